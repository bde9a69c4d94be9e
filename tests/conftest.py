"""Shared fixtures: a real nfs-ganesha server, per-test exports, log hygiene.

Test files are numbered by layer: 0x foundation (server, WAN emulator), 1x codec,
2x NFS client against ganesha, 3x caches against a fake backend, 4x `Operations`
called directly, 5x a real FUSE mount, 6x write-back and crashes, 7x operating it
(mount helper, metrics, CLI), 8x the bench.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from bench.nfsserver import NfsServer, start_server
from bench.wcmount import WancacheMount
from wancache.nfs_backend.client import ClientOptions, open_client
from wancache.nfs_backend.errors import NfsError
from wancache.nfs_backend.nfs3 import Sattr3, StableHow
from wancache.nfs_backend.transport import Cred


@pytest.fixture(scope="session")
def nfs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NfsServer]:
    """One ganesha for the whole session; tests get their own export subdirectory."""
    server = start_server(workdir=tmp_path_factory.mktemp("ganesha"))
    yield server
    server.stop()


@pytest.fixture
def private_nfs_server(tmp_path: Path) -> Iterator[NfsServer]:
    """A ganesha of this test's own, for tests that stop, kill or restart it."""
    server = start_server(workdir=tmp_path / "ganesha")
    yield server
    server.stop()


@dataclass
class Export:
    """A directory of the server's export that belongs to one test."""

    server: NfsServer
    subdir: str
    mounts: list[WancacheMount] = field(default_factory=list)

    @property
    def path(self) -> Path:
        """The directory on the server's local disk (read it; write through NFS).

        Looking at the server means looking at what reached it: each time this path
        (or one below it) is used, every wancache mount of this export first flushes
        its write-back journal.
        """
        return _server_path(self)(self.raw_path)

    @property
    def raw_path(self) -> Path:
        """The directory on the server's disk, without flushing any mount first."""
        return self.server.export / self.subdir

    def flush_mounts(self) -> None:
        for m in self.mounts:
            if m.proc is not None and m.proc.poll() is None:
                m.flush()

    @property
    def export_path(self) -> str:
        """The path a MOUNT client asks for."""
        return f"{self.server.export_path}/{self.subdir}"

    @property
    def spec(self) -> str:
        return self.server.spec(self.subdir)

    def url(self, path: str = "") -> str:
        """nfs:// URL (for libnfs-utils) of `path` inside this test's directory."""
        return self.server.url(f"{self.subdir}/{path}" if path else self.subdir)

    def nfs_cat(self, path: str) -> bytes:
        """Read a file the way an independent NFS client sees it."""
        self.flush_mounts()
        return run_tool(["nfs-cat", self.url(path)]).stdout

    def nfs_cp_in(self, local: Path, path: str) -> None:
        """Write a file through NFS as another client would."""
        run_tool(["nfs-cp", str(local), self.url(path)])

    def overwrite_as_other_client(self, path: str, data: bytes) -> None:
        """Replace a file's contents through NFS, as another client would (nfs-cp
        cannot overwrite): an independent connection of our NFS client."""
        trio.run(_overwrite, self, path.encode(), data)

    def nfs_ls(self, path: str = "") -> list[str]:
        """Names in a directory as an independent NFS client lists them."""
        self.flush_mounts()
        out = run_tool(["nfs-ls", self.url(path)]).stdout.decode(errors="surrogateescape")
        rows = (line.split(None, 5) for line in out.splitlines())
        # A name containing a newline spills onto a line of its own: skip those.
        return sorted(row[5] for row in rows if len(row) == 6)


def _server_path(export: Export) -> type[Path]:
    """A Path class whose file system uses flush `export`'s mounts first."""

    class ServerPath(type(Path())):  # type: ignore[misc]
        def __fspath__(self) -> str:
            export.flush_mounts()
            return str(self)

    return ServerPath


async def _overwrite(export: Export, path: bytes, data: bytes) -> None:
    opts = ClientOptions(nfs_port=export.server.nfs_port, mount_port=export.server.mount_port)
    root = Cred.root()
    async with trio.open_nursery() as nursery:
        client = await open_client(nursery, "127.0.0.1", export.export_path, opts)
        fh = client.root_fh
        parts = path.split(b"/")
        for part in parts[:-1]:
            fh = (await client.lookup(fh, part, root)).fh
        target: bytes | None
        try:
            target = (await client.lookup(fh, parts[-1], root)).fh
        except NfsError:
            target = (await client.create(fh, parts[-1], root)).object
        assert target is not None
        await client.setattr(target, Sattr3(size=0), root)
        await client.write(target, 0, data, root, stable=StableHow.FILE_SYNC)
        client.close()


