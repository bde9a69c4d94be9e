"""ONC-RPC v2 messages (RFC 5531) and TCP record marking, against hand-built bytes."""

from __future__ import annotations

import errno
import pickle
import struct
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wancache.nfs_backend import rpc
from wancache.nfs_backend.errors import (
    ProtocolError,
    RpcAcceptError,
    RpcDeniedError,
    RpcError,
    XdrError,
)
from wancache.nfs_backend.rpc import (
    AUTH_NONE_CRED,
    AcceptStat,
    AuthFlavor,
    AuthStat,
    AuthSys,
    CallHeader,
    OpaqueAuth,
    RecordReader,
    RejectStat,
    auth_sys_cred,
    decode_auth_sys,
    decode_call,
    decode_reply,
    encode_call,
    encode_reply_denied,
    encode_reply_error,
    encode_reply_success,
    frame_record,
    peek_xid,
)


def w(*vals: int) -> bytes:
    """Big-endian 32-bit words, built without the codec."""
    return b"".join(v.to_bytes(4, "big") for v in vals)


# An NFSv3 GETATTR call with AUTH_SYS, laid out by hand from RFC 5531 §9 and appendix A.
AUTH_SYS_BODY = (
    w(0x5F5E0FF)  # stamp
    + w(4) + b"host"  # machinename<255>
    + w(1000)  # uid
    + w(100)  # gid
    + w(2, 100, 27)  # gids<16>
)  # fmt: skip
GETATTR_CALL = (
    w(0x12345678)  # xid
    + w(0)  # msg_type CALL
    + w(2)  # rpcvers
    + w(100003, 3, 1)  # prog NFS, vers 3, proc GETATTR
    + w(1, 32) + AUTH_SYS_BODY  # cred: AUTH_SYS, 32 bytes
    + w(0, 0)  # verf: AUTH_NONE, empty
    + w(4) + b"\x01\x02\x03\x04"  # args: nfs_fh3 opaque<64>
)  # fmt: skip
AUTH = AuthSys(0x5F5E0FF, b"host", 1000, 100, (100, 27))


def test_auth_sys_call_matches_hand_built_bytes() -> None:
    assert len(AUTH_SYS_BODY) == 32
    cred = auth_sys_cred(AUTH)
    assert cred == OpaqueAuth(AuthFlavor.AUTH_SYS, AUTH_SYS_BODY)
    msg = encode_call(0x12345678, 100003, 3, 1, cred, w(4) + b"\x01\x02\x03\x04")
    assert msg == GETATTR_CALL


def test_decode_hand_built_call() -> None:
    header, args = decode_call(GETATTR_CALL)
    assert header == CallHeader(
        0x12345678, 100003, 3, 1, OpaqueAuth(AuthFlavor.AUTH_SYS, AUTH_SYS_BODY), AUTH_NONE_CRED
    )
    assert bytes(args) == w(4) + b"\x01\x02\x03\x04"
    assert decode_auth_sys(header.cred.body) == AUTH
    assert peek_xid(GETATTR_CALL) == 0x12345678


def test_auth_none_call() -> None:
    msg = encode_call(7, 100005, 3, 0, AUTH_NONE_CRED, b"")
    assert msg == w(7, 0, 2, 100005, 3, 0, 0, 0, 0, 0)


def test_unknown_flavor_is_kept_as_int() -> None:
    msg = encode_call(1, 2, 3, 4, OpaqueAuth(99, b"abcd"), b"")
    header, _ = decode_call(msg)
    assert header.cred == OpaqueAuth(99, b"abcd")


def test_auth_sys_limits() -> None:
    many = AuthSys(1, b"m", 0, 0, tuple(range(20)))
    assert decode_auth_sys(auth_sys_cred(many).body).gids == tuple(range(16))  # truncated
    with pytest.raises(ValueError):
        auth_sys_cred(AuthSys(1, b"m" * 256, 0, 0))
    assert decode_auth_sys(auth_sys_cred(AuthSys(1, b"m" * 255, 0, 0)).body).machinename == (
        b"m" * 255
    )
    too_many = w(0, 0, 0, 0, 17) + w(*range(17))
    with pytest.raises(XdrError):
        decode_auth_sys(too_many)
    with pytest.raises(XdrError):
        decode_auth_sys(AUTH_SYS_BODY + w(0))  # trailing bytes
    with pytest.raises(ValueError):
        auth_sys_cred(AuthSys(-1, b"", 0, 0))


def test_opaque_auth_is_limited_to_400_bytes() -> None:
    with pytest.raises(ValueError):
        encode_call(1, 2, 3, 4, OpaqueAuth(1, b"x" * 401), b"")
    msg = w(1, 0, 2, 1, 1, 1) + w(1, 404) + b"x" * 404 + w(0, 0)
    with pytest.raises(XdrError):
        decode_call(msg)


