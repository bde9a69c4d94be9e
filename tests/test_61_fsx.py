"""fsx in Python: one file, one fd, pwrite (some past EOF), pread and ftruncate (down
and up) in a tight loop against an in-memory model of the file, in every mode.

A tight loop of os.pwrite/os.pread/os.ftruncate is fast enough to outrun the
write-back flusher, which is what it takes (issue 13: reads returned old bytes where
zeros were due).  `tests/data/writeback-truncate-corruption.ops` is a failing sequence
of the original report (fsx format: `write OFF LEN SIZE_BEFORE`, `truncate 0 NEWSIZE
OLDSIZE`, `read OFF LEN SIZE`, hex; `skip` lines were not run), replayed at full speed.
After each run the file is flushed and the server's copy must equal the model too.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from bench.modelops import MOUNT_MODES, bytes_diff, payload
from tests.conftest import Export, MountFactory

MAX_SIZE = 256 * 1024
MAX_LEN = 0x10000
REPRO = Path(__file__).parent / "data" / "writeback-truncate-corruption.ops"

Op = tuple[str, int, int]     # ("write", off, len) | ("truncate", size, 0) | ("read", off, len)


class FsxFile:
    """One fd on the mount and the model of what the file must contain."""

    def __init__(self, path: Path) -> None:
        self.name = path.name
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self.model = bytearray()
        self.log: list[str] = []

    def apply(self, n: int, op: Op) -> None:
        kind, a, b = op
        size = len(self.model)
        if kind == "write":
            data = payload(n, b)
            assert os.pwrite(self.fd, data, a) == b
            if size < a:
                self.model.extend(bytes(a - size))
            self.model[a:a + b] = data
        elif kind == "truncate":
            os.ftruncate(self.fd, a)
            if a < size:
                del self.model[a:]
            else:
                self.model.extend(bytes(a - size))
        else:
            got, want = os.pread(self.fd, b, a), bytes(self.model[a:a + b])
            if got != want:
                pytest.fail(f"{self.name}: op {n}: read {a:#x}+{b:#x} (size {size:#x}): "
                            f"{bytes_diff(got, want, a)}\nlast ops:\n" + "\n".join(self.log[-30:]))
        self.log.append(f"{n}: {kind} {a:#x} {b:#x} (size before {size:#x})")

    def __enter__(self) -> FsxFile:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd >= 0:       # failed: close anyway, or the mount cannot be unmounted
            os.close(self.fd)

    def close(self) -> None:
        os.fsync(self.fd)
        whole = os.pread(self.fd, len(self.model) + 1, 0)
        os.close(self.fd)
        self.fd = -1
        assert whole == bytes(self.model), bytes_diff(whole, bytes(self.model))


def random_ops(seed: int, n: int) -> list[Op]:
    rnd = random.Random(seed)
    ops: list[Op] = []
    size = 0
    for _ in range(n):
        k = rnd.random()
        if k < 0.4:
            off = rnd.randrange(MAX_SIZE)
            length = min(rnd.randrange(1, MAX_LEN), MAX_SIZE - off) or 1
            ops.append(("write", off, length))
            size = max(size, off + length)
        elif k < 0.55:
            size = rnd.randrange(MAX_SIZE)
            ops.append(("truncate", size, 0))
        else:
            ops.append(("read", rnd.randrange(max(1, size)), rnd.randrange(1, MAX_LEN)))
    return ops


def repro_ops() -> list[Op]:
    ops: list[Op] = []
    for line in REPRO.read_text().splitlines():
        f = line.split()
        if not f or f[0] == "skip":
            continue
        if f[0] == "truncate":
            ops.append(("truncate", int(f[2], 16), 0))
        else:
            ops.append((f[0], int(f[1], 16), int(f[2], 16)))
    return ops


@pytest.fixture(params=list(MOUNT_MODES))
def fsx_mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def fsx_mount(fsx_mode: str, mount_factory: MountFactory) -> Path:
    return mount_factory(MOUNT_MODES[fsx_mode]).mountpoint


def check_server(export: Export, name: str, f: FsxFile) -> None:
    on_server = (export.path / name).read_bytes()      # flushes the mounts first
    assert on_server == bytes(f.model), "server: " + bytes_diff(on_server, bytes(f.model))


def test_fsx_random(fsx_mode: str, fsx_mount: Path, export: Export) -> None:
    """Three seeds, one file each; fewer ops where every write goes to the server."""
    n = 2500 if fsx_mode.startswith("writeback") and fsx_mode != "writeback_off" else 800
    for seed in range(3):
        with FsxFile(fsx_mount / f"fsx{seed}") as f:
            for i, op in enumerate(random_ops(seed, n)):
                f.apply(i, op)
            f.close()
        check_server(export, f"fsx{seed}", f)


def test_fsx_replay_of_the_reported_sequence(fsx_mount: Path, export: Export) -> None:
    ops = repro_ops()
    assert len(ops) == 108
    with FsxFile(fsx_mount / "repro") as f:
        for n, op in enumerate(ops):
            f.apply(n, op)
        f.close()
    check_server(export, "repro", f)
