"""The bench driver: how much faster is wancache than NFS across the WAN, and how far
from the best the link allows?

`python -m bench.run [--profile branch|lan|far] [--rtt-ms N --mbit N] [--quick]
[--out DIR] [--only WORKLOAD,...] [--configs CONFIG,...] [--markdown]`

It starts a private nfs-ganesha, writes each workload's data into its export, puts a
WAN emulator in front of its NFS and MOUNT ports, and runs every workload under each
configuration: a wancache mount with default options, one with `cache=off` (the
baseline), the Python-FUSE floor (`bench.passthrough` over a local copy of the data:
no WAN, no caching logic), libnfs-utils, and the computed physical limit.  Every step
runs in a child process that is killed at the step timeout.  Mounts, emulators and the
server are always torn down, also on errors and Ctrl-C.  See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

from bench import report
from bench.nfsserver import NfsServer, NfsServerError, start_server
from bench.passthrough import PassthroughMount
from bench.wanem import PROFILES, LinkProfile, WanEmulatorThread
from bench.wcmount import FuseChild, WancacheMount, is_mounted
from bench.workloads import (
    CMD_ENV,
    FULL,
    QUICK,
    QUICK_WORKLOADS,
    WORKLOADS,
    Op,
    Result,
    Sizes,
    Step,
    Workload,
)
from wancache.nfs_backend.nfs3 import Proc

REPO = Path(__file__).resolve().parent.parent
CONFIGS = ("wancache", "cache=off", "floor", "libnfs", "limit")
ALIASES = {"default": "wancache", "passthrough": "cache=off", "pass-through": "cache=off",
           "cache-off": "cache=off"}
MOUNT_OPTIONS = {"wancache": (), "cache=off": ("cache=off",)}
RUN_ORDER = ("floor", "cache=off", "wancache", "libnfs")     # "limit" is computed
SLUGS = {"wancache": "wancache", "cache=off": "cache-off", "floor": "floor",
         "libnfs": "libnfs"}
STEP_TIMEOUT, QUICK_STEP_TIMEOUT = 15.0, 5.0
GRACE = 5.0          # a child op stops itself at the timeout; killed this much later
POLL = 0.02
NFS, MOUNT = 100003, 100005


class UsageError(Exception):
    """A bad command line (exit 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


@dataclass
class Settings:
    """What to run, parsed from the command line."""

    profile: str
    link: LinkProfile
    quick: bool
    sizes: Sizes
    workloads: list[Workload]
    configs: list[str]
    out: Path
    step_timeout: float
    markdown: bool

    def want(self, workload: Workload) -> frozenset[str]:
        """The steps of `workload` this run measures."""
        return frozenset(s.name for s in workload.steps(self.sizes)
                         if s.quick or not self.quick)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", default="branch", help="lan, branch (default) or far")
    p.add_argument("--rtt-ms", type=float, help="round-trip time in ms (overrides profile)")
    p.add_argument("--mbit", type=float, help="bandwidth each way in Mbit/s (overrides)")
    p.add_argument("--quick", action="store_true",
                   help=f"small data, workloads {','.join(QUICK_WORKLOADS)}, about a minute")
    p.add_argument("--out", type=Path, default=Path("bench-results"),
                   help="directory for the JSON, the chart and daemon logs")
    p.add_argument("--only", help=f"workloads to run, of {','.join(WORKLOADS)}")
    p.add_argument("--configs", help=f"configurations, of {','.join(CONFIGS)} (default all)")
    p.add_argument("--step-timeout", type=float,
                   help=f"seconds per step (default {STEP_TIMEOUT:g}, quick "
                        f"{QUICK_STEP_TIMEOUT:g})")
    p.add_argument("--markdown", action="store_true", help="print the table as markdown")
    return p


def _names(text: str, known: tuple[str, ...], what: str,
           aliases: dict[str, str] | None = None) -> list[str]:
    names = []
    for raw in text.split(","):
        name = (aliases or {}).get(raw.strip(), raw.strip())
        if name not in known:
            raise UsageError(f"unknown {what} {raw.strip()!r}; choose from {', '.join(known)}")
        if name not in names:
            names.append(name)
    return names


def parse_args(argv: list[str] | None) -> Settings:
    """Settings from the command line; UsageError if bad."""
    args = build_parser().parse_args(argv)
    if args.profile not in PROFILES:
        raise UsageError(f"unknown profile {args.profile!r}; choose from "
                         f"{', '.join(PROFILES)}")
    link, profile = PROFILES[args.profile], args.profile
    if args.rtt_ms is not None:
        if not args.rtt_ms >= 0:
            raise UsageError("--rtt-ms must be >= 0")
        link, profile = dataclasses.replace(link, rtt_ms=args.rtt_ms), "custom"
    if args.mbit is not None:
        if not args.mbit > 0:
            raise UsageError("--mbit must be > 0")
        link, profile = dataclasses.replace(link, up_mbit=args.mbit, down_mbit=args.mbit), \
            "custom"
    if args.step_timeout is not None and not args.step_timeout > 0:
        raise UsageError("--step-timeout must be > 0")
    default = QUICK_WORKLOADS if args.quick else tuple(WORKLOADS)
    only = _names(args.only, tuple(WORKLOADS), "workload") if args.only else list(default)
    configs = (_names(args.configs, CONFIGS, "config", ALIASES) if args.configs
               else list(CONFIGS))
    return Settings(
        profile=profile, link=link, quick=args.quick, sizes=QUICK if args.quick else FULL,
        workloads=[WORKLOADS[n] for n in WORKLOADS if n in only],
        configs=[c for c in CONFIGS if c in configs], out=args.out,
        step_timeout=args.step_timeout or (QUICK_STEP_TIMEOUT if args.quick else STEP_TIMEOUT),
        markdown=args.markdown)


# --------------------------------------------------------------------------- processes


@dataclass
class Outcome:
    """How a child process ended."""

    status: str                  # ok | timeout | error
    seconds: float | None = None
    done: int | None = None
    error: str = ""


def _last_line(data: bytes) -> str:
    lines = data.decode(errors="replace").strip().splitlines()
    return lines[-1].strip() if lines else ""


class Runner:
    """Runs timed operations in child processes (own session) and kills overruns."""

    def __init__(self, timeout: float, env: dict[str, str]) -> None:
        self.timeout = timeout
        self.env = env

    def run(self, op: Op) -> Outcome:
        if op.kind == "cmd":
            return self._command(op.args["argv"])
        return self._python(op)

    def _spawn(self, argv: list[str], stdin: int, stdout: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen(argv, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE,
                                env=self.env, start_new_session=True)

    def _wait(self, proc: subprocess.Popen[bytes], timeout: float,
              stdin: bytes | None = None) -> tuple[bytes, bytes] | None:
        """Output of `proc`, or None if it was killed for overrunning `timeout`."""
        try:
            return proc.communicate(stdin, timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            return None
        except BaseException:
            kill_group(proc)
            raise

    def _command(self, argv: list[str]) -> Outcome:
        if shutil.which(argv[0], path=self.env.get("PATH")) is None:
            return Outcome("error", error=f"{argv[0]} not found")
        start = time.perf_counter()
        proc = self._spawn(argv, subprocess.DEVNULL, subprocess.DEVNULL)
        out = self._wait(proc, self.timeout)
        if out is None:
            return Outcome("timeout", self.timeout)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            return Outcome("error", seconds, error=f"{Path(argv[0]).name} exited "
                                                   f"{proc.returncode}: {_last_line(out[1])}")
        return Outcome("ok", seconds)

    def _python(self, op: Op) -> Outcome:
        argv = [sys.executable, "-m", "bench.workloads"]
        proc = self._spawn(argv, subprocess.PIPE, subprocess.PIPE)
        out = self._wait(proc, self.timeout + op.runs_for + GRACE,
                         op.to_json(self.timeout).encode())
        if out is None:
            return Outcome("timeout", self.timeout + op.runs_for)
        try:
            data = json.loads(_last_line(out[0]))
        except ValueError:
            return Outcome("error", error=f"{op.kind} exited {proc.returncode}: "
                                          f"{_last_line(out[1])}")
        if "error" in data:
            return Outcome("error", error=str(data["error"]))
        return Outcome("timeout" if data["timeout"] else "ok", data["seconds"], data["done"])


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process group that `proc` leads, and reap `proc`."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.communicate(timeout=10)


# --------------------------------------------------------------------------- WAN


def _proc_name(prog: int, proc: int) -> str:
    if prog == NFS:
        with contextlib.suppress(ValueError):
            return Proc(proc).name
    return f"{'MOUNT' if prog == MOUNT else prog}.{proc}"


class Wan:
    """Two WAN emulators in front of the server: its NFS port and its MOUNT port."""

    def __init__(self, server: NfsServer, link: LinkProfile, stack: ExitStack) -> None:
        self.nfs = stack.enter_context(WanEmulatorThread(("127.0.0.1", server.nfs_port), link))
        self.mount = stack.enter_context(
            WanEmulatorThread(("127.0.0.1", server.mount_port), link))

    def reset(self) -> None:
        self.nfs.reset_counts()
        self.mount.reset_counts()

    def calls(self) -> dict[str, int]:
        """Calls since the last reset, by procedure name (MOUNT ones prefixed)."""
        out: dict[str, int] = {}
        for emu in (self.nfs, self.mount):
            for (prog, _vers, proc), n in emu.counts.items():
                name = _proc_name(prog, proc)
                out[name] = out.get(name, 0) + n
        return out

    def stats(self) -> dict[str, int]:
        """Calls and bytes that crossed the emulated link since the last reset."""
        snaps = [self.nfs.snapshot(), self.mount.snapshot()]
        return {k: sum(int(s[k]) for s in snaps) for k in ("calls", "bytes_up", "bytes_down")}


# --------------------------------------------------------------------------- contexts


def one_line(exc: BaseException, limit: int = 200) -> str:
    """`Type: first line of the message`, at most `limit` characters."""
    text = str(exc).strip().splitlines()
    line = f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")
    return line if len(line) <= limit else line[:limit - 3] + "..."


class _Context:
    """What both contexts share: recording results of a workload under one config."""

    def __init__(self, bench: Bench, workload: Workload, config: str) -> None:
        self.bench = bench
        self.config = config
        self.server_dir = bench.server.export / workload.name / SLUGS[config]
        self.root = self.server_dir
        self.scratch = bench.scratch
        self.results: list[Result] = []
        self._started = 0.0

    def url(self, rel: str) -> str:
        path = f"{self.server_dir}/{rel}".rstrip("/")
        query = urllib.parse.urlencode({"nfsport": self.bench.wan.nfs.port,
                                        "mountport": self.bench.wan.mount.port,
                                        "version": 3})
        return f"nfs://127.0.0.1{urllib.parse.quote(path)}?{query}"

    def _reset(self) -> None:
        self.bench.wan.reset()

    def _collect(self, res: Result) -> None:
        res.wan = self.bench.wan.stats()

    def measure(self, step: Step, op: Op) -> Result:
        self._reset()
        self._started = time.monotonic()
        out = self.bench.runner.run(op)
        done = step.total if out.status == "ok" and out.done is None else out.done
        return self._record(Result(step.workload, step.name, self.config, out.status,
                                   out.seconds, done, step.total, error=out.error))

    def wait_until(self, step: Step, done: Callable[[], bool]) -> Result:
        last = self.results[-1]
        res = Result(step.workload, step.name, self.config, last.status, last.seconds,
                     None, step.total, error=last.error)
        if last.status == "ok":
            deadline = time.monotonic() + self.bench.settings.step_timeout
            while not done():
                if time.monotonic() > deadline:
                    res.status = "timeout"
                    break
                time.sleep(POLL)
            res.seconds = time.monotonic() - self._started
            res.done = step.total if res.status == "ok" else None
        return self._record(res)

    def _record(self, res: Result) -> Result:
        try:
            self._collect(res)
        except Exception as exc:
            if res.status != "error":
                res.status, res.error = "error", f"collecting counters: {one_line(exc)}"
        self.results.append(res)
        self.bench.progress(res)
        return res

    def remount(self) -> None:
        raise NotImplementedError

    def drop_kernel_caches(self) -> None:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")

    def pause(self, seconds: float) -> None:
        time.sleep(seconds)


class MountContext(_Context):
    """A workload's directory mounted by wancache over the emulated WAN."""

    def __init__(self, bench: Bench, workload: Workload, config: str) -> None:
        super().__init__(bench, workload, config)
        name = f"{workload.name}-{SLUGS[config]}"
        self.root = bench.workdir / "mnt" / name
        self.log = bench.settings.out / "logs" / f"{name}.log"
        self.spec = bench.server.spec(f"{workload.name}/{SLUGS[config]}")
        self.options = [f"nfsport={bench.wan.nfs.port}", f"mountport={bench.wan.mount.port}",
                        f"cache_dir={bench.workdir / 'cache' / name}", "metrics=off",
                        *MOUNT_OPTIONS.get(config, ()), *workload.mount_options]
        self.mount: FuseChild | None = None

    def _make_mount(self) -> FuseChild:
        return WancacheMount(self.spec, self.root, self.options, log_path=self.log)

    def __enter__(self) -> MountContext:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.log.unlink(missing_ok=True)
        self._mount()
        return self

    def __exit__(self, *exc: object) -> None:
        self._unmount()

    def _mount(self) -> None:
        self.mount = self._make_mount()
        try:
            self.mount.start()
        except BaseException:
            self.mount.kill()
            self.mount = None
            raise

    def _unmount(self) -> None:
        mount, self.mount = self.mount, None
        if mount is None:
            return
        try:
            mount.unmount()
        except BaseException:
            mount.kill()
            raise

    def remount(self) -> None:
        self._unmount()
        self._mount()

    def _reset(self) -> None:
        super()._reset()
        assert isinstance(self.mount, WancacheMount)
        self.mount.reset_rpc_calls()

    def _collect(self, res: Result) -> None:
        super()._collect(res)
        assert isinstance(self.mount, WancacheMount)
        res.rpcs = dict(self.mount.rpc_calls())
        res.peak_rss = self.mount.peak_rss()


class FloorContext(MountContext):
    """The Python-FUSE floor: `bench.passthrough` over the workload's data on local
    disk (the config's own copy in the export directory; no WAN, no NFS)."""

    def _make_mount(self) -> FuseChild:
        return PassthroughMount(self.server_dir, self.root, log_path=self.log)

    def _reset(self) -> None:
        pass

    def _collect(self, res: Result) -> None:
        assert self.mount is not None
        res.peak_rss = self.mount.peak_rss()


class LibnfsContext(_Context):
    """libnfs-utils talking NFS across the emulated WAN themselves."""

    def _collect(self, res: Result) -> None:
        super()._collect(res)
        res.rpcs = self.bench.wan.calls()


# --------------------------------------------------------------------------- the run


def machine_info() -> dict[str, Any]:
    """CPU model, cores, kernel, Python and the wancache commit."""
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    commit = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=10,
                                check=False).stdout.strip()
    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(),
            "python": platform.python_version(), "commit": commit}


class Bench:
    """One run: the server, the WAN, the data, and the results of every step."""

    def __init__(self, settings: Settings, stack: ExitStack) -> None:
        self.settings = settings
        self.workdir = Path(tempfile.mkdtemp(prefix="wancache-bench-"))
        stack.callback(self._remove_workdir)
        self.scratch = self.workdir / "scratch"
        self.scratch.mkdir()
        env = {**os.environ, **CMD_ENV, "HOME": str(self.scratch),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO),
                                                           os.environ.get("PYTHONPATH")]))}
        self.runner = Runner(settings.step_timeout, env)
        self.server = start_server(workdir=self.workdir / "ganesha")
        stack.callback(self.server.close)
        self.wan: Wan
        self.results: list[Result] = []
        self._stack = stack
        self._t0 = time.monotonic()

    def _remove_workdir(self) -> None:
        mnt = self.workdir / "mnt"
        for d in (mnt.iterdir() if mnt.is_dir() else ()):
            if is_mounted(d):
                subprocess.run(["fusermount3", "-uz", str(d)], capture_output=True,
                               check=False)
        if not any(is_mounted(d) for d in (mnt.iterdir() if mnt.is_dir() else ())):
            shutil.rmtree(self.workdir, ignore_errors=True)

    def configs_of(self, workload: Workload) -> list[str]:
        """The configurations that run (rather than compute) `workload`."""
        steps = [s for s in workload.steps(self.settings.sizes)
                 if s.name in self.settings.want(workload)]
        return [c for c in RUN_ORDER if c in self.settings.configs
                and (c != "libnfs" or any(s.libnfs for s in steps))]

    def steps(self) -> list[tuple[str, Step]]:
        sizes = self.settings.sizes
        return [(w.title(sizes), s) for w in self.settings.workloads for s in w.steps(sizes)
                if s.name in self.settings.want(w)]

    def progress(self, res: Result) -> None:
        """One line on stderr per finished step."""
        shown = report.fmt_seconds(res.seconds) if res.seconds is not None else ""
        elapsed = time.monotonic() - self._t0
        print(f"[{elapsed:5.0f} s] {res.workload + '/' + res.step:<24} {res.config:<9} "
              f"{res.status:<7} {shown} {res.error}".rstrip(), file=sys.stderr, flush=True)

    def run(self) -> list[Result]:
        """Generate all data, then run every workload under every configuration."""
        failed: dict[str, str] = {}
        for w in self.settings.workloads:
            try:
                for config in self.configs_of(w):
                    w.generate(self.server.export / w.name / SLUGS[config], self.scratch,
                               self.settings.sizes, config == "libnfs")
            except Exception as exc:
                failed[w.name] = f"generating data: {one_line(exc)}"
        self.wan = Wan(self.server, self.settings.link, self._stack)
        for w in self.settings.workloads:
            for config in self.configs_of(w):
                self._run_one(w, config, failed.get(w.name))
        return self.results

    def _run_one(self, workload: Workload, config: str, error: str | None) -> None:
        sizes, want = self.settings.sizes, self.settings.want(workload)
        steps = [s for s in workload.steps(sizes) if s.name in want]
        ctx: _Context | None = None
        if error is None:
            try:
                if config == "libnfs":
                    ctx = LibnfsContext(self, workload, config)
                    workload.run_libnfs(ctx, sizes, frozenset(s.name for s in steps if s.libnfs))
                else:
                    kind = FloorContext if config == "floor" else MountContext
                    with kind(self, workload, config) as mctx:
                        ctx = mctx
                        workload.run(mctx, sizes, want)
            except Exception as exc:
                error = one_line(exc)
        done = ctx.results if ctx else []
        recorded = {r.step: r for r in done}
        missing = [s for s in steps if s.name not in recorded
                   and (config != "libnfs" or s.libnfs)]
        if error is not None and not missing and done and done[-1].status != "error":
            done[-1].status, done[-1].error = "error", error   # e.g. the unmount failed
        for step in steps:
            res = recorded.get(step.name)
            if res is None:
                status = "error" if step in missing else "n/a"
                res = Result(step.workload, step.name, config, status, total=step.total,
                             error="" if status == "n/a" else error or "step did not run")
                if status == "error":
                    self.progress(res)
            self.results.append(res)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Run the bench; 0 if every step ran (timeouts included), 1 on errors, 2 on usage."""
    try:
        settings = parse_args(argv)
    except UsageError as exc:
        print(f"python -m bench.run: error: {exc}", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("python -m bench.run: must run as root (it mounts FUSE and drops kernel "
              "caches)", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _interrupt)
    started, t0 = datetime.now(), time.monotonic()
    try:
        with ExitStack() as stack:
            bench = Bench(settings, stack)
            results = bench.run()
            steps = bench.steps()
    except KeyboardInterrupt:
        print("python -m bench.run: interrupted; everything was unmounted and stopped",
              file=sys.stderr)
        return 130
    except (NfsServerError, OSError, RuntimeError) as exc:
        print(f"python -m bench.run: {one_line(exc)}", file=sys.stderr)
        return 1
    meta = {
        "bench": "wancache", "version": 1, "profile": settings.profile,
        "link": dataclasses.asdict(settings.link), "link_text": settings.link.describe(),
        "quick": settings.quick, "step_timeout": settings.step_timeout,
        "sizes": dataclasses.asdict(settings.sizes), "configs": settings.configs,
        "workloads": [w.name for w in settings.workloads], "machine": machine_info(),
        "started": started.isoformat(timespec="seconds"),
        "wall_seconds": time.monotonic() - t0,
        "notes": [f"{w.name}: mounted with {','.join(w.mount_options)} so the lease "
                  "expires quickly" for w in settings.workloads if w.mount_options],
    }
    rep = report.Report(meta, report.derive(results, steps, settings.link, settings.configs,
                                            settings.profile))
    paths = report.write(rep, settings.out, started.strftime("%Y%m%d-%H%M%S"))
    print(report.markdown_table(rep) if settings.markdown else report.text_table(rep))
    print(f"\nwrote {', '.join(str(p) for p in paths)}")
    if rep.errors:
        print(f"python -m bench.run: {len(rep.errors)} step(s) failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
