"""The bench's workloads: the data each one needs, what it does, what the WAN must carry.

Every workload writes its own data into a directory on the server's disk from a fixed
seed (`Workload.generate`), before any client has looked at it.  It then runs its
steps through a `Context`: a wancache mount, or libnfs-utils over the emulated WAN.
Each `Step` states the least the link must carry (`Need`: round trips and bytes),
from which the report computes the physical limit, and the target wancache is
measured against, if any.

Timed Python operations run in a child process, so that the driver can kill one
that overruns: `python -m bench.workloads < OP_JSON` prints the outcome as JSON.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from bench.wanem import LinkProfile

SEED = 20240917
MIB = 1 << 20
OLD_MTIME = 1_704_067_200   # 2024-01-01: generated files predate the git index
DIRENT_BYTES = 150          # a READDIRPLUS entry without its name: fileid, attrs, handle
LEASE = 3.0                 # the ls workload mounts with actimeo=LEASE
CMD_ENV = {"LC_ALL": "C", "GIT_CONFIG_NOSYSTEM": "1", "GIT_OPTIONAL_LOCKS": "0"}


# --------------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class Sizes:
    """How much data each workload uses."""

    seq_mib: int = 64
    rand_mib: int = 64
    rand_reads: int = 2000
    ls_entries: int = 2000
    tree_dirs: int = 50
    tree_files: int = 2000
    untar_files: int = 1000
    untar_dirs: int = 10
    untar_kib: int = 4
    git_files: int = 2000
    git_dirs: int = 40
    units: int = 100
    headers: int = 12
    include_dirs: int = 6
    includes_per_unit: int = 8
    header_kib: int = 8
    source_kib: int = 4
    object_kib: int = 64
    readers: int = 16
    reader_mib: int = 4
    dbench_clients: int = 4
    dbench_seconds: int = 20


FULL = Sizes()
QUICK = replace(FULL, seq_mib=8, rand_mib=8, rand_reads=200, ls_entries=300, tree_dirs=10,
                tree_files=200, untar_files=200, untar_dirs=4, git_files=200, git_dirs=10,
                units=10, reader_mib=1, dbench_seconds=6)


# --------------------------------------------------------------------------- steps


@dataclass(frozen=True)
class Need:
    """The least a step must carry across the WAN: dependent round trips and bytes."""

    rtts: float = 0.0
    down: int = 0     # bytes server -> client
    up: int = 0       # bytes client -> server

    def seconds(self, link: LinkProfile) -> float:
        """Time on `link`: the round trips plus the slower direction's transfer."""
        def transfer(nbytes: int, mbit: float | None) -> float:
            return 0.0 if not nbytes or mbit is None else nbytes * 8 / (mbit * 1e6)
        return (self.rtts * link.rtt
                + max(transfer(self.down, link.down_mbit), transfer(self.up, link.up_mbit)))


@dataclass(frozen=True)
class Target:
    """A goal for the `wancache` configuration (see `report.check_target`)."""

    text: str
    kind: str     # "link" (share of link rate), "rate", "rate-noread" (and no READ call),
                  # "rpcs" (at most), "seconds" (at most), "floor" (rate / the floor's rate
                  # in the same run, at least)
    value: float
    profile: str = ""    # checked on this profile only ("": on every profile)


@dataclass(frozen=True)
class Step:
    """One timed step of a workload; `total` counts `unit`s of work (bytes for B/s)."""

    workload: str
    name: str
    label: str
    unit: str
    total: int                   # 0: the step runs for a set time and reports what it did
    needs: tuple[Need, ...]      # ways to do it; the limit is the fastest
    target: Target | None = None
    libnfs: bool = False         # libnfs-utils have an equivalent
    quick: bool = True           # run by --quick (if its workload is)

    @property
    def key(self) -> str:
        return f"{self.workload}/{self.name}"

    def limit(self, link: LinkProfile) -> float:
        """The physical limit: the fastest way the link allows."""
        return min(n.seconds(link) for n in self.needs)


@dataclass
class Result:
    """One step under one configuration, as measured (or computed, for `limit`)."""

    workload: str
    step: str
    config: str
    status: str                        # ok | timeout | error | n/a
    seconds: float | None = None       # wall time; for a timeout, how long it ran
    done: int | None = None            # units done (None: unknown, e.g. a killed command)
    total: int | None = None
    rpcs: dict[str, int] | None = None  # calls per procedure
    wan: dict[str, int] | None = None   # what crossed the emulator: calls, bytes
    peak_rss: int | None = None        # daemon VmHWM, bytes
    error: str = ""


