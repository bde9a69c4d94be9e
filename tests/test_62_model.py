"""The model checker: hypothesis drives a real mount and an oracle (a plain directory on
this machine's local disk) with the same calls and compares every result
(`bench/modelops.py` holds the ops and the comparison).

One hypothesis example works in a fresh directory `exN/w` of both trees, through
one wancache mount that lives for the whole test.  Its steps are data ops on open
handles (pwrite/pread at random offsets, past EOF, ftruncate down and up, O_APPEND,
mmap + msync, copy_file_range, fallocate and punch-hole, fsync, several fds on one
file), bursts of a few hundred random data ops at full speed, namespace ops (a small
name pool in a 2-level tree: create, mkdir, mknod, symlinks with 2-4 KB targets, link,
rename with and without RENAME_NOREPLACE, unlink and rmdir also of open files, chmod,
chown, utimensat in and out of NFSv3's range), the same as uid/gid 1001 (a worker
process), and, with write-back, pausing and resuming the flusher so changes pile up
as on a slow link.  Up to twice per example the daemon is killed with SIGKILL and
remounted with the same cache_dir: the tree must then equal the oracle (every
acknowledged op survived) and show the same mtimes.  Flushing must leave every mtime
and ctime the mount shows as it was, a file's mtime must reach the server, the daemon
must log no error, and the server (seen through a second, `cache=off` mount) must
equal the oracle: contents, sizes, types, modes, owners, nlink, symlink targets.

Every mode runs: write-back (default and writeback_delay=0), writeback=off and
cache=off.  The default run is CI-sized; `pytest -m long` runs at least
WANCACHE_MODEL_DATA_OPS data ops (100 000) and WANCACHE_MODEL_NAMESPACE_OPS namespace
ops (20 000) per mode.  To look past a known bug: WANCACHE_MODEL_IGNORE (comma-separated
substrings of mismatch categories, e.g. "nlink,utime") reports those mismatches as
notes instead of failing, WANCACHE_MODEL_EXCLUDE (op kinds, e.g. "mmap_write") leaves
those ops out.  WANCACHE_MODEL_MOUNT_OPTIONS (comma-separated, e.g. "debug") adds
mount options.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, note, settings
from hypothesis import strategies as st
from hypothesis.internal.conjecture import engine
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    precondition,
    rule,
    run_state_machine_as_test,
)

from bench import modelops as mo
from bench.wcmount import MountFailed, WancacheMount
from tests.conftest import LOG_PROBLEMS, Export, MountFactory, wait_until

MODES = mo.MOUNT_MODES
USER = (1001, 1001)
HANDLES = 6


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


IGNORE = [s for s in os.environ.get("WANCACHE_MODEL_IGNORE", "").split(",") if s]
EXCLUDE = {s for s in os.environ.get("WANCACHE_MODEL_EXCLUDE", "").split(",") if s}

paths = st.sampled_from(mo.POOL)
modes = st.sampled_from(mo.MODES)
offsets = st.integers(0, mo.MAX_SIZE)
lengths = st.integers(1, mo.MAX_WRITE)
seeds = st.integers(0, 2**32 - 1)
handle_ix = st.integers(0, HANDLES - 1)
ids = st.sampled_from(mo.IDS)
times = st.sampled_from(mo.TIMES_NS)
# burst ops: (kind, handle index, offset or size, length, seed); pwrite shrinks first
BURST_KINDS = ("pwrite",) * 4 + ("pread",) * 4 + ("ftruncate",) * 3 + (
    "write", "mmap_write", "copy_range", "fallocate", "fstat", "open", "close", "fsync")
burst_ops = st.tuples(st.sampled_from(BURST_KINDS), handle_ix, offsets, lengths, seeds)
targets = st.one_of(paths, st.builds(
    lambda n, w: "/".join(["nowhere", *(["x" * w] * n)])[:4000],
    st.integers(10, 40), st.integers(100, 200)))


def _user_ops() -> st.SearchStrategy[dict[str, Any]]:
    """Ops the uid-1001 worker runs: namespace ops and whole-file writes and reads."""
    return st.one_of(
        st.builds(lambda p, m: {"op": "create", "path": p, "mode": m}, paths, modes),
        st.builds(lambda p, n, s, f: {"op": "write_file", "path": p, "len": n, "seed": s,
                                      "flags": f, "mode": 0o644},
                  paths, st.integers(0, 20000), seeds,
                  st.sampled_from((os.O_TRUNC, os.O_APPEND, 0))),
        st.builds(lambda p: {"op": "read_file", "path": p}, paths),
        st.builds(lambda p, m: {"op": "mkdir", "path": p, "mode": m}, paths, modes),
        st.builds(lambda p: {"op": "unlink", "path": p}, paths),
        st.builds(lambda p: {"op": "rmdir", "path": p}, paths),
        st.builds(lambda a, b: {"op": "rename", "src": a, "dst": b, "flags": 0}, paths, paths),
        st.builds(lambda a, b: {"op": "link", "src": a, "dst": b}, paths, paths),
        st.builds(lambda p, t: {"op": "symlink", "path": p, "target": t}, paths, targets),
        st.builds(lambda p, k: {"op": "mknod", "path": p, "mode": 0o644, "kind": k,
                                "rdev": os.makedev(1, 3)}, paths, st.sampled_from(("fifo", "chr"))),
        st.builds(lambda p, m: {"op": "chmod", "path": p, "mode": m}, paths, modes),
        st.builds(lambda p, u, g: {"op": "chown", "path": p, "uid": u, "gid": g}, paths,
                  st.sampled_from((USER[0], -1, 0, 1002)), st.sampled_from((USER[1], -1, 0, 1002))),
        st.builds(lambda p, a, m: {"op": "utime", "path": p, "atime_ns": a, "mtime_ns": m},
                  paths, times, times),
        st.builds(lambda p: {"op": "stat", "path": p}, paths),
        st.builds(lambda p: {"op": "listdir", "path": p}, paths),
        # ftruncate on a file it just created with mode 0 (issue 13, POSIX point)
        st.builds(lambda p, n: {"op": "open_truncate", "path": p, "size": n}, paths,
                  st.integers(0, 70000)),
    )


@dataclass
class Harness:
    """The mount under test, the server's view and the oracle of one test."""

    name: str
    options: list[str]
    mount_factory: MountFactory
    oracle: Path
    mount: WancacheMount
    server: WancacheMount
    examples: itertools.count[int] = field(default_factory=itertools.count)
    counts: Counter[str] = field(default_factory=Counter)
    notes: Counter[str] = field(default_factory=Counter)

    @property
    def writeback(self) -> bool:
        return not any(o in ("writeback=off", "cache=off") for o in self.options)

    log_seen: int = 0
    mounts: int = 0         # fresh cache_dirs after a mount that did not come back

    def remount(self) -> str | None:
        """Start the killed daemon again with the same cache_dir (and log); if it does
        not come back, mount on a fresh cache_dir (so the test can go on) and say why."""
        keep = os.environ.get("WANCACHE_MODEL_KEEP_JOURNALS")
        if keep:      # debugging: the journal each remount replays
            import shutil
            self.mounts_kept = getattr(self, "mounts_kept", 0) + 1
            cache = next(o[len("cache_dir="):] for o in self.mount.options
                         if o.startswith("cache_dir="))
            shutil.copytree(Path(cache) / "journal", Path(keep) / str(self.mounts_kept))
        try:
            self.mount.start()
            return None
        except MountFailed as exc:
            self.mounts += 1
            self.log_seen = 0
            self.mount = self.mount_factory(self.options, name=f"model{self.mounts}")
            return str(exc)[-2000:]

    def new_log_problems(self) -> list[str]:
        """Tracebacks and ERROR lines the daemon logged since the last call."""
        text = self.mount.log()
        new, self.log_seen = text[self.log_seen:], len(text)
        return [line for line in new.splitlines()
                if LOG_PROBLEMS.search(line) or line.startswith(("ValueError", "  File"))][:20]