def test_decode_call_rejects_non_calls() -> None:
    with pytest.raises(ProtocolError, match="msg_type"):
        decode_call(encode_reply_success(1, b""))
    with pytest.raises(ProtocolError, match="version"):
        decode_call(w(1, 0, 3, 100003, 3, 0, 0, 0, 0, 0))
    with pytest.raises(ProtocolError):
        decode_call(GETATTR_CALL[:30])
    with pytest.raises(ProtocolError):
        peek_xid(b"\0\0\0")


# --- replies ------------------------------------------------------------------------------


def test_decode_success_reply() -> None:
    msg = w(9, 1, 0) + w(0, 0) + w(0) + w(0, 42)  # accepted, AUTH_NONE verf, SUCCESS, results
    reply = decode_reply(msg)
    assert reply.xid == 9
    assert reply.verf == AUTH_NONE_CRED
    assert bytes(reply.body) == w(0, 42)
    assert reply.body.obj is msg  # zero-copy
    assert encode_reply_success(9, w(0, 42)) == msg


def test_reply_with_non_empty_verifier() -> None:
    msg = encode_reply_success(3, b"", OpaqueAuth(AuthFlavor.AUTH_SHORT, b"shrt"))
    assert msg == w(3, 1, 0, 2, 4) + b"shrt" + w(0)
    assert decode_reply(msg).verf == OpaqueAuth(AuthFlavor.AUTH_SHORT, b"shrt")


def test_prog_mismatch() -> None:
    msg = w(5, 1, 0, 0, 0, 2, 2, 3)
    assert encode_reply_error(5, AcceptStat.PROG_MISMATCH, (2, 3)) == msg
    with pytest.raises(RpcAcceptError) as ei:
        decode_reply(msg)
    assert ei.value.accept_stat == AcceptStat.PROG_MISMATCH
    assert ei.value.mismatch == (2, 3)
    assert ei.value.xid == 5


@pytest.mark.parametrize(
    "stat",
    [AcceptStat.PROG_UNAVAIL, AcceptStat.PROC_UNAVAIL, AcceptStat.GARBAGE_ARGS,
     AcceptStat.SYSTEM_ERR],
)  # fmt: skip
def test_other_accept_errors(stat: AcceptStat) -> None:
    msg = w(5, 1, 0, 0, 0, stat)
    assert encode_reply_error(5, stat) == msg
    with pytest.raises(RpcAcceptError) as ei:
        decode_reply(msg)
    assert ei.value.accept_stat is stat
    assert ei.value.mismatch is None


def test_rpc_mismatch_denied() -> None:
    msg = w(6, 1, 1, 0, 2, 2)
    assert encode_reply_denied(6, RejectStat.RPC_MISMATCH, mismatch=(2, 2)) == msg
    with pytest.raises(RpcDeniedError) as ei:
        decode_reply(msg)
    assert ei.value.reject_stat == RejectStat.RPC_MISMATCH
    assert ei.value.auth_stat is None
    assert ei.value.mismatch == (2, 2)


def test_auth_error_denied() -> None:
    msg = w(6, 1, 1, 1, 5)
    assert encode_reply_denied(6, RejectStat.AUTH_ERROR, AuthStat.AUTH_TOOWEAK) == msg
    with pytest.raises(RpcDeniedError) as ei:
        decode_reply(msg)
    assert ei.value.auth_stat is AuthStat.AUTH_TOOWEAK
    assert ei.value.mismatch is None
    with pytest.raises(RpcDeniedError) as ei:
        decode_reply(w(6, 1, 1, 1, 99))
    assert ei.value.auth_stat == 99


def test_rpc_errors_are_not_protocol_errors_and_pickle() -> None:
    assert issubclass(RpcDeniedError, RpcError)
    assert not issubclass(RpcError, ProtocolError)
    e = pickle.loads(pickle.dumps(RpcDeniedError(1, 5, None, 3)))
    assert (e.reject_stat, e.auth_stat, e.mismatch, e.xid) == (1, 5, None, 3)
    a = pickle.loads(pickle.dumps(RpcAcceptError(2, (2, 3), 4)))
    assert (a.accept_stat, a.mismatch, a.xid) == (2, (2, 3), 4)