@dataclass(frozen=True)
class Op:
    """A timed operation: an external command (`cmd`) or a child-process function."""

    kind: str
    args: dict[str, Any] = field(default_factory=dict)
    runs_for: float = 0.0     # seconds it runs by design, on top of the step timeout

    def to_json(self, timeout: float) -> str:
        return json.dumps({"kind": self.kind, "args": self.args,
                           "timeout": timeout + self.runs_for})


def cmd(*argv: str | Path) -> Op:
    """An external command whose stdout is discarded."""
    return Op("cmd", {"argv": [str(a) for a in argv]})


class Context(Protocol):
    """Where a workload runs: a wancache mount, or libnfs-utils over the WAN."""

    root: Path          # the workload's directory as the client sees it (mounts only)
    server_dir: Path    # the same directory on the server's disk
    scratch: Path       # local working space shared by all configurations

    def url(self, rel: str) -> str:
        """nfs:// URL of `rel` (relative to the workload's directory) across the WAN."""
        ...

    def measure(self, step: Step, op: Op) -> Result:
        """Run `op` as `step`, with the step timeout, and record the result."""
        ...

    def wait_until(self, step: Step, done: Callable[[], bool]) -> Result:
        """Record the time from the start of the last `measure` until `done()`."""
        ...

    def remount(self) -> None:
        """Unmount and mount again with the same cache directory."""
        ...

    def drop_kernel_caches(self) -> None:
        """Make the kernel forget its page, dentry and inode caches."""
        ...

    def pause(self, seconds: float) -> None:
        """Sleep (e.g. until leases expire)."""
        ...


# --------------------------------------------------------------------------- data


def random_bytes(seed: int, n: int) -> bytes:
    """`n` deterministic pseudo-random bytes."""
    return random.Random(seed).randbytes(n)


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, (OLD_MTIME, OLD_MTIME))


def _text(rng: random.Random, size: int) -> bytes:
    words = [b"alpha", b"beta", b"gamma", b"delta", b"wan", b"cache", b"nfs", b"branch"]
    out = bytearray()
    while len(out) < size:
        out += b" ".join(rng.choice(words) for _ in range(8)) + b"\n"
    return bytes(out[:size])