def wait_until(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll `cond` until it holds or `timeout` seconds pass; whether it held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def run_tool(argv: list[str], **kw: object) -> subprocess.CompletedProcess[bytes]:
    """Run a command; fail the test with its stderr if it fails."""
    if shutil.which(argv[0]) is None:
        pytest.fail(f"{argv[0]} is not installed (scripts/bootstrap installs it)")
    proc = subprocess.run(argv, capture_output=True, timeout=120, check=False, **kw)  # type: ignore[call-overload]
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.decode()!r}")
    return proc  # type: ignore[no-any-return]


@pytest.fixture
def export(nfs_server: NfsServer, request: pytest.FixtureRequest) -> Export:
    """A fresh, empty, world-writable directory in the session server's export."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)[:80]
    path = nfs_server.export / name
    n = 0
    while path.exists():
        n += 1
        path = nfs_server.export / f"{name}.{n}"
    path.mkdir(mode=0o777)
    path.chmod(0o777)
    return Export(nfs_server, path.name)


# Log hygiene (as in S3QL): a warning or error logged by wancache fails the test
# unless the test says it expects one with the `allow_log_warnings` fixture.

@pytest.fixture(autouse=True)
def _daemon_logs_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Daemon-mode mounts log to files when there is no syslog: keep them in tmp."""
    monkeypatch.setenv("WANCACHE_LOG_DIR", str(tmp_path / "daemon-logs"))


@pytest.fixture
def allow_log_warnings() -> None:
    """Mark this test as expecting wancache to log warnings."""


@pytest.fixture(autouse=True)
def _fail_on_log_warnings(request: pytest.FixtureRequest,
                          caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.INFO, logger="wancache")
    yield
    if "allow_log_warnings" in request.fixturenames:
        return
    bad = [r for r in caplog.get_records("call")
           if r.levelno >= logging.WARNING and r.name.startswith("wancache")]
    if bad:
        pytest.fail("unexpected log warnings: " + "; ".join(
            f"{r.name}: {r.getMessage()}" for r in bad[:5]))


# A real wancache mount over the test's export, in a child process.

MountFactory = Callable[..., WancacheMount]
LOG_PROBLEMS = re.compile(r"Traceback|\b(ERROR|CRITICAL)\b")
LOG_WARNINGS = re.compile(r"\bWARNING\b")


@pytest.fixture
def mount_factory(export: Export, tmp_path: Path,
                  request: pytest.FixtureRequest) -> Iterator[MountFactory]:
    """`make(options, ...)` mounts wancache (foreground child) and returns the mount.

    Every mount is unmounted at the end of the test, and its log must show no
    traceback or error (nor warning, unless the test uses `allow_log_warnings`).
    """
    made: list[WancacheMount] = []

    def make(options: list[str] | tuple[str, ...] = (), *, target: Export | None = None,
             nfs_port: int | None = None, mount_port: int | None = None,
             name: str = "", start: bool = True) -> WancacheMount:
        exp = target or export
        mnt_dir = tmp_path / (name or f"mnt{len(made)}")
        cache = tmp_path / f"cache-{name or len(made)}"
        opts = [f"nfsport={nfs_port or exp.server.nfs_port}",
                f"mountport={mount_port or exp.server.mount_port}",
                f"cache_dir={cache}", "metrics=off", *options]
        m = WancacheMount(exp.spec, mnt_dir, opts, log_path=tmp_path / f"{mnt_dir.name}.log")
        made.append(m)
        exp.mounts.append(m)
        return m.start() if start else m

    yield make
    errors = []
    for m in made:
        try:
            m.unmount()
        except Exception as exc:
            errors.append(f"unmount {m.mountpoint}: {exc}")
        text = m.log()
        if LOG_PROBLEMS.search(text) or (LOG_WARNINGS.search(text) and
                                         "allow_log_warnings" not in request.fixturenames):
            errors.append(f"{m.log_path} shows problems:\n{text[-3000:]}")
    if errors:
        pytest.fail("\n".join(errors))


CACHE_MODES = {"cache_off": ["cache=off"], "cached": []}


@pytest.fixture(params=list(CACHE_MODES))
def mode(request: pytest.FixtureRequest) -> str:
    """Each key of CACHE_MODES: a behaviour must hold with and without caches."""
    return str(request.param)


@pytest.fixture
def srv(export: Export) -> Path:
    """The test's export directory on the server's local disk (read only)."""
    return export.path


@pytest.fixture
def mnt(mount_factory: MountFactory) -> WancacheMount:
    """A wancache mount with default options."""
    return mount_factory()


@pytest.fixture
def passthrough(mount_factory: MountFactory) -> WancacheMount:
    """A wancache mount with every cache off."""
    return mount_factory(["cache=off"])
