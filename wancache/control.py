"""The control socket of a mount: how `wancache status/flush/...` and tests talk to
the daemon.

One root-only Unix socket per mount, at `/run/wancache/<mount point>.sock` (or a
hash of it, with the mount point in `<hash>.mountpoint`, if that is too long).  The
protocol is one JSON object per line: a request `{"cmd": NAME, ...}` is answered by
zero or more progress lines `{"progress": {...}}` and one final line, either
`{"ok": true, "result": ...}` or `{"ok": false, "error": "..."}`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from pathlib import Path
from typing import Any

import trio

log = logging.getLogger(__name__)

RUN_DIR_ENV = "WANCACHE_RUN_DIR"
MAX_LINE = 1 << 20
MAX_SOCKET_PATH = 100   # bytes: sockaddr_un holds 108 with the NUL
_long_names: dict[Path, str] = {}   # hashed socket paths -> their mount points

# A handler gets the request and a `progress(dict)` callback; returns the result.
Progress = Callable[[dict[str, Any]], Awaitable[None]]
Handler = Callable[[dict[str, Any], Progress], Awaitable[Any]]


class ControlError(RuntimeError):
    """The daemon refused a request, or is not there."""


def run_dir() -> Path:
    return Path(os.environ.get(RUN_DIR_ENV, "/run/wancache"))


def socket_path(mountpoint: str | Path) -> Path:
    """The control socket of the mount at `mountpoint`: the path, '/' -> '_', or, if
    that makes too long a socket path, a hash (the mount point is then written
    next to the socket, see `ControlServer`)."""
    real = os.path.realpath(mountpoint)
    name = (real.strip("/") or "root").replace("_", "__").replace("/", "_")
    path = run_dir() / f"{name}.sock"
    if len(os.fsencode(str(path))) > MAX_SOCKET_PATH:
        digest = hashlib.sha256(os.fsencode(real)).hexdigest()[:20]
        path = run_dir() / f"~{digest}.sock"
        _long_names[path] = real
    return path


def _mountpoint_file(sock: Path) -> Path:
    return sock.with_name(sock.name[:-5] + ".mountpoint")


def mount_label(mountpoint: str | Path) -> str:
    """The absolute path of a mount point, for status and metrics: safe to compute
    while mounted, as only the parent directory is resolved (asking our own mount
    from inside the daemon would deadlock)."""
    path = os.path.abspath(mountpoint)
    if path == "/":
        return path
    parent, name = os.path.split(path)
    return os.path.join(os.path.realpath(parent), name)


def mounts() -> list[Path]:
    """Mount points whose daemons have a control socket here."""
    found = []
    for sock in sorted(run_dir().glob("*.sock")):
        name = sock.name[:-5]
        with contextlib.suppress(OSError):   # a hashed name: the mount point is beside
            found.append(Path(_mountpoint_file(sock).read_text()))
            continue
        path = "/" + name.replace("__", "\0").replace("_", "/").replace("\0", "_")
        found.append(Path(path))
    return found


class ControlServer:
    """Serves the control socket of one mount in the mount's nursery."""

    def __init__(self, path: Path, handlers: dict[str, Handler]) -> None:
        """`path` comes from `socket_path()`, computed BEFORE mounting: resolving the
        mount point afterwards would ask our own FUSE file system and deadlock."""
        self.path = path
        self.handlers = handlers

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.path.parent, 0o700)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        long_name = _long_names.get(self.path)
        if long_name is not None:
            fd = os.open(_mountpoint_file(self.path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                         0o600)
            with os.fdopen(fd, "w") as f:
                f.write(long_name)
        listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            await listener.bind(str(self.path))
        finally:
            os.umask(old_umask)
        listener.listen(16)
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    conn, _ = await listener.accept()
                    nursery.start_soon(self._serve, trio.SocketStream(conn))
        finally:
            listener.close()
            with contextlib.suppress(OSError):
                self.path.unlink()
            if long_name is not None:
                with contextlib.suppress(OSError):
                    _mountpoint_file(self.path).unlink()

    async def _serve(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                async for request in _lines(stream):
                    await self._answer(stream, request)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def _answer(self, stream: trio.SocketStream, request: dict[str, Any]) -> None:
        async def progress(info: dict[str, Any]) -> None:
            await _send(stream, {"progress": info})

        handler = self.handlers.get(str(request.get("cmd")))
        if handler is None:
            await _send(stream, {"ok": False, "error": f"unknown command {request.get('cmd')!r}"})
            return
        try:
            result = await handler(request, progress)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise
        except Exception as exc:
            if not isinstance(exc, (OSError, ValueError, LookupError, ControlError)):
                log.exception("control command %r failed", request.get("cmd"))
            await _send(stream, {"ok": False, "error": str(exc) or type(exc).__name__})
            return
        await _send(stream, {"ok": True, "result": result})


async def _send(stream: trio.SocketStream, obj: dict[str, Any]) -> None:
    await stream.send_all(json.dumps(obj, default=str).encode() + b"\n")


async def _lines(stream: trio.SocketStream) -> AsyncIterator[dict[str, Any]]:
    buf = b""
    while True:
        data = await stream.receive_some(65536)
        if not data:
            return
        buf += data
        if len(buf) > MAX_LINE:
            raise trio.BrokenResourceError("request too long")
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if line.strip():
                try:
                    obj = json.loads(line)
                except ValueError:
                    obj = {"cmd": None}
                yield obj if isinstance(obj, dict) else {"cmd": None}


def request_iter(mountpoint: str | Path, cmd: str, timeout: float | None = 30.0,
                 **args: Any) -> Generator[dict[str, Any], None, Any]:
    """Send one request; yield progress dicts, then return the result (as the
    generator's return value, see `request`).  ControlError if refused/unreachable."""
    path = socket_path(mountpoint)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except FileNotFoundError:
        sock.close()
        raise ControlError(f"no wancache mount at {mountpoint} (no {path})") from None
    except ConnectionRefusedError:
        sock.close()
        raise ControlError(f"the daemon of {mountpoint} is not running (stale {path})") \
            from None
    except PermissionError:
        sock.close()
        raise ControlError(f"permission denied on {path} (root only)") from None
    with sock, sock.makefile("rwb") as f:
        f.write(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        f.flush()
        for line in f:
            msg = json.loads(line)
            if "progress" in msg:
                yield msg["progress"]
                continue
            if not msg.get("ok"):
                raise ControlError(msg.get("error", "request failed"))
            return msg.get("result")
    raise ControlError("the daemon closed the connection")


def request(mountpoint: str | Path, cmd: str, timeout: float | None = 30.0,
            **args: Any) -> Any:
    """Send one request and return its result (progress is discarded)."""
    it = request_iter(mountpoint, cmd, timeout, **args)
    while True:
        try:
            next(it)
        except StopIteration as stop:
            return stop.value
