"""The WAN emulator (bench/wanem.py): a pipe with latency, RPC accounting, outages."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import re
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import trio

from bench.wanem import (
    LinkProfile,
    RecordParser,
    WanEmulator,
    WanEmulatorThread,
    decode_call,
)

REPO = Path(__file__).resolve().parent.parent
NFS, MOUNT = 100003, 100005


# --------------------------------------------------------------------------- helpers


async def _echo_handler(stream: trio.SocketStream) -> None:
    try:
        async for data in stream:
            await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


@pytest.fixture
async def echo_port(nursery: trio.Nursery) -> int:
    listeners = await nursery.start(partial(trio.serve_tcp, _echo_handler, 0, host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1]


async def start_emu(nursery: trio.Nursery, port: int, profile: LinkProfile | None = None,
                    **kw) -> WanEmulator:
    emu = WanEmulator(("127.0.0.1", port), profile, **kw)
    await nursery.start(emu.run)
    return emu


async def connect(emu: WanEmulator) -> trio.SocketStream:
    stream = await trio.open_tcp_stream(*emu.address)
    stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return stream


async def recv_exactly(stream: trio.SocketStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        data = await stream.receive_some(n - len(buf))
        if not data:
            raise EOFError(f"EOF after {len(buf)} of {n} bytes")
        buf += data
    return bytes(buf)


async def round_trip(stream: trio.SocketStream, msg: bytes = b"ping") -> float:
    t0 = trio.current_time()
    await stream.send_all(msg)
    assert await recv_exactly(stream, len(msg)) == msg
    return trio.current_time() - t0


def rpc_call(xid: int, prog: int, vers: int, proc: int, body: bytes = b"") -> bytes:
    """The payload of a CALL record (AUTH_NONE credential and verifier)."""
    return struct.pack(">10I", xid, 0, 2, prog, vers, proc, 0, 0, 0, 0) + body


def rpc_reply(xid: int) -> bytes:
    """The payload of an accepted, successful REPLY record."""
    return struct.pack(">6I", xid, 1, 0, 0, 0, 0)


def record(payload: bytes, fragments: int = 1) -> bytes:
    """`payload` with record marking, split into `fragments` fragments."""
    cuts = sorted(random.sample(range(1, len(payload)), fragments - 1)) if fragments > 1 else []
    bounds = [0, *cuts, len(payload)]
    out = bytearray()
    for i, (a, b) in enumerate(itertools.pairwise(bounds)):
        last = 0x80000000 if i == len(bounds) - 2 else 0
        out += struct.pack(">I", last | (b - a)) + payload[a:b]
    return bytes(out)


def frag(payload: bytes, last: bool) -> bytes:
    return struct.pack(">I", (0x80000000 if last else 0) | len(payload)) + payload


# --------------------------------------------------------------------------- data path


async def test_bytes_pass_unchanged_on_many_connections(nursery, echo_port):
    emu = await start_emu(nursery, echo_port, LinkProfile(rtt_ms=10, up_mbit=2000,
                                                          down_mbit=2000), window=256 * 1024)
    blob = os.urandom(5 * 1024 * 1024)
    results: dict[int, str] = {}

    async def one(i: int) -> None:
        stream = await connect(emu)
        data = blob[i:] + blob[:i]  # each connection sends a different rotation
        got = bytearray()

        async def sender() -> None:
            view = memoryview(data)
            for off in range(0, len(view), 100_000):
                await stream.send_all(view[off:off + 100_000])
            await stream.send_eof()

        async with trio.open_nursery() as inner:
            inner.start_soon(sender)
            async for chunk in stream:
                got += chunk
        await stream.aclose()
        assert len(got) == len(data)
        results[i] = hashlib.sha256(got).hexdigest()
        assert results[i] == hashlib.sha256(data).hexdigest()

    t0 = trio.current_time()
    with trio.fail_after(15):
        async with trio.open_nursery() as n:
            for i in range(8):
                n.start_soon(one, i * 1000)
    elapsed = trio.current_time() - t0
    assert len(results) == 8
    snap = emu.snapshot()
    assert snap["bytes_up"] == snap["bytes_down"] == 8 * len(blob)
    assert snap["connections_total"] == 8
    # Back-pressure: no connection queued much more than its window.
    assert snap["peak_queued"] <= 256 * 1024 + 64 * 1024
    print(f"8 x 5 MiB echoed in {elapsed:.2f}s ({8 * len(blob) * 8 / elapsed / 1e6:.0f} Mbit/s "
          f"each way of 2000 configured); peak queue {snap['peak_queued']} B")
    await trio.sleep(0.05)
    assert emu.connections_open == 0


async def test_round_trip_costs_one_rtt_plus_one_for_setup(nursery, echo_port):
    emu = await start_emu(nursery, echo_port, LinkProfile(rtt_ms=100))
    stream = await connect(emu)
    first = await round_trip(stream)  # includes the emulated TCP handshake
    second = await round_trip(stream)
    print(f"first exchange {first * 1000:.1f} ms, then {second * 1000:.1f} ms at rtt=100ms")
    assert 0.2 <= first < 0.2 + 0.08
    assert 0.1 <= second < 0.1 + 0.05
    await stream.aclose()


async def test_asymmetric_delays(nursery, echo_port):
    emu = await start_emu(nursery, echo_port, LinkProfile(up_delay_ms=10, down_delay_ms=70))
    stream = await connect(emu)
    await round_trip(stream)
    rt = await round_trip(stream)
    assert 0.08 <= rt < 0.08 + 0.03
    emu.set_link(rtt_ms=20)
    await round_trip(stream)
    assert 0.02 <= await round_trip(stream) < 0.02 + 0.03
    await stream.aclose()


async def test_bandwidth_limits_throughput(nursery, echo_port):
    emu = await start_emu(nursery, echo_port, LinkProfile(rtt_ms=0, up_mbit=40, down_mbit=None))
    stream = await connect(emu)
    size = 4 * 1024 * 1024
    t0 = trio.current_time()
    async with trio.open_nursery() as n:
        n.start_soon(stream.send_all, os.urandom(size))
        await recv_exactly(stream, size)
    elapsed = trio.current_time() - t0
    mbit = size * 8 / elapsed / 1e6
    print(f"4 MiB over 40 Mbit/s took {elapsed:.3f}s = {mbit:.1f} Mbit/s")
    assert elapsed >= 0.8
    assert elapsed < 0.839 * 1.25
    await stream.aclose()


async def test_link_is_shared_by_connections(nursery, echo_port):
    emu = await start_emu(nursery, echo_port, LinkProfile(rtt_ms=0, up_mbit=80))
    size = 2 * 1024 * 1024

    async def one() -> None:
        stream = await connect(emu)
        async with trio.open_nursery() as n:
            n.start_soon(stream.send_all, os.urandom(size))
            await recv_exactly(stream, size)
        await stream.aclose()

    t0 = trio.current_time()
    async with trio.open_nursery() as n:
        for _ in range(3):
            n.start_soon(one)
    elapsed = trio.current_time() - t0
    # 6 MiB in total through one 80 Mbit/s link: >= 0.63 s, not 0.21 s.
    assert elapsed >= 3 * size * 8 / 80e6 * 0.99


async def test_pipelined_requests_share_the_pipe(nursery, echo_port):
    emu = await start_emu(nursery, echo_port, LinkProfile(rtt_ms=100, up_mbit=100,
                                                          down_mbit=100))
    stream = await connect(emu)
    await round_trip(stream)
    msgs = [f"request {i:04d}\n".encode() for i in range(50)]
    t0 = trio.current_time()
    for m in msgs:  # back to back, not waiting for replies
        await stream.send_all(m)
    assert await recv_exactly(stream, sum(map(len, msgs))) == b"".join(msgs)
    elapsed = trio.current_time() - t0
    print(f"50 pipelined exchanges at rtt=100ms took {elapsed * 1000:.1f} ms")
    assert 0.1 <= elapsed < 0.3
    await stream.aclose()


async def test_data_sent_during_setup_is_queued(nursery, echo_port):
    emu = await start_emu(nursery, echo_port, LinkProfile(rtt_ms=60))
    stream = await connect(emu)
    await stream.send_all(b"early")
    await stream.send_all(b" bird")
    assert await recv_exactly(stream, 10) == b"early bird"
    await stream.aclose()


# --------------------------------------------------------------------------- RPC accounting


def test_record_parser_handles_any_split():
    rng = random.Random(1)
    payloads = [rpc_call(i, NFS, 3, i % 22, rng.randbytes(rng.randrange(0, 40)))
                for i in range(6)]
    stream = b"".join(record(p, fragments=1 + i % 3) for i, p in enumerate(payloads))
    stream += frag(b"", False) + frag(payloads[0][:3], False) + frag(payloads[0][3:], True)
    expected = [p[:24] for p in payloads] + [payloads[0][:24]]

    whole = RecordParser().feed(stream)
    assert whole == expected
    for cut in range(len(stream) + 1):
        parser = RecordParser()
        assert parser.feed(stream[:cut]) + parser.feed(stream[cut:]) == expected
    parser = RecordParser()
    assert [r for b in stream for r in parser.feed(bytes([b]))] == expected
    assert decode_call(expected[2]) == (2, NFS, 3, 2)


def test_record_parser_survives_garbage():
    parser = RecordParser()
    assert parser.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") == [None]
    assert parser.desynced
    assert parser.feed(os.urandom(100_000)) == []
    short = RecordParser()
    assert short.feed(frag(b"abc", True)) == [b"abc"]
    assert decode_call(b"abc") is None


async def _fake_rpc_server(expect: int, stream: trio.SocketStream) -> None:
    """Read `expect` call records, then reply to all of them (so they are all in flight)."""
    buf = bytearray()
    xids: list[int] = []
    payload = bytearray()
    async for data in stream:
        buf += data
        while len(buf) >= 4:
            word = int.from_bytes(buf[:4], "big")
            length = word & 0x7FFFFFFF
            if len(buf) < 4 + length:
                break
            payload += buf[4:4 + length]
            del buf[:4 + length]
            if word & 0x80000000:
                xids.append(int.from_bytes(payload[:4], "big"))
                payload.clear()
        if len(xids) >= expect:
            break
    await stream.send_all(b"".join(record(rpc_reply(x)) for x in xids))
    await stream.send_all(b"".join(record(rpc_reply(x)) for x in xids[:3]))  # unmatched
    await trio.sleep_forever()


async def test_counts_rpc_calls_and_in_flight(nursery):
    n_calls = 12
    listeners = await nursery.start(partial(
        trio.serve_tcp, partial(_fake_rpc_server, n_calls), 0, host="127.0.0.1"))
    emu = await start_emu(nursery, listeners[0].socket.getsockname()[1],
                          LinkProfile(rtt_ms=10))
    stream = await connect(emu)
    rng = random.Random(2)
    # 5 pipelined READs in one send
    await stream.send_all(b"".join(record(rpc_call(100 + i, NFS, 3, 6, b"x" * 40))
                                   for i in range(5)))
    # GETATTR split inside the record-marking header, then inside the RPC header
    rec = record(rpc_call(200, NFS, 3, 1, b"fh" * 10))
    for piece in (rec[:2], rec[2:13], rec[13:]):
        await stream.send_all(piece)
        await trio.sleep(0.03)
    # a multi-fragment MNT whose fixed header spans three fragments
    body = rpc_call(300, MOUNT, 3, 1, b"/export\0")
    rec = frag(body[:7], False) + frag(body[7:19], False) + frag(body[19:], True)
    for piece in (rec[:9], rec[9:24], rec[24:]):
        await stream.send_all(piece)
        await trio.sleep(0.03)
    # 5 more calls, randomly fragmented, sent byte-chunked
    rest = b"".join(record(rpc_call(400 + i, NFS, 3, 3 + i % 2, rng.randbytes(30)), 1 + i % 3)
                    for i in range(5))
    cut = 37
    await stream.send_all(rest[:cut])
    await trio.sleep(0.03)
    await stream.send_all(rest[cut:])

    replies = await recv_exactly(stream, (n_calls + 3) * 28)
    assert len(RecordParser().feed(replies)) == n_calls + 3
    assert emu.counts == {(NFS, 3, 6): 5, (NFS, 3, 1): 1, (MOUNT, 3, 1): 1,
                          (NFS, 3, 3): 3, (NFS, 3, 4): 2}
    assert emu.calls() == n_calls
    assert emu.calls(prog=NFS) == 11
    assert emu.calls(prog=NFS, proc=6) == 5
    assert emu.calls(proc=1) == 2
    assert emu.calls(prog=MOUNT, vers=3) == 1
    assert emu.replies == n_calls + 3
    assert emu.max_in_flight == n_calls
    assert emu.in_flight == 0
    assert emu.garbage_records == 0
    snap = emu.snapshot()
    assert snap["counts"]["100003.3.6"] == 5
    assert snap["bytes_down"] == len(replies)
    json.dumps(snap)
    emu.reset_counts()
    assert emu.calls() == 0
    assert emu.snapshot()["bytes_up"] == 0
    await stream.aclose()


async def test_max_in_flight_sees_200_outstanding_calls(nursery):
    listeners = await nursery.start(partial(
        trio.serve_tcp, partial(_fake_rpc_server, 200), 0, host="127.0.0.1"))
    emu = await start_emu(nursery, listeners[0].socket.getsockname()[1],
                          LinkProfile(rtt_ms=50, up_mbit=100, down_mbit=100))
    stream = await connect(emu)
    await stream.send_all(b"".join(record(rpc_call(i, NFS, 3, 6)) for i in range(200)))
    await recv_exactly(stream, 203 * 28)
    assert emu.max_in_flight == 200
    assert emu.calls(prog=NFS, proc=6) == 200
    await stream.aclose()


async def test_unreachable_target_resets_the_client(nursery):
    with trio.socket.socket() as probe:
        await probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]  # nothing listens there
    emu = await start_emu(nursery, dead_port)
    stream = await connect(emu)
    await _expect_closed(stream)
    assert emu.connections_open == 0


async def test_non_rpc_traffic_is_forwarded_and_counted_as_garbage(nursery, echo_port):
    emu = await start_emu(nursery, echo_port)
    stream = await connect(emu)
    junk = b"GET / HTTP/1.1\r\n\r\n" + os.urandom(200_000)
    async with trio.open_nursery() as n:
        n.start_soon(stream.send_all, junk)
        assert await recv_exactly(stream, len(junk)) == junk
    # an echoed CALL is a call upstream but garbage downstream (not a reply)
    other = await connect(emu)
    call = record(rpc_call(7, NFS, 3, 0))
    await other.send_all(call)
    assert await recv_exactly(other, len(call)) == call
    assert emu.calls() == 1
    assert emu.garbage_records == 3  # junk in both directions, echoed call
    assert emu.in_flight == 1
    await other.aclose()
    await trio.sleep(0.05)
    assert emu.in_flight == 0  # a closed connection's calls are no longer in flight
    await stream.aclose()


# --------------------------------------------------------------------------- outages


async def _expect_closed(stream: trio.SocketStream) -> None:
    with trio.fail_after(2):
        try:
            data = await stream.receive_some(100)
        except trio.BrokenResourceError:
            return
        assert data == b""


async def test_stop_and_start(nursery, echo_port):
    emu = await start_emu(nursery, echo_port, LinkProfile(rtt_ms=10))
    port = emu.port
    stream = await connect(emu)
    await round_trip(stream)
    emu.stop()
    assert not emu.listening
    await _expect_closed(stream)
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", port)
    assert emu.connections_open == 0
    emu.start()
    assert emu.port == port
    again = await connect(emu)
    await round_trip(again)
    assert emu.snapshot()["connections_total"] == 2
    await again.aclose()


async def test_drop_connections_keeps_listening(nursery, echo_port):
    emu = await start_emu(nursery, echo_port)
    a, b = await connect(emu), await connect(emu)
    await round_trip(a)
    await round_trip(b)
    emu.drop_connections()
    await _expect_closed(a)
    await _expect_closed(b)
    c = await connect(emu)
    await round_trip(c)
    await c.aclose()


async def test_blackhole_loses_bytes_without_closing(nursery, echo_port):
    emu = await start_emu(nursery, echo_port, LinkProfile(rtt_ms=10))
    stream = await connect(emu)
    await round_trip(stream)
    emu.blackhole(True)
    await stream.send_all(b"hello?")
    with trio.move_on_after(1.0) as cancelled:
        await stream.receive_some(100)  # neither an answer nor EOF
    assert cancelled.cancelled_caught
    assert emu.snapshot()["bytes_blackholed"] == 6
    emu.blackhole(False)
    fresh = await connect(emu)
    await round_trip(fresh)
    assert emu.connections_open == 2
    await fresh.aclose()
    await stream.aclose()


async def test_stall_holds_bytes_and_delivers_them_in_order(nursery, echo_port):
    emu = await start_emu(nursery, echo_port, LinkProfile(rtt_ms=10))
    stream = await connect(emu)
    await round_trip(stream)
    emu.stall(True)
    assert emu.snapshot()["stalled"]
    msgs = [b"first,", b"second,", b"third"]
    for m in msgs:
        await stream.send_all(m)
    with trio.move_on_after(1.0) as cancelled:
        await stream.receive_some(100)  # neither an answer nor EOF while stalled
    assert cancelled.cancelled_caught
    assert emu.connections_open == 1
    emu.stall(False)
    want = b"".join(msgs)
    with trio.fail_after(5):
        assert await recv_exactly(stream, len(want)) == want
    await round_trip(stream)
    assert emu.snapshot()["bytes_blackholed"] == 0
    assert emu.snapshot()["connections_total"] == 1
    await stream.aclose()


# --------------------------------------------------------------------------- sync API and command


class _EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        try:
            while data := self.request.recv(65536):
                self.request.sendall(data)
        except ConnectionResetError:
            pass


@pytest.fixture
def sync_echo() -> Iterator[int]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _EchoHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def _sync_round_trip(address: tuple[str, int], msg: bytes) -> bytes:
    with socket.create_connection(address, timeout=5) as s:
        s.sendall(msg)
        got = b""
        while len(got) < len(msg):
            data = s.recv(65536)
            if not data:
                break
            got += data
        return got


def test_thread_api(sync_echo):
    call = record(rpc_call(1, NFS, 3, 0))
    with WanEmulatorThread(("127.0.0.1", sync_echo), LinkProfile(rtt_ms=20)) as emu:
        assert emu.address == ("127.0.0.1", emu.port)
        assert _sync_round_trip(emu.address, call) == call
        assert emu.calls(prog=NFS) == 1
        assert emu.counts == {(NFS, 3, 0): 1}
        emu.stop()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(emu.address, timeout=5)
        emu.start()
        emu.set_link(rtt_ms=0, up_mbit=1000)
        assert _sync_round_trip(emu.address, b"x" * 1000) == b"x" * 1000
        assert emu.snapshot()["link"]["up_mbit"] == 1000
        emu.drop_connections()
        emu.blackhole(False)
        emu.stall(True)
        assert emu.snapshot()["stalled"]
        emu.stall(False)
        emu.reset_counts()
        assert emu.snapshot()["connections_total"] == 0
        port = emu.port
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)


def _control(path: Path, *lines: str) -> list[str]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(path))
        f = s.makefile("rwb")
        answers = []
        for line in lines:
            f.write(line.encode() + b"\n")
            f.flush()
            answers.append(f.readline().decode().strip())
        return answers


def test_command_line(sync_echo, tmp_path):
    ctl = tmp_path / "ctl.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.wanem", "--target", f"127.0.0.1:{sync_echo}",
         "--rtt-ms", "10", "--mbit", "100", "--control", str(ctl)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        m = re.fullmatch(r"wanem listening on 127\.0\.0\.1:(\d+) -> 127\.0\.0\.1:(\d+) "
                         r"\(rtt=10ms, up=100Mbit/s, down=100Mbit/s\)\n", line)
        assert m, line
        address = ("127.0.0.1", int(m.group(1)))
        call = record(rpc_call(9, NFS, 3, 6))
        assert _sync_round_trip(address, call) == call
        stats, bad, ok, link, stall = _control(ctl, "stats", "bogus", "blackhole off",
                                               "link rtt=20 up=50 down=inf", "stall off")
        snap = json.loads(stats)
        assert snap["counts"] == {"100003.3.6": 1}
        assert snap["connections_total"] == 1
        assert bad.startswith("error:")
        assert ok == link == stall == "ok"
        assert _control(ctl, "stop") == ["ok"]
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(address, timeout=5)
        assert _control(ctl, "start", "drop") == ["ok", "ok"]
        assert _sync_round_trip(address, b"back") == b"back"
        link_info = json.loads(_control(ctl, "stats")[0])["link"]
        assert (link_info["rtt_ms"], link_info["up_mbit"], link_info["down_mbit"]) == (20, 50, None)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert re.search(r"NFSv3\s+READ\s+1", out), out
    assert not ctl.exists()


def test_command_rejects_bad_arguments():
    proc = subprocess.run([sys.executable, "-m", "bench.wanem", "--target", "nohost"],
                          cwd=REPO, capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 2
    assert "expected HOST:PORT" in proc.stderr
    assert "Traceback" not in proc.stderr