def _dirent_bytes(names: Iterator[str] | list[str]) -> int:
    return sum(DIRENT_BYTES + (len(n) + 3) // 4 * 4 for n in names)


# --------------------------------------------------------------------------- workloads


class Workload:
    """Base class: a named workload with steps, data and a way to run them."""

    name = ""
    mount_options: tuple[str, ...] = ()

    def title(self, sizes: Sizes) -> str:
        """Short description used in table rows."""
        raise NotImplementedError

    def steps(self, sizes: Sizes) -> list[Step]:
        """Every step, in the order it runs."""
        raise NotImplementedError

    def generate(self, root: Path, scratch: Path, sizes: Sizes, libnfs: bool) -> None:
        """Write this workload's data under `root` (on the server's disk), for a wancache
        mount or (`libnfs`) for libnfs-utils; `scratch` is local space outside the export."""
        raise NotImplementedError

    def run(self, ctx: Context, sizes: Sizes, want: frozenset[str]) -> None:
        """Run the steps named in `want` on a wancache mount."""
        raise NotImplementedError

    def run_libnfs(self, ctx: Context, sizes: Sizes, want: frozenset[str]) -> None:
        """Run the steps that have a libnfs-utils equivalent."""

    def step(self, sizes: Sizes, name: str) -> Step:
        return next(s for s in self.steps(sizes) if s.name == name)


class SeqRead(Workload):
    """Sequential read of one large file in 1 MiB chunks: cold, warm, after remount."""

    name = "seq-read"

    def title(self, sizes: Sizes) -> str:
        return f"seq read {sizes.seq_mib} MiB"

    def steps(self, sizes: Sizes) -> list[Step]:
        size = sizes.seq_mib * MIB
        fetch = Need(1, down=size)
        return [
            Step(self.name, "cold", "cold", "B/s", size, (fetch,),
                 Target(">=85% of link rate", "link", 0.85), libnfs=True),
            Step(self.name, "warm-kernel", "warm (kernel cache)", "B/s", size, (Need(),),
                 Target(">=1 GB/s", "rate", 1e9)),
            # Bound by the local disk the block cache lives on, not by wancache or
            # the WAN: no target (the ">=1 GB/s warm re-read" is the row above).
            Step(self.name, "warm-dropped", "warm (page cache dropped)", "B/s", size,
                 (Need(),), quick=False),
            Step(self.name, "remount", "after remount", "B/s", size, (Need(1),),
                 Target(">=300 MB/s, 0 READs", "rate-noread", 300e6)),
        ]

    def generate(self, root: Path, scratch: Path, sizes: Sizes, libnfs: bool) -> None:
        _write(root / "data.bin", random_bytes(SEED, sizes.seq_mib * MIB))

    def run(self, ctx: Context, sizes: Sizes, want: frozenset[str]) -> None:
        op = Op("read", {"path": str(ctx.root / "data.bin"), "chunk": MIB})
        for name in ("cold", "warm-kernel", "warm-dropped", "remount"):
            if name not in want:
                continue
            if name == "warm-dropped":
                ctx.drop_kernel_caches()
            elif name == "remount":
                ctx.remount()
            ctx.measure(self.step(sizes, name), op)

    def run_libnfs(self, ctx: Context, sizes: Sizes, want: frozenset[str]) -> None:
        if "cold" in want:
            ctx.measure(self.step(sizes, "cold"), cmd("nfs-cat", ctx.url("data.bin")))


class RandomRead(Workload):
    """4 KiB reads at deterministic random offsets of a cold file, one after another."""

    name = "random-read"

    def title(self, sizes: Sizes) -> str:
        return f"random 4K reads ({sizes.rand_reads})"

    def steps(self, sizes: Sizes) -> list[Step]:
        n, size = sizes.rand_reads, sizes.rand_mib * MIB
        # Either one round trip per read, or fetch the whole file at once.
        needs = (Need(n, down=n * 4096), Need(1, down=size))
        return [Step(self.name, "cold", "cold", "reads/s", n, needs),
                Step(self.name, "cached", "cached (page cache dropped)", "reads/s", n,
                     (Need(),), Target(">=5000 reads/s", "rate", 5000), quick=False)]

    def generate(self, root: Path, scratch: Path, sizes: Sizes, libnfs: bool) -> None:
        _write(root / "data.bin", random_bytes(SEED + 1, sizes.rand_mib * MIB))

    def run(self, ctx: Context, sizes: Sizes, want: frozenset[str]) -> None:
        op = Op("pread", {"path": str(ctx.root / "data.bin"), "reads": sizes.rand_reads,
                          "size": 4096, "seed": SEED})
        if "cold" in want:
            ctx.measure(self.step(sizes, "cold"), op)
        if "cached" in want:
            # Again, from wancache's block cache (the cold step fetched whole
            # blocks), not from the kernel's page cache.
            ctx.drop_kernel_caches()
            ctx.measure(self.step(sizes, "cached"), op)


def _ls_names(sizes: Sizes) -> list[str]:
    return [f"entry-{i:05d}.dat" for i in range(sizes.ls_entries)]


class Listing(Workload):
    """`ls -l` of one large directory: cold, warm, and after the lease expired."""

    name = "ls"
    mount_options = (f"actimeo={LEASE:g}",)

    def title(self, sizes: Sizes) -> str:
        return f"ls -l {sizes.ls_entries} entries"

    def steps(self, sizes: Sizes) -> list[Step]:
        n = sizes.ls_entries
        listing = Need(1, down=_dirent_bytes(_ls_names(sizes)))
        return [
            Step(self.name, "cold", "cold", "entries/s", n, (listing,), libnfs=True),
            Step(self.name, "warm", "warm (within lease)", "entries/s", n, (Need(),),
                 Target("0 RPCs", "rpcs", 0)),
            Step(self.name, "lease", f"after lease expired ({LEASE:g} s)", "entries/s", n,
                 (listing,), quick=False),
        ]

    def generate(self, root: Path, scratch: Path, sizes: Sizes, libnfs: bool) -> None:
        rng = random.Random(SEED + 2)
        for name in _ls_names(sizes):
            _write(root / "dir" / name, _text(rng, rng.randrange(0, 2048)))

    def run(self, ctx: Context, sizes: Sizes, want: frozenset[str]) -> None:
        op = cmd("ls", "-l", "--color=never", ctx.root / "dir")
        if "cold" in want:
            ctx.measure(self.step(sizes, "cold"), op)
        if "warm" in want:
            ctx.measure(self.step(sizes, "warm"), op)
        if "lease" in want:
            ctx.pause(LEASE + 0.5)
            ctx.measure(self.step(sizes, "lease"), op)

    def run_libnfs(self, ctx: Context, sizes: Sizes, want: frozenset[str]) -> None:
        if "cold" in want:
            ctx.measure(self.step(sizes, "cold"), cmd("nfs-ls", ctx.url("dir")))


def _tree_paths(sizes: Sizes) -> list[str]:
    return [f"d{i % sizes.tree_dirs:03d}/file-{i:05d}.txt" for i in range(sizes.tree_files)]


class FindStat(Workload):
    """`find -type f -exec stat` over a two-level tree."""

    name = "find-stat"

    def title(self, sizes: Sizes) -> str:
        return f"find+stat {sizes.tree_dirs} dirs/{sizes.tree_files} files"

    def steps(self, sizes: Sizes) -> list[Step]:
        names = [f"d{i:03d}" for i in range(sizes.tree_dirs)]
        names += [p.split("/")[1] for p in _tree_paths(sizes)]
        # The top directory, then all subdirectories at once.
        need = Need(2, down=_dirent_bytes(names))
        return [Step(self.name, "cold", "cold", "files/s", sizes.tree_files, (need,),
                     libnfs=True),
                Step(self.name, "warm", "warm (within lease)", "files/s", sizes.tree_files,
                     (Need(),), Target("0 RPCs", "rpcs", 0))]

    def generate(self, root: Path, scratch: Path, sizes: Sizes, libnfs: bool) -> None:
        rng = random.Random(SEED + 3)
        for rel in _tree_paths(sizes):
            _write(root / "tree" / rel, _text(rng, rng.randrange(0, 4096)))

    def run(self, ctx: Context, sizes: Sizes, want: frozenset[str]) -> None:
        find = cmd("find", ctx.root / "tree", "-type", "f", "-exec",
                   "stat", "--format=%n %s %Y", "{}", "+")
        for name in ("cold", "warm"):
            if name in want:
                ctx.measure(self.step(sizes, name), find)

    def run_libnfs(self, ctx: Context, sizes: Sizes, want: frozenset[str]) -> None:
        if "cold" in want:
            ctx.measure(self.step(sizes, "cold"), cmd("nfs-ls", "-R", ctx.url("tree")))


def _untar_members(sizes: Sizes) -> list[str]:
    return [f"pkg/d{i % sizes.untar_dirs:02d}/file-{i:05d}.bin"
            for i in range(sizes.untar_files)]


class Untar(Workload):
    """`tar x` of many small files: until tar returns, and until all is on the server."""

    name = "untar"

    def title(self, sizes: Sizes) -> str:
        return f"untar {sizes.untar_files} x {sizes.untar_kib} KiB"

    def steps(self, sizes: Sizes) -> list[Step]:
        n = sizes.untar_files
        limit = 5.0 * n / 1000
        upload = Need(3, up=n * sizes.untar_kib * 1024)   # MKDIR, CREATE, WRITE
        return [
            Step(self.name, "returns", "tar returns", "files/s", n, (Need(),),
                 Target(f"<={limit:g} s", "seconds", limit), libnfs=True),
            Step(self.name, "on-server", "all on server", "files/s", n, (upload,),
                 Target(f"<={6 * limit:g} s", "seconds", 6 * limit), libnfs=True),
        ]

    @staticmethod
    def archive(scratch: Path, sizes: Sizes) -> Path:
        """The tar file, outside the export."""
        return scratch / f"untar-{sizes.untar_files}.tar"

    @staticmethod
    def extracted(scratch: Path, sizes: Sizes) -> Path:
        """The archive's files, extracted locally (nfs-cp copies them)."""
        return scratch / f"untar-{sizes.untar_files}"

    def _build_archive(self, scratch: Path, sizes: Sizes) -> None:
        path = self.archive(scratch, sizes)
        if path.exists():
            return
        src = self.extracted(scratch, sizes)
        with tarfile.open(path, "w") as tar:
            for i, name in enumerate(_untar_members(sizes)):
                data = random_bytes(SEED + 10_000 + i, sizes.untar_kib * 1024)
                _write(src / name, data)
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), OLD_MTIME, 0o644
                tar.addfile(info, io.BytesIO(data))

    def generate(self, root: Path, scratch: Path, sizes: Sizes, libnfs: bool) -> None:
        self._build_archive(scratch, sizes)
        (root / "out").mkdir(parents=True)
        if libnfs:   # nfs-cp cannot make directories
            for d in range(sizes.untar_dirs):
                (root / "out" / "pkg" / f"d{d:02d}").mkdir(parents=True)

    def _complete(self, out: Path, sizes: Sizes) -> Callable[[], bool]:
        want = sizes.untar_kib * 1024

        def check() -> bool:
            try:
                return all((out / m).stat().st_size == want for m in _untar_members(sizes))
            except OSError:
                return False
        return check

    def run(self, ctx: Context, sizes: Sizes, want: frozenset[str]) -> None:
        if "returns" not in want:
            return
        ctx.measure(self.step(sizes, "returns"), cmd(
            "tar", "-xf", self.archive(ctx.scratch, sizes), "--no-same-owner",
            "-C", ctx.root / "out"))
        if "on-server" in want:
            ctx.wait_until(self.step(sizes, "on-server"),
                           self._complete(ctx.server_dir / "out", sizes))

    def run_libnfs(self, ctx: Context, sizes: Sizes, want: frozenset[str]) -> None:
        if "returns" not in want:
            return
        src = self.extracted(ctx.scratch, sizes)
        pairs = [[str(src / m), ctx.url(f"out/{m}")] for m in _untar_members(sizes)]
        ctx.measure(self.step(sizes, "returns"), Op("nfs-cp", {"pairs": pairs}))
        if "on-server" in want:
            ctx.wait_until(self.step(sizes, "on-server"),
                           self._complete(ctx.server_dir / "out", sizes))


