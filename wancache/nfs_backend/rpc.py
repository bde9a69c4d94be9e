"""ONC-RPC version 2 messages (RFC 5531) and TCP record marking, sans I/O.

- §8 and §9: rpc_msg, call_body, reply_body (encode_call / decode_call,
  decode_reply / encode_reply_*).
- §8.2 and appendix A: opaque_auth and the AUTH_SYS credential (authsys_parms).
- §11: record marking over a byte stream (frame_record / RecordReader).

Everything here works on bytes; sockets and timers live elsewhere.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

from .errors import ProtocolError, RpcAcceptError, RpcDeniedError, XdrError
from .xdr import Packer, Unpacker

RPC_VERSION = 2
MAX_AUTH_BYTES = 400
"""opaque_auth bodies are opaque<400> (RFC 5531 §8.2)."""
AUTH_SYS_MAX_MACHINENAME = 255
AUTH_SYS_MAX_GIDS = 16


class MsgType(IntEnum):
    """msg_type (RFC 5531 §9)."""

    CALL = 0
    REPLY = 1


class ReplyStat(IntEnum):
    """reply_stat."""

    MSG_ACCEPTED = 0
    MSG_DENIED = 1


class AcceptStat(IntEnum):
    """accept_stat."""

    SUCCESS = 0
    PROG_UNAVAIL = 1
    PROG_MISMATCH = 2
    PROC_UNAVAIL = 3
    GARBAGE_ARGS = 4
    SYSTEM_ERR = 5


class RejectStat(IntEnum):
    """reject_stat."""

    RPC_MISMATCH = 0
    AUTH_ERROR = 1


class AuthStat(IntEnum):
    """auth_stat (RFC 5531 §9 plus RPCSEC_GSS values of RFC 2203)."""

    AUTH_OK = 0
    AUTH_BADCRED = 1
    AUTH_REJECTEDCRED = 2
    AUTH_BADVERF = 3
    AUTH_REJECTEDVERF = 4
    AUTH_TOOWEAK = 5
    AUTH_INVALIDRESP = 6
    AUTH_FAILED = 7
    AUTH_KERB_GENERIC = 8
    AUTH_TIMEEXPIRE = 9
    AUTH_TKT_FILE = 10
    AUTH_DECODE = 11
    AUTH_NET_ADDR = 12
    RPCSEC_GSS_CREDPROBLEM = 13
    RPCSEC_GSS_CTXPROBLEM = 14


class AuthFlavor(IntEnum):
    """auth_flavor (RFC 5531 §8.2); the set is open, decoders keep unknown ints."""

    AUTH_NONE = 0
    AUTH_SYS = 1
    AUTH_SHORT = 2
    AUTH_DH = 3
    RPCSEC_GSS = 6


@dataclass(frozen=True, slots=True)
class OpaqueAuth:
    """opaque_auth: a flavor and up to 400 bytes of flavor-specific body."""

    flavor: int
    body: bytes = b""


AUTH_NONE_CRED = OpaqueAuth(AuthFlavor.AUTH_NONE, b"")


@dataclass(frozen=True, slots=True)
class AuthSys:
    """authsys_parms (RFC 5531 appendix A).

    Encoding truncates ``gids`` to the first 16 (the RFC limit; servers reject
    more) and refuses a machinename longer than 255 bytes.
    """

    stamp: int
    machinename: bytes
    uid: int
    gid: int
    gids: tuple[int, ...] = ()


def auth_sys_cred(a: AuthSys) -> OpaqueAuth:
    """The AUTH_SYS credential carrying ``a``."""
    p = Packer()
    p.pack_uint(a.stamp)
    p.pack_string(a.machinename, AUTH_SYS_MAX_MACHINENAME)
    p.pack_uint(a.uid)
    p.pack_uint(a.gid)
    p.pack_array(tuple(a.gids[:AUTH_SYS_MAX_GIDS]), p.pack_uint)
    return OpaqueAuth(AuthFlavor.AUTH_SYS, p.get_buffer())


def decode_auth_sys(body: bytes | memoryview) -> AuthSys:
    """Parse an AUTH_SYS credential body; XdrError if malformed."""
    u = Unpacker(body)
    stamp = u.unpack_uint()
    machinename = u.unpack_string(AUTH_SYS_MAX_MACHINENAME)
    uid = u.unpack_uint()
    gid = u.unpack_uint()
    gids = tuple(u.unpack_array(u.unpack_uint, AUTH_SYS_MAX_GIDS))
    u.done()
    return AuthSys(stamp, machinename, uid, gid, gids)


_FLAVOR_OF: dict[int, int] = {int(f): f for f in AuthFlavor}
_AUTH_STAT_OF: dict[int, int] = {int(s): s for s in AuthStat}


def _pack_auth(p: Packer, a: OpaqueAuth) -> None:
    p.pack_uint(a.flavor)
    p.pack_opaque(a.body, MAX_AUTH_BYTES)


def _unpack_auth(u: Unpacker) -> OpaqueAuth:
    raw = u.unpack_uint()
    flavor = _FLAVOR_OF.get(raw, raw)
    return OpaqueAuth(flavor, u.unpack_opaque(MAX_AUTH_BYTES))


_CALL_HEAD = struct.Struct(">IIIIII")  # xid, CALL, rpcvers, prog, vers, proc
_REPLY_HEAD = struct.Struct(">III")  # xid, REPLY, reply_stat
_U32 = struct.Struct(">I")
_U32x2 = struct.Struct(">II")


@dataclass(frozen=True, slots=True)
class CallHeader:
    """The call_body of an rpc_msg, without the procedure arguments."""

    xid: int
    prog: int
    vers: int
    proc: int
    cred: OpaqueAuth
    verf: OpaqueAuth = AUTH_NONE_CRED


def encode_call(
    xid: int,
    prog: int,
    vers: int,
    proc: int,
    cred: OpaqueAuth,
    args: bytes | bytearray | memoryview,
    verf: OpaqueAuth = AUTH_NONE_CRED,
) -> bytes:
    """A CALL rpc_msg with already-encoded ``args`` (no record mark)."""
    p = Packer()
    p.pack_struct(_CALL_HEAD, xid, MsgType.CALL, RPC_VERSION, prog, vers, proc)
    _pack_auth(p, cred)
    _pack_auth(p, verf)
    p.pack_raw(args)
    return p.get_buffer()


Buffer = bytes | bytearray | memoryview


def frame_call(
    xid: int,
    prog: int,
    vers: int,
    proc: int,
    cred: OpaqueAuth,
    args: Buffer | Sequence[Buffer],
    verf: OpaqueAuth = AUTH_NONE_CRED,
) -> bytes:
    """``frame_record(encode_call(...))`` in one step: the record-marked CALL, with
    the bytes of ``args`` (encoded arguments, or their parts in order) copied once.

    A WRITE's data is its arguments' bulk: the transport sends the parts of
    `frame_call_parts` without copying it at all, so a call in flight holds no
    more RAM than its data, which its caller holds anyway (issue 14).
    """
    return b"".join(frame_call_parts(xid, prog, vers, proc, cred, args, verf))


BIG_PART = 64 << 10     # frame_call_parts: a part this big is passed on, not copied


def frame_call_parts(
    xid: int,
    prog: int,
    vers: int,
    proc: int,
    cred: OpaqueAuth,
    args: Buffer | Sequence[Buffer],
    verf: OpaqueAuth = AUTH_NONE_CRED,
) -> list[Buffer]:
    """`frame_call` as parts to send in order: the parts of ``args`` of at least
    BIG_PART bytes (a WRITE's data) are among them, not copied; the rest is joined."""
    p = Packer()
    p.pack_struct(_CALL_HEAD, xid, MsgType.CALL, RPC_VERSION, prog, vers, proc)
    _pack_auth(p, cred)
    _pack_auth(p, verf)
    parts: Sequence[Buffer] = (args,) if isinstance(args, bytes | bytearray | memoryview) \
        else args
    n = len(p) + sum(len(part) for part in parts)
    if n & 3:
        raise ValueError("raw XDR data must be a multiple of 4 bytes")
    if n > MAX_FRAGMENT:
        return [frame_record(b"".join((p.get_buffer(), *parts)))]
    out: list[Buffer] = []
    small: list[Buffer] = [_U32.pack(_LAST_FRAGMENT | n), p.get_buffer()]
    for part in parts:
        if len(part) >= BIG_PART:
            out += (b"".join(small), part)
            small = []
        else:
            small.append(part)
    if small:
        out.append(b"".join(small))
    return out


def decode_call(msg: bytes | bytearray | memoryview) -> tuple[CallHeader, memoryview]:
    """Parse a CALL rpc_msg into its header and a zero-copy view of the arguments.

    ProtocolError if it is not a call or not RPC version 2 (a server should
    answer the latter with encode_reply_denied(..., RPC_MISMATCH, mismatch=(2, 2))).
    """
    u = Unpacker(msg)
    xid, mtype, rpcvers, prog, vers, proc = u.unpack_struct(_CALL_HEAD)
    if mtype != MsgType.CALL:
        raise ProtocolError(f"xid {xid:#x}: expected an RPC call, got msg_type {mtype}")
    if rpcvers != RPC_VERSION:
        raise ProtocolError(f"xid {xid:#x}: RPC version {rpcvers}, only 2 is spoken")
    cred = _unpack_auth(u)
    verf = _unpack_auth(u)
    header = CallHeader(int(xid), int(prog), int(vers), int(proc), cred, verf)
    return header, u.unpack_rest()


def peek_xid(msg: bytes | bytearray | memoryview) -> int:
    """The xid of any rpc_msg (call or reply)."""
    if len(msg) < 4:
        raise ProtocolError(f"RPC message of {len(msg)} bytes has no xid")
    return int(_U32.unpack_from(msg, 0)[0])


@dataclass(frozen=True, slots=True)
class Reply:
    """An accepted, successful reply: the procedure's results are in ``body``."""

    xid: int
    verf: OpaqueAuth
    body: memoryview


def decode_reply(msg: bytes | bytearray | memoryview) -> Reply:
    """Parse a REPLY rpc_msg.

    Returns the SUCCESS results as a zero-copy view.  Raises RpcAcceptError for
    other accept_stats, RpcDeniedError for MSG_DENIED, ProtocolError if the
    bytes are not a well-formed reply.  Bytes trailing an error reply are
    ignored.
    """
    u = Unpacker(msg)
    xid, mtype, reply_stat = u.unpack_struct(_REPLY_HEAD)
    xid = int(xid)
    if mtype != MsgType.REPLY:
        raise ProtocolError(f"xid {xid:#x}: expected an RPC reply, got msg_type {mtype}")
    if reply_stat == ReplyStat.MSG_ACCEPTED:
        verf = _unpack_auth(u)
        accept_stat = u.unpack_uint()
        if accept_stat == AcceptStat.SUCCESS:
            return Reply(xid, verf, u.unpack_rest())
        if accept_stat == AcceptStat.PROG_MISMATCH:
            low, high = u.unpack_struct(_U32x2)
            raise RpcAcceptError(AcceptStat.PROG_MISMATCH, (int(low), int(high)), xid)
        try:
            stat = AcceptStat(accept_stat)
        except ValueError:
            raise XdrError(f"xid {xid:#x}: unknown accept_stat {accept_stat}") from None
        raise RpcAcceptError(stat, None, xid)
    if reply_stat == ReplyStat.MSG_DENIED:
        reject_stat = u.unpack_uint()
        if reject_stat == RejectStat.RPC_MISMATCH:
            low, high = u.unpack_struct(_U32x2)
            raise RpcDeniedError(RejectStat.RPC_MISMATCH, None, (int(low), int(high)), xid)
        if reject_stat == RejectStat.AUTH_ERROR:
            raw = u.unpack_uint()
            auth_stat = _AUTH_STAT_OF.get(raw, raw)  # unknown values kept: the set grows
            raise RpcDeniedError(RejectStat.AUTH_ERROR, auth_stat, None, xid)
        raise XdrError(f"xid {xid:#x}: unknown reject_stat {reject_stat}")
    raise XdrError(f"xid {xid:#x}: unknown reply_stat {reply_stat}")


def encode_reply_success(
    xid: int, results: bytes | bytearray | memoryview, verf: OpaqueAuth = AUTH_NONE_CRED
) -> bytes:
    """An accepted SUCCESS reply carrying already-encoded ``results``."""
    p = Packer()
    p.pack_struct(_REPLY_HEAD, xid, MsgType.REPLY, ReplyStat.MSG_ACCEPTED)
    _pack_auth(p, verf)
    p.pack_uint(AcceptStat.SUCCESS)
    p.pack_raw(results)
    return p.get_buffer()


def encode_reply_error(
    xid: int,
    accept_stat: int,
    mismatch: tuple[int, int] | None = None,
    verf: OpaqueAuth = AUTH_NONE_CRED,
) -> bytes:
    """An accepted reply with a non-SUCCESS accept_stat (``mismatch`` for PROG_MISMATCH)."""
    if accept_stat == AcceptStat.SUCCESS:
        raise ValueError("use encode_reply_success for SUCCESS")
    p = Packer()
    p.pack_struct(_REPLY_HEAD, xid, MsgType.REPLY, ReplyStat.MSG_ACCEPTED)
    _pack_auth(p, verf)
    p.pack_uint(accept_stat)
    if accept_stat == AcceptStat.PROG_MISMATCH:
        if mismatch is None:
            raise ValueError("PROG_MISMATCH needs the (low, high) supported versions")
        p.pack_struct(_U32x2, *mismatch)
    return p.get_buffer()


def encode_reply_denied(
    xid: int,
    reject_stat: int,
    auth_stat: int | None = None,
    mismatch: tuple[int, int] | None = None,
) -> bytes:
    """A MSG_DENIED reply: RPC_MISMATCH with ``mismatch`` or AUTH_ERROR with ``auth_stat``."""
    p = Packer()
    p.pack_struct(_REPLY_HEAD, xid, MsgType.REPLY, ReplyStat.MSG_DENIED)
    p.pack_uint(reject_stat)
    if reject_stat == RejectStat.RPC_MISMATCH:
        if mismatch is None:
            raise ValueError("RPC_MISMATCH needs the (low, high) supported RPC versions")
        p.pack_struct(_U32x2, *mismatch)
    elif reject_stat == RejectStat.AUTH_ERROR:
        if auth_stat is None:
            raise ValueError("AUTH_ERROR needs an auth_stat")
        p.pack_uint(auth_stat)
    else:
        raise ValueError(f"unknown reject_stat {reject_stat}")
    return p.get_buffer()


# --- record marking (RFC 5531 §11) ---------------------------------------------

MAX_FRAGMENT = 2**31 - 1
_LAST_FRAGMENT = 0x80000000


def frame_record(msg: bytes | bytearray | memoryview, max_fragment: int = MAX_FRAGMENT) -> bytes:
    """Record-mark ``msg`` for a stream: fragments of at most ``max_fragment`` bytes.

    An empty message becomes one empty last fragment.
    """
    if not 1 <= max_fragment <= MAX_FRAGMENT:
        raise ValueError(f"max_fragment must be 1..{MAX_FRAGMENT}, got {max_fragment}")
    n = len(msg)
    if n <= max_fragment:
        return _U32.pack(_LAST_FRAGMENT | n) + msg
    view = memoryview(msg)
    parts: list[bytes | memoryview] = []
    for start in range(0, n, max_fragment):
        chunk = view[start : start + max_fragment]
        last = _LAST_FRAGMENT if start + max_fragment >= n else 0
        parts.append(_U32.pack(last | len(chunk)))
        parts.append(chunk)
    return b"".join(parts)


class RecordReader:
    """Reassemble record-marked messages from a byte stream (sans I/O).

    Feed whatever the socket returned; get back every record it completed.
    Each byte is copied twice at most (into the buffer, out into the record),
    so a stream of large records costs linear time however it is chunked.
    A record longer than `max_record` raises ProtocolError, after which the
    stream position is lost: close the connection.  With `skip_oversized`, such a
    record is read past instead (never held in memory) and noted in `oversized`
    as (xid, announced length); the xid is None if the record has fewer than 4
    bytes.  The stream stays usable.
    """

    __slots__ = ("_buf", "_frag_left", "_frags", "_last", "_max_record", "_record_len",
                 "_skip", "_skip_xid", "_skip_xid_known", "_skipping", "oversized")

    def __init__(self, max_record: int = 64 * 2**20, *, skip_oversized: bool = False) -> None:
        self._max_record = max_record
        self._buf = bytearray()
        self._frags: list[bytes] = []  # complete fragments of the current record
        self._record_len = 0  # bytes in self._frags plus the announced current fragment
        self._frag_left = -1  # length of the fragment being read; -1 = expect a header
        self._last = False
        self._skip = skip_oversized
        self._skipping = False  # reading past the current (oversized) record
        self._skip_xid: int | None = None
        self._skip_xid_known = False  # the xid was read, or can no longer be
        self.oversized: list[tuple[int | None, int]] = []

    @property
    def buffered(self) -> int:
        """Bytes received that belong to no complete record yet (0 at a record boundary)."""
        return len(self._buf) + sum(len(f) for f in self._frags)

    def at_boundary(self) -> bool:
        """True if the stream ended cleanly between two records."""
        return not self._buf and not self._frags and self._frag_left < 0

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Add stream bytes; return the records they complete, in order."""
        buf = self._buf
        buf += data
        records: list[bytes] = []
        pos = 0
        end = len(buf)
        while True:
            if self._frag_left < 0:
                if end - pos < 4:
                    break
                (mark,) = _U32.unpack_from(buf, pos)
                pos += 4
                self._last = bool(mark & _LAST_FRAGMENT)
                self._frag_left = mark & MAX_FRAGMENT
                self._record_len += self._frag_left
                if self._record_len > self._max_record and not self._skipping:
                    if not self._skip:
                        raise ProtocolError(
                            f"RPC record of more than {self._max_record} bytes "
                            f"({self._record_len} announced so far)"
                        )
                    self._start_skipping()
            n = self._frag_left
            if self._skipping:
                pos = self._skip_bytes(buf, pos, end)
                if self._frag_left >= 0:
                    break
                continue
            if end - pos < n:
                break
            with memoryview(buf) as mv:
                frag = bytes(mv[pos : pos + n])
            pos += n
            self._frag_left = -1
            if not self._last:
                self._frags.append(frag)
                continue
            if self._frags:
                self._frags.append(frag)
                frag = b"".join(self._frags)
                self._frags.clear()
            records.append(frag)
            self._record_len = 0
        if pos:
            del buf[:pos]
        return records

    def _start_skipping(self) -> None:
        self._skipping = True
        first = b"".join(self._frags)[:4]
        self._skip_xid = _U32.unpack(first)[0] if len(first) == 4 else None
        self._skip_xid_known = bool(self._frags)
        self._frags.clear()

    def _skip_bytes(self, buf: bytearray, pos: int, end: int) -> int:
        """Read past the oversized record's current fragment; the new position."""
        if not self._skip_xid_known:
            if self._frag_left >= 4 and end - pos < 4:
                return pos      # wait for the xid (the first 4 bytes of the record)
            if self._frag_left >= 4:
                self._skip_xid = _U32.unpack_from(buf, pos)[0]
            self._skip_xid_known = True
        take = min(self._frag_left, end - pos)
        pos += take
        self._frag_left -= take
        if self._frag_left == 0:
            self._frag_left = -1
            if self._last:
                self.oversized.append((self._skip_xid, self._record_len))
                self._skipping = self._skip_xid_known = False
                self._skip_xid = None
                self._record_len = 0
        return pos
