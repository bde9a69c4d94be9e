"""WAN emulator: a userspace TCP proxy that adds latency and bandwidth limits.

It sits between a client (wancache) and an NFS server on 127.0.0.1 and makes the
link behave like a WAN pipe: each direction is one link shared by all proxied
connections, a chunk occupies that link for ``n * 8 / bandwidth`` seconds and
arrives one one-way delay after its transmission ends, so many requests in flight
share the bandwidth instead of paying one RTT each.  It also counts ONC-RPC calls
and replies (RFC 5531 record marking) and can simulate outages: the link down
(`stop`), bytes lost on open connections (`blackhole`), or bytes held on open
connections and delivered late (`stall`).

Library use (inside trio)::

    emu = WanEmulator(("127.0.0.1", 2049), PROFILES["branch"])
    port = await nursery.start(emu.run)

From synchronous code, ``with WanEmulatorThread(target, profile) as emu: ...``.
Command: ``python -m bench.wanem --target 127.0.0.1:2049 --profile branch``.

This module is self-contained: it must not import the ``wancache`` package.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import signal
import socket
import struct
import sys
import threading
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import trio

__all__ = [
    "PROFILES",
    "LinkProfile",
    "RecordParser",
    "WanEmulator",
    "WanEmulatorThread",
    "decode_call",
    "decode_reply",
    "main",
]

CHUNK = 64 * 1024
"""Largest read from a source socket."""
MIN_WINDOW = 4 * 1024 * 1024
"""Smallest automatic per-connection, per-direction queue limit."""
MAX_RECORD = 64 * 1024 * 1024
"""A record longer than this is taken as non-RPC traffic."""
UNLIMITED = math.inf
"""Pass as a bandwidth to `WanEmulator.set_link` to remove the limit."""

_T = TypeVar("_T")


@dataclass(frozen=True)
class LinkProfile:
    """WAN link parameters; a bandwidth of None means unlimited.

    The one-way delays default to half the RTT each; set ``up_delay_ms`` /
    ``down_delay_ms`` for an asymmetric link.
    """

    rtt_ms: float = 0.0
    up_mbit: float | None = None
    down_mbit: float | None = None
    up_delay_ms: float | None = None
    down_delay_ms: float | None = None

    @property
    def up_delay(self) -> float:
        """Client-to-server one-way delay in seconds."""
        ms = self.rtt_ms / 2 if self.up_delay_ms is None else self.up_delay_ms
        return ms / 1000

    @property
    def down_delay(self) -> float:
        """Server-to-client one-way delay in seconds."""
        ms = self.rtt_ms / 2 if self.down_delay_ms is None else self.down_delay_ms
        return ms / 1000

    @property
    def rtt(self) -> float:
        """Round-trip propagation time in seconds."""
        return self.up_delay + self.down_delay

    def describe(self) -> str:
        """Human-readable summary such as ``rtt=50ms, up=100Mbit/s, down=unlimited``."""

        def bw(mbit: float | None) -> str:
            return "unlimited" if mbit is None else f"{mbit:g}Mbit/s"

        return f"rtt={self.rtt * 1000:g}ms, up={bw(self.up_mbit)}, down={bw(self.down_mbit)}"


PROFILES: dict[str, LinkProfile] = {
    "lan": LinkProfile(0, None, None),
    "branch": LinkProfile(50, 100, 100),
    "far": LinkProfile(150, 20, 20),
}

# --------------------------------------------------------------------------- RPC parsing


class RecordParser:
    """Incremental ONC-RPC record-marking parser (RFC 5531 §11).

    Feed it a byte stream in chunks split anywhere; it returns, per complete
    record, the record's first ``keep`` bytes (across fragments).  Memory use is
    bounded: record bodies are never buffered.  A record longer than
    ``max_record`` means the stream is not RPC: the parser reports it as garbage
    (``None``) and ignores the rest of the stream.
    """

    def __init__(self, keep: int = 24, max_record: int = MAX_RECORD) -> None:
        self._keep = keep
        self._max = max_record
        self._hdr = bytearray()
        self._in_fragment = False
        self._remaining = 0
        self._last = False
        self._prefix = bytearray()
        self._record_len = 0
        self.desynced = False

    def desync(self) -> None:
        """Stop parsing: bytes of this stream were lost, record boundaries are unknown."""
        self.desynced = True

    def feed(self, data: bytes) -> list[bytes | None]:
        """Consume `data`; return a prefix per completed record, None for garbage."""
        out: list[bytes | None] = []
        if self.desynced:
            return out
        view = memoryview(data)
        i, n = 0, len(view)
        while i < n:
            if not self._in_fragment:
                take = min(4 - len(self._hdr), n - i)
                self._hdr += view[i : i + take]
                i += take
                if len(self._hdr) < 4:
                    break
                word = int.from_bytes(self._hdr, "big")
                self._hdr.clear()
                self._last = bool(word & 0x80000000)
                self._remaining = word & 0x7FFFFFFF
                self._record_len += self._remaining
                if self._record_len > self._max:
                    out.append(None)
                    self.desync()
                    return out
                self._in_fragment = True
            else:
                take = min(self._remaining, n - i)
                room = self._keep - len(self._prefix)
                if room > 0:
                    self._prefix += view[i : i + min(room, take)]
                self._remaining -= take
                i += take
            if self._in_fragment and self._remaining == 0:
                self._in_fragment = False
                if self._last:
                    out.append(bytes(self._prefix))
                    self._prefix.clear()
                    self._record_len = 0
        return out


def decode_call(prefix: bytes) -> tuple[int, int, int, int] | None:
    """(xid, prog, vers, proc) of an RPC CALL record's first 24 bytes, else None."""
    if len(prefix) < 24:
        return None
    xid, msg_type, rpcvers, prog, vers, proc = struct.unpack_from(">6I", prefix)
    if msg_type != 0 or rpcvers != 2:
        return None
    return xid, prog, vers, proc