def _git_paths(sizes: Sizes) -> list[str]:
    return [f"src/m{i % sizes.git_dirs:02d}/file_{i:05d}.c" for i in range(sizes.git_files)]


class GitStatus(Workload):
    """`git status` in a repository committed on the server: cold mount, then warm."""

    name = "git-status"

    def title(self, sizes: Sizes) -> str:
        return f"git status {sizes.git_files} files"

    def steps(self, sizes: Sizes) -> list[Step]:
        paths = _git_paths(sizes)
        names = [p.rsplit("/", 1)[1] for p in paths] + [f"m{i:02d}" for i in range(sizes.git_dirs)]
        index = 12 + sum(64 + len(p) for p in paths)
        # The index and the top directories, then all subdirectories at once.
        need = Need(3, down=index + _dirent_bytes(names))
        return [
            Step(self.name, "cold", "cold mount", "files/s", sizes.git_files, (need,)),
            Step(self.name, "warm", "warm", "files/s", sizes.git_files, (Need(),)),
        ]

    def generate(self, root: Path, scratch: Path, sizes: Sizes, libnfs: bool) -> None:
        rng = random.Random(SEED + 4)
        repo = root / "repo"
        for rel in _git_paths(sizes):
            _write(repo / rel, _text(rng, rng.randrange(200, 3000)))
        git = ["git", "-C", str(repo), "-c", "user.name=bench", "-c", "user.email=b@x",
               "-c", "init.defaultBranch=main"]
        env = {**os.environ, **CMD_ENV, "HOME": str(scratch)}
        for args in (["init", "-q"], ["config", "core.checkStat", "minimal"],
                     ["config", "core.trustCtime", "false"], ["add", "-A"],
                     ["commit", "-q", "-m", "generated"]):
            subprocess.run([*git, *args], check=True, capture_output=True, env=env)

    def run(self, ctx: Context, sizes: Sizes, want: frozenset[str]) -> None:
        op = cmd("git", "-C", ctx.root / "repo", "status", "--porcelain")
        for name in ("cold", "warm"):
            if name in want:
                ctx.measure(self.step(sizes, name), op)


