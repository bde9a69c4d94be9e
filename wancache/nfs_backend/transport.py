"""ONC-RPC over TCP on trio: the only socket code of the NFS backend.

One `RpcTransport` talks to one server program (NFS or MOUNT) over `nconnect` TCP
connections.  Each connection has one writer task (callers queue whole records, so
a cancelled caller never leaves half a record on the wire) and one reader task that
hands replies to their callers by XID, so hundreds of calls can be outstanding.

Failure handling (what we chose and why):

* A connection that stays silent for `timeo` seconds while calls wait is probed
  with a NULL call; if that gets no answer within another `timeo` it is dropped.
  Anything received (any reply) counts as life, and so does the server taking our
  bytes once the socket buffer was full, so a saturated slow link, either way, is
  not mistaken for a dead one.
* Connections are re-established in the background with capped exponential backoff.
  A reconnect first tries the previous source port, so servers whose duplicate
  request cache (DRC) is keyed by client address and port can recognise a
  retransmission, as the Linux client does.
* A call counts as sent once its last byte was handed to the kernel: from then on
  the server may run it.  A call cut part-way cannot have run (a server runs only
  whole records, and the rest of it never follows on a new connection), so after a
  lost connection it is simply sent again; so is one never written.  Sent
  idempotent calls (see `nfs3.IDEMPOTENT`, which counts EXCLUSIVE CREATE as
  idempotent thanks to its verifier) are re-sent with the *same* XID.  A sent
  non-idempotent call (REMOVE, RENAME, MKDIR, ...) whose reply was lost has an
  unknown fate: it is not replayed blindly, `UnknownOutcomeError` is raised and
  the caller (who knows what it asked for) checks the server's state.
* Soft mounts (`timeout` set, the default) fail a call with `RpcTimeoutError` or
  `ServerUnreachableError` once `timeout` seconds passed, or `UnknownOutcomeError`
  if it was non-idempotent and already on its way (the writer had started writing
  it: it goes out whole unless the connection dies).  Hard mounts (`timeout=None`)
  retry until the caller's own cancel scope gives up.
* Fail fast while offline.  Once the transport knows the server is unreachable
  (`offline`: the connection was lost and an attempt to reconnect failed, or a
  call timed out with nothing heard from the server since it was made), a new
  call on a soft mount waits at most `offline_wait` (1 s) for that to change, and
  then fails with `ServerUnreachableError` without having been sent.  Reconnect
  attempts (capped exponential backoff) and NULL probes go on in the background;
  a waiting call also asks for one now (at most one every `KICK_SPACING` s), so
  the first call after the server's return goes through.  Calls already made when
  the link went down keep their full `timeout`.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import itertools
import logging
import math
import os
import socket
import struct
import termios
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import trio

from wancache.creds import Cred

from .errors import (
    ProtocolError,
    RpcTimeoutError,
    ServerUnreachableError,
    TransportClosedError,
    TransportError,
    UnknownOutcomeError,
)
from .rpc import (
    AUTH_NONE_CRED,
    AuthSys,
    Buffer,
    OpaqueAuth,
    RecordReader,
    auth_sys_cred,
    decode_reply,
    encode_call,
    frame_call_parts,
    frame_record,
    peek_xid,
)
from .stats import RpcStats

__all__ = ["Cred", "RpcTransport", "TransportOptions"]

log = logging.getLogger(__name__)

RESERVED_PORTS = range(1023, 664, -1)
MAX_BATCH = 512 * 1024  # bytes the writer takes into one send
SEND_PARTS = 256        # buffers in one sendmsg at most (Linux allows 1024)
KICK_SPACING = 0.5      # seconds between reconnect attempts asked for by waiting calls


@functools.lru_cache(maxsize=4096)
def _opaque_auth(cred: Cred | None) -> OpaqueAuth:
    if cred is None:
        return AUTH_NONE_CRED
    return auth_sys_cred(AuthSys(stamp=os.getpid() & 0xFFFFFFFF,
                                 machinename=socket.gethostname().encode()[:255],
                                 uid=cred.uid, gid=cred.gid, gids=cred.groups[:16]))


@dataclass
class TransportOptions:
    """Timeouts and connection policy (filled from the mount options)."""

    timeout: float | None = 30.0    # soft mount: a call fails after this; None = hard
    timeo: float = 5.0              # silence before a connection is probed, then dropped
    offline_wait: float = 1.0       # soft mount, server known unreachable: wait this long
    nconnect: int = 1
    resvport: bool = False
    connect_timeout: float = 10.0
    backoff_min: float = 0.1
    backoff_max: float = 10.0
    max_in_flight: int = 1024
    max_record: int = 64 * 2**20


class SendTracker:
    """Whether any call that may change the server's state, made under
    `track_sends` (in its task or the tasks it starts), went out whole: the server may
    have run it.  A caller that must know if a failed attempt changed anything there
    (the write-back flusher) asks this."""

    def __init__(self) -> None:
        self.sent = False


_tracker: ContextVar[SendTracker | None] = ContextVar("wancache_send_tracker",
                                                       default=None)


@contextmanager
def track_sends() -> Iterator[SendTracker]:
    """Track the calls made in this context (see `SendTracker`)."""
    tracker = SendTracker()
    token = _tracker.set(tracker)
    try:
        yield tracker
    finally:
        _tracker.reset(token)


def note_sent() -> None:
    """A call of the current context went out (transports, and test fakes, say so)."""
    tracker = _tracker.get()
    if tracker is not None:
        tracker.sent = True


class _ConnectionLost(Exception):
    def __init__(self, sent: bool) -> None:
        super().__init__("connection lost")
        self.sent = sent


@dataclass(eq=False)
class _Pending:
    """One attempt of one call on one connection."""

    xid: int
    record: tuple[Buffer, ...]           # the framed call, in parts sent in order
    size: int                            # ... its length
    event: trio.Event = field(default_factory=trio.Event)
    reply: bytes | None = None
    error: ProtocolError | None = None   # a reply came but cannot be taken
    committed: bool = False   # the writer took it: it goes out whole unless the link dies
    sent: bool = False        # every byte is with the kernel: the server may run it
    abandoned: bool = False
    tracker: SendTracker | None = None   # the caller's, told once it is sent


class _Connection:
    """A TCP connection: a writer task, a reader task, replies matched by XID."""

    def __init__(self, stream: trio.SocketStream, transport: RpcTransport) -> None:
        self.stream = stream
        self.transport = transport
        self.pending: dict[int, _Pending] = {}
        self._send, self._queue = trio.open_memory_channel[_Pending](math.inf)
        self.last_recv = trio.current_time()    # when a reply last came
        self.last_alive = self.last_recv        # ... or the peer last acked our bytes
        self._written = self._acked = 0         # bytes given to the kernel, acked
        self.dead = False
        self._scope = trio.CancelScope()
        self._probe_lock = trio.Lock()

    def kill(self) -> None:
        """Drop the connection; its waiting calls see `_ConnectionLost`."""
        self.dead = True
        self._scope.cancel()

    async def serve(self) -> None:
        """Run reader and writer until the connection fails or is killed."""
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._guard, self._writer)
                    await self._guard(self._reader)
        finally:
            self.dead = True
            with trio.CancelScope(shield=True):
                await self.stream.aclose()
            for p in self.pending.values():
                p.event.set()
            self.pending.clear()

    async def _guard(self, work: Callable[[], Awaitable[None]]) -> None:
        """Run the reader or the writer; when either ends, the connection ends."""
        try:
            await work()
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.debug("connection to %s lost: %s", self.transport.label, exc)
        except ProtocolError as exc:
            log.warning("dropping connection to %s: %s", self.transport.label, exc)
        finally:
            self.kill()

    def submit(self, xid: int, record: Buffer | Sequence[Buffer],
               tracker: SendTracker | None = None) -> _Pending:
        """Queue a framed call record (or its parts, in order) for sending and
        register for its reply (`tracker` is told once it went out)."""
        if self.dead:
            raise _ConnectionLost(sent=False)
        parts = (record,) if isinstance(record, bytes | bytearray | memoryview) \
            else tuple(record)
        p = _Pending(xid, parts, sum(len(part) for part in parts), tracker=tracker)
        self.pending[xid] = p
        self._send.send_nowait(p)
        return p

    async def wait(self, p: _Pending) -> bytes:
        """The reply to `p`; probes the connection when it stays silent."""
        timeo = self.transport.options.timeo
        try:
            while True:
                with trio.move_on_after(timeo):
                    await p.event.wait()
                if p.event.is_set():
                    if p.error is not None:
                        raise p.error
                    if p.reply is None:
                        raise _ConnectionLost(p.sent)
                    return p.reply
                if trio.current_time() - self.last_alive >= timeo:
                    await self._probe(timeo)
        finally:
            p.abandoned = True
            self.pending.pop(p.xid, None)

    async def _probe(self, timeo: float) -> None:
        """Ping a connection silent for `timeo`; drop it if nothing at all comes back."""
        async with self._probe_lock:
            self._acks_moved()
            if self.dead or trio.current_time() - self.last_alive < timeo:
                return
            if not await self.ping(timeo) and not self._acks_moved():
                log.info("%s: no answer for %.1fs, reconnecting", self.transport.label,
                         2 * timeo)
                self.kill()

    async def ping(self, timeo: float) -> bool:
        """Send a NULL call: whether anything at all came back within `timeo`."""
        t = self.transport
        xid = t.next_xid()
        record = frame_record(encode_call(xid, t.program, t.version, 0, AUTH_NONE_CRED, b""))
        t.stats.started(t.proc_name(0), len(record))
        started = trio.current_time()
        p: _Pending | None = None
        try:
            p = self.submit(xid, record)
            with trio.move_on_after(timeo):
                await p.event.wait()
        except _ConnectionLost:
            pass
        finally:
            if p is not None:
                p.abandoned = True
                self.pending.pop(xid, None)
            reply = p.reply if p is not None else None
            t.stats.finished(t.proc_name(0), trio.current_time() - started,
                             len(reply or b""), ok=reply is not None)
        return reply is not None or self.last_recv >= started

    async def _writer(self) -> None:
        async for first in self._queue:
            batch = [first]
            size = first.size
            while size < MAX_BATCH:
                try:
                    p = self._queue.receive_nowait()
                except trio.WouldBlock:
                    break
                batch.append(p)
                size += p.size
            batch = [p for p in batch if not p.abandoned]
            if batch:
                await self._write(batch)

    async def _write(self, batch: list[_Pending]) -> None:
        """Write `batch` in order; each call is `sent` once its last byte is with the
        kernel (a call written only in part when the connection fails cannot run)."""
        for p in batch:
            p.committed = True
        # The parts as they are (a WRITE's data is not copied into one buffer).
        bufs = deque(memoryview(part) for p in batch for part in p.record if part)
        ends = list(itertools.accumulate(p.size for p in batch))
        sock = self.stream.socket
        done = i = 0
        while bufs:
            n = await sock.sendmsg(list(itertools.islice(bufs, SEND_PARTS)))
            done += n
            left = n
            while left:
                if len(bufs[0]) <= left:
                    left -= len(bufs.popleft())
                else:
                    bufs[0], left = bufs[0][left:], 0
            self._written += n
            while i < len(batch) and ends[i] <= done:
                batch[i].sent = True
                tracker = batch[i].tracker
                if tracker is not None:
                    tracker.sent = True
                i += 1

    def _acks_moved(self) -> bool:
        """Whether the peer acknowledged more of our bytes (TCP) since the last look: a
        slow uplink still busy with a big call is not a silent connection."""
        try:
            raw = fcntl.ioctl(self.stream.socket.fileno(), termios.TIOCOUTQ, b"\0" * 4)
        except (OSError, ValueError):
            return False    # not Linux, or closed: replies alone tell
        acked = self._written - struct.unpack("i", raw)[0]
        moved = acked > self._acked
        self._acked = acked
        if moved:
            self.last_alive = trio.current_time()
        return moved

    async def _reader(self) -> None:
        max_record = self.transport.options.max_record
        reader = RecordReader(max_record, skip_oversized=True)
        while True:
            data = await self.stream.receive_some(256 * 1024)
            if not data:
                return
            self.last_recv = self.last_alive = self.transport.last_recv = \
                trio.current_time()
            if self.transport.unresponsive:
                self.transport._answered()
            for record in reader.feed(data):
                p = self.pending.pop(peek_xid(record), None)
                if p is None:
                    self.transport.stats.late_replies += 1
                    continue
                p.reply = record
                p.event.set()
            for xid, size in reader.oversized:   # fail that call, not every call
                p = self.pending.pop(xid, None) if xid is not None else None
                log.warning("%s: a reply of %d bytes exceeds the limit of %d (xid %s)",
                            self.transport.label, size, max_record,
                            "?" if xid is None else f"{xid:08x}")
                if p is not None:
                    p.error = ProtocolError(f"reply of {size} bytes from "
                                            f"{self.transport.label} exceeds {max_record}")
                    p.event.set()
            reader.oversized.clear()


class RpcTransport:
    """Calls to one RPC program on one server, multiplexed over TCP connections."""

    def __init__(self, host: str, port: int, program: int, version: int, *,
                 options: TransportOptions | None = None, stats: RpcStats | None = None,
                 proc_names: dict[int, str] | None = None, prefix: str = "") -> None:
        self.host, self.port = host, port
        self.program, self.version = program, version
        self.options = options or TransportOptions()
        self.stats = stats if stats is not None else RpcStats()
        self.label = f"{host}:{port}"
        self._proc_names = proc_names or {}
        self._prefix = prefix or f"{program}."
        self._xid = int.from_bytes(os.urandom(4), "big")
        self._conns: list[_Connection] = []
        self._changed = trio.Event()
        self._slots = trio.Semaphore(self.options.max_in_flight)
        self._scope: trio.CancelScope | None = None
        self._closed = False
        self._local_ports: dict[int, int] = {}
        self.last_error: BaseException | None = None
        self.connected_once = False
        self.unresponsive = False    # a call timed out and nothing answered since
        self.last_recv = -math.inf   # when a reply last came from the server
        self._kicked = trio.Event()  # set: reconnect or probe now, not after the backoff
        self._last_attempt = -math.inf
        self._said_offline = False

    # -- lifecycle -----------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep `nconnect` connections up until `close()`; start it in a nursery."""
        with trio.CancelScope() as self._scope:
            async with trio.open_nursery() as nursery:
                for i in range(max(1, self.options.nconnect)):
                    nursery.start_soon(self._keep_connected, i)
                nursery.start_soon(self._probe_while_unresponsive)
                task_status.started()
        self._closed = True
        self._notify()

    def close(self) -> None:
        """Stop the transport; waiting calls fail with `TransportClosedError`."""
        self._closed = True
        if self._scope is not None:
            self._scope.cancel()
        for c in self._conns:
            c.kill()
        self._notify()

    @property
    def up(self) -> bool:
        """True while a connection is established and the server answers on it."""
        return not self.unresponsive and any(not c.dead for c in self._conns)

    @property
    def offline(self) -> bool:
        """Known unreachable: no connection and the last attempt to make one failed,
        or a call timed out with nothing heard from the server since.  New calls on
        a soft mount then fail at once (after `offline_wait`) without being sent."""
        if self._closed:
            return False
        return self.unresponsive or (self.last_error is not None and
                                     not any(not c.dead for c in self._conns))

    def _answered(self) -> None:
        if self.unresponsive:
            self.unresponsive = False
            log.info("server %s answers again", self.label)
            self._notify()

    async def wait_changed(self) -> None:
        """Return at the next connect or disconnect."""
        await self._changed.wait()

    def _notify(self) -> None:
        offline = self.offline
        if offline != self._said_offline:
            self._said_offline = offline
            # Before the first connection the caller reports the failure; when
            # unresponsive, a warning said it.
            if offline and self.connected_once and not self.unresponsive:
                log.info("server %s unreachable (%s): calls fail at once until it answers",
                         self.label, self.last_error)
        self._changed.set()
        self._changed = trio.Event()

    def _kick(self) -> None:
        """Have the background loops try the server now, unless one just did."""
        if trio.current_time() - self._last_attempt >= KICK_SPACING:
            self._kicked.set()
            self._kicked = trio.Event()

    async def _pause(self, delay: float) -> None:
        """Sleep `delay` seconds of backoff, or until a waiting call kicks."""
        with trio.move_on_after(delay):
            await self._kicked.wait()

    async def _keep_connected(self, slot: int) -> None:
        delay = self.options.backoff_min
        while not self._closed:
            self._last_attempt = trio.current_time()
            try:
                with trio.fail_after(self.options.connect_timeout):
                    stream = await self._connect(slot)
            except (OSError, trio.TooSlowError) as exc:
                self.last_error = exc
                log.debug("connect to %s failed: %s", self.label, exc)
                self._notify()
                await self._pause(delay)
                delay = min(delay * 2, self.options.backoff_max)
                continue
            conn = _Connection(stream, self)
            if self.connected_once:
                self.stats.reconnects += 1
                log.info("reconnected to %s", self.label)
            self.connected_once = True
            self.last_error = None
            self._conns.append(conn)
            self._notify()
            began = trio.current_time()
            try:
                await conn.serve()
            finally:
                self._conns.remove(conn)
                self._notify()
            if trio.current_time() - began > 10:
                delay = self.options.backoff_min
            else:
                await self._pause(delay)
                delay = min(delay * 2, self.options.backoff_max)

    async def _probe_while_unresponsive(self) -> None:
        """While calls time out on a connection that is up, ping it with capped
        backoff until the server answers (any reply clears `unresponsive`)."""
        delay = self.options.backoff_min
        while not self._closed:
            live = [c for c in self._conns if not c.dead]
            if not self.unresponsive or not live:
                if not self.unresponsive:
                    delay = self.options.backoff_min
                await self._changed.wait()
                continue
            self._last_attempt = trio.current_time()
            conn = live[0]
            async with conn._probe_lock:
                if not await conn.ping(self.options.timeo) and not conn._acks_moved():
                    conn.kill()
            if self.unresponsive:
                await self._pause(delay)
                delay = min(delay * 2, self.options.backoff_max)

    async def _connect(self, slot: int) -> trio.SocketStream:
        infos = await trio.socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        if not infos:
            raise OSError(errno.EHOSTUNREACH, f"cannot resolve {self.host}")
        family, stype, proto, _, addr = infos[0]
        ports: list[int | None] = []
        if slot in self._local_ports:
            ports.append(self._local_ports[slot])
        if self.options.resvport:
            ports.extend(RESERVED_PORTS)
        else:
            ports.append(None)
        last: OSError | None = None
        for local_port in ports:
            sock = trio.socket.socket(family, stype, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if local_port is not None:
                    await sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", local_port))
                await sock.connect(addr)
            except OSError as exc:
                sock.close()
                last = exc
                if exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
                    continue
                raise
            self._local_ports[slot] = sock.getsockname()[1]
            return trio.SocketStream(sock)
        raise last or OSError(errno.EADDRINUSE, "no free source port")

    async def _get_connection(self, *, patient: bool = False) -> _Connection:
        while True:
            if self._closed:
                raise TransportClosedError(f"transport to {self.label} is closed")
            if patient and self.options.timeout is not None and self.offline:
                # a patient call outlives a slow link, not a lost server (soft mounts)
                raise ServerUnreachableError(f"{self.label} is not reachable")
            live = [c for c in self._conns if not c.dead]
            if live:
                return min(live, key=lambda c: len(c.pending))
            self._kick()
            with trio.move_on_after(KICK_SPACING):
                await self._changed.wait()

    # -- calls ---------------------------------------------------------------------

    def next_xid(self) -> int:
        """A fresh transaction id."""
        self._xid = (self._xid + 1) & 0xFFFFFFFF
        return self._xid

    def proc_name(self, proc: int) -> str:
        """The counter name of procedure number `proc`, e.g. "nfs3.READ"."""
        return self._prefix + self._proc_names.get(proc, str(proc))

    async def call(self, proc: int, args: Buffer | Sequence[Buffer], cred: Cred | None, *,
                   idempotent: bool, patient: bool = False, changes: bool = True
                   ) -> memoryview:
        """Make one call and return the reply's result bytes (`patient`: without the
        soft timeout while connected; see client.patient; `changes`: the call may
        change the server's state, which a `SendTracker` is told once it went out).

        Raises RpcDeniedError/RpcAcceptError (server refused the call), ProtocolError,
        RpcTimeoutError/ServerUnreachableError (soft timeout), UnknownOutcomeError.
        """
        name = self.proc_name(proc)
        if self.options.timeout is not None and self.offline:
            await self._wait_online()
        xid = self.next_xid()
        record = frame_call_parts(xid, self.program, self.version, proc, _opaque_auth(cred),
                                  args)
        del args        # (the record's parts hold what it needs)
        size = sum(len(part) for part in record)
        self.stats.started(name, size)
        started = trio.current_time()
        attempts: list[_Pending] = []
        reply: bytes | None = None
        try:
            async with self._slots:
                timeout = None if patient else self.options.timeout
                with trio.move_on_after(math.inf if timeout is None else timeout):
                    reply = await self._attempts(xid, record, name, idempotent, attempts,
                                                 patient=patient,
                                                 tracker=_tracker.get() if changes else None)
            if reply is None:
                raise self._timed_out(name, started, idempotent,
                                      bool(attempts) and attempts[-1].committed)
            return decode_reply(reply).body
        finally:
            self.stats.finished(name, trio.current_time() - started, len(reply or b""),
                                ok=reply is not None)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("rpc %s xid=%08x %s in %.1f ms (%d bytes out, %d in)", name, xid,
                          "ok" if reply else "failed", (trio.current_time() - started) * 1e3,
                          size, len(reply or b""))

    async def _wait_online(self) -> None:
        """Soft mount, server known unreachable: wait `offline_wait` at most, asking
        for a reconnect or probe meanwhile; then fail without sending anything."""
        assert self.options.timeout is not None
        deadline = trio.current_time() + min(self.options.offline_wait, self.options.timeout)
        while self.offline and trio.current_time() < deadline:
            self._kick()
            next_kick = max(self._last_attempt, trio.current_time()) + KICK_SPACING
            with trio.move_on_at(min(deadline, next_kick)):
                await self._changed.wait()
        if self.offline:
            self.stats.failed_fast += 1
            why = "it does not answer" if self.unresponsive else str(self.last_error)
            raise ServerUnreachableError(
                f"server {self.label} unreachable ({why}); call not sent") from None

    def _timed_out(self, name: str, started: float, idempotent: bool,
                   on_its_way: bool) -> TransportError:
        """The error for a call whose `timeout` ran out; marks the server unresponsive
        if nothing at all came from it since the call was made."""
        timeout = self.options.timeout
        connected = self.up
        if not self.unresponsive and self.connected_once and self.last_recv < started:
            # Said once, not once per request; `up` is false until it answers.
            # (Before the first connection the caller reports the failure.)
            log.warning("server %s is not answering: calls fail at once until it does",
                        self.label)
            self.unresponsive = True
            self._notify()
        if on_its_way and not idempotent:
            return UnknownOutcomeError(
                f"{name}: no reply from {self.label} within {timeout:g}s to a call that "
                "was sent; its outcome is unknown")
        if not connected:
            why = f": {self.last_error}" if self.last_error else ""
            return ServerUnreachableError(
                f"server {self.label} unreachable for {timeout:g}s{why}")
        return RpcTimeoutError(f"no reply from {self.label} within {timeout:g}s")

    async def _attempts(self, xid: int, record: list[Buffer], name: str, idempotent: bool,
                        attempts: list[_Pending], *, patient: bool = False,
                        tracker: SendTracker | None = None) -> bytes:
        while True:
            conn = await self._get_connection(patient=patient)
            if attempts:
                self.stats.retransmitted(name, sum(len(part) for part in record))
            try:
                p = conn.submit(xid, record, tracker)
                attempts.append(p)
                return await conn.wait(p)
            except _ConnectionLost as lost:
                if lost.sent and not idempotent:
                    raise UnknownOutcomeError(
                        f"{name}: connection to {self.label} lost after the call was sent; "
                        "its outcome is unknown") from None