@pytest.mark.parametrize(
    "msg",
    [
        GETATTR_CALL,  # a call, not a reply
        w(1, 2, 0, 0, 0, 0),  # msg_type 2
        w(1, 1, 2),  # reply_stat 2
        w(1, 1, 0, 0, 0, 6),  # accept_stat 6
        w(1, 1, 1, 2),  # reject_stat 2
        w(1, 1, 0, 0),  # truncated verifier
        w(1, 1, 0, 0, 0, 2, 2),  # truncated mismatch info
        w(1, 1, 1, 1),  # truncated auth_stat
        w(1, 1),
        b"",
    ],
)
def test_malformed_replies_are_protocol_errors(msg: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_reply(msg)


def test_encode_reply_argument_checks() -> None:
    with pytest.raises(ValueError):
        encode_reply_error(1, AcceptStat.SUCCESS)
    with pytest.raises(ValueError):
        encode_reply_error(1, AcceptStat.PROG_MISMATCH)
    with pytest.raises(ValueError):
        encode_reply_denied(1, RejectStat.AUTH_ERROR)
    with pytest.raises(ValueError):
        encode_reply_denied(1, RejectStat.RPC_MISMATCH)


@settings(max_examples=100, deadline=None)
@given(
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    st.builds(
        AuthSys,
        st.integers(0, 2**32 - 1),
        st.binary(max_size=255),
        st.integers(0, 2**32 - 1),
        st.integers(0, 2**32 - 1),
        st.lists(st.integers(0, 2**32 - 1), max_size=16).map(tuple),
    ),
    st.binary(max_size=200).map(lambda b: b + bytes(-len(b) % 4)),
)
def test_call_and_reply_round_trip(
    xid: int, prog: int, vers: int, proc: int, auth: AuthSys, args: bytes
) -> None:
    msg = encode_call(xid, prog, vers, proc, auth_sys_cred(auth), args)
    header, got = decode_call(msg)
    assert header == CallHeader(xid, prog, vers, proc, auth_sys_cred(auth))
    assert bytes(got) == args
    assert decode_auth_sys(header.cred.body) == auth
    assert peek_xid(msg) == xid
    reply = decode_reply(encode_reply_success(xid, args))
    assert (reply.xid, bytes(reply.body)) == (xid, args)


# --- record marking (RFC 5531 §11) -----------------------------------------------------------


def test_single_fragment_vector() -> None:
    assert frame_record(b"abcd") == b"\x80\x00\x00\x04abcd"
    assert frame_record(b"") == b"\x80\x00\x00\x00"


def test_multi_fragment_vector() -> None:
    framed = frame_record(b"abcdefghij", max_fragment=4)
    assert framed == (b"\x00\x00\x00\x04abcd" + b"\x00\x00\x00\x04efgh" + b"\x80\x00\x00\x02ij")
    assert frame_record(b"abcdefgh", max_fragment=4) == (
        b"\x00\x00\x00\x04abcd\x80\x00\x00\x04efgh"
    )
    with pytest.raises(ValueError):
        frame_record(b"x", max_fragment=0)
    with pytest.raises(ValueError):
        frame_record(b"x", max_fragment=2**31)


def test_reader_reassembles_hand_built_fragments() -> None:
    stream = (
        b"\x00\x00\x00\x03abc"  # first fragment of record 1
        + b"\x00\x00\x00\x00"  # an empty non-last fragment is legal
        + b"\x80\x00\x00\x02de"  # last fragment of record 1
        + b"\x80\x00\x00\x00"  # record 2: empty
        + b"\x80\x00\x00\x01f"  # record 3
        + b"\x00\x00\x00\x02gh"  # start of record 4 (incomplete)
    )  # fmt: skip
    r = RecordReader()
    assert r.feed(stream) == [b"abcde", b"", b"f"]
    assert not r.at_boundary()
    assert r.buffered == 2
    assert r.feed(b"\x80\x00\x00\x01i") == [b"ghi"]
    assert r.at_boundary()
    assert r.buffered == 0


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.binary(max_size=300), min_size=1, max_size=6),
    st.integers(1, 64),
    st.lists(st.integers(1, 50), min_size=1, max_size=30),
)
def test_reader_handles_any_chunking(records: list[bytes], max_frag: int, cuts: list[int]) -> None:
    stream = b"".join(frame_record(m, max_frag) for m in records)
    r = RecordReader()
    got: list[bytes] = []
    pos = 0
    i = 0
    while pos < len(stream):
        n = cuts[i % len(cuts)]
        got += r.feed(stream[pos : pos + n])
        pos += n
        i += 1
    assert got == records
    assert r.at_boundary()


def test_reader_byte_by_byte() -> None:
    stream = frame_record(b"hello world", 3) + frame_record(b"x")
    r = RecordReader()
    got = []
    for i in range(len(stream)):
        got += r.feed(stream[i : i + 1])
    assert got == [b"hello world", b"x"]


