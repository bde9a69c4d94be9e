"""The RPC transport against a scripted RPC server: what counts as sent, and what a
caller is told when a call's fate cannot be known."""

from __future__ import annotations

import socket
import struct
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
import trio

from wancache.nfs_backend import nfs3
from wancache.nfs_backend.client import NfsClient, ServerInfo
from wancache.nfs_backend.errors import (
    ProtocolError,
    RpcTimeoutError,
    ServerUnreachableError,
    UnknownOutcomeError,
)
from wancache.nfs_backend.rpc import RecordReader, decode_call, encode_reply_success, frame_record
from wancache.nfs_backend.transport import Cred, RpcTransport, TransportOptions

PROG, VERS = 400123, 1
BIG = 16 * 2**20    # more than any socket buffers on the way can hold


class ScriptedServer:
    """An RPC server on 127.0.0.1 that records every call it received whole.

    `on_call(conn_no, proc, stream)` decides, per call, what happens: return True to
    reply (with empty results) or the results to send, False to stay silent.  It may
    reset the connection.
    """

    def __init__(self, on_call: Callable[[int, int, trio.SocketStream],
                                         Awaitable[bool | bytes]],
                 rcvbuf: int = 65536) -> None:
        self.on_call = on_call
        self.rcvbuf = rcvbuf
        self.executed: Counter[int] = Counter()   # proc -> complete calls received
        self.connections = 0
        self.go = trio.Event()                     # reading starts when this is set
        self.port = 0

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        await sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        self.port = sock.getsockname()[1]
        listener = trio.SocketListener(sock)
        async with trio.open_nursery() as nursery:
            task_status.started(self.port)
            await trio.serve_listeners(self._serve, [listener], handler_nursery=nursery)

    async def _serve(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        conn_no = self.connections
        await self.go.wait()
        reader = RecordReader()
        try:
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    return
                for record in reader.feed(data):
                    header, _ = decode_call(record)
                    self.executed[header.proc] += 1
                    answer = await self.on_call(conn_no, header.proc, stream)
                    if answer is not False:
                        results = answer if isinstance(answer, bytes) else b""
                        await stream.send_all(frame_record(encode_reply_success(header.xid,
                                                                                results)))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return


async def reset(stream: trio.SocketStream) -> None:
    """Abort the connection with a TCP RST, as a crashing server or middlebox does."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.socket.close()
    await trio.lowlevel.checkpoint()


@asynccontextmanager
async def transport_to(server: ScriptedServer,
                       **opts: object) -> AsyncIterator[RpcTransport]:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.run)
        t = RpcTransport("127.0.0.1", port, PROG, VERS,
                         options=TransportOptions(**opts))  # type: ignore[arg-type]
        await nursery.start(t.run)
        try:
            yield t
        finally:
            t.close()
            nursery.cancel_scope.cancel()


async def wait_pending(t: RpcTransport, n: int) -> None:
    """Until `n` calls wait on the transport's connection (bounded)."""
    with trio.fail_after(10):
        while sum(len(c.pending) for c in t._conns) < n:
            await trio.sleep(0.005)


async def test_call_written_whole_before_the_connection_died_is_not_sent_again() -> None:
    """Regression (issue 13.6): a non-idempotent call that had gone out whole in a batch
    whose later bytes could not be written was marked unsent and sent a second time."""
    C, A, B = 1, 2, 3     # C: idempotent and big; A: small, B: big, both non-idempotent

    async def on_call(conn_no: int, proc: int, stream: trio.SocketStream) -> bool:
        if conn_no == 1:
            if proc == A:          # A arrived whole: the server runs it, then dies
                await reset(stream)
            return False
        return True

    server = ScriptedServer(on_call)
    results: dict[int, object] = {}

    async def call(proc: int, size: int, idempotent: bool) -> None:
        try:
            await t.call(proc, bytes(size), None, idempotent=idempotent)
            results[proc] = "ok"
        except UnknownOutcomeError as exc:
            results[proc] = exc

    async with transport_to(server, timeout=30.0, timeo=30.0, backoff_min=0.01) as t, \
            trio.open_nursery() as nursery:
        # The writer is stuck sending C (the server does not read yet), so A and B
        # queue behind it and then leave together, A first, in one batch.
        nursery.start_soon(call, C, BIG, True)
        await wait_pending(t, 1)
        nursery.start_soon(call, A, 100, False)
        await wait_pending(t, 2)
        nursery.start_soon(call, B, BIG, False)
        await wait_pending(t, 3)
        server.go.set()

    assert server.executed[A] == 1, "A was executed twice"
    assert isinstance(results[A], UnknownOutcomeError)
    # B never arrived whole on the first connection: it cannot have run, and is re-sent.
    assert results[B] == "ok" and server.executed[B] == 1
    assert results[C] == "ok"
    assert t.stats.reconnects >= 1


async def test_sent_non_idempotent_call_that_times_out_has_an_unknown_outcome(
        allow_log_warnings: None) -> None:
    """Regression (issue 13.6): a soft timeout of a CREATE the server had received was
    a plain RpcTimeoutError, so the caller retried it and took its own file for
    another client's."""
    async def silent(conn_no: int, proc: int, stream: trio.SocketStream) -> bool:
        return False

    server = ScriptedServer(silent)
    server.go.set()
    async with transport_to(server, timeout=0.5, timeo=30.0) as t:
        with pytest.raises(UnknownOutcomeError, match="outcome is unknown"):
            await t.call(8, b"create!!", None, idempotent=False)
        assert server.executed[8] == 1
        # Nothing came back since: the server is known not to answer, and the next
        # call fails at once, unsent (the background probe sends NULLs meanwhile).
        assert t.offline and not t.up
        with pytest.raises(ServerUnreachableError, match="call not sent"):
            await t.call(1, b"getattr!", None, idempotent=True)
        assert server.executed[1] == 0
        assert t.stats.failed_fast == 1


async def test_call_never_written_when_its_time_ran_out_is_never_sent(
        allow_log_warnings: None) -> None:
    """A call still queued behind others when its deadline passes is dropped: it is a
    plain timeout (it did not run), and it does not reach the server later."""
    async def reply(conn_no: int, proc: int, stream: trio.SocketStream) -> bool:
        return True

    server = ScriptedServer(reply)

    async def blocker() -> None:
        with pytest.raises(RpcTimeoutError):
            await t.call(1, bytes(BIG), None, idempotent=True)

    async with transport_to(server, timeout=2.0, timeo=30.0) as t:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(blocker)        # the writer is stuck sending this one
            await wait_pending(t, 1)
            with pytest.raises((RpcTimeoutError, ServerUnreachableError)):
                await t.call(9, b"remove!!", None, idempotent=False)
        server.go.set()
        with trio.fail_after(10):      # the first reply ends the "not answering" state
            while t.offline:
                await trio.sleep(0.01)
        # Replies come in order: once this one is back, the server has seen all before.
        await t.call(2, b"getattr!", None, idempotent=True)
    assert server.executed[1] == 1
    assert server.executed[9] == 0


async def test_reply_larger_than_accepted_fails_only_its_call(allow_log_warnings: None) -> None:
    """A reply over `max_record` used to drop the connection; the call was sent again,
    got the same reply, and so on until its timeout (for ever on a hard mount)."""
    async def answer(conn_no: int, proc: int, stream: trio.SocketStream) -> bool | bytes:
        return bytes(4096) if proc == 6 else True

    server = ScriptedServer(answer)
    server.go.set()
    async with transport_to(server, timeout=30.0, max_record=1024) as t:
        with trio.fail_after(5):
            with pytest.raises(ProtocolError, match="exceeds 1024"):
                await t.call(6, b"read", None, idempotent=True)
            await t.call(1, b"getattr!", None, idempotent=True)   # same connection
        assert server.connections == 1 and server.executed[6] == 1


async def test_read_reply_that_contradicts_itself_is_refused(nursery: trio.Nursery) -> None:
    async def answer(conn_no: int, proc: int, stream: trio.SocketStream) -> bool | bytes:
        return nfs3.encode_res(nfs3.ReadRes(nfs3.Nfsstat3.NFS3_OK, None, 10, False, b"12345"))

    server = ScriptedServer(answer)
    server.go.set()
    port = await nursery.start(server.run)
    t = RpcTransport("127.0.0.1", port, nfs3.PROGRAM, nfs3.VERSION)
    await nursery.start(t.run)
    info = ServerInfo(b"root", port, port, 4096, 4096, 4096, None, None)  # type: ignore[arg-type]
    client = NfsClient(t, info, t.stats)
    with pytest.raises(ProtocolError, match="says 10 bytes, carries 5"):
        await client.read(b"fh", 0, 10, Cred.root())
    t.close()
