"""The soak's workloads: real tools on the mount, each one mirrored on a local oracle.

Each workload owns one directory of the mount (its *area*, `MOUNT/<name>`) and the same
directory of the oracle (a plain local directory).  A round works in a fresh
subdirectory `rN` and runs a few steps; a step that succeeds on the mount is
acknowledged and is then done on the oracle too, so the oracle always holds what the
mount acknowledged and, once everything is flushed, the server must equal it.  A
round that fails half-way (an outage, a killed daemon, a full cache disk) leaves the
failed step's part of it (its *scope*) unknown: once the mount answers again, what
the round acknowledged outside that scope must still read back as acknowledged (a
*survival check*: what a crash or an outage lost shows here), then the round is
removed on both sides (`rm -rf` on the mount, retried until the mount acknowledges
it).  Rounds older than the last `KEEP` are checked and removed the same way.

Every command runs with its working directory in the area on the mount (and paths
relative to it): while the daemon is dead and the mount point is bare, a command
cannot start, and one running when the daemon dies fails (ENOTCONN) instead of
writing to the local directory under the mount point.

Read checks compare what the mount returns with the oracle (`diff -r`); a difference
is a wrong byte read, counted apart from errors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KEEP = 2                   # rounds kept per workload; older ones are removed
STEP_TIMEOUT = 600.0       # a step still running after this is killed (and reported)
GIT_ENV = {"GIT_AUTHOR_NAME": "soak", "GIT_AUTHOR_EMAIL": "soak@example.org",
           "GIT_COMMITTER_NAME": "soak", "GIT_COMMITTER_EMAIL": "soak@example.org",
           "GIT_AUTHOR_DATE": "2024-01-01T00:00:00Z",
           "GIT_COMMITTER_DATE": "2024-01-01T00:00:00Z",
           "GIT_CONFIG_NOSYSTEM": "1", "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"}
GIT_SOURCES = ("email", "json", "http", "urllib", "xml", "logging")
TAR_SOURCES = ("asyncio", "unittest", "concurrent", "importlib")
TAR_FLAGS = ("--format=gnu", "--sort=name", "--mtime=@1700000000", "--owner=0",
             "--group=0", "--numeric-owner")
UNCHECKED = frozenset({"index"})   # git's index holds stat data: content not compared
# What a git step may change (a step's scope: fnmatch patterns relative to the round).
GIT_STATUS = ["repo/.git/index", "repo/.git/*.lock"]
GIT_ADD = [*GIT_STATUS, "repo/.git/objects/[0-9a-f][0-9a-f]"]
GIT_COMMIT = [*GIT_ADD, "repo/.git/refs", "repo/.git/logs", "repo/.git/HEAD",
              "repo/.git/ORIG_HEAD", "repo/.git/COMMIT_EDITMSG", "repo/.git/packed-refs"]


@dataclass(frozen=True)
class User:
    """Who runs a workload's commands (setpriv drops root's privileges)."""

    uid: int
    gid: int

    @property
    def label(self) -> str:
        return "root" if self.uid == 0 else f"uid {self.uid}"

    def prefix(self) -> list[str]:
        if self.uid == 0:
            return []
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups",
                "--"]


ROOT = User(0, 0)


@dataclass
class Done:
    """How one command ended."""

    rc: int | None            # None: it could not start, or was killed at the timeout
    seconds: float
    out: str = ""
    hung: bool = False

    @property
    def ok(self) -> bool:
        return self.rc == 0

    def why(self) -> str:
        if self.hung:
            return f"killed after {self.seconds:.0f} s"
        lines = self.out.strip().splitlines()
        return f"exit {self.rc}: {lines[-1][:160] if lines else ''}"


class Shell:
    """Runs commands as a user in a directory, each in its own session, killed (with
    its whole process group) at a timeout, or all at once by `kill_running`."""

    def __init__(self, env: dict[str, str], timeout: float = STEP_TIMEOUT) -> None:
        self.env = env
        self.timeout = timeout
        self._running: set[subprocess.Popen[bytes]] = set()
        self._lock = threading.Lock()

    def kill_running(self) -> None:
        """Kill every command running now (the soak ends: their steps are abandoned)."""
        with self._lock:
            for proc in self._running:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)

    def run(self, argv: list[str], cwd: Path, user: User = ROOT,
            timeout: float | None = None) -> Done:
        start = time.monotonic()
        try:
            proc = subprocess.Popen([*user.prefix(), *argv], cwd=cwd, env=self.env,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as exc:      # e.g. cwd is gone: the mount is down
            return Done(None, 0.0, f"cannot start in {cwd}: {exc.strerror}")
        with self._lock:
            self._running.add(proc)
        try:
            out, _ = proc.communicate(timeout=timeout or self.timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.communicate(timeout=30)
            return Done(None, time.monotonic() - start, hung=True)
        finally:
            with self._lock:
                self._running.discard(proc)
        return Done(proc.returncode, time.monotonic() - start,
                    out.decode(errors="replace")[-4000:])


ALL = ["*"]         # a step's scope: every path of the round


class StepFailed(Exception):
    """A step of a round did not succeed on the mount: what it may have changed (its
    scope: fnmatch patterns relative to the round's directory) is unknown."""

    def __init__(self, step: str, done: Done, scope: list[str] | None = None) -> None:
        super().__init__(f"{step}: {done.why()}")
        self.step = step
        self.done = done
        self.scope = ALL if scope is None else scope


class Abandoned(StepFailed):
    """The soak ends: the round stops (a step still running was killed: its scope is
    unknown)."""

    def __init__(self, scope: list[str] | None = None) -> None:
        super().__init__("soak ending", Done(0, 0.0), [] if scope is None else scope)


class ReadMismatch(Exception):
    """The mount returned bytes or a tree that differ from the oracle's."""


class HarnessError(Exception):
    """The oracle side failed: a bug in the soak itself."""


@dataclass
class Stats:
    """What one workload did."""

    rounds_ok: int = 0
    rounds_failed: int = 0
    rounds_abandoned: int = 0
    steps_ok: int = 0
    steps_failed: int = 0
    unexpected: list[str] = field(default_factory=list)   # failed with no fault near
    seconds: dict[str, list[float]] = field(default_factory=dict)  # step: count, mean, max
    hung: list[str] = field(default_factory=list)
    removals: int = 0
    removal_retries: int = 0
    read_mismatches: list[str] = field(default_factory=list)
    survival_checks: int = 0
    lost: list[str] = field(default_factory=list)      # acknowledged, then gone or changed
    lost_bytes: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    unresolved: list[tuple[str, list[str]]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def timed(self, step: str, seconds: float) -> None:
        n, mean, top = self.seconds.get(step, [0, 0.0, 0.0])
        self.seconds[step] = [n + 1, (mean * n + seconds) / (n + 1), max(top, seconds)]

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["errors"] = dict(self.errors.most_common(8))
        return d


@dataclass
class Ctx:
    """Where the workloads run and what they share."""

    mount: Path            # the mount point (its root is the soak's export directory)
    oracle: Path           # the oracle's root
    sources: Path          # local inputs: the tarball, the tree to copy, the git repo
    shell: Shell
    stop: threading.Event
    scale: float = 1.0     # < 1 for short runs: smaller rounds
    faults: Callable[[float, float], bool] = lambda a, b: False  # any fault in [a, b]?
    alive: Callable[[], bool] = lambda: True                     # is a daemon serving?


class Workload:
    """Base: rounds in `rN` subdirectories of the area, until `ctx.stop` is set."""

    name = ""
    pause = 2.0            # seconds between rounds

    def __init__(self, ctx: Ctx, user: User = ROOT) -> None:
        self.ctx = ctx
        self.user = user
        self.stats = Stats()
        self.pending: list[tuple[str, list[str]]] = []   # rounds to remove, unknown scope
        self.round_no = 0

    @property
    def area(self) -> Path:
        return self.ctx.mount / self.name

    @property
    def oracle(self) -> Path:
        return self.ctx.oracle / self.name

    def setup(self, server_area: Path) -> None:
        """Create the area on the server's disk and in the oracle (before mounting)."""
        for d in (server_area, self.oracle):
            d.mkdir(parents=True, exist_ok=True)
            os.chown(d, self.user.uid, self.user.gid)

    # -- steps

    def on_mount(self, what: str, argv: list[str], scope: list[str], *,
                 user: User | None = None, timeout: float | None = None) -> Done:
        """A step on the mount; StepFailed (with `scope`) unless it succeeds."""
        self.stopping()
        done = self.ctx.shell.run(argv, self.area, user or self.user, timeout)
        if done.hung:
            self.stats.hung.append(f"{what} (round {self.round_no})")
        if not done.ok:
            raise StepFailed(what, done, scope)
        self.stats.steps_ok += 1
        self.stats.timed(what, done.seconds)
        return done

    def on_oracle(self, what: str, argv: list[str]) -> None:
        done = self.ctx.shell.run(argv, self.oracle, self.user, timeout=600)
        if not done.ok:
            raise HarnessError(f"{self.name}: oracle {what}: {done.why()}")

    def both(self, what: str, argv: list[str], scope: list[str], *,
             timeout: float | None = None) -> None:
        """A mutating step that may change `scope`: on the mount, then (acknowledged)
        on the oracle."""
        self.on_mount(what, argv, scope, timeout=timeout)
        self.on_oracle(what, argv)

    def compare(self, rel: str, exclude: tuple[str, ...] = ()) -> None:
        """Read check: `rel` on the mount equals `rel` on the oracle (diff -r)."""
        argv = ["diff", "-r", "--no-dereference", "-q"]
        for x in exclude:
            argv += ["-x", x]
        argv += [rel, str(self.oracle / rel)]
        done = self.ctx.shell.run(argv, self.area, self.user)
        if done.rc == 1:
            raise ReadMismatch(f"{rel}: {done.out.strip().splitlines()[:3]}")
        if not done.ok:
            raise StepFailed(f"diff {rel}", done, [])
        self.stats.steps_ok += 1

    def stopping(self) -> None:
        """Between steps: give the round up when the soak ends (it is then removed)."""
        if self.ctx.stop.is_set():
            raise Abandoned

    # -- rounds

    def round(self, rel: str) -> None:
        """One round in the fresh directory `rel` (already made on both sides)."""
        raise NotImplementedError

    def run(self) -> None:
        """Rounds until the soak stops, then remove what is left to remove."""
        while not self.ctx.stop.is_set():
            self.round_no += 1
            rel = f"r{self.round_no}"
            try:
                self.both("mkdir", ["mkdir", rel], ALL)
                self.round(rel)
                self.stats.rounds_ok += 1
            except StepFailed as exc:
                if isinstance(exc, Abandoned) or self.ctx.stop.is_set():
                    self.stats.rounds_abandoned += 1     # killed at the end: not a failure
                else:
                    self._failed(exc)
                self.pending.append((rel, exc.scope))
            except ReadMismatch as exc:
                self.stats.read_mismatches.append(f"round {self.round_no}: {exc}")
                self.stats.rounds_failed += 1
                self.pending.append((rel, ALL))    # counted once: as a wrong read
            old = f"r{self.round_no - KEEP}"
            if self.round_no > KEEP and (self.oracle / old).exists() \
                    and all(rel != old for rel, _ in self.pending):
                self.pending.append((old, []))
            self.remove_pending()
            self.ctx.stop.wait(self.pause)
        self.finish()

    def _failed(self, exc: StepFailed) -> None:
        self.stats.rounds_failed += 1
        self.stats.steps_failed += 1
        kind = f"{exc.step}: {_kind_of(exc.done)}"
        self.stats.errors[kind] += 1
        now = time.time()
        if self.ctx.alive() and not self.ctx.faults(now - exc.done.seconds, now):
            self.stats.unexpected.append(f"round {self.round_no}: {kind} "
                                         f"({exc.done.why()[:200]})")

    def remove_pending(self) -> None:
        """Check, then `rm -rf`, each pending round on the mount; once the mount
        acknowledged the removal, remove it from the oracle."""
        for rel, scope in list(self.pending):
            if scope != ALL and not self.survives(rel, scope):
                self.stats.removal_retries += 1
                continue
            done = self.ctx.shell.run(["rm", "-rf", "--", rel], self.area, ROOT)
            if done.ok:
                shutil.rmtree(self.oracle / rel, ignore_errors=True)
                self.pending.remove((rel, scope))
                self.stats.removals += 1
            else:
                self.pending[self.pending.index((rel, scope))] = (rel, ALL)   # checked
                self.stats.removal_retries += 1

    def survives(self, rel: str, scope: list[str]) -> bool:
        """Survival check of a round: True once it ran (a loss is recorded), False if
        the mount could not be read (try again later)."""
        done = self.ctx.shell.run([sys.executable, "-m", "bench.soak_workloads", "survive",
                                   rel, str(self.oracle / rel), json.dumps(scope)],
                                  self.area, ROOT, timeout=300)
        try:
            res = json.loads(done.out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return False
        self.stats.survival_checks += 1
        for item in res["lost"]:
            self.stats.lost.append(f"round {rel[1:]}: {item}")
        self.stats.lost_bytes += res["lost_bytes"]
        return True

    def finish(self, seconds: float = 150.0) -> None:
        """At the end (faults over): retry removals until they succeed or time is up."""
        deadline = time.monotonic() + seconds
        while self.pending and time.monotonic() < deadline and self.ctx.alive():
            self.remove_pending()
            if self.pending:
                time.sleep(2)
        self.stats.unresolved = list(self.pending)


def _kind_of(done: Done) -> str:
    """A short error class for counting: the last line's errno text, or hung."""
    if done.hung:
        return "hung"
    if done.rc is None:
        return "could not start (mount down)"
    for key in ("Transport endpoint is not connected", "Input/output error",
                "No space left on device", "Connection timed out", "Stale file handle",
                "Permission denied", "No such file or directory", "Timer expired",
                "Read-only file system", "Software caused connection abort",
                "Disk quota exceeded", "File exists", "Directory not empty"):
        if key in done.out:
            return key
    lines = done.out.strip().splitlines()
    return lines[0][-80:] if lines else f"exit {done.rc}"


# --------------------------------------------------------------------------- workloads


class TarInOut(Workload):
    """`tar x` of a stdlib tarball into the mount, `tar c` of it back into the mount."""

    name = "tar"

    def round(self, rel: str) -> None:
        tarball = str(self.ctx.sources / "stdlib.tar")
        self.both("mkdir", ["mkdir", f"{rel}/x"], ["x"])
        self.both("tar x", ["tar", "-xf", tarball, "-C", f"{rel}/x"], ["x"])
        self.stopping()
        self.both("tar c", ["tar", "-cf", f"{rel}/out.tar", *TAR_FLAGS, "-C", f"{rel}/x", "."],
                  ["out.tar"])
        self.compare(rel)


class CopyTree(Workload):
    """`cp -a` of a few thousand small files (with symlinks and hard links)."""

    name = "cp"

    def round(self, rel: str) -> None:
        self.both("cp -a", ["cp", "-a", str(self.ctx.sources / "tree"), f"{rel}/copy"],
                  ["copy"])
        self.stopping()
        self.compare(rel)


class Git(Workload):
    """`git clone` of a local repository, `status`, a commit of changed files, `status`."""

    name = "git"

    def round(self, rel: str) -> None:
        repo = f"{rel}/repo"
        self.both("git clone", ["git", "clone", "-q", "--no-hardlinks",
                                str(self.ctx.sources / "repo.git"), repo], ["repo"])
        self._clean(repo)
        self.stopping()
        for i in range(5):
            path = f"repo/{GIT_SOURCES[i]}/__init__.py"
            line = f"# round {self.round_no} change {i}"
            self.both("edit", ["sh", "-c", f'echo "{line}" >> "$1"', "sh", f"{rel}/{path}"],
                      [path])
        self.both("git add", ["git", "-C", repo, "add", "-A"], GIT_ADD)
        self.both("git commit", ["git", "-C", repo, "commit", "-q", "-m",
                                 f"round {self.round_no}"], GIT_COMMIT)
        self._clean(repo)
        self.compare(rel, exclude=tuple(UNCHECKED))

    def _clean(self, repo: str) -> None:
        done = self.on_mount("git status", ["git", "-C", repo, "status", "--porcelain"],
                             GIT_STATUS)
        if done.out.strip():
            raise ReadMismatch(f"git status on the mount is not clean: {done.out[:200]!r}")


class Fio(Workload):
    """fio random writes of 4 KiB blocks whose content is their offset, verified by
    fio itself (it reads every block back) and then against the oracle."""

    name = "fio"

    def round(self, rel: str) -> None:
        mib = max(2, int(8 * self.ctx.scale))
        argv = ["fio", "--name=soak", f"--directory={rel}", "--rw=randwrite", "--bs=4k",
                f"--size={mib}M", "--nrfiles=4", "--ioengine=psync", "--verify=pattern",
                "--verify_pattern=%o", "--do_verify=1", f"--randseed={self.round_no}",
                "--verify_state_save=0", "--output=/dev/null"]
        done = self.ctx.shell.run(argv, self.area, self.user)
        if not done.ok:
            if "bad pattern" in done.out.lower():
                raise ReadMismatch(f"fio verify: {done.out.strip().splitlines()[-1][:200]}")
            raise StepFailed("fio", done, ALL)
        self.stats.steps_ok += 1
        self.on_oracle("fio", argv)
        self.compare(rel)


class Dbench(Workload):
    """Debian's dbench (file-server load) for a while, then its directory removed."""

    name = "dbench"

    def round(self, rel: str) -> None:
        seconds = max(5, int(20 * self.ctx.scale))
        self.on_mount("dbench", ["dbench", "-t", str(seconds), "-D", rel, "2"], ALL,
                      timeout=seconds + STEP_TIMEOUT)
        self.both("rm -rf", ["rm", "-rf", "--", rel], ALL)


class ModelOps(Workload):
    """The model checker's random operations (bench/modelops.py), compared op by op
    with the oracle, in a child process (`python -m bench.soak_workloads model`).
    Differences in a round that overlapped a fault are expected (an error on the
    mount, success on the oracle): they are only noted, and the round is removed as
    unknown."""

    name = "model"

    def round(self, rel: str) -> None:
        began = time.time()
        seconds = max(5.0, 20 * self.ctx.scale)
        done = self.on_mount("modelops", [
            sys.executable, "-m", "bench.soak_workloads", "model", rel,
            str(self.oracle / rel), str(self.round_no), str(seconds), str(self.user.uid),
            str(self.user.gid)], ALL, user=ROOT, timeout=seconds + STEP_TIMEOUT)
        try:
            found = json.loads(done.out.strip().splitlines()[-1])["mismatches"]
        except (ValueError, IndexError, KeyError):
            raise StepFailed("modelops", done, ALL) from None
        if found and self.ctx.faults(began, time.time()):
            self.stats.notes.append(f"round {self.round_no} (during a fault): {found[0]}")
            raise StepFailed("modelops", Done(1, time.time() - began,
                                              "differed during a fault"), ALL)
        if found:
            raise ReadMismatch(f"modelops: {found[0]}")


def model_round(mount_dir: str, oracle_dir: str, seed: int, seconds: float,
                uid: int, gid: int) -> dict[str, Any]:
    """Child process: one random_workload run; its op count and mismatches."""
    modelops = importlib.import_module("bench.modelops")   # another helper's module
    res = modelops.random_workload(Path(mount_dir), Path(oracle_dir), seed=seed,
                                   seconds=seconds, user=(uid, gid))
    return {"ops": res.ops, "mismatches": [str(m) for m in res.mismatches]}


def modelops_available() -> str:
    """'' if bench.modelops can run, else why not."""
    try:
        modelops = importlib.import_module("bench.modelops")
    except ImportError as exc:
        return f"bench.modelops not available ({exc})"
    if not hasattr(modelops, "random_workload"):
        return "bench.modelops has no random_workload yet"
    return ""


# --------------------------------------------------------------------------- sources


def make_sources(dest: Path, users: dict[str, User], scale: float) -> None:
    """The local inputs: a stdlib tarball, a tree of small files, a git repository."""
    stdlib = Path(__import__("sysconfig").get_paths()["stdlib"])
    dest.mkdir(parents=True, exist_ok=True)
    _tarball(stdlib, dest / "stdlib.tar")
    _tree(dest / "tree", int(2000 * scale), users.get("cp", ROOT))
    _git_repo(stdlib, dest / "git-src", dest / "repo.git")
    for p in (dest, dest / "tree"):
        p.chmod(0o755)


def _py_files(stdlib: Path, packages: tuple[str, ...]) -> list[Path]:
    return sorted(p for pkg in packages for p in (stdlib / pkg).rglob("*.py")
                  if "__pycache__" not in p.parts and "test" not in p.parts)


def _tarball(stdlib: Path, path: Path) -> None:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for p in _py_files(stdlib, TAR_SOURCES):
            info = tar.gettarinfo(str(p), arcname=str(p.relative_to(stdlib)))
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mode = 0o644
            with p.open("rb") as f:
                tar.addfile(info, f)
    path.chmod(0o644)


def _tree(root: Path, files: int, owner: User) -> None:
    rng = random.Random(14)
    for i in range(files):
        p = root / f"d{i % 40:02d}" / f"f{i:05d}.txt"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(rng.randbytes(rng.randrange(0, 4096)))
        p.chmod(rng.choice((0o644, 0o600, 0o755)))
    for i in range(20):
        (root / f"d{i:02d}" / f"link{i}").symlink_to(f"f{i:05d}.txt")
        os.link(root / f"d{i:02d}" / f"f{i:05d}.txt", root / f"d{i:02d}" / f"hard{i}")
    for p in [root, *root.rglob("*")]:
        os.chown(p, owner.uid, owner.gid, follow_symlinks=False)


def _git_repo(stdlib: Path, work: Path, bare: Path) -> None:
    env = {**os.environ, **GIT_ENV, "HOME": str(work.parent)}
    for p in _py_files(stdlib, GIT_SOURCES):
        dst = work / p.relative_to(stdlib)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, dst)

    def git(*args: str, cwd: Path = work) -> None:
        subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True)

    git("init", "-q", "-b", "main")
    git("add", "-A")
    git("commit", "-q", "-m", "stdlib")
    git("clone", "-q", "--bare", str(work), str(bare), cwd=work.parent)
    for p in [bare, *bare.rglob("*")]:
        p.chmod(p.stat().st_mode | 0o555 if p.is_dir() else p.stat().st_mode | 0o444)


# --------------------------------------------------------------------------- shared files


def shared_content(name: str, version: int) -> bytes:
    """Version `version` of shared file `name`: a header naming both, then seeded bytes."""
    rng = random.Random(f"{name}/{version}")
    head = f"{name} v{version}\n".encode()
    return head + rng.randbytes(rng.randrange(16, 128) * 1024)


def check_shared(data: bytes) -> str:
    """'' if `data` is one whole version of a shared file, else what is wrong."""
    head = data.partition(b"\n")[0]
    try:
        name, v = head.decode().rsplit(" v", 1)
        want = shared_content(name, int(v))
    except (UnicodeDecodeError, ValueError):
        return f"no header ({len(data)} bytes, starts {data[:24]!r})"
    if data != want:
        return (f"{name} v{v}: {len(data)} bytes, want {len(want)} "
                f"(sha {hashlib.sha256(data).hexdigest()[:12]})")
    return ""


class SharedReader(Workload):
    """Reads every file another client keeps changing and deleting (through NFS, not
    through this mount): each read must return one whole version, old or new."""

    name = "shared"
    pause = 1.0

    def run(self) -> None:
        while not self.ctx.stop.is_set():
            self.round_no += 1
            done = self.ctx.shell.run([sys.executable, "-m", "bench.soak_workloads",
                                       "read-shared"], self.area, self.user, timeout=120)
            if done.hung:
                self.stats.hung.append(f"read-shared (round {self.round_no})")
            if self.ctx.stop.is_set():
                break
            try:
                report = json.loads(done.out.strip().splitlines()[-1])
            except (ValueError, IndexError):
                self.stats.rounds_failed += 1
                self.stats.errors[_kind_of(done)] += 1
            else:
                self.stats.rounds_ok += 1
                self.stats.steps_ok += report["read"]
                for e in report["errors"]:
                    self.stats.errors[e] += 1
                for bad in report["bad"]:
                    self.stats.read_mismatches.append(f"round {self.round_no}: {bad}")
            self.ctx.stop.wait(self.pause)


def read_shared(directory: Path) -> dict[str, Any]:
    """Child process: read every file of `directory`; what was read, failed, wrong."""
    out: dict[str, Any] = {"read": 0, "errors": [], "bad": []}
    for name in sorted(os.listdir(directory)):
        try:
            data = (directory / name).read_bytes()
        except OSError as exc:
            if exc.errno != 2:       # deleted meanwhile: fine
                out["errors"].append(exc.strerror or str(exc))
            continue
        out["read"] += 1
        if problem := check_shared(data):
            out["bad"].append(f"{name}: {problem}")
    return out


WORKLOADS: dict[str, type[Workload]] = {w.name: w for w in (
    TarInOut, CopyTree, Git, Fio, Dbench, ModelOps, SharedReader)}


def survive(rel: str, oracle: str, scope: list[str]) -> dict[str, Any]:
    """Child process: what of the acknowledged round (`oracle`) outside `scope` the mount
    (`rel`) no longer holds as acknowledged.  OSError if the mount cannot be read."""
    from bench import soak_verify
    want = soak_verify.snapshot(Path(oracle), UNCHECKED)
    have = soak_verify.snapshot(Path(rel), UNCHECKED) if Path(rel).exists() else {}
    want, have = soak_verify.excuse(want, have, "", scope)
    have = {p: e for p, e in have.items() if p in want}      # new files: not our business
    d = soak_verify.compare(rel, want, have)
    return {"lost": d.missing[:20] + d.changed[:20], "lost_bytes": d.lost_bytes}


def main(argv: list[str] | None = None) -> int:
    """Child entry points, run in a directory of the mount:
    `python -m bench.soak_workloads read-shared`,
    `python -m bench.soak_workloads model DIR ORACLE SEED SECONDS UID GID` and
    `python -m bench.soak_workloads survive DIR ORACLE SCOPE_JSON`."""
    args = sys.argv[1:] if argv is None else argv
    try:
        if args == ["read-shared"]:
            out = read_shared(Path("."))
        elif len(args) == 7 and args[0] == "model":
            out = model_round(args[1], args[2], int(args[3]), float(args[4]), int(args[5]),
                              int(args[6]))
        elif len(args) == 4 and args[0] == "survive":
            out = survive(args[1], args[2], json.loads(args[3]))
        else:
            print("usage: python -m bench.soak_workloads read-shared | model DIR ORACLE "
                  "SEED SECONDS UID GID | survive DIR ORACLE SCOPE_JSON", file=sys.stderr)
            return 2
    except (OSError, RuntimeError) as exc:
        print(f"bench.soak_workloads: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