def _header_names(sizes: Sizes) -> list[str]:
    return [f"h{j:02d}.h" for j in range(sizes.headers)]


def _header_dir(sizes: Sizes, j: int) -> int:
    """Headers live in the later include directories: the search misses first."""
    first = sizes.include_dirs // 2
    return first + j % (sizes.include_dirs - first)


def unit_includes(sizes: Sizes, seed: int, unit: int) -> list[str]:
    """The headers translation unit `unit` includes."""
    return random.Random(seed * 7919 + unit).sample(_header_names(sizes),
                                                    sizes.includes_per_unit)


class Compile(Workload):
    """A compile-like mix: read sources and shared headers found along an include path
    (missing entries first), write one object file per unit."""

    name = "compile"

    def title(self, sizes: Sizes) -> str:
        return f"compile {sizes.units} units"

    def steps(self, sizes: Sizes) -> list[Step]:
        # List the include directories, then read sources and headers at once;
        # objects are written back in the background.
        read = sizes.units * sizes.source_kib * 1024 + sizes.headers * sizes.header_kib * 1024
        return [Step(self.name, "cold", "cold", "units/s", sizes.units, (Need(2, down=read),))]

    def generate(self, root: Path, scratch: Path, sizes: Sizes, libnfs: bool) -> None:
        rng = random.Random(SEED + 5)
        proj = root / "proj"
        for d in range(sizes.include_dirs):
            (proj / "include" / f"inc{d}").mkdir(parents=True)
        for j, h in enumerate(_header_names(sizes)):
            _write(proj / "include" / f"inc{_header_dir(sizes, j)}" / h,
                   _text(rng, sizes.header_kib * 1024))
        for u in range(sizes.units):
            _write(proj / "src" / f"u{u:04d}.c", _text(rng, sizes.source_kib * 1024))
        (proj / "obj").mkdir()

    def run(self, ctx: Context, sizes: Sizes, want: frozenset[str]) -> None:
        if "cold" in want:
            ctx.measure(self.step(sizes, "cold"), Op("compile", {
                "root": str(ctx.root / "proj"), "sizes": asdict(sizes), "seed": SEED}))