def decode_reply(prefix: bytes) -> int | None:
    """The xid of an RPC REPLY record's first bytes, else None."""
    if len(prefix) < 8:
        return None
    xid, msg_type = struct.unpack_from(">2I", prefix)
    return xid if msg_type == 1 else None


# --------------------------------------------------------------------------- the link


class _Link:
    """One direction of the WAN: a serializing transmitter plus a propagation delay."""

    def __init__(self, mbit: float | None, delay: float) -> None:
        self.bytes_per_s: float | None = None
        self.delay = delay
        self.free_at = -math.inf
        self.set_bandwidth(mbit)

    def set_bandwidth(self, mbit: float | None) -> None:
        self.bytes_per_s = None if mbit is None else mbit * 1e6 / 8

    def schedule(self, nbytes: int, now: float) -> float:
        """Put `nbytes` on the link at `now`; return when they reach the other side."""
        start = max(now, self.free_at)
        end = start if self.bytes_per_s is None else start + nbytes / self.bytes_per_s
        self.free_at = end
        return end + self.delay


class _Pipe:
    """One direction of one proxied connection: bytes on the link, not yet delivered."""

    def __init__(self, direction: str, src: trio.socket.SocketType,
                 dst: trio.socket.SocketType) -> None:
        self.direction = direction
        self.src = src
        self.dst = dst
        self.queue: deque[tuple[float, bytes | None]] = deque()
        self.queued = 0
        self.has_data = trio.lowlevel.ParkingLot()
        self.has_space = trio.lowlevel.ParkingLot()
        self.parser = RecordParser()

    def push(self, due: float, data: bytes | None) -> None:
        self.queue.append((due, data))
        if data is not None:
            self.queued += len(data)
        self.has_data.unpark_all()


def _set_nodelay(sock: trio.socket.SocketType) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


