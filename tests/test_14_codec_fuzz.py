"""Fuzzing the decoders: hostile bytes may only raise ProtocolError (or, for replies, RpcError).

Never IndexError, struct.error, ValueError, MemoryError or a hang: a far
server or a broken middlebox must not be able to crash or stall the client.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tests.test_12_nfs3 import ARG_STRATEGIES, RES_STRATEGIES, any_args, any_res, w
from wancache.nfs_backend import mount3, portmap, rpc
from wancache.nfs_backend.errors import ProtocolError, RpcError
from wancache.nfs_backend.nfs3 import (
    Proc,
    decode_args,
    decode_res,
    encode_args,
    encode_res,
    proc_of,
)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
procs = st.sampled_from(list(Proc))


def only_protocol_errors(fn: Callable[[], object], also: tuple[type[Exception], ...] = ()) -> None:
    try:
        fn()
    except ProtocolError:
        pass
    except also:
        pass


def mutate(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    """Flip one bit per (index, bit) pair."""
    buf = bytearray(data)
    for index, bit in flips:
        buf[index % len(buf)] ^= 1 << bit
    return bytes(buf)


flip_lists = st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 7)), min_size=1, max_size=4)

# Random words biased towards values that matter to XDR: booleans, small lengths, huge lengths.
words = st.lists(
    st.sampled_from([0, 1, 2, 3, 4, 8, 64, 65, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF])
    | st.integers(0, 2**32 - 1),
    max_size=40,
).map(lambda ws: w(*ws))
hostile = st.binary(max_size=300) | words


# --- NFSv3 ---------------------------------------------------------------------------------


@FUZZ
@given(procs, hostile)
def test_decode_res_random_bytes(proc: Proc, data: bytes) -> None:
    only_protocol_errors(lambda: decode_res(proc, data))


@FUZZ
@given(procs, hostile)
def test_decode_args_random_bytes(proc: Proc, data: bytes) -> None:
    only_protocol_errors(lambda: decode_args(proc, data))


@FUZZ
@given(any_res, st.data())
def test_truncated_results_always_fail(res: Any, data: st.DataObject) -> None:
    enc = encode_res(res)
    assume(enc)
    cut = data.draw(st.integers(0, len(enc) - 1))
    with pytest.raises(ProtocolError):  # XDR encodings of one type are prefix-free
        decode_res(proc_of(res), enc[:cut])


@FUZZ
@given(any_args, st.data())
def test_truncated_args_always_fail(args: Any, data: st.DataObject) -> None:
    enc = encode_args(args)
    assume(enc)
    cut = data.draw(st.integers(0, len(enc) - 1))
    with pytest.raises(ProtocolError):
        decode_args(proc_of(args), enc[:cut])


@FUZZ
@given(any_res, flip_lists)
def test_bit_flipped_results(res: Any, flips: list[tuple[int, int]]) -> None:
    enc = encode_res(res)
    assume(enc)
    only_protocol_errors(lambda: decode_res(proc_of(res), mutate(enc, flips)))


@FUZZ
@given(any_args, flip_lists)
def test_bit_flipped_args(args: Any, flips: list[tuple[int, int]]) -> None:
    enc = encode_args(args)
    assume(enc)
    only_protocol_errors(lambda: decode_args(proc_of(args), mutate(enc, flips)))


@FUZZ
@given(any_res, st.binary(min_size=1, max_size=8))
def test_appended_bytes_are_refused(res: Any, extra: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_res(proc_of(res), encode_res(res) + extra)


def test_strategies_reach_every_procedure() -> None:
    assert set(ARG_STRATEGIES) == set(RES_STRATEGIES) == set(Proc)


def test_huge_counts_do_not_allocate_or_loop() -> None:
    big = 0xFFFFFFFF
    for proc, data in [
        (Proc.READ, w(0, 0, 10, 1, big)),  # READ data length
        (Proc.READLINK, w(0, 0, big)),
        (Proc.LOOKUP, w(0, big)),  # file handle length
        (Proc.READDIR, w(0, 0) + b"\0" * 8 + w(1, 0, 0, big)),  # entry name length
        (Proc.READDIR, w(0, 0) + b"\0" * 8 + w(1) * 10_000),  # entries without end
    ]:
        with pytest.raises(ProtocolError):
            decode_res(proc, data)
    with pytest.raises(ProtocolError):
        decode_args(Proc.WRITE, w(0, 0, 0, 0, 0, big))


# --- RPC -------------------------------------------------------------------------------------


def _valid_messages() -> st.SearchStrategy[bytes]:
    cred = rpc.auth_sys_cred(rpc.AuthSys(1, b"client", 1000, 1000, (1, 2, 3)))
    calls = st.tuples(st.integers(0, 2**32 - 1), any_args).map(
        lambda t: rpc.encode_call(t[0], 100003, 3, proc_of(t[1]), cred, encode_args(t[1]))
    )
    replies = st.tuples(st.integers(0, 2**32 - 1), any_res).map(
        lambda t: rpc.encode_reply_success(t[0], encode_res(t[1]))
    )
    errors = st.sampled_from([
        rpc.encode_reply_error(1, rpc.AcceptStat.PROG_MISMATCH, (2, 3)),
        rpc.encode_reply_error(1, rpc.AcceptStat.GARBAGE_ARGS),
        rpc.encode_reply_denied(1, rpc.RejectStat.AUTH_ERROR, rpc.AuthStat.AUTH_BADCRED),
        rpc.encode_reply_denied(1, rpc.RejectStat.RPC_MISMATCH, mismatch=(2, 2)),
    ])  # fmt: skip
    return calls | replies | errors


valid_messages = _valid_messages()


@FUZZ
@given(hostile)
def test_decode_reply_and_call_random_bytes(data: bytes) -> None:
    only_protocol_errors(lambda: rpc.decode_reply(data), also=(RpcError,))
    only_protocol_errors(lambda: rpc.decode_call(data))
    only_protocol_errors(lambda: rpc.decode_auth_sys(data))
    only_protocol_errors(lambda: rpc.peek_xid(data))


@FUZZ
@given(valid_messages, flip_lists, st.data())
def test_damaged_rpc_messages(
    msg: bytes, flips: list[tuple[int, int]], data: st.DataObject
) -> None:
    for damaged in (mutate(msg, flips), msg[: data.draw(st.integers(0, len(msg)))]):
        only_protocol_errors(lambda d=damaged: rpc.decode_reply(d), also=(RpcError,))  # type: ignore[misc]
        only_protocol_errors(lambda d=damaged: rpc.decode_call(d))  # type: ignore[misc]


@FUZZ
@given(valid_messages)
def test_a_decoded_call_body_decodes_or_fails_cleanly(msg: bytes) -> None:
    try:
        header, args = rpc.decode_call(msg)
    except ProtocolError:
        return  # a reply
    assert decode_args(header.proc, args) is not None
    assert rpc.decode_auth_sys(header.cred.body).machinename == b"client"


@FUZZ
@given(hostile, st.lists(st.integers(1, 64), min_size=1, max_size=8))
def test_record_reader_random_stream(data: bytes, cuts: list[int]) -> None:
    reader = rpc.RecordReader(max_record=1024)
    pos = 0
    i = 0
    try:
        while pos < len(data):
            n = cuts[i % len(cuts)]
            for record in reader.feed(data[pos : pos + n]):
                assert len(record) <= 1024
            pos += n
            i += 1
    except ProtocolError:
        pass


@FUZZ
@given(st.lists(valid_messages, min_size=1, max_size=3), flip_lists)
def test_record_reader_damaged_framing(msgs: list[bytes], flips: list[tuple[int, int]]) -> None:
    stream = mutate(b"".join(rpc.frame_record(m, 50) for m in msgs), flips)
    only_protocol_errors(lambda: rpc.RecordReader(max_record=4096).feed(stream))


# --- MOUNT and portmap -------------------------------------------------------------------


@FUZZ
@given(hostile)
def test_mount_and_portmap_random_bytes(data: bytes) -> None:
    for decode in (
        mount3.decode_mnt_res, mount3.decode_mnt_args, mount3.decode_umnt_args,
        mount3.decode_export_res, mount3.decode_dump_res, portmap.decode_getport_res,
        portmap.decode_getport_args, portmap.decode_getaddr_res, portmap.decode_getaddr_args,
    ):  # fmt: skip
        only_protocol_errors(lambda f=decode: f(data))  # type: ignore[misc]


@FUZZ
@given(st.text(max_size=40))
def test_parse_uaddr_random_text(text: str) -> None:
    only_protocol_errors(lambda: portmap.parse_uaddr(text))