class SeqWrite(Workload):
    """Write one large file in 1 MiB chunks: until the writer is done (close), and
    until all of it is on the server."""

    name = "seq-write"

    def title(self, sizes: Sizes) -> str:
        return f"seq write {sizes.seq_mib} MiB"

    def steps(self, sizes: Sizes) -> list[Step]:
        size = sizes.seq_mib * MIB
        return [
            Step(self.name, "returns", "writer done", "B/s", size, (Need(),), libnfs=True),
            Step(self.name, "on-server", "all on server", "B/s", size, (Need(2, up=size),),
                 Target(">=85% of link rate", "link", 0.85), libnfs=True),
        ]

    def generate(self, root: Path, scratch: Path, sizes: Sizes, libnfs: bool) -> None:
        root.mkdir(parents=True, exist_ok=True)
        src = scratch / f"write-{sizes.seq_mib}.bin"
        if not src.exists():
            src.write_bytes(random_bytes(SEED + 7, sizes.seq_mib * MIB))

    def _complete(self, path: Path, size: int) -> Callable[[], bool]:
        def check() -> bool:
            # The size alone could be reached early (WRITEs arrive out of order and
            # leave holes): every byte is there once the file has no holes left.
            try:
                st = path.stat()
            except OSError:
                return False
            return st.st_size == size and st.st_blocks * 512 >= size
        return check

    def run(self, ctx: Context, sizes: Sizes, want: frozenset[str]) -> None:
        if "returns" not in want:
            return
        size = sizes.seq_mib * MIB
        ctx.measure(self.step(sizes, "returns"), Op("copy", {
            "src": str(ctx.scratch / f"write-{sizes.seq_mib}.bin"),
            "dst": str(ctx.root / "out.bin"), "chunk": MIB}))
        if "on-server" in want:
            ctx.wait_until(self.step(sizes, "on-server"),
                           self._complete(ctx.server_dir / "out.bin", size))

    def run_libnfs(self, ctx: Context, sizes: Sizes, want: frozenset[str]) -> None:
        if "returns" not in want:
            return
        src = ctx.scratch / f"write-{sizes.seq_mib}.bin"
        ctx.measure(self.step(sizes, "returns"),
                    Op("nfs-cp", {"pairs": [[str(src), ctx.url("out.bin")]]}))
        if "on-server" in want:
            ctx.wait_until(self.step(sizes, "on-server"),
                           self._complete(ctx.server_dir / "out.bin", sizes.seq_mib * MIB))