class _Conn:
    """A proxied connection: the accepted client socket and the upstream socket."""

    def __init__(self, client: trio.socket.SocketType) -> None:
        self.client = client
        self.upstream: trio.socket.SocketType | None = None
        self.scope = trio.CancelScope()
        self.open_at = math.inf
        self.inflight: Counter[int] = Counter()
        self.pipes: tuple[_Pipe, ...] = ()
        self.forgotten = False

    def _sockets(self) -> list[trio.socket.SocketType]:
        return [s for s in (self.client, self.upstream) if s is not None and s.fileno() != -1]

    def abort(self) -> None:
        """Reset both sides (SO_LINGER 0 makes close send RST) and stop its tasks."""
        for s in self._sockets():
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
        self.scope.cancel()

    def close(self) -> None:
        """Close both sides normally."""
        for s in self._sockets():
            s.close()


async def _send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        sent = await sock.send(view)
        view = view[sent:]


# --------------------------------------------------------------------------- emulator


class WanEmulator:
    """TCP proxy emulating a WAN link to `target`; use only from its trio thread."""

    def __init__(self, target: tuple[str, int], profile: LinkProfile | None = None, *,
                 listen: tuple[str, int] = ("127.0.0.1", 0),
                 window: int | None = None) -> None:
        self.target = (target[0], int(target[1]))
        self.profile = profile if profile is not None else LinkProfile()
        self._listen_addr: tuple[str, int] = (listen[0], int(listen[1]))
        self._window_fixed = window
        self._links = {
            "up": _Link(self.profile.up_mbit, self.profile.up_delay),
            "down": _Link(self.profile.down_mbit, self.profile.down_delay),
        }
        self._nursery: trio.Nursery | None = None
        self._listener: trio.socket.SocketType | None = None
        self._accept_scope: trio.CancelScope | None = None
        self._conns: set[_Conn] = set()
        self._blackhole = False
        self._blackhole_off = trio.Event()
        self._blackhole_off.set()
        self._stall_off = trio.Event()
        self._stall_off.set()
        self.in_flight = 0
        self.connections_total = 0
        self.reset_counts()

    # ----- properties

    @property
    def port(self) -> int:
        """The listening port (known once `run` has started)."""
        return self._listen_addr[1]

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) clients connect to."""
        return self._listen_addr

    @property
    def listening(self) -> bool:
        """False during an outage (`stop`)."""
        return self._listener is not None

    @property
    def connections_open(self) -> int:
        """Proxied connections currently open."""
        return len(self._conns)

    def window(self, direction: str) -> int:
        """Bytes that may be queued per connection in `direction` before reading stops."""
        if self._window_fixed is not None:
            return self._window_fixed
        mbit = self.profile.up_mbit if direction == "up" else self.profile.down_mbit
        if mbit is None:
            return MIN_WINDOW
        return max(MIN_WINDOW, int(2 * mbit * 1e6 / 8 * self.profile.rtt))

    # ----- running

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and proxy until cancelled; ``task_status.started(port)``."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                self.start()
                task_status.started(self.port)
                await trio.sleep_forever()
            finally:
                self.stop()
                self._nursery = None

    def start(self) -> None:
        """End an outage: listen again on the same address (no-op if listening)."""
        if self._nursery is None:
            raise RuntimeError("WanEmulator.start() needs run() to be running")
        if self._listener is not None:
            return
        std = socket.socket(_family(self._listen_addr[0]), socket.SOCK_STREAM)
        try:
            std.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            std.bind(self._listen_addr)
            std.listen(128)
            std.setblocking(False)
        except OSError:
            std.close()
            raise
        self._listen_addr = (self._listen_addr[0], std.getsockname()[1])
        self._listener = trio.socket.from_stdlib_socket(std)
        self._accept_scope = trio.CancelScope()
        self._nursery.start_soon(self._accept_loop, self._listener, self._accept_scope)

    def stop(self) -> None:
        """WAN outage: close the listener and reset every proxied connection."""
        if self._accept_scope is not None:
            self._accept_scope.cancel()
            self._accept_scope = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self.drop_connections()

    def drop_connections(self) -> None:
        """Reset all current proxied connections; keep listening."""
        for conn in list(self._conns):
            conn.abort()
            self._forget(conn)

    def blackhole(self, on: bool) -> None:
        """While on, connections stay open but every byte in either direction is lost."""
        if on and not self._blackhole:
            self._blackhole_off = trio.Event()
        elif not on and self._blackhole:
            self._blackhole_off.set()
        self._blackhole = on

    @property
    def stalled(self) -> bool:
        """True while `stall` holds every byte."""
        return not self._stall_off.is_set()

    def stall(self, on: bool) -> None:
        """While on, connections stay open and nothing is delivered either way; the
        bytes sent meanwhile are held (queued up to the window, then the senders
        block, as TCP would) and delivered in order once the stall ends."""
        if on and not self.stalled:
            self._stall_off = trio.Event()
        elif not on:
            self._stall_off.set()

    def set_link(self, rtt_ms: float | None = None, up_mbit: float | None = None,
                 down_mbit: float | None = None, *, up_delay_ms: float | None = None,
                 down_delay_ms: float | None = None) -> None:
        """Change link parameters now; None keeps a value, `UNLIMITED` removes a limit.

        Setting `rtt_ms` resets both one-way delays to half of it unless they are
        given too.  Bytes already on the link keep their delivery times.
        """
        changes: dict[str, Any] = {}
        if rtt_ms is not None:
            changes.update(rtt_ms=float(rtt_ms), up_delay_ms=None, down_delay_ms=None)
        for name, value in (("up_mbit", up_mbit), ("down_mbit", down_mbit)):
            if value is not None:
                if value <= 0:
                    raise ValueError(f"{name} must be > 0 (use UNLIMITED for no limit)")
                changes[name] = None if math.isinf(value) else float(value)
        if up_delay_ms is not None:
            changes["up_delay_ms"] = float(up_delay_ms)
        if down_delay_ms is not None:
            changes["down_delay_ms"] = float(down_delay_ms)
        self.profile = dataclasses.replace(self.profile, **changes)
        self._links["up"].set_bandwidth(self.profile.up_mbit)
        self._links["up"].delay = self.profile.up_delay
        self._links["down"].set_bandwidth(self.profile.down_mbit)
        self._links["down"].delay = self.profile.down_delay
        for conn in self._conns:  # the window may have grown
            for pipe in conn.pipes:
                pipe.has_space.unpark_all()

    # ----- accounting

    def reset_counts(self) -> None:
        """Zero the counters; ``max_in_flight`` restarts from the calls now in flight."""
        self.counts: Counter[tuple[int, int, int]] = Counter()
        self.replies = 0
        self.garbage_records = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.bytes_blackholed = 0
        self.connections_total = 0
        self.max_in_flight = self.in_flight
        self.peak_queued = 0

    def calls(self, prog: int | None = None, proc: int | None = None, *,
              vers: int | None = None) -> int:
        """Number of RPC calls forwarded upstream matching the given fields."""
        return sum(n for (p, v, c), n in self.counts.items()
                   if (prog is None or p == prog) and (proc is None or c == proc)
                   and (vers is None or v == vers))

    def snapshot(self) -> dict[str, Any]:
        """Counters and state as a JSON-serializable dict."""
        counts = {f"{p}.{v}.{c}": n for (p, v, c), n in sorted(self.counts.items())}
        return {
            "counts": counts,
            "calls": sum(self.counts.values()),
            "replies": self.replies,
            "garbage_records": self.garbage_records,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "bytes_blackholed": self.bytes_blackholed,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "peak_queued": self.peak_queued,
            "connections_total": self.connections_total,
            "connections_open": self.connections_open,
            "listening": self.listening,
            "blackhole": self._blackhole,
            "stalled": self.stalled,
            "link": {**dataclasses.asdict(self.profile),
                     "window_up": self.window("up"), "window_down": self.window("down")},
        }

    def _forget(self, conn: _Conn) -> None:
        if conn.forgotten:
            return
        conn.forgotten = True
        self.in_flight -= sum(conn.inflight.values())
        conn.inflight.clear()
        self._conns.discard(conn)

    def _account(self, conn: _Conn, pipe: _Pipe, data: bytes) -> None:
        """Count bytes and RPC records of `data`, about to be delivered."""
        up = pipe.direction == "up"
        if up:
            self.bytes_up += len(data)
        else:
            self.bytes_down += len(data)
        for prefix in pipe.parser.feed(data):
            if prefix is None:
                self.garbage_records += 1
            elif up:
                call = decode_call(prefix)
                if call is None:
                    self.garbage_records += 1
                    continue
                xid, prog, vers, proc = call
                self.counts[prog, vers, proc] += 1
                conn.inflight[xid] += 1
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
            else:
                xid_or_none = decode_reply(prefix)
                if xid_or_none is None:
                    self.garbage_records += 1
                    continue
                self.replies += 1
                if conn.inflight[xid_or_none] > 0:
                    conn.inflight[xid_or_none] -= 1
                    self.in_flight -= 1
                if conn.inflight[xid_or_none] == 0:
                    del conn.inflight[xid_or_none]

    # ----- proxying

    async def _accept_loop(self, listener: trio.socket.SocketType,
                           scope: trio.CancelScope) -> None:
        with scope:
            while True:
                try:
                    client, _ = await listener.accept()
                except (OSError, trio.ClosedResourceError):
                    if listener.fileno() == -1:
                        return
                    await trio.sleep(0.01)  # e.g. EMFILE: retry shortly
                    continue
                assert self._nursery is not None
                self._nursery.start_soon(self._serve_conn, client, scope)

    async def _serve_conn(self, client: trio.socket.SocketType,
                          accept_scope: trio.CancelScope) -> None:
        conn = _Conn(client)
        if accept_scope.cancel_called:  # accepted just before an outage began
            conn.abort()
            return
        self._conns.add(conn)
        self.connections_total += 1
        _set_nodelay(client)
        try:
            with conn.scope:
                upstream = trio.socket.socket(_family(self.target[0]), socket.SOCK_STREAM)
                conn.upstream = upstream
                try:
                    await upstream.connect(self.target)
                except (OSError, trio.ClosedResourceError):
                    conn.abort()
                    return
                _set_nodelay(upstream)
                # The TCP handshake across the WAN: data flows one RTT from now.
                conn.open_at = trio.current_time() + self.profile.rtt
                conn.pipes = (_Pipe("up", client, upstream), _Pipe("down", upstream, client))
                async with trio.open_nursery() as nursery:
                    for pipe in conn.pipes:
                        nursery.start_soon(self._read_side, conn, pipe)
                        nursery.start_soon(self._deliver_side, conn, pipe)
        finally:
            conn.close()
            self._forget(conn)

    async def _read_side(self, conn: _Conn, pipe: _Pipe) -> None:
        """Read chunks from the source and put them on the link (TCP-like window)."""
        try:
            await trio.sleep_until(conn.open_at)
            while True:
                while pipe.queued > self.window(pipe.direction):
                    await pipe.has_space.park()
                data = await pipe.src.recv(CHUNK)
                link = self._links[pipe.direction]
                now = trio.current_time()
                if not data:
                    pipe.push(link.schedule(0, now), None)
                    return
                if self._blackhole:
                    self.bytes_blackholed += len(data)
                    pipe.parser.desync()
                    continue
                pipe.push(link.schedule(len(data), now), data)
                self.peak_queued = max(self.peak_queued, pipe.queued)
        except (OSError, trio.ClosedResourceError):
            conn.abort()

    async def _deliver_side(self, conn: _Conn, pipe: _Pipe) -> None:
        """Deliver each queued chunk to the destination at its due time."""
        try:
            while True:
                while not pipe.queue:
                    await pipe.has_data.park()
                due, data = pipe.queue[0]
                await trio.sleep_until(due)
                await self._stall_off.wait()
                if data is None:  # FIN: a blackhole holds it back rather than losing it
                    while self._blackhole:
                        await self._blackhole_off.wait()
                    pipe.dst.shutdown(socket.SHUT_WR)
                    return
                if self._blackhole:
                    self.bytes_blackholed += len(data)
                    pipe.parser.desync()
                else:
                    self._account(conn, pipe, data)
                    await _send_all(pipe.dst, data)
                pipe.queue.popleft()
                pipe.queued -= len(data)
                pipe.has_space.unpark_all()
        except (OSError, trio.ClosedResourceError):
            conn.abort()


# --------------------------------------------------------------------------- thread API


class WanEmulatorThread:
    """A `WanEmulator` running in its own trio thread, for synchronous code.

    Use as a context manager (or call `open`/`close`).  All methods are
    thread-safe: they run inside the emulator's trio thread.
    """

    def __init__(self, target: tuple[str, int], profile: LinkProfile | None = None,
                 **kw: Any) -> None:
        self.emulator = WanEmulator(target, profile, **kw)
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._scope: trio.CancelScope | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def open(self) -> WanEmulatorThread:
        """Start the trio thread and wait until the emulator listens."""
        self._thread = threading.Thread(target=self._main, name="wanem", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout=30):
            raise RuntimeError("wanem thread did not start")
        if self._error is not None:
            raise self._error
        return self

    def close(self) -> None:
        """Stop the emulator (resetting its connections) and join the thread."""
        if self._thread is None:
            return
        if self._token is not None and self._scope is not None:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
        self._thread.join(timeout=30)
        self._thread = None

    def __enter__(self) -> WanEmulatorThread:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _main(self) -> None:
        try:
            trio.run(self._amain)
        except BaseException as exc:  # reported to open() if it happens during startup
            self._error = exc
        finally:
            self._ready.set()

    async def _amain(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as scope:
            self._scope = scope
            async with trio.open_nursery() as nursery:
                await nursery.start(self.emulator.run)
                self._ready.set()

    def _call(self, fn: Callable[..., _T], *args: Any) -> _T:
        if self._token is None:
            raise RuntimeError("WanEmulatorThread is not running")
        return trio.from_thread.run_sync(fn, *args, trio_token=self._token)

    @property
    def port(self) -> int:
        """The listening port."""
        return self.emulator.port

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) clients connect to."""
        return self.emulator.address

    @property
    def counts(self) -> dict[tuple[int, int, int], int]:
        """A copy of the RPC call counts per (prog, vers, proc)."""
        return self._call(lambda: dict(self.emulator.counts))

    @property
    def max_in_flight(self) -> int:
        """Most RPC calls outstanding at once since the last `reset_counts`."""
        return self._call(lambda: self.emulator.max_in_flight)

    def stop(self) -> None:
        """See `WanEmulator.stop`."""
        self._call(self.emulator.stop)

    def start(self) -> None:
        """See `WanEmulator.start`."""
        self._call(self.emulator.start)

    def drop_connections(self) -> None:
        """See `WanEmulator.drop_connections`."""
        self._call(self.emulator.drop_connections)

    def blackhole(self, on: bool) -> None:
        """See `WanEmulator.blackhole`."""
        self._call(self.emulator.blackhole, on)

    def stall(self, on: bool) -> None:
        """See `WanEmulator.stall`."""
        self._call(self.emulator.stall, on)

    def set_link(self, rtt_ms: float | None = None, up_mbit: float | None = None,
                 down_mbit: float | None = None, **kw: float | None) -> None:
        """See `WanEmulator.set_link`."""
        self._call(lambda: self.emulator.set_link(rtt_ms, up_mbit, down_mbit, **kw))

    def calls(self, prog: int | None = None, proc: int | None = None, *,
              vers: int | None = None) -> int:
        """See `WanEmulator.calls`."""
        return self._call(lambda: self.emulator.calls(prog, proc, vers=vers))

    def reset_counts(self) -> None:
        """See `WanEmulator.reset_counts`."""
        self._call(self.emulator.reset_counts)

    def snapshot(self) -> dict[str, Any]:
        """See `WanEmulator.snapshot`."""
        return self._call(self.emulator.snapshot)


