"""The soak: real workloads for a long time through the WAN emulator, with faults, inside
fixed memory and disk; at the end the server must equal what the workloads acknowledged.

`python -m bench.soak --minutes M [--profile branch] [--faults F,...] [--out DIR]`

A private nfs-ganesha exports a fresh directory; two WAN emulators sit in front of its
NFS and MOUNT ports; wancache mounts it with its cache_dir on a small loop-mounted
ext4 file system.  The workloads (`bench.soak_workloads`: tar, cp -a, git, fio,
dbench, the model checker's random operations, a reader of files another client
changes; as root and as uids 1001 and 1002) run all at once, each mirrored on a
local oracle, while `bench.soak_faults` injects faults one at a time.  At the end it
flushes, reads the server through a `cache=off` mount (`bench.soak_verify`), looks
into `cache_dir/lost+found`, and prints and plots what the sampler recorded
(`bench.soak_report`).  Exit status: 0 if every check passed, 1 if one failed, 2 on
bad arguments.  See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

from bench import soak_report, soak_verify
from bench.nfsserver import NfsServerError, start_server
from bench.run import machine_info
from bench.soak_faults import FAULTS, Event, FaultLog, Injector, plan
from bench.soak_other import SHARED, TMP, OtherClient
from bench.soak_workloads import (
    GIT_ENV,
    KEEP,
    ROOT,
    STEP_TIMEOUT,
    UNCHECKED,
    WORKLOADS,
    Ctx,
    Shell,
    User,
    Workload,
    make_sources,
    modelops_available,
)
from bench.wanem import PROFILES, LinkProfile, WanEmulatorThread
from bench.wcmount import MountFailed, WancacheMount
from wancache.config import parse_size

MIB = 1 << 20
RSS_BOUND = 200 * MIB
JOURNAL_SEGMENT = 64 * MIB       # a journal segment (wancache/cache/journal.py)
SOAK = "soak"                    # the export directory the mount serves
USERS = {"tar": User(1002, 1002), "cp": User(1001, 1001), "git": User(1001, 1001),
         "model": User(1002, 1002), "shared": User(1002, 1002), "fio": ROOT, "dbench": ROOT}
FLUSH_TIMEOUT = 600.0


class UsageError(Exception):
    """A bad command line (exit 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


@dataclass
class Settings:
    """What to run, from the command line."""

    minutes: float
    profile: str
    link: LinkProfile
    faults: list[str]
    workloads: list[str]
    out: Path
    cache_size: int
    max_dirty: int
    cache_disk: int
    options: list[str]
    interval: float
    seed: int
    markdown: bool
    report: Path | None = None

    @property
    def seconds(self) -> float:
        return self.minutes * 60

    @property
    def cache_dir_cap(self) -> int:
        """cache_size plus the journal's cap: max_dirty and one segment being written."""
        return self.cache_size + self.max_dirty + JOURNAL_SEGMENT

    @property
    def scale(self) -> float:
        """Round sizes: full from 10 minutes on, smaller for short runs (CI)."""
        return min(1.0, max(0.25, self.minutes / 10))


def _names(text: str, known: list[str], what: str) -> list[str]:
    if text in ("all", ""):
        return list(known) if text == "all" else []
    out = []
    for name in (n.strip() for n in text.split(",")):
        if name not in known:
            raise UsageError(f"unknown {what} {name!r}; choose from {', '.join(known)}")
        if name not in out:
            out.append(name)
    return out


def parse_args(argv: list[str] | None) -> Settings:
    p = _Parser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=30.0, help="how long the load runs")
    p.add_argument("--profile", default="branch", help="lan, branch (default) or far")
    p.add_argument("--faults", default="all",
                   help=f"faults to inject, in turn: all or some of {','.join(FAULTS)}")
    p.add_argument("--workloads", default="all",
                   help=f"workloads: all or some of {','.join(WORKLOADS)}")
    p.add_argument("--out", type=Path, default=Path("soak-results"))
    p.add_argument("--cache-size", default="128M", help="the mount's cache_size")
    p.add_argument("--max-dirty", default="64M", help="the mount's max_dirty")
    p.add_argument("--cache-disk", default="1G", help="size of the cache_dir file system")
    p.add_argument("-o", "--options", default="", help="more mount options, comma-separated")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between samples")
    p.add_argument("--seed", type=int, default=14)
    p.add_argument("--markdown", action="store_true", help="print the tables as markdown")
    p.add_argument("--report", type=Path, metavar="JSON",
                   help="print the report of a saved run (its JSON) and exit")
    a = p.parse_args(argv)
    if not a.minutes > 0:
        raise UsageError("--minutes must be > 0")
    if a.profile not in PROFILES:
        raise UsageError(f"unknown profile {a.profile!r}; choose from {', '.join(PROFILES)}")
    if not a.interval > 0:
        raise UsageError("--interval must be > 0")
    try:
        cache_size, max_dirty = parse_size(a.cache_size), parse_size(a.max_dirty)
        cache_disk = parse_size(a.cache_disk)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return Settings(minutes=a.minutes, profile=a.profile, link=PROFILES[a.profile],
                    faults=_names(a.faults, list(FAULTS), "fault"),
                    workloads=_names(a.workloads, list(WORKLOADS), "workload"), out=a.out,
                    cache_size=cache_size, max_dirty=max_dirty, cache_disk=cache_disk,
                    options=[o for o in a.options.split(",") if o], interval=a.interval,
                    seed=a.seed, markdown=a.markdown, report=a.report)