def test_reader_enforces_max_record() -> None:
    r = RecordReader(max_record=10)
    assert r.feed(frame_record(b"x" * 10)) == [b"x" * 10]
    with pytest.raises(ProtocolError):
        RecordReader(max_record=10).feed(b"\x80\x00\x00\x0b")  # refused on the header alone
    r = RecordReader(max_record=10)
    with pytest.raises(ProtocolError):
        r.feed(frame_record(b"x" * 11, 4))  # the sum of the fragments counts
    with pytest.raises(ProtocolError):
        RecordReader().feed(b"\xff\xff\xff\xff")


def test_reader_skips_oversized_records_when_asked() -> None:
    """A reply too large to accept fails its own call (by xid), not the connection."""
    big = struct.pack(">I", 0xCAFE) + b"y" * 40
    stream = (frame_record(b"before") + frame_record(big, 7) + frame_record(b"after")
              + frame_record(b"ab"))
    for chunk in (len(stream), 1, 3, 5):
        r = RecordReader(max_record=10, skip_oversized=True)
        got = []
        for i in range(0, len(stream), chunk):
            got += r.feed(stream[i : i + chunk])
        assert got == [b"before", b"after", b"ab"]
        assert r.oversized == [(0xCAFE, 44)]
        assert r.at_boundary() and r.buffered == 0
    # The xid comes from the fragments already held when the limit is crossed.
    r = RecordReader(max_record=10, skip_oversized=True)
    assert r.feed(frame_record(struct.pack(">I", 7) + b"z" * 20, 6) + frame_record(b"ok")) \
        == [b"ok"]
    assert r.oversized == [(7, 24)]
    r = RecordReader(max_record=4, skip_oversized=True)      # an xid across fragments
    assert r.feed(frame_record(b"abcdefgh", 2)) == []
    assert r.oversized == [(0x61626364, 8)]
    # Refused while its first fragment, shorter than an xid, is all there is: no xid.
    r = RecordReader(max_record=1, skip_oversized=True)
    assert r.feed(frame_record(b"abcdefgh", 2)) == []
    assert r.oversized == [(None, 8)]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=8), st.integers(4, 16), st.integers(0, 30),
       st.lists(st.integers(1, 50), max_size=20))
def test_reader_skip_mode_any_chunking(records: list[bytes], max_frag: int, limit: int,
                                       cuts: list[int]) -> None:
    stream = b"".join(frame_record(rec, max_frag) for rec in records)
    r = RecordReader(max_record=limit, skip_oversized=True)
    got: list[bytes] = []
    pos = 0
    for n in [*cuts, len(stream)]:
        got += r.feed(stream[pos : pos + n])
        pos += n
    assert got == [rec for rec in records if len(rec) <= limit]
    assert r.oversized == [(struct.unpack(">I", rec[:4])[0] if len(rec) >= 4 else None,
                            len(rec)) for rec in records if len(rec) > limit]
    assert r.at_boundary()


def test_reader_is_linear_for_large_records() -> None:
    record = bytes(range(256)) * 4096  # 1 MiB
    stream = frame_record(record) * 48  # 48 MiB
    r = RecordReader()
    count = 0
    start = time.perf_counter()
    view = memoryview(stream)
    for off in range(0, len(stream), 65536):
        for rec in r.feed(view[off : off + 65536]):
            assert len(rec) == len(record)
            count += 1
    elapsed = time.perf_counter() - start
    assert count == 48
    assert r.at_boundary()
    assert elapsed < 5.0  # linear: ~0.1 s; quadratic copying would take minutes


def test_multi_fragment_record_of_large_message() -> None:
    record = bytes(range(256)) * 4096
    framed = frame_record(record, max_fragment=100_000)
    assert len(framed) == len(record) + 4 * 11  # ceil(1 MiB / 100000) = 11 fragment headers
    assert RecordReader().feed(framed) == [record]


def test_module_constants() -> None:
    assert rpc.RPC_VERSION == 2
    assert rpc.MAX_FRAGMENT == 2**31 - 1
    assert (int(AuthFlavor.AUTH_NONE), int(AuthFlavor.AUTH_SYS)) == (0, 1)


def test_transport_errors() -> None:
    from wancache.nfs_backend import errors

    for cls in (errors.RpcTimeoutError, errors.ServerUnreachableError,
                errors.TransportClosedError, errors.UnknownOutcomeError):  # fmt: skip
        e = cls("why")
        assert isinstance(e, errors.TransportError) and isinstance(e, errors.WancacheError)
        assert not isinstance(e, ProtocolError)
        assert str(e) == "why" and e.errno == errno.EIO