# --------------------------------------------------------------------------- command

_PROC_NAMES: dict[tuple[int, int], list[str]] = {
    (100000, 2): ["NULL", "SET", "UNSET", "GETPORT", "DUMP", "CALLIT"],
    (100003, 3): ["NULL", "GETATTR", "SETATTR", "LOOKUP", "ACCESS", "READLINK", "READ",
                  "WRITE", "CREATE", "MKDIR", "SYMLINK", "MKNOD", "REMOVE", "RMDIR",
                  "RENAME", "LINK", "READDIR", "READDIRPLUS", "FSSTAT", "FSINFO",
                  "PATHCONF", "COMMIT"],
    (100005, 3): ["NULL", "MNT", "DUMP", "UMNT", "UMNTALL", "EXPORT"],
}
_PROG_NAMES = {100000: "PORTMAP", 100003: "NFS", 100005: "MOUNT", 100021: "NLM"}


def format_counts(emu: WanEmulator) -> str:
    """The RPC count table printed when the command exits."""
    lines = [f"{'program':<12} {'procedure':<14} {'calls':>10}"]
    for (prog, vers, proc), n in sorted(emu.counts.items()):
        names = _PROC_NAMES.get((prog, vers), [])
        pname = f"{_PROG_NAMES.get(prog, str(prog))}v{vers}"
        cname = names[proc] if proc < len(names) else str(proc)
        lines.append(f"{pname:<12} {cname:<14} {n:>10}")
    lines.append(f"{'total':<27} {sum(emu.counts.values()):>10}")
    lines.append(f"replies={emu.replies} garbage_records={emu.garbage_records} "
                 f"bytes_up={emu.bytes_up} bytes_down={emu.bytes_down} "
                 f"max_in_flight={emu.max_in_flight} "
                 f"connections_total={emu.connections_total}")
    return "\n".join(lines)