# --------------------------------------------------------------------------- the setup


def last_error(log: str) -> str:
    """The last exception line of a daemon's log (or its last line)."""
    lines = [line.strip(" |") for line in log.splitlines() if line.strip(" |")]
    found = [line for line in lines if re.match(r"[\w.]+(Error|Exception|Exit)\b.*:", line)]
    return (found or lines or [""])[-1][:300]


def run_cmd(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise OSError(f"{' '.join(argv)}: {proc.stderr.strip()[-200:]}")


class SoakEnv:
    """The server, the WAN, the cache disk and the mount; the faults act on them."""

    def __init__(self, settings: Settings, stack: ExitStack) -> None:
        self.s = settings
        self.workdir = Path(tempfile.mkdtemp(prefix="wancache-soak-"))
        self.workdir.chmod(0o755)
        stack.callback(self._remove_workdir)
        self.server = start_server(export=self.workdir / "export",
                                   workdir=self.workdir / "ganesha")
        stack.callback(self.server.close)
        self.soak_dir = self.server.export / SOAK
        self.soak_dir.mkdir(mode=0o755)
        self.emus = [stack.enter_context(WanEmulatorThread(("127.0.0.1", port), settings.link))
                     for port in (self.server.nfs_port, self.server.mount_port)]
        self.cache_fs = self.workdir / "cachefs"
        self.cache_fs.mkdir()
        self.disk_note = self._mount_cache_disk(settings.cache_disk)
        stack.callback(self._umount_cache_disk)
        self.cache_dir = self.cache_fs / "cache"
        self.mountpoint = self.workdir / "mnt"
        self.mountpoint.mkdir()
        # A bare mount point (the daemon dead) must not take writes meant for the mount.
        self.protected = subprocess.run(["chattr", "+i", str(self.mountpoint)],
                                        capture_output=True, check=False).returncode == 0
        stack.callback(self._unprotect)
        self.log_path = settings.out / "logs" / "wancache.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path.unlink(missing_ok=True)
        self.lock = threading.Lock()
        self.mount: WancacheMount | None = None
        self.killing = False
        self.crashes = 0
        self.gone = ""           # why the mount could not be brought back (ends the soak)
        self.other: OtherClient | None = None
        stack.callback(self._stop_mount)

    def options(self) -> list[str]:
        return [f"nfsport={self.emus[0].port}", f"mountport={self.emus[1].port}",
                f"cache_dir={self.cache_dir}", f"cache_size={self.s.cache_size}",
                f"max_dirty={self.s.max_dirty}", "metrics=off", *self.s.options]

    def start_mount(self) -> float:
        """Mount (or mount again with the same cache_dir); seconds it took."""
        began = time.monotonic()
        self.mount = WancacheMount(self.server.spec(SOAK), self.mountpoint, self.options(),
                                   log_path=self.log_path)
        self.mount.start(timeout=120)
        return time.monotonic() - began

    def daemon(self) -> tuple[int | None, Path]:
        """The running daemon's pid (None while there is none) and the mount point."""
        m = self.mount
        pid = m.proc.pid if m is not None and m.proc is not None else None
        return pid, self.mountpoint

    def _mount_cache_disk(self, size: int) -> str:
        image = self.workdir / "cache.img"
        with image.open("wb") as f:
            f.truncate(size)
        try:
            run_cmd(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)])
            run_cmd(["mount", "-o", "loop", str(image), str(self.cache_fs)])
            return f"ext4 on a loop device, {size // MIB} MiB"
        except OSError:
            image.unlink()
            run_cmd(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(self.cache_fs)])
            return f"tmpfs, {size // MIB} MiB (no loop device)"

    def _umount_cache_disk(self) -> None:
        subprocess.run(["umount", str(self.cache_fs)], capture_output=True, check=False)

    def _unprotect(self) -> None:
        subprocess.run(["chattr", "-i", str(self.mountpoint)], capture_output=True,
                       check=False)

    def _stop_mount(self) -> None:
        m, self.mount = self.mount, None
        if m is None:
            return
        try:
            m.unmount(timeout=90)
        except MountFailed:
            m.kill()

    def _remove_workdir(self) -> None:
        with open("/proc/mounts") as f:
            busy = [line.split()[1] for line in f if line.split()[1].startswith(
                str(self.workdir))]
        if not busy:
            shutil.rmtree(self.workdir, ignore_errors=True)
        else:
            print(f"bench.soak: left {self.workdir} (still mounted: {busy})", file=sys.stderr)

    # -- what the faults do

    def wan_down(self, down: bool) -> None:
        for emu in self.emus:
            emu.stop() if down else emu.start()

    def wan_stall(self, on: bool) -> None:
        for emu in self.emus:
            emu.stall(on)

    def restart_server(self) -> str:
        began = time.monotonic()
        self.server.restart()
        return f"answering again after {time.monotonic() - began:.1f} s"

    def kill_and_remount(self) -> str:
        with self.lock:
            assert self.mount is not None
            self.killing = True
            try:
                self.mount.kill()
                return f"remounted in {self._remount():.1f} s"
            finally:
                self.killing = False

    def _remount(self) -> float:
        """start_mount; if the daemon refuses, MountFailed with the reason it logged."""
        try:
            return self.start_mount()
        except MountFailed as exc:
            self.mount = None
            self.gone = f"the remount failed: {last_error(str(exc))}"
            raise MountFailed(self.gone) from None

    def alive(self) -> bool:
        m = self.mount
        return m is not None and m.proc is not None and m.proc.poll() is None

    def fill_cache_disk(self) -> str:
        chunk = b"\0" * 64 * 1024
        fd = os.open(self.cache_fs / "ballast", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with contextlib.suppress(OSError):
                sv = os.statvfs(self.cache_fs)
                os.posix_fallocate(fd, 0, max(MIB, sv.f_bavail * sv.f_frsize - MIB))
            written = os.fstat(fd).st_size
            try:
                while True:                  # the last blocks, until the disk says no
                    written += os.pwrite(fd, chunk, written)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
            os.fsync(fd)
        finally:
            os.close(fd)
        sv = os.statvfs(self.cache_fs)
        return (f"ballast of {written // MIB} MiB; {sv.f_bavail * sv.f_frsize // 1024} KiB "
                "left")

    def free_cache_disk(self) -> str:
        (self.cache_fs / "ballast").unlink(missing_ok=True)
        return "ballast removed"

    def other_burst(self, ops: int) -> str:
        if self.other is None:
            return "no other client"
        self.other.burst(ops)
        return f"{ops} changes"

    def check_daemon(self) -> str:
        """Remount if the daemon died by itself (not killed by a fault): what happened."""
        with self.lock:
            m = self.mount
            if self.killing or m is None or m.proc is None or m.proc.poll() is None:
                return ""
            rc = m.proc.returncode
            self.crashes += 1
            why = last_error(m.log())
            m.kill()
            try:
                took = self._remount()
            except MountFailed as exc:
                return f"the daemon exited {rc} by itself ({why}); {exc}"
            return f"the daemon exited {rc} by itself ({why}); remounted in {took:.1f} s"

    def verify_mount(self) -> WancacheMount:
        """A cache=off mount straight to the server (no WAN): the server as it is."""
        return WancacheMount(self.server.spec(SOAK), self.workdir / "verify",
                             [f"nfsport={self.server.nfs_port}",
                              f"mountport={self.server.mount_port}", "cache=off",
                              "metrics=off"], log_path=self.s.out / "logs" / "verify.log")

    def url(self, rel: str) -> str:
        return self.server.url(f"{SOAK}/{rel}")


# --------------------------------------------------------------------------- the run


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


class Soak:
    """One soak: the workloads, the faults, the sampler; then flush, verify, check."""

    def __init__(self, settings: Settings, env: SoakEnv) -> None:
        self.s = settings
        self.env = env
        self.stop = threading.Event()
        self.t0 = time.time()
        self.log = FaultLog(self.t0)
        self.notes: list[str] = []
        home = env.workdir / "home"
        home.mkdir(mode=0o777)
        home.chmod(0o777)
        shell_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
                     "LC_ALL": "C", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        self.ctx = Ctx(env.mountpoint, env.workdir / "oracle", env.workdir / "sources",
                       Shell({**shell_env, **GIT_ENV}), self.stop, settings.scale,
                       self.log.overlaps, env.alive)
        self.workloads: list[Workload] = []
        for name in settings.workloads:
            if name == "model" and (why := modelops_available()):
                self.notes.append(f"workload model skipped: {why}")
                continue
            self.workloads.append(WORKLOADS[name](self.ctx, USERS[name]))

    def prepare(self) -> None:
        """Inputs, areas, the shared files: all before the mount comes up."""
        users = {w.name: w.user for w in self.workloads}
        make_sources(self.ctx.sources, users, self.s.scale)
        git_user = users.get("git", ROOT)
        for p in [self.ctx.sources / "repo.git", *(self.ctx.sources / "repo.git").rglob("*")]:
            os.chown(p, git_user.uid, git_user.gid)
        self.ctx.oracle.mkdir(mode=0o755)
        for w in self.workloads:
            w.setup(self.env.soak_dir / w.name)
        self.env.other = OtherClient(self.env.server, SOAK, files=20, seed=self.s.seed)
        self.env.other.setup(self.env.soak_dir)
        self.env.start_mount()

    def run(self) -> dict[str, Any]:
        self.prepare()
        self.t0 = self.log.t0 = time.time()
        sampler = soak_report.Sampler(self.env.daemon, self.env.cache_dir, self.t0,
                                      self.s.interval)
        injector = Injector(self.env, plan(self.s.faults, self.s.seconds), self.log,
                            self.stop)
        assert self.env.other is not None
        other = threading.Thread(target=self.env.other.run, args=(self.stop, 2.0),
                                 name="other-client", daemon=True)
        threads = [threading.Thread(target=w.run, name=w.name, daemon=True)
                   for w in self.workloads]
        for t in (sampler, injector, other, *threads):
            t.start()
        try:
            deadline = self.t0 + self.s.seconds
            while time.time() < deadline and injector.error is None and not self.env.gone:
                time.sleep(min(1.0, max(0.0, deadline - time.time())))
        finally:
            self.stop.set()
            ended = time.time() - self.t0
            self.ctx.shell.kill_running()      # steps in flight are abandoned
            injector.join(timeout=300)
            for t in threads:
                t.join(timeout=STEP_TIMEOUT + 240)
            other.join(timeout=180)
        if injector.error is not None:
            self.notes.append(f"fault injection failed: {injector.error!r}")
        if self.env.gone:
            self.notes.append(f"the soak ended early: {self.env.gone}")
        if note := self.env.check_daemon():
            self.log.end(ev := self.log.begin("crash"))
            ev.notes.append(note)
        after = self._flush()
        sampler.stop.set()
        sampler.join(timeout=60)
        after["sample"] = dataclasses.asdict(sampler.take())
        diffs = self._verify()
        return self._result(sampler.samples, diffs, after, ended,
                            stuck=[t.name for t in (*threads, other) if t.is_alive()],
                            injector_error=injector.error)

    def _flush(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ok": False}
        m = self.env.mount
        began = time.monotonic()
        if m is None:
            out["error"] = "no daemon to flush (the mount is gone)"
        else:
            try:
                m.flush(timeout=FLUSH_TIMEOUT)
                out["ok"] = True
            except Exception as exc:
                out["error"] = f"{type(exc).__name__}: {exc}"[:300]
        out["seconds"] = round(time.monotonic() - began, 1)
        with contextlib.suppress(Exception):
            assert m is not None
            out["status"] = m.request("status", timeout=10)
        out["journal_bytes"] = soak_report.du(self.env.cache_dir / "journal")
        lost = self.env.cache_dir / "lost+found"
        out["lost_found"] = sorted(os.listdir(lost)) if lost.is_dir() else []
        return out

    def _verify(self) -> list[soak_verify.Diff]:
        vm = self.env.verify_mount()
        diffs: list[soak_verify.Diff] = []
        with vm:
            root = vm.mountpoint
            for w in self.workloads:
                if w.name == "shared":
                    continue
                want = soak_verify.snapshot(w.oracle, UNCHECKED)
                have = soak_verify.snapshot(root / w.name, UNCHECKED)
                for rel, scope in w.stats.unresolved:     # known only outside the scope
                    want, have = soak_verify.excuse(want, have, rel, scope)
                d = soak_verify.compare(w.name, want, have)
                soak_verify.libnfs_check(d, functools.partial(self._url, w.name), want)
                diffs.append(d)
            assert self.env.other is not None
            diffs.append(soak_verify.compare_bytes(SHARED, self.env.other.expected(),
                                                   root / SHARED))
            diffs.append(soak_verify.compare_bytes(TMP, {}, root / TMP))
            top = soak_verify.Diff("/")
            top.extra = sorted(set(os.listdir(root)) - {w.name for w in self.workloads}
                               - {SHARED, TMP})
            diffs.append(top)
        return diffs

    def _url(self, area: str, rel: str) -> str:
        return self.env.url(f"{area}/{rel}")

    def _result(self, samples: list[soak_report.Sample], diffs: list[soak_verify.Diff],
                after: dict[str, Any], ended: float, stuck: list[str],
                injector_error: BaseException | None) -> dict[str, Any]:
        checks = self._checks(samples, diffs, after, stuck, injector_error)
        return {
            "soak": "wancache", "version": 1, "profile": self.s.profile,
            "link": dataclasses.asdict(self.s.link), "link_text": self.s.link.describe(),
            "minutes": self.s.minutes, "load_seconds": round(ended, 1),
            "faults": self.s.faults, "workloads": [w.name for w in self.workloads],
            "users": {w.name: w.user.label for w in self.workloads},
            "options": self.env.options(), "cache_disk": self.env.disk_note,
            "mountpoint_protected": self.env.protected,
            "bounds": {"rss": RSS_BOUND, "cache_dir": self.s.cache_dir_cap,
                       "cache_size": self.s.cache_size, "max_dirty": self.s.max_dirty,
                       "journal_segment": JOURNAL_SEGMENT},
            "machine": machine_info(), "notes": self.notes,
            "events": [dataclasses.asdict(e) for e in self.log.events],
            "workload_stats": {w.name: w.stats.to_json() for w in self.workloads},
            "other_client": self._other_json(),
            "after_flush": after, "daemon_log": log_summary(self.env.log_path),
            "diffs": [dataclasses.asdict(d) for d in diffs],
            "checks": [dataclasses.asdict(c) for c in checks],
            "samples": soak_report.samples_json(samples),
        }

    def _other_json(self) -> dict[str, Any]:
        o = self.env.other
        if o is None:
            return {}
        return {"ops": dict(o.ops), "errors": dict(o.errors), "unknown": sorted(o.unknown),
                "files": len(o.expected())}

    def _checks(self, samples: list[soak_report.Sample], diffs: list[soak_verify.Diff],
                after: dict[str, Any], stuck: list[str],
                injector_error: BaseException | None) -> list[Check]:
        out = []
        peaks = [(s.hwm or s.rss or 0, s.t) for s in samples]
        peak, at = max(peaks, default=(0, 0.0))
        out.append(Check(f"daemon RSS <= {RSS_BOUND // MIB} MiB throughout",
                         peak <= RSS_BOUND and bool(samples),
                         f"peak {peak / MIB:.0f} MiB (VmHWM) at {at / 60:.1f} min"))
        top, at = max(((s.cache_dir, s.t) for s in samples), default=(0, 0.0))
        cap = self.s.cache_dir_cap
        out.append(Check(f"cache_dir <= cache_size + journal cap ({cap // MIB} MiB) "
                         "throughout", top <= cap,
                         f"largest {top / MIB:.0f} MiB at {at / 60:.1f} min"))
        lost = sum(d.lost_bytes for d in diffs) + sum(w.stats.lost_bytes
                                                        for w in self.workloads)
        acked = sum(d.bytes for d in diffs)
        files = sum(d.files for d in diffs)
        during = [f"{w.name}: {item}" for w in self.workloads for item in w.stats.lost]
        checked = sum(w.stats.survival_checks for w in self.workloads)
        out.append(Check("0 acknowledged bytes lost", lost == 0 and not during,
                         f"{lost} bytes lost; at the end {acked} bytes in {files} files "
                         f"acknowledged; {checked} rounds checked before removal"
                         + (f"; lost on the way: {'; '.join(during)[:1200]}" if during
                            else "")))
        unequal = [line for d in diffs for line in d.lines(3)]
        out.append(Check("the server equals what the workloads acknowledged", not unequal,
                         "; ".join(unequal)[:1500] or "every area, every file"))
        wrong = [f"{w.name}: {m}" for w in self.workloads for m in w.stats.read_mismatches]
        out.append(Check("no wrong byte read through the mount", not wrong,
                         "; ".join(wrong)[:1500] or "every read check agreed"))
        failed = [f"{w.name}: {u}" for w in self.workloads for u in w.stats.unexpected]
        out.append(Check("every step with no fault near it succeeded", not failed,
                         "; ".join(failed)[:1500] or "all"))
        out.append(Check("nothing in cache_dir/lost+found", not after["lost_found"],
                         ", ".join(after["lost_found"][:10]) or "empty"))
        out.append(Check("flush completed", after["ok"],
                         f"{after['seconds']} s" + (f": {after['error']}"
                                                    if "error" in after else "")))
        hung = [f"{w.name}: {h}" for w in self.workloads for h in w.stats.hung]
        out.append(Check(f"no step hung (killed after {STEP_TIMEOUT:.0f} s)",
                         not hung and not stuck,
                         "; ".join(hung + [f"{t} did not stop" for t in stuck]) or "none"))
        unresolved = [f"{w.name}/{r}" for w in self.workloads for r, _ in w.stats.unresolved]
        out.append(Check("every failed round could be removed", not unresolved,
                         ", ".join(unresolved) or f"all (the last {KEEP} rounds kept)"))
        out.append(Check("the daemon never died by itself", self.env.crashes == 0,
                         f"{self.env.crashes} times"))
        out.append(Check("every remount (after a kill or a crash) worked", not self.env.gone,
                         self.env.gone or "all"))
        out.append(Check("every fault was injected", injector_error is None,
                         "" if injector_error is None else repr(injector_error)[:300]))
        return out


def log_summary(path: Path) -> dict[str, Any]:
    """Counts of warnings, errors and tracebacks in the daemon's log, and a few lines."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return {}
    pick = [line for line in lines if " ERROR " in line or "Traceback" in line]
    return {"warnings": sum(" WARNING " in line for line in lines),
            "errors": sum(" ERROR " in line for line in lines),
            "tracebacks": sum("Traceback" in line for line in lines),
            "first_errors": pick[:5]}


# --------------------------------------------------------------------------- output


def render(res: dict[str, Any], markdown: bool) -> str:
    """The report: header, the table over time, faults, workloads, checks."""
    m = res["machine"]
    samples = [soak_report.Sample(**s) for s in res["samples"]]
    events = [Event(**e) for e in res["events"]]
    width = 30.0 if res["minutes"] <= 10 else 60.0 if res["minutes"] <= 60 else 300.0
    rows = soak_report.buckets(samples, events, width)
    b = res["bounds"]
    lines = [
        f"wancache soak: profile {res['profile']} ({res['link_text']}), {_load(res)}, "
        f"faults: {', '.join(res['faults']) or 'none'}",
        f"machine: {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}, Python "
        f"{m['python']}; wancache {m['commit'] or 'unknown commit'}",
        f"mount: cache_size={b['cache_size'] // MIB}M, max_dirty={b['max_dirty'] // MIB}M; "
        f"cache_dir on {res['cache_disk']}; bounds: RSS {b['rss'] // MIB} MiB, cache_dir "
        f"{b['cache_dir'] // MIB} MiB", "",
        soak_report.markdown(rows) if markdown else soak_report.table(rows), "",
        "faults:"]
    for e in res["events"]:
        end = f"{e['end']:.0f}" if e["end"] is not None else "?"
        lines.append(f"  {e['start']:6.0f}-{end:>5} s  {e['name']:<16} {'; '.join(e['notes'])}")
    lines += ["", "workloads: rounds ok/failed, steps ok/failed, wrong reads, slowest steps "
              "(mean/max s); errors seen:"]
    for name, st in res["workload_stats"].items():
        errors = ", ".join(f"{k} x{v}" for k, v in st["errors"].items())
        slow = sorted(st["seconds"].items(), key=lambda kv: -kv[1][1])[:2]
        times = ", ".join(f"{k} {v[1]:.1f}/{v[2]:.0f}" for k, v in slow)
        lines.append(f"  {name:<7} {res['users'][name]:<8} {st['rounds_ok']:>4}/"
                     f"{st['rounds_failed']:<4} {st['steps_ok']:>5}/{st['steps_failed']:<4} "
                     f"{len(st['read_mismatches']):>2}  {times}")
        if errors:
            lines.append(f"          {errors[:200]}")
    o = res["other_client"]
    lines.append(f"  other client (NFS, straight to the server): {o.get('ops')}, errors "
                 f"{o.get('errors')}")
    a = res["after_flush"]
    st = a.get("status", {}).get("writeback", {})
    lines += ["", f"after the flush: journal/ {a['journal_bytes'] // 1024} KiB on disk, "
              f"dirty {st.get('dirty_bytes')} bytes, pending {st.get('pending_ops')}; "
              f"daemon log: {res['daemon_log'].get('warnings')} warnings, "
              f"{res['daemon_log'].get('errors')} errors, "
              f"{res['daemon_log'].get('tracebacks')} tracebacks"]
    lines += [f"note: {n}" for n in res["notes"]]
    lines += ["", "checks:"]
    for c in res["checks"]:
        lines.append(f"  {'PASS' if c['ok'] else 'FAIL'}  {c['name']}: {c['detail']}")
    return "\n".join(lines)


def _load(res: dict[str, Any]) -> str:
    """'30 min of load', or '4.7 of 30 min of load' when it ended early."""
    ran = res["load_seconds"] / 60
    if ran < res["minutes"] * 0.95:
        return f"{ran:.1f} of {res['minutes']:g} min of load (ended early)"
    return f"{res['minutes']:g} min of load"


def write(res: dict[str, Any], out: Path, stamp: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"soak-{res['profile']}-{stamp}.json"
    data.write_text(json.dumps(res, indent=1) + "\n")
    shutil.copyfile(data, out / "latest.json")
    png = out / f"soak-{res['profile']}.png"
    soak_report.plot([soak_report.Sample(**s) for s in res["samples"]],
                     [Event(**e) for e in res["events"]],
                     {"rss": res["bounds"]["rss"], "cache_dir": res["bounds"]["cache_dir"]},
                     f"wancache soak, profile {res['profile']} ({res['link_text']}), "
                     f"{_load(res)}", png, res["load_seconds"])
    return [data, out / "latest.json", png]


def reprint(path: Path, markdown: bool) -> int:
    """Print the report of a saved run."""
    try:
        res = json.loads(path.read_text())
        print(render(res, markdown))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"python -m bench.soak: cannot read {path}: {exc}", file=sys.stderr)
        return 1
    return 0 if all(c["ok"] for c in res["checks"]) else 1


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Run the soak; 0 if every check passed, 1 if not, 2 on usage errors."""
    try:
        settings = parse_args(argv)
    except UsageError as exc:
        print(f"python -m bench.soak: error: {exc}", file=sys.stderr)
        return 2
    if settings.report is not None:
        return reprint(settings.report, settings.markdown)
    if os.geteuid() != 0:
        print("python -m bench.soak: must run as root (it mounts FUSE and a loop device)",
              file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _interrupt)
    os.umask(0o022)
    started = datetime.now()
    try:
        with ExitStack() as stack:
            env = SoakEnv(settings, stack)
            res = Soak(settings, env).run()
            res["started"] = started.isoformat(timespec="seconds")
    except KeyboardInterrupt:
        print("python -m bench.soak: interrupted; everything was unmounted and stopped",
              file=sys.stderr)
        return 130
    except (NfsServerError, OSError, MountFailed) as exc:
        print(f"python -m bench.soak: {type(exc).__name__}: {str(exc)[:300]}",
              file=sys.stderr)
        return 1
    paths = write(res, settings.out, started.strftime("%Y%m%d-%H%M%S"))
    print(render(res, settings.markdown))
    print(f"\nwrote {', '.join(str(p) for p in paths)}")
    return 0 if all(c["ok"] for c in res["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