class ParallelRead(Workload):
    """Many readers at once, each reading its own cold file sequentially."""

    name = "parallel-read"

    def title(self, sizes: Sizes) -> str:
        return f"{sizes.readers} readers x {sizes.reader_mib} MiB"

    def steps(self, sizes: Sizes) -> list[Step]:
        size = sizes.readers * sizes.reader_mib * MIB
        return [Step(self.name, "cold", "cold, at once", "B/s", size, (Need(1, down=size),),
                     Target(">=90% of link rate", "link", 0.9))]

    def _paths(self, root: Path, sizes: Sizes) -> list[str]:
        return [str(root / "files" / f"f{i:02d}.bin") for i in range(sizes.readers)]

    def generate(self, root: Path, scratch: Path, sizes: Sizes, libnfs: bool) -> None:
        for i, path in enumerate(self._paths(root, sizes)):
            _write(Path(path), random_bytes(SEED + 100 + i, sizes.reader_mib * MIB))

    def run(self, ctx: Context, sizes: Sizes, want: frozenset[str]) -> None:
        if "cold" in want:
            ctx.measure(self.step(sizes, "cold"), Op("parallel-read", {
                "paths": self._paths(ctx.root, sizes), "chunk": MIB}))


class Dbench(Workload):
    """Debian's `dbench`: N clients replaying a file-server load for a set time."""

    name = "dbench"

    def title(self, sizes: Sizes) -> str:
        return f"dbench {sizes.dbench_clients} clients"

    def steps(self, sizes: Sizes) -> list[Step]:
        return [Step(self.name, "run", f"{sizes.dbench_seconds} s", "B/s", 0, (Need(),),
                     Target(">=1.0x floor", "floor", 1.0, profile="lan"))]

    def generate(self, root: Path, scratch: Path, sizes: Sizes, libnfs: bool) -> None:
        (root / "dbench").mkdir(parents=True, exist_ok=True)

    def run(self, ctx: Context, sizes: Sizes, want: frozenset[str]) -> None:
        if "run" in want:
            ctx.measure(self.step(sizes, "run"), Op("dbench", {
                "dir": str(ctx.root / "dbench"), "clients": sizes.dbench_clients,
                "seconds": sizes.dbench_seconds}, runs_for=sizes.dbench_seconds))


WORKLOADS: dict[str, Workload] = {w.name: w for w in (
    SeqRead(), SeqWrite(), RandomRead(), ParallelRead(), Listing(), FindStat(), Untar(),
    GitStatus(), Compile(), Dbench())}
QUICK_WORKLOADS = ("seq-read", "ls", "untar")


# --------------------------------------------------------------------------- child ops
# Each returns the units done; it stops at `deadline` (time.monotonic()).

class Deadline(Exception):
    """The operation ran out of time; `done` units were finished."""

    def __init__(self, done: int) -> None:
        super().__init__(done)
        self.done = done


def op_read(args: dict[str, Any], deadline: float) -> int:
    """Read a file sequentially in `chunk`-byte reads; bytes read."""
    buf = bytearray(args["chunk"])
    done = 0
    with open(args["path"], "rb", buffering=0) as f:
        while True:
            if time.monotonic() > deadline:
                raise Deadline(done)
            n = f.readinto(buf)
            if not n:
                return done
            done += n


def op_pread(args: dict[str, Any], deadline: float) -> int:
    """`reads` reads of `size` bytes at seeded random aligned offsets; reads done."""
    size = args["size"]
    fd = os.open(args["path"], os.O_RDONLY)
    try:
        blocks = os.fstat(fd).st_size // size
        rng = random.Random(args["seed"])
        for i in range(args["reads"]):
            if time.monotonic() > deadline:
                raise Deadline(i)
            if len(os.pread(fd, size, rng.randrange(blocks) * size)) != size:
                raise OSError(f"short read at read {i}")
    finally:
        os.close(fd)
    return int(args["reads"])