def _parse_bw(text: str) -> float:
    if text.lower() in ("inf", "unlimited", "none"):
        return UNLIMITED
    return float(text)


def control_command(emu: WanEmulator, line: str) -> str:
    """Execute one control-socket command line; return the one-line answer."""
    words = line.split()
    if not words:
        return "error: empty command"
    cmd, args = words[0].lower(), words[1:]
    try:
        if cmd == "stats" and not args:
            return json.dumps(emu.snapshot(), sort_keys=True)
        if cmd == "stop" and not args:
            emu.stop()
        elif cmd == "start" and not args:
            emu.start()
        elif cmd == "drop" and not args:
            emu.drop_connections()
        elif cmd == "reset" and not args:
            emu.reset_counts()
        elif cmd == "blackhole" and len(args) == 1 and args[0] in ("on", "off"):
            emu.blackhole(args[0] == "on")
        elif cmd == "stall" and len(args) == 1 and args[0] in ("on", "off"):
            emu.stall(args[0] == "on")
        elif cmd == "link" and args:
            kw: dict[str, float] = {}
            for arg in args:
                key, sep, value = arg.partition("=")
                if not sep:
                    return f"error: expected key=value, got {arg!r}"
                if key == "rtt":
                    kw["rtt_ms"] = float(value)
                elif key == "mbit":
                    kw["up_mbit"] = kw["down_mbit"] = _parse_bw(value)
                elif key in ("up", "down"):
                    kw[f"{key}_mbit"] = _parse_bw(value)
                else:
                    return f"error: unknown link parameter {key!r}"
            emu.set_link(**kw)
        else:
            return ("error: commands are stop, start, drop, reset, blackhole on|off, "
                    "stall on|off, link rtt=MS mbit=N|up=N|down=N, stats")
    except (ValueError, OSError, RuntimeError) as exc:
        return f"error: {exc}"
    return "ok"