@pytest.fixture
def harness(request: pytest.FixtureRequest, export: Export, mount_factory: MountFactory,
            tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
            allow_log_warnings: None) -> Harness:
    """Warnings are allowed (a crash makes replay warn); errors in a log still fail."""
    mode = request.param
    monkeypatch.setattr(engine, "MAX_SHRINKING_SECONDS",
                        _env_int("WANCACHE_MODEL_SHRINK_SECONDS", 30))
    oracle = tmp_path / "oracle"
    oracle.mkdir()
    options = [*MODES[mode], *filter(None, os.environ.get(
        "WANCACHE_MODEL_MOUNT_OPTIONS", "").split(","))]
    mount = mount_factory(options, name="model")
    server = mount_factory(["cache=off"], name="server")
    return Harness(mode, options, mount_factory, oracle, mount, server)


class ModelMachine(RuleBasedStateMachine):
    """One example: a fresh directory pair, random steps, final checks in teardown."""

    h: Harness   # set by machine_for()

    def __init__(self) -> None:
        super().__init__()
        h = self.h
        self.rel = f"ex{next(h.examples)}/w"
        for root in (h.mount.mountpoint, h.oracle):
            (root / self.rel).mkdir(parents=True)
            (root / self.rel).chmod(0o777)
        self.ex = self._executor()
        self.steps: list[str] = []     # every step of the example, for a failure's report
        self.worker: mo.UserWorker | None = None
        self.user_handles = 0
        self.paused = False
        self.crashed = 0
        self.failed = False
        self.checks = 0
        self.next_handle = 1

    # -- plumbing ----------------------------------------------------------------------

    @property
    def mroot(self) -> Path:
        return self.h.mount.mountpoint / self.rel

    @property
    def oroot(self) -> Path:
        return self.h.oracle / self.rel

    def _executor_after_failed_remount(self) -> mo.Executor:
        """A fresh cache_dir: this example's directory is there only if it was flushed."""
        for root in (self.mroot, self.oroot):
            root.mkdir(parents=True, exist_ok=True)
        return self._executor()

    def _executor(self) -> mo.Executor:
        return mo.Executor.open(self.h.mount.mountpoint / self.rel, self.h.oracle / self.rel)

    def _fail_on(self, found: list[mo.Mismatch]) -> None:
        real = []
        for m in found:
            if any(s in m.what for s in IGNORE):
                self.h.notes[f"ignored: {m.what}"] += 1
            else:
                real.append(m)
        self.check([str(m) for m in real], "the mount differs from the oracle")

    def apply(self, op: dict[str, Any]) -> None:
        if op["op"] in EXCLUDE:
            return
        note(mo.describe(op))
        self.steps.append(mo.describe(op))
        kind = "data" if op["op"] in mo.DATA_KINDS else "namespace"
        self.h.counts[kind] += 1
        self._fail_on(self.ex.apply(op))

    def handle(self, ix: int) -> int | None:
        hs = sorted(h for h in self.ex.oracle.fds if h < 10_000)
        return hs[ix % len(hs)] if hs else None

    def user(self) -> mo.UserWorker:
        if self.worker is None:
            self.worker = mo.UserWorker(self.mroot, self.oroot, *USER)
        return self.worker

    def server_tree(self) -> Path:
        return self.h.server.mountpoint / self.rel

    # -- data ops ----------------------------------------------------------------------

    @initialize(path=st.sampled_from(mo.TOP), n=st.integers(1, 3),
                extra=st.sampled_from((0, os.O_APPEND)))
    def first_handles(self, path: str, n: int, extra: int) -> None:
        """Start with a file and up to 3 handles on it, so data ops have work at once."""
        for i in range(n):
            self.open(path, os.O_RDWR, os.O_CREAT | (extra if i == n - 1 else 0), 0o644)

    @rule(path=paths, access=st.sampled_from((os.O_RDWR, os.O_RDWR, os.O_RDONLY, os.O_WRONLY)),
          extra=st.sampled_from((os.O_CREAT, 0, os.O_CREAT | os.O_APPEND, os.O_CREAT | os.O_TRUNC,
                                 os.O_CREAT | os.O_EXCL)),
          mode=st.sampled_from((0o644, 0o600, 0o000)))
    def open(self, path: str, access: int, extra: int, mode: int) -> None:
        if len(self.ex.oracle.fds) >= HANDLES:
            return
        h, self.next_handle = self.next_handle, self.next_handle + 1
        self.apply({"op": "open", "h": h, "path": path, "flags": access | extra, "mode": mode})

    @rule(ix=handle_ix)
    def close(self, ix: int) -> None:
        h = self.handle(ix)
        if h is not None:
            self.apply({"op": "close", "h": h})

    @rule(ix=handle_ix, off=offsets, length=lengths, seed=seeds)
    def pwrite(self, ix: int, off: int, length: int, seed: int) -> None:
        h = self.handle(ix)
        if h is not None:
            self.apply({"op": "pwrite", "h": h, "off": off, "len": length, "seed": seed})

    @rule(ix=handle_ix, length=st.integers(1, 8192), seed=seeds)
    def write(self, ix: int, length: int, seed: int) -> None:
        h = self.handle(ix)
        if h is not None:
            self.apply({"op": "write", "h": h, "len": length, "seed": seed})

    @rule(ix=handle_ix, off=offsets, length=lengths)
    def pread(self, ix: int, off: int, length: int) -> None:
        h = self.handle(ix)
        if h is not None:
            self.apply({"op": "pread", "h": h, "off": off, "len": length})

    @rule(ix=handle_ix, size=offsets)
    def ftruncate(self, ix: int, size: int) -> None:
        h = self.handle(ix)
        if h is not None:
            self.apply({"op": "ftruncate", "h": h, "size": size})

    @rule(ix=handle_ix, off=st.integers(0, 1 << 16), length=st.integers(1, 8192), seed=seeds)
    def mmap_write(self, ix: int, off: int, length: int, seed: int) -> None:
        h = self.handle(ix)
        if h is not None:
            self.apply({"op": "mmap_write", "h": h, "off": off, "len": length, "seed": seed})

    @rule(src=handle_ix, dst=handle_ix, off_in=offsets, off_out=offsets, length=lengths)
    def copy_range(self, src: int, dst: int, off_in: int, off_out: int, length: int) -> None:
        a, b = self.handle(src), self.handle(dst)
        if a is not None and b is not None:
            self.apply({"op": "copy_range", "src": a, "dst": b, "off_in": off_in,
                        "off_out": off_out, "len": length})

    @rule(ix=handle_ix, mode=st.sampled_from(mo.FALLOC_MODES), off=offsets, length=lengths)
    def fallocate(self, ix: int, mode: int, off: int, length: int) -> None:
        h = self.handle(ix)
        if h is not None:
            self.apply({"op": "fallocate", "h": h, "mode": mode, "off": off, "len": length})

    @precondition(lambda self: not self.paused)
    @rule(ix=handle_ix)
    def fsync(self, ix: int) -> None:
        h = self.handle(ix)
        if h is not None:
            self.apply({"op": "fsync", "h": h})

    @rule(ix=handle_ix)
    def fstat(self, ix: int) -> None:
        h = self.handle(ix)
        if h is not None:
            self.apply({"op": "fstat", "h": h})

    @rule(seed=seeds, n=st.integers(1, 300), namespace=st.sampled_from((0.0, 1 / 6, 1.0)))
    def random_burst(self, seed: int, n: int, namespace: float) -> None:
        """`n` ops of `modelops.OpGenerator` (data ops, a sixth namespace ops, or only
        namespace ops) at full speed through handles of their own, closed at the end."""
        gen = mo.OpGenerator(random.Random(seed), self.ex, namespace_share=namespace,
                             exclude=frozenset(EXCLUDE | ({"fsync"} if self.paused else set())))
        gen.next_handle = 10_000
        done: list[dict[str, Any]] = []
        found: list[mo.Mismatch] = []
        for _ in range(n):
            op = gen.next()
            if op["op"] in ("open", "close") and op.get("h", 0) < 10_000:
                continue           # leave the rules' handles alone
            done.append(op)
            found = self.ex.apply(op)
            if found:
                break
        if not found:
            for h in sorted(h for h in self.ex.oracle.fds if h >= 10_000):
                done.append({"op": "close", "h": h})
                found += self.ex.apply(done[-1])
        self.steps += [mo.describe(op) for op in done]
        for op in done:
            self.h.counts["data" if op["op"] in mo.DATA_KINDS else "namespace"] += 1
        if found:
            note("the burst's ops:\n" + "\n".join(map(mo.describe, done)))
            found[0].detail += "\nafter the burst's ops (a race may not replay):\n" + \
                "\n".join(map(mo.describe, done[-60:]))
        self._fail_on(found)

    @rule(ops=st.lists(burst_ops, min_size=1, max_size=40))
    def burst(self, ops: list[tuple[str, int, int, int, int]]) -> None:
        """Many data ops in a row at full speed, faster than the flusher."""
        for kind, ix, off, length, seed in ops:
            if kind == "open":
                self.open(mo.POOL[off % len(mo.POOL)], (os.O_RDWR, os.O_RDONLY)[seed % 4 == 3],
                          (os.O_CREAT, os.O_CREAT | os.O_APPEND, os.O_CREAT | os.O_TRUNC)[seed % 3],
                          0o644)
                continue
            h = self.handle(ix)
            if h is None:
                continue
            if kind == "copy_range":
                op = {"op": kind, "src": self.handle(seed), "dst": h, "off_in": seed % mo.MAX_SIZE,
                      "off_out": off, "len": length}
            elif kind in ("close", "fsync", "fstat"):
                if kind == "fsync" and self.paused:
                    continue
                op = {"op": kind, "h": h}
            elif kind == "ftruncate":
                op = {"op": kind, "h": h, "size": off}
            elif kind == "fallocate":
                op = {"op": kind, "h": h, "mode": mo.FALLOC_MODES[seed % len(mo.FALLOC_MODES)],
                      "off": off, "len": length}
            elif kind == "pread":
                op = {"op": kind, "h": h, "off": off, "len": length}
            elif kind == "mmap_write":
                op = {"op": kind, "h": h, "off": off // 4, "len": length % 8192 + 1, "seed": seed}
            elif kind == "write":
                op = {"op": kind, "h": h, "len": length % 8192 + 1, "seed": seed}
            else:
                op = {"op": kind, "h": h, "off": off, "len": length, "seed": seed}
            self.apply(op)

    # -- namespace ops -----------------------------------------------------------------

    @rule(path=paths, mode=modes)
    def create(self, path: str, mode: int) -> None:
        self.apply({"op": "create", "path": path, "mode": mode})

    @rule(path=paths, length=st.integers(0, 70000), seed=seeds,
          flags=st.sampled_from((os.O_TRUNC, os.O_APPEND, 0)))
    def write_file(self, path: str, length: int, seed: int, flags: int) -> None:
        self.apply({"op": "write_file", "path": path, "len": length, "seed": seed,
                    "flags": flags, "mode": 0o644})

    @rule(path=paths)
    def read_file(self, path: str) -> None:
        self.apply({"op": "read_file", "path": path})

    @rule(path=paths, mode=modes)
    def mkdir(self, path: str, mode: int) -> None:
        self.apply({"op": "mkdir", "path": path, "mode": mode})

    @rule(path=paths, kind=st.sampled_from(("fifo", "chr")), major=st.integers(1, 255),
          minor=st.integers(0, 255))
    def mknod(self, path: str, kind: str, major: int, minor: int) -> None:
        self.apply({"op": "mknod", "path": path, "mode": 0o644, "kind": kind,
                    "rdev": os.makedev(major, minor)})

    @rule(path=paths, to=targets)
    def symlink(self, path: str, to: str) -> None:
        self.apply({"op": "symlink", "path": path, "target": to})

    @rule(src=paths, dst=paths)
    def link(self, src: str, dst: str) -> None:
        self.apply({"op": "link", "src": src, "dst": dst})

    @rule(src=paths, dst=paths, noreplace=st.booleans())
    def rename(self, src: str, dst: str, noreplace: bool) -> None:
        self.apply({"op": "rename", "src": src, "dst": dst,
                    "flags": mo.RENAME_NOREPLACE if noreplace else 0})

    @rule(path=paths)
    def unlink(self, path: str) -> None:
        self.apply({"op": "unlink", "path": path})

    @rule(path=paths)
    def rmdir(self, path: str) -> None:
        self.apply({"op": "rmdir", "path": path})

    @rule(path=paths, mode=modes)
    def chmod(self, path: str, mode: int) -> None:
        self.apply({"op": "chmod", "path": path, "mode": mode})

    @rule(path=paths, uid=ids, gid=ids)
    def chown(self, path: str, uid: int, gid: int) -> None:
        self.apply({"op": "chown", "path": path, "uid": uid, "gid": gid})

    @rule(path=paths, atime=times, mtime=times)
    def utime(self, path: str, atime: int, mtime: int) -> None:
        self.apply({"op": "utime", "path": path, "atime_ns": atime, "mtime_ns": mtime})

    @rule(path=paths, kind=st.sampled_from(("stat", "listdir", "readlink")))
    def look(self, path: str, kind: str) -> None:
        self.apply({"op": kind, "path": path})

    @rule(op=_user_ops())
    def as_user(self, op: dict[str, Any]) -> None:
        note(f"as uid {USER[0]}: {mo.describe(op)}")
        self.steps.append(f"as uid {USER[0]}: {mo.describe(op)}")
        self.h.counts["namespace"] += 1
        worker = self.user()
        if op["op"] == "open_truncate":
            self.user_handles += 1
            h = self.user_handles
            found = worker.apply({"op": "open", "h": h, "path": op["path"], "mode": 0,
                                  "flags": os.O_CREAT | os.O_RDWR})
            found += worker.apply({"op": "ftruncate", "h": h, "size": op["size"]})
            found += worker.apply({"op": "close", "h": h})
        else:
            found = worker.apply(op)
        self._fail_on(found)

    # -- the flusher, the server, crashes ----------------------------------------------

    @precondition(lambda self: self.h.writeback and not self.paused)
    @rule()
    def pause_flusher(self) -> None:
        self.h.mount.request("flusher", action="pause")
        self.steps.append("pause the flusher")
        self.paused = True

    @precondition(lambda self: self.paused)
    @rule()
    def resume_flusher(self) -> None:
        self.h.mount.request("flusher", action="resume")
        self.steps.append("resume the flusher")
        self.paused = False

    @precondition(lambda self: not self.paused and self.checks < 2)
    @rule()
    def flush_and_check_server(self) -> None:
        self.checks += 1
        self.steps.append("flush, check the server")
        self.check_flush()

    @precondition(lambda self: self.crashed < 2)
    @rule()
    def crash(self) -> None:
        """SIGKILL the daemon, remount with the same cache_dir: everything acknowledged
        is there, every mtime as before."""
        # (directories: their mtime may come back a few ms off after kill -9, README:
        # "Times"; every other check of directory times stands)
        before = mo.time_snapshot(self.mroot, dirs=False)
        self.crashed += 1
        self.steps.append("kill -9, remount")
        self.h.mount.kill()
        self.h.notes["crashes"] += 1
        self.ex.release()
        if self.worker is not None:
            self.worker.stop(compare=False)
            self.worker = None
        refused = self.h.remount()
        self.paused = False
        if refused is not None:
            self.ex = self._executor_after_failed_remount()
            self.check([refused], "after kill -9, the mount does not come back")
        self.ex = self._executor()
        self.check(self.settled_diffs(self.mroot, mo.hidden_on_mount),
                   "after kill -9 and remount, the mount differs from the oracle")
        # mtime must survive (issue 13, point 5); ctime, which NFSv3 cannot set, may
        # come back as the server's
        self.check(mo.changed_times(before, mo.time_snapshot(self.mroot, dirs=False),
                                    ctime=False),
                   "mtimes changed across kill -9 and remount")

    def check(self, problems: list[str], header: str) -> None:
        """Fail the example with `problems` (after which teardown only cleans up)."""
        problems = [p for p in problems if not any(s in p for s in IGNORE)]
        if problems:
            self.failed = True
            raise AssertionError(header + ":\n" + "\n".join(problems[:20]) +
                                 "\nthe example's last steps:\n" + "\n".join(self.steps[-60:]))

    def settled_diffs(self, tree: Path, ignore: Callable[[str], bool] | None, *,
                      flush: bool = False) -> list[str]:
        """compare_trees(tree, oracle), given a few seconds when only hidden unlinked-open
        files differ: the kernel sends RELEASE after close() has returned."""
        diffs: list[str] = []

        def settled() -> bool:
            nonlocal diffs
            if flush:
                self.h.mount.flush()
            diffs = mo.compare_trees(tree, self.oroot, ignore=ignore)
            return not diffs or any(mo.SILLY_PREFIX not in d for d in diffs)

        wait_until(settled, 10)
        return diffs

    def leftovers(self) -> Callable[[str], bool] | None:
        return mo.hidden_on_mount if self.crashed else None

    def check_flush(self, ignore: Callable[[str], bool] | None = mo.hidden_on_mount) -> None:
        """Flush; times on the mount must not move; the server must equal the oracle."""
        hidden, before = mo.hidden_paths(self.mroot), mo.time_snapshot(self.mroot)
        self.h.mount.flush()
        self.check(self.h.new_log_problems(), "the daemon logged errors")
        after = mo.time_snapshot(self.mroot)
        # The kernel sends RELEASE after close() returned: the last one of an unlinked
        # open file removes its hidden name meanwhile, which changes its directory's
        # times (a local change, as on NFS clients, not one by itself).
        released = {os.path.dirname(p) or "." for p in hidden - mo.hidden_paths(self.mroot)}
        server = mo.time_snapshot(self.server_tree())
        self.check(self.settled_diffs(self.server_tree(), ignore, flush=True),
                   "after a flush, the server differs from the oracle")
        self.check([c for c in mo.changed_times(before, after)
                    if c.split(":")[0] not in released],
                   "times the mount shows changed by themselves across a flush")
        files = [p for p in before if self.ex.oracle.kind(p) == "file"]
        self.check([f"{p}: mtime mount {before[p][0]}, server {server[p][0]}" for p in sorted(files)
                    if p in server and server[p][0] != before[p][0]],
                   "after a flush, the server's mtime differs from the mount's")

    def teardown(self) -> None:
        try:
            if self.paused:
                self.h.mount.request("flusher", action="resume")
            if not self.failed:
                found = self.ex.close()
                if self.worker is not None:
                    found += self.worker.stop()
                    self.worker = None
                self._fail_on(found)
                # every handle is closed: no hidden unlinked-open file may be left
                # (but a crash leaves them, as on NFS)
                self.check(self.settled_diffs(self.mroot, self.leftovers()),
                           "at the end, the mount differs from the oracle")
                self.check_flush(self.leftovers())
        finally:
            self.ex.release()
            if self.worker is not None:
                self.worker.stop(compare=False)
            if self.failed:     # leave nothing pending for the next example
                with contextlib.suppress(Exception):
                    self.h.mount.flush(timeout=30)
                self.h.new_log_problems()


def machine_for(h: Harness) -> type[ModelMachine]:
    return type(f"Model_{h.name}", (ModelMachine,), {"h": h})


def run_model(h: Harness, *, examples: int, steps: int, derandomize: bool = False) -> None:
    run_state_machine_as_test(machine_for(h), settings=settings(
        max_examples=examples, stateful_step_count=steps, deadline=None, database=None,
        derandomize=derandomize,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.generate, Phase.shrink, Phase.explain]))
    print(f"{h.name}: {dict(h.counts)} notes {dict(h.notes)}")