def op_compile(args: dict[str, Any], deadline: float) -> int:
    """For each unit: read its source, find and read its headers, write its object."""
    sizes = Sizes(**args["sizes"])
    root = Path(args["root"])
    include = [root / "include" / f"inc{d}" for d in range(sizes.include_dirs)]
    for u in range(sizes.units):
        if time.monotonic() > deadline:
            raise Deadline(u)
        (root / "src" / f"u{u:04d}.c").read_bytes()
        for header in unit_includes(sizes, args["seed"], u):
            for d in include:
                if time.monotonic() > deadline:
                    raise Deadline(u)
                try:
                    (d / header).stat()
                except FileNotFoundError:
                    continue
                (d / header).read_bytes()
                break
            else:
                raise FileNotFoundError(f"{header} not found on the include path")
        with open(root / "obj" / f"u{u:04d}.o", "wb") as f:
            f.write(random_bytes(u, sizes.object_kib * 1024))
    return sizes.units


def op_nfs_cp(args: dict[str, Any], deadline: float) -> int:
    """`nfs-cp SRC URL` for each pair, one after another; files copied."""
    for i, (src, url) in enumerate(args["pairs"]):
        left = deadline - time.monotonic()
        if left <= 0:
            raise Deadline(i)
        try:
            proc = subprocess.run(["nfs-cp", src, url], capture_output=True, timeout=left,
                                  check=False)
        except subprocess.TimeoutExpired:
            raise Deadline(i) from None
        if proc.returncode != 0:
            err = proc.stderr.decode(errors="replace").strip().splitlines() or ["failed"]
            raise OSError(f"nfs-cp exited {proc.returncode}: {err[-1]}")
    return len(args["pairs"])


def op_copy(args: dict[str, Any], deadline: float) -> int:
    """Copy a local file into the mount in `chunk`-byte writes; bytes written."""
    done = 0
    with open(args["src"], "rb") as src, open(args["dst"], "wb", buffering=0) as dst:
        while True:
            if time.monotonic() > deadline:
                raise Deadline(done)
            chunk = src.read(args["chunk"])
            if not chunk:
                return done
            dst.write(chunk)
            done += len(chunk)


def op_parallel_read(args: dict[str, Any], deadline: float) -> int:
    """Read every file of `paths` at once, one thread each; bytes read."""
    done = [0] * len(args["paths"])
    errors: list[BaseException] = []

    def reader(i: int, path: str) -> None:
        buf = bytearray(args["chunk"])
        try:
            with open(path, "rb", buffering=0) as f:
                while time.monotonic() <= deadline and (n := f.readinto(buf)):
                    done[i] += n
        except OSError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(i, p), daemon=True)
               for i, p in enumerate(args["paths"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    if time.monotonic() > deadline:
        raise Deadline(sum(done))
    return sum(done)


DBENCH_THROUGHPUT = re.compile(rb"Throughput ([0-9.]+) MB/sec")


def op_dbench(args: dict[str, Any], deadline: float) -> tuple[int, float]:
    """`dbench -t SECONDS -D DIR CLIENTS`: (bytes, seconds) at its reported throughput."""
    seconds = args["seconds"]
    try:
        proc = subprocess.run(["dbench", "-t", str(seconds), "-D", args["dir"],
                               str(args["clients"])], capture_output=True, check=False,
                              timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        raise Deadline(0) from None
    found = DBENCH_THROUGHPUT.search(proc.stdout)
    if proc.returncode != 0 or found is None:
        tail = (proc.stdout + proc.stderr).decode(errors="replace").strip().splitlines()
        raise OSError(f"dbench exited {proc.returncode}: {tail[-1] if tail else ''}")
    return int(float(found.group(1)) * 1e6 * seconds), float(seconds)


CHILD_OPS: dict[str, Callable[[dict[str, Any], float], int | tuple[int, float]]] = {
    "read": op_read, "pread": op_pread, "compile": op_compile, "nfs-cp": op_nfs_cp,
    "copy": op_copy, "parallel-read": op_parallel_read, "dbench": op_dbench}


def run_child_op(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one op; its outcome: seconds, units done, whether it ran out of time.

    An op that runs for a set time returns (units, seconds measured) itself."""
    fn = CHILD_OPS[spec["kind"]]
    start = time.monotonic()
    try:
        out, timeout = fn(spec["args"], start + spec["timeout"]), False
    except Deadline as exc:
        out, timeout = exc.done, True
    done, seconds = out if isinstance(out, tuple) else (out, time.monotonic() - start)
    return {"seconds": seconds, "done": done, "timeout": timeout}


def main() -> int:
    """Child entry point: run the op given as JSON on stdin, print its outcome as JSON."""
    try:
        out = run_child_op(json.loads(sys.stdin.read()))
    except Exception as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
        return 1
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