async def _control_client(emu: WanEmulator, stream: trio.SocketStream) -> None:
    buf = b""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        async with stream:
            while True:
                data = await stream.receive_some(4096)
                if not data:
                    return
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    answer = control_command(emu, line.decode(errors="replace"))
                    await stream.send_all(answer.encode() + b"\n")


async def serve_control(emu: WanEmulator, path: str, *,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve line commands for `emu` on the Unix socket `path` until cancelled."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(path)
        sock.listen(16)
        listener = trio.SocketListener(sock)
        task_status.started()

        async def handler(stream: trio.SocketStream) -> None:
            await _control_client(emu, stream)

        await trio.serve_listeners(handler, [listener])
    finally:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``python -m bench.wanem``."""
    p = argparse.ArgumentParser(prog="python -m bench.wanem",
                                description="TCP proxy that emulates a WAN link.")
    p.add_argument("--target", type=_host_port, required=True, metavar="HOST:PORT",
                   help="server to forward to")
    p.add_argument("--listen", type=_host_port, default=("127.0.0.1", 0),
                   metavar="HOST:PORT", help="address to listen on (default 127.0.0.1:0)")
    p.add_argument("--profile", choices=sorted(PROFILES), default="lan",
                   help="base link profile (default lan); options below override it")
    p.add_argument("--rtt-ms", type=_non_negative, help="round-trip time in ms")
    p.add_argument("--mbit", type=_positive, help="bandwidth each way in Mbit/s")
    p.add_argument("--up-mbit", type=_positive, help="client-to-server bandwidth")
    p.add_argument("--down-mbit", type=_positive, help="server-to-client bandwidth")
    p.add_argument("--window", type=int, help="per-connection queue limit in bytes")
    p.add_argument("--control", metavar="PATH", help="Unix socket for line commands")
    return p


def _profile_from_args(args: argparse.Namespace) -> LinkProfile:
    profile = PROFILES[args.profile]
    changes: dict[str, float] = {}
    if args.rtt_ms is not None:
        changes["rtt_ms"] = args.rtt_ms
    if args.mbit is not None:
        changes["up_mbit"] = changes["down_mbit"] = args.mbit
    if args.up_mbit is not None:
        changes["up_mbit"] = args.up_mbit
    if args.down_mbit is not None:
        changes["down_mbit"] = args.down_mbit
    return dataclasses.replace(profile, **changes)


async def _amain(args: argparse.Namespace, emu: WanEmulator) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(emu.run)
            if args.control:
                await nursery.start(serve_control, emu, args.control)
            host, port = emu.address
            print(f"wanem listening on {host}:{port} -> {emu.target[0]}:{emu.target[1]} "
                  f"({emu.profile.describe()})", flush=True)
            async for _ in signals:
                break
            nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    """Run the emulator until SIGINT/SIGTERM; print RPC counts on exit."""
    args = build_parser().parse_args(argv)
    emu = WanEmulator(args.target, _profile_from_args(args), listen=args.listen,
                      window=args.window)
    failed: OSError | None = None
    try:
        trio.run(_amain, args, emu)
    except* KeyboardInterrupt:
        pass
    except* OSError as group:
        exc: BaseException = group
        while isinstance(exc, BaseExceptionGroup):
            exc = exc.exceptions[0]
        failed = exc if isinstance(exc, OSError) else OSError(str(exc))
    if failed is not None:
        print(f"wanem: {failed}", file=sys.stderr)
        return 1
    print(format_counts(emu), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
