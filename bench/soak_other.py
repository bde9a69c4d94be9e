"""Another client of the soak's server: it changes and deletes the shared files
through NFS (wancache's own NFS client, straight to the server, not through the WAN)
while the mount reads them.

Every version of a file is whole (`soak_workloads.shared_content`) and replaces the
old one atomically: written in full to `shared-tmp/`, then renamed over the name.
The model (name -> version, None once deleted) is what the server must hold at the
end; a call whose outcome is unknown (the server restarted meanwhile) marks the name
unknown until it is read back from the server.
"""

from __future__ import annotations

import errno
import random
import threading
from collections import Counter
from pathlib import Path

import trio

from bench.nfsserver import NfsServer
from bench.soak_workloads import shared_content
from wancache.nfs_backend.client import ClientOptions, NfsClient, open_client
from wancache.nfs_backend.errors import NfsError, WancacheError
from wancache.nfs_backend.nfs3 import Sattr3, StableHow
from wancache.nfs_backend.transport import Cred, TransportOptions

ROOT = Cred.root()
CHUNK = 64 * 1024
SHARED, TMP = "shared", "shared-tmp"


class OtherClient:
    """Changes, deletes and re-creates the files of `soak/shared` at a steady pace,
    faster during a `burst`."""

    def __init__(self, server: NfsServer, soak_dir: str, files: int, seed: int) -> None:
        self.server = server
        self.export = f"{server.export_path}/{soak_dir}"
        self.names = [f"s{i:02d}.dat" for i in range(files)]
        self.model: dict[str, int | None] = dict.fromkeys(self.names, 0)
        self.unknown: set[str] = set()
        self._next = dict.fromkeys(self.names, 1)
        self._rng = random.Random(seed)
        self._burst = 0
        self._lock = threading.Lock()
        self.ops: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()

    def setup(self, soak_dir: Path) -> None:
        """Version 0 of every file, on the server's disk before anything is mounted."""
        (soak_dir / TMP).mkdir(mode=0o755)
        shared = soak_dir / SHARED
        shared.mkdir(mode=0o755, exist_ok=True)
        for name in self.names:
            (shared / name).write_bytes(shared_content(name, 0))

    def burst(self, ops: int) -> None:
        """Make the next `ops` changes back to back."""
        with self._lock:
            self._burst += ops

    def run(self, stop: threading.Event, period: float) -> None:
        """Change one file every `period` seconds until `stop`; then settle unknowns."""
        trio.run(self._main, stop, period)

    async def _main(self, stop: threading.Event, period: float) -> None:
        opts = ClientOptions(nfs_port=self.server.nfs_port, mount_port=self.server.mount_port,
                             transport=TransportOptions(timeout=15.0, timeo=3.0))
        async with trio.open_nursery() as nursery:
            client: NfsClient | None = None
            while True:
                done = stop.is_set()
                try:
                    if client is None:
                        client = await open_client(nursery, "127.0.0.1", self.export, opts)
                    dirs = await self._dirs(client)
                    await self._settle(client, dirs)
                    if done:
                        break
                    await self._change(client, dirs)
                except (WancacheError, OSError) as exc:
                    self.errors[type(exc).__name__] += 1
                    if done and self.errors[type(exc).__name__] > 50:
                        break
                with self._lock:
                    fast = self._burst > 0
                    self._burst = max(0, self._burst - 1)
                await trio.sleep(0.05 if fast else period)
            if client is not None:
                client.close()
            nursery.cancel_scope.cancel()

    async def _dirs(self, client: NfsClient) -> tuple[bytes, bytes]:
        root = client.root_fh
        return ((await client.lookup(root, SHARED.encode(), ROOT)).fh,
                (await client.lookup(root, TMP.encode(), ROOT)).fh)

    async def _change(self, client: NfsClient, dirs: tuple[bytes, bytes]) -> None:
        name = self._rng.choice(self.names)
        self.unknown.add(name)
        if self.model[name] is not None and self._rng.random() < 0.3:
            await client.remove(dirs[0], name.encode(), ROOT)
            self.model[name] = None
            self.ops["delete"] += 1
        else:
            version = self._next[name]
            self._next[name] += 1
            await self._put(client, dirs, name, shared_content(name, version))
            self.ops["create" if self.model[name] is None else "change"] += 1
            self.model[name] = version
        self.unknown.discard(name)

    async def _put(self, client: NfsClient, dirs: tuple[bytes, bytes], name: str,
                   data: bytes) -> None:
        tmp = f"{name}.tmp".encode()
        fh = (await client.create(dirs[1], tmp, ROOT, attrs=Sattr3(mode=0o644, size=0))).object
        assert fh is not None
        for off in range(0, len(data), CHUNK):
            await client.write(fh, off, data[off:off + CHUNK], ROOT,
                               stable=StableHow.FILE_SYNC)
        await client.rename(dirs[1], tmp, dirs[0], name.encode(), ROOT)

    async def _settle(self, client: NfsClient, dirs: tuple[bytes, bytes]) -> None:
        """Read back from the server what an unknown outcome left."""
        for name in sorted(self.unknown):
            try:
                await client.remove(dirs[1], f"{name}.tmp".encode(), ROOT)
            except NfsError as exc:
                if exc.errno != errno.ENOENT:
                    raise
            self.model[name] = await self._version_on_server(client, dirs[0], name)
            self.unknown.discard(name)
            self.ops["settled"] += 1

    async def _version_on_server(self, client: NfsClient, dir_fh: bytes,
                                 name: str) -> int | None:
        try:
            fh = (await client.lookup(dir_fh, name.encode(), ROOT)).fh
        except NfsError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise
        data = bytearray()
        while True:
            res = await client.read(fh, len(data), CHUNK, ROOT)
            data += res.data
            if res.eof or not res.data:
                break
        head = bytes(data).partition(b"\n")[0].decode(errors="replace")
        try:
            return int(head.rsplit(" v", 1)[1])
        except (IndexError, ValueError):
            self.errors["unreadable version on the server"] += 1
            return -1       # matches no version: the final check reports the file

    def expected(self) -> dict[str, bytes]:
        """What the server's shared directory must hold."""
        return {n: shared_content(n, v) for n, v in self.model.items() if v is not None}