# Modes with a known open finding: a non-strict xfail each ({mode: why}); none now.
KNOWN: dict[str, str] = {
    "writeback_delay0": "open (issue 13): one CI run on 2026-12-02 found a chown lost "
                        "across kill -9 and remount (b: uid 0 != 1001), not yet "
                        "reproduced or understood; see README, Testing",
}
CI_MODES = [pytest.param(m, marks=pytest.mark.xfail(reason=KNOWN[m], strict=False))
            if m in KNOWN else m for m in MODES]


@pytest.mark.parametrize("harness", CI_MODES, indirect=True)
def test_model(harness: Harness) -> None:
    """The CI-sized run: the same sequences every time (derandomized), so that a
    failure here is a regression that reproduces; WANCACHE_MODEL_RANDOM=1 explores
    (as the long run does)."""
    run_model(harness, examples=_env_int("WANCACHE_MODEL_EXAMPLES", 10),
              steps=_env_int("WANCACHE_MODEL_STEPS", 50),
              derandomize=not _env_int("WANCACHE_MODEL_RANDOM", 0))


@pytest.mark.long
@pytest.mark.timeout(0)
@pytest.mark.parametrize("harness", list(MODES), indirect=True)
def test_model_long(harness: Harness) -> None:
    data = _env_int("WANCACHE_MODEL_DATA_OPS", 100_000)
    names = _env_int("WANCACHE_MODEL_NAMESPACE_OPS", 20_000)
    while harness.counts["data"] < data or harness.counts["namespace"] < names:
        run_model(harness, examples=20, steps=200)
    assert harness.counts["data"] >= data and harness.counts["namespace"] >= names
