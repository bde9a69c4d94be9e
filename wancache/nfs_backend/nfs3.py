"""NFS version 3 (RFC 1813): data types (§2) and the arguments and results of
all 22 procedures (§3.3.0-§3.3.21) of program 100003 version 3, sans I/O.

Every procedure P has a frozen ``<P>Args`` and ``<P>Res`` dataclass.  File
handles, names and symlink targets are ``bytes`` (names need not be UTF-8).
A result whose status is not NFS3_OK carries only what the RFC's failure arm
carries (e.g. LOOKUP's dir_attributes, CREATE's dir_wcc); its other fields
hold neutral defaults (None, 0, b"", [], an empty WccData).

Uniform dispatch, shared by the client, fake servers and the WAN emulator:
``encode_args`` / ``decode_args`` / ``encode_res`` / ``decode_res`` / ``proc_of``.
Decoders raise XdrError (a ProtocolError) on garbage, truncation or trailing
bytes; encoders raise ValueError on values the wire format cannot carry.
"""

from __future__ import annotations

import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from .errors import NfsError, Nfsstat3, XdrError
from .xdr import _PAD, Packer, Unpacker

PROGRAM = 100003
VERSION = 3

NFS3_FHSIZE = 64
NFS3_COOKIEVERFSIZE = 8
NFS3_CREATEVERFSIZE = 8
NFS3_WRITEVERFSIZE = 8


class Proc(IntEnum):
    """NFSv3 procedure numbers (RFC 1813 §3)."""

    NULL = 0
    GETATTR = 1
    SETATTR = 2
    LOOKUP = 3
    ACCESS = 4
    READLINK = 5
    READ = 6
    WRITE = 7
    CREATE = 8
    MKDIR = 9
    SYMLINK = 10
    MKNOD = 11
    REMOVE = 12
    RMDIR = 13
    RENAME = 14
    LINK = 15
    READDIR = 16
    READDIRPLUS = 17
    FSSTAT = 18
    FSINFO = 19
    PATHCONF = 20
    COMMIT = 21


NFS3_OK = Nfsstat3.NFS3_OK


class Ftype3(IntEnum):
    """ftype3 (§2.6): a closed set."""

    REG = 1
    DIR = 2
    BLK = 3
    CHR = 4
    LNK = 5
    SOCK = 6
    FIFO = 7


class StableHow(IntEnum):
    """stable_how (§3.3.7)."""

    UNSTABLE = 0
    DATA_SYNC = 1
    FILE_SYNC = 2


class CreateMode(IntEnum):
    """createmode3 (§3.3.8)."""

    UNCHECKED = 0
    GUARDED = 1
    EXCLUSIVE = 2


class TimeHow(IntEnum):
    """time_how (§2.6, set_atime/set_mtime discriminant)."""

    DONT_CHANGE = 0
    SET_TO_SERVER_TIME = 1
    SET_TO_CLIENT_TIME = 2


SERVER_TIME = TimeHow.SET_TO_SERVER_TIME
"""Sattr3.atime / mtime value meaning "set to the server's clock"."""

ACCESS3_READ = 0x0001
ACCESS3_LOOKUP = 0x0002
ACCESS3_MODIFY = 0x0004
ACCESS3_EXTEND = 0x0008
ACCESS3_DELETE = 0x0010
ACCESS3_EXECUTE = 0x0020

FSF3_LINK = 0x0001
FSF3_SYMLINK = 0x0002
FSF3_HOMOGENEOUS = 0x0008
FSF3_CANSETTIME = 0x0010

_FTYPE_MODE_BITS = {
    Ftype3.REG: stat.S_IFREG,
    Ftype3.DIR: stat.S_IFDIR,
    Ftype3.BLK: stat.S_IFBLK,
    Ftype3.CHR: stat.S_IFCHR,
    Ftype3.LNK: stat.S_IFLNK,
    Ftype3.SOCK: stat.S_IFSOCK,
    Ftype3.FIFO: stat.S_IFIFO,
}
_MODE_BITS_FTYPE = {v: k for k, v in _FTYPE_MODE_BITS.items()}


def ftype_to_mode_bits(ftype: Ftype3) -> int:
    """The stat.S_IF* file-type bits for an ftype3."""
    return _FTYPE_MODE_BITS[ftype]


def ftype_from_mode(mode: int) -> Ftype3:
    """The ftype3 of a st_mode's S_IFMT bits; ValueError if there are none."""
    try:
        return _MODE_BITS_FTYPE[stat.S_IFMT(mode)]
    except KeyError:
        raise ValueError(f"mode {mode:#o} has no known file type bits") from None


# --- basic data types (§2.5-§2.6) ---------------------------------------------------


@dataclass(frozen=True, slots=True, order=True)
class NfsTime:
    """nfstime3: seconds and nanoseconds since the epoch, both uint32."""

    seconds: int
    nseconds: int

    def to_ns(self) -> int:
        """Nanoseconds since the epoch."""
        return self.seconds * 1_000_000_000 + self.nseconds

    @classmethod
    def from_ns(cls, ns: int) -> NfsTime:
        """From nanoseconds since the epoch (must fit in uint32 seconds to be encoded)."""
        s, n = divmod(ns, 1_000_000_000)
        return cls(s, n)


_ZERO_TIME = NfsTime(0, 0)


@dataclass(frozen=True, slots=True)
class Fattr3:
    """fattr3: file attributes (§2.6).  rdev is specdata3 (major, minor)."""

    type: Ftype3
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    used: int
    rdev: tuple[int, int]
    fsid: int
    fileid: int
    atime: NfsTime
    mtime: NfsTime
    ctime: NfsTime

    @property
    def is_dir(self) -> bool:
        """True for directories."""
        return self.type == Ftype3.DIR

    @property
    def st_mode(self) -> int:
        """A full st_mode: file-type bits plus the permission bits."""
        return _FTYPE_MODE_BITS[self.type] | (self.mode & 0o7777)


@dataclass(frozen=True, slots=True)
class WccAttr:
    """wcc_attr: the pre-operation attributes of weak cache consistency data."""

    size: int
    mtime: NfsTime
    ctime: NfsTime


@dataclass(frozen=True, slots=True)
class WccData:
    """wcc_data: pre_op_attr before, post_op_attr after (either may be absent)."""

    before: WccAttr | None = None
    after: Fattr3 | None = None


EMPTY_WCC = WccData()


@dataclass(frozen=True, slots=True)
class Sattr3:
    """sattr3: attributes to set; None means "don't change".

    atime/mtime: None (don't change), SERVER_TIME (server's clock) or an
    NfsTime (client time).
    """

    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime: NfsTime | TimeHow | None = None
    mtime: NfsTime | TimeHow | None = None


@dataclass(frozen=True, slots=True)
class DirOpArgs:
    """diropargs3: a directory handle and a name in it."""

    dir: bytes
    name: bytes


@dataclass(frozen=True, slots=True)
class Entry3:
    """entry3 of a READDIR reply."""

    fileid: int
    name: bytes
    cookie: int


@dataclass(frozen=True, slots=True)
class EntryPlus3:
    """entryplus3 of a READDIRPLUS reply."""

    fileid: int
    name: bytes
    cookie: int
    name_attributes: Fattr3 | None = None
    name_handle: bytes | None = None


# --- codecs of the basic types -----------------------------------------------------

_FATTR = struct.Struct(">IIIIIQQIIQQIIIIII")
_WCC_ATTR = struct.Struct(">QIIII")
_TIME = struct.Struct(">II")
_SPEC = _TIME
_STATUS_OF = {int(s): s for s in Nfsstat3}
_FTYPE_OF = {int(t): t for t in Ftype3}


def _p_fh(p: Packer, fh: bytes) -> None:
    p.pack_opaque(fh, NFS3_FHSIZE)


def _u_fh(u: Unpacker) -> bytes:
    return u.unpack_opaque(NFS3_FHSIZE)


def _p_name(p: Packer, name: bytes) -> None:
    p.pack_string(name)


def _u_name(u: Unpacker) -> bytes:
    return u.unpack_string()


def _p_uint(p: Packer, n: int) -> None:
    p.pack_uint(n)


def _u_uint(u: Unpacker) -> int:
    return u.unpack_uint()


def _p_uint64(p: Packer, n: int) -> None:
    p.pack_uhyper(n)


def _u_uint64(u: Unpacker) -> int:
    return u.unpack_uhyper()


def _p_bool(p: Packer, b: bool) -> None:
    p.pack_bool(b)


def _u_bool(u: Unpacker) -> bool:
    return u.unpack_bool()


def _p_verf(p: Packer, v: bytes) -> None:
    p.pack_fopaque(8, v)


def _u_verf(u: Unpacker) -> bytes:
    return u.unpack_fopaque(8)


def _p_opaque(p: Packer, data: bytes) -> None:
    p.pack_opaque(data)


def _u_opaque(u: Unpacker) -> bytes:
    return u.unpack_opaque()


def _p_time(p: Packer, t: NfsTime) -> None:
    p.pack_struct(_TIME, t.seconds, t.nseconds)


def _u_time(u: Unpacker) -> NfsTime:
    s, ns = u.unpack_struct(_TIME)
    return NfsTime(s, ns)


def _p_spec(p: Packer, spec: tuple[int, int]) -> None:
    major, minor = spec
    p.pack_struct(_SPEC, major, minor)


def _u_spec(u: Unpacker) -> tuple[int, int]:
    major, minor = u.unpack_struct(_SPEC)
    return (major, minor)


def _p_ftype(p: Packer, t: Ftype3) -> None:
    if t not in _FTYPE_OF:
        raise ValueError(f"not an ftype3: {t!r}")
    p.pack_enum(t)


def _u_ftype(u: Unpacker) -> Ftype3:
    return u.unpack_enum_of(Ftype3)


def _p_stable(p: Packer, s: StableHow) -> None:
    p.pack_enum(StableHow(s))


def _u_stable(u: Unpacker) -> StableHow:
    return u.unpack_enum_of(StableHow)


def _p_fattr(p: Packer, a: Fattr3) -> None:
    if a.type not in _FTYPE_OF:
        raise ValueError(f"not an ftype3: {a.type!r}")
    at, mt, ct = a.atime, a.mtime, a.ctime
    p.pack_struct(
        _FATTR, a.type, a.mode, a.nlink, a.uid, a.gid, a.size, a.used, a.rdev[0], a.rdev[1],
        a.fsid, a.fileid, at.seconds, at.nseconds, mt.seconds, mt.nseconds,
        ct.seconds, ct.nseconds,
    )  # fmt: skip


def _u_fattr(u: Unpacker) -> Fattr3:
    (t, mode, nlink, uid, gid, size, used, r1, r2, fsid, fileid,
     a_s, a_ns, m_s, m_ns, c_s, c_ns) = u.unpack_struct(_FATTR)  # fmt: skip
    ftype = _FTYPE_OF.get(t)
    if ftype is None:
        raise XdrError(f"{t} is not a valid ftype3")
    return Fattr3(
        ftype, mode, nlink, uid, gid, size, used, (r1, r2), fsid, fileid,
        NfsTime(a_s, a_ns), NfsTime(m_s, m_ns), NfsTime(c_s, c_ns),
    )  # fmt: skip


def _p_post_op_attr(p: Packer, a: Fattr3 | None) -> None:
    if a is None:
        p.pack_bool(False)
    else:
        p.pack_bool(True)
        _p_fattr(p, a)


def _u_post_op_attr(u: Unpacker) -> Fattr3 | None:
    return _u_fattr(u) if u.unpack_bool() else None


def _p_wcc_attr(p: Packer, w: WccAttr) -> None:
    p.pack_struct(
        _WCC_ATTR, w.size, w.mtime.seconds, w.mtime.nseconds, w.ctime.seconds, w.ctime.nseconds
    )


def _u_wcc_attr(u: Unpacker) -> WccAttr:
    size, m_s, m_ns, c_s, c_ns = u.unpack_struct(_WCC_ATTR)
    return WccAttr(size, NfsTime(m_s, m_ns), NfsTime(c_s, c_ns))


def _p_wcc(p: Packer, w: WccData) -> None:
    p.pack_optional(w.before, lambda b: _p_wcc_attr(p, b))
    _p_post_op_attr(p, w.after)


def _u_wcc(u: Unpacker) -> WccData:
    before = _u_wcc_attr(u) if u.unpack_bool() else None
    after = _u_post_op_attr(u)
    if before is None and after is None:
        return EMPTY_WCC
    return WccData(before, after)


def _p_post_op_fh(p: Packer, fh: bytes | None) -> None:
    p.pack_optional(fh, lambda h: _p_fh(p, h))


def _u_post_op_fh(u: Unpacker) -> bytes | None:
    return _u_fh(u) if u.unpack_bool() else None


def _p_set_time(p: Packer, t: NfsTime | TimeHow | None) -> None:
    if isinstance(t, NfsTime):
        p.pack_enum(TimeHow.SET_TO_CLIENT_TIME)
        _p_time(p, t)
    elif t is None or t == TimeHow.DONT_CHANGE:
        p.pack_enum(TimeHow.DONT_CHANGE)
    elif t == TimeHow.SET_TO_SERVER_TIME:
        p.pack_enum(TimeHow.SET_TO_SERVER_TIME)
    else:
        raise ValueError(f"set_time needs None, SERVER_TIME or an NfsTime, got {t!r}")


def _u_set_time(u: Unpacker) -> NfsTime | TimeHow | None:
    how = u.unpack_enum_of(TimeHow)
    if how == TimeHow.SET_TO_CLIENT_TIME:
        return _u_time(u)
    if how == TimeHow.SET_TO_SERVER_TIME:
        return SERVER_TIME
    return None


def _p_sattr(p: Packer, s: Sattr3) -> None:
    for v in (s.mode, s.uid, s.gid):
        if v is None:
            p.pack_bool(False)
        else:
            p.pack_bool(True)
            p.pack_uint(v)
    if s.size is None:
        p.pack_bool(False)
    else:
        p.pack_bool(True)
        p.pack_uhyper(s.size)
    _p_set_time(p, s.atime)
    _p_set_time(p, s.mtime)


def _u_sattr(u: Unpacker) -> Sattr3:
    mode = u.unpack_uint() if u.unpack_bool() else None
    uid = u.unpack_uint() if u.unpack_bool() else None
    gid = u.unpack_uint() if u.unpack_bool() else None
    size = u.unpack_uhyper() if u.unpack_bool() else None
    atime = _u_set_time(u)
    mtime = _u_set_time(u)
    return Sattr3(mode, uid, gid, size, atime, mtime)


def _p_guard(p: Packer, ctime: NfsTime | None) -> None:
    p.pack_optional(ctime, lambda t: _p_time(p, t))


def _u_guard(u: Unpacker) -> NfsTime | None:
    return _u_time(u) if u.unpack_bool() else None


def _p_diropargs(p: Packer, d: DirOpArgs) -> None:
    _p_fh(p, d.dir)
    _p_name(p, d.name)


def _u_diropargs(u: Unpacker) -> DirOpArgs:
    return DirOpArgs(_u_fh(u), _u_name(u))


def _p_entries(p: Packer, entries: list[Entry3]) -> None:
    for e in entries:
        p.pack_bool(True)
        p.pack_uhyper(e.fileid)
        p.pack_string(e.name)
        p.pack_uhyper(e.cookie)
    p.pack_bool(False)


def _u_entries(u: Unpacker) -> list[Entry3]:
    out: list[Entry3] = []
    while u.unpack_bool():  # every entry consumes >= 24 bytes: bounded by the input
        fileid = u.unpack_uhyper()
        name = u.unpack_string()
        out.append(Entry3(fileid, name, u.unpack_uhyper()))
    return out


def _p_entries_plus(p: Packer, entries: list[EntryPlus3]) -> None:
    for e in entries:
        p.pack_bool(True)
        p.pack_uhyper(e.fileid)
        p.pack_string(e.name)
        p.pack_uhyper(e.cookie)
        _p_post_op_attr(p, e.name_attributes)
        _p_post_op_fh(p, e.name_handle)
    p.pack_bool(False)


def _u_entries_plus(u: Unpacker) -> list[EntryPlus3]:
    out: list[EntryPlus3] = []
    while u.unpack_bool():
        fileid = u.unpack_uhyper()
        name = u.unpack_string()
        cookie = u.unpack_uhyper()
        attrs = _u_post_op_attr(u)
        out.append(EntryPlus3(fileid, name, cookie, attrs, _u_post_op_fh(u)))
    return out


def _status(v: int) -> Nfsstat3 | int:
    return _STATUS_OF.get(v, v)


# --- procedure arguments and results (§3.3) ---------------------------------------


@dataclass(frozen=True, slots=True)
class NullArgs:
    """NULL takes no arguments."""


@dataclass(frozen=True, slots=True)
class NullRes:
    """NULL returns nothing."""


@dataclass(frozen=True, slots=True)
class GetattrArgs:
    """GETATTR3args."""

    object: bytes


@dataclass(frozen=True, slots=True)
class GetattrRes:
    """GETATTR3res: attributes on success."""

    status: Nfsstat3 | int
    attributes: Fattr3 | None = None


@dataclass(frozen=True, slots=True)
class SetattrArgs:
    """SETATTR3args; guard is the ctime the object must still have (sattrguard3)."""

    object: bytes
    new_attributes: Sattr3
    guard: NfsTime | None = None


@dataclass(frozen=True, slots=True)
class SetattrRes:
    """SETATTR3res: obj_wcc in both arms."""

    status: Nfsstat3 | int
    obj_wcc: WccData = EMPTY_WCC


@dataclass(frozen=True, slots=True)
class LookupArgs:
    """LOOKUP3args."""

    what: DirOpArgs


@dataclass(frozen=True, slots=True)
class LookupRes:
    """LOOKUP3res: the failure arm carries dir_attributes only."""

    status: Nfsstat3 | int
    object: bytes | None = None
    obj_attributes: Fattr3 | None = None
    dir_attributes: Fattr3 | None = None

    @property
    def fh(self) -> bytes:
        """The handle found; a successful reply always carries one."""
        assert self.object is not None, "LOOKUP3resok without a handle"
        return self.object


@dataclass(frozen=True, slots=True)
class AccessArgs:
    """ACCESS3args: access is a mask of ACCESS3_* bits."""

    object: bytes
    access: int


@dataclass(frozen=True, slots=True)
class AccessRes:
    """ACCESS3res: the failure arm carries obj_attributes only."""

    status: Nfsstat3 | int
    obj_attributes: Fattr3 | None = None
    access: int = 0


@dataclass(frozen=True, slots=True)
class ReadlinkArgs:
    """READLINK3args."""

    symlink: bytes


@dataclass(frozen=True, slots=True)
class ReadlinkRes:
    """READLINK3res: the failure arm carries symlink_attributes only."""

    status: Nfsstat3 | int
    symlink_attributes: Fattr3 | None = None
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class ReadArgs:
    """READ3args."""

    file: bytes
    offset: int
    count: int


@dataclass(frozen=True, slots=True)
class ReadRes:
    """READ3res: the failure arm carries file_attributes only."""

    status: Nfsstat3 | int
    file_attributes: Fattr3 | None = None
    count: int = 0
    eof: bool = False
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class WriteArgs:
    """WRITE3args (count is sent as given; it should equal len(data))."""

    file: bytes
    offset: int
    count: int
    stable: StableHow
    data: bytes


@dataclass(frozen=True, slots=True)
class WriteRes:
    """WRITE3res: file_wcc in both arms; count, committed, verf on success."""

    status: Nfsstat3 | int
    file_wcc: WccData = EMPTY_WCC
    count: int = 0
    committed: StableHow = StableHow.UNSTABLE
    verf: bytes = b""


@dataclass(frozen=True, slots=True)
class CreateArgs:
    """CREATE3args: obj_attributes for UNCHECKED/GUARDED, verf for EXCLUSIVE.

    Encoding sends an empty Sattr3 when obj_attributes is None.
    """

    where: DirOpArgs
    mode: CreateMode
    obj_attributes: Sattr3 | None = None
    verf: bytes | None = None


@dataclass(frozen=True, slots=True)
class DirOpRes:
    """Shape shared by CREATE3res, MKDIR3res, SYMLINK3res and MKNOD3res.

    The failure arm carries dir_wcc only.
    """

    status: Nfsstat3 | int
    object: bytes | None = None
    obj_attributes: Fattr3 | None = None
    dir_wcc: WccData = EMPTY_WCC


@dataclass(frozen=True, slots=True)
class CreateRes(DirOpRes):
    """CREATE3res."""


@dataclass(frozen=True, slots=True)
class MkdirArgs:
    """MKDIR3args."""

    where: DirOpArgs
    attributes: Sattr3


@dataclass(frozen=True, slots=True)
class MkdirRes(DirOpRes):
    """MKDIR3res."""


@dataclass(frozen=True, slots=True)
class SymlinkArgs:
    """SYMLINK3args (symlinkdata3 flattened)."""

    where: DirOpArgs
    symlink_attributes: Sattr3
    symlink_data: bytes


@dataclass(frozen=True, slots=True)
class SymlinkRes(DirOpRes):
    """SYMLINK3res."""


@dataclass(frozen=True, slots=True)
class MknodArgs:
    """MKNOD3args (mknoddata3 flattened).

    CHR/BLK carry attributes and spec (major, minor), SOCK/FIFO carry
    attributes only, other types nothing.  Encoding sends an empty Sattr3 for
    a missing attributes and (0, 0) for a missing spec where they are carried.
    """

    where: DirOpArgs
    type: Ftype3
    attributes: Sattr3 | None = None
    spec: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True)
class MknodRes(DirOpRes):
    """MKNOD3res."""


@dataclass(frozen=True, slots=True)
class RemoveArgs:
    """REMOVE3args."""

    object: DirOpArgs


@dataclass(frozen=True, slots=True)
class DirWccRes:
    """Shape shared by REMOVE3res and RMDIR3res: dir_wcc in both arms."""

    status: Nfsstat3 | int
    dir_wcc: WccData = EMPTY_WCC


@dataclass(frozen=True, slots=True)
class RemoveRes(DirWccRes):
    """REMOVE3res."""


@dataclass(frozen=True, slots=True)
class RmdirArgs:
    """RMDIR3args."""

    object: DirOpArgs


@dataclass(frozen=True, slots=True)
class RmdirRes(DirWccRes):
    """RMDIR3res."""


@dataclass(frozen=True, slots=True)
class RenameArgs:
    """RENAME3args."""

    from_: DirOpArgs
    to: DirOpArgs


@dataclass(frozen=True, slots=True)
class RenameRes:
    """RENAME3res: both wcc_data in both arms."""

    status: Nfsstat3 | int
    fromdir_wcc: WccData = EMPTY_WCC
    todir_wcc: WccData = EMPTY_WCC


@dataclass(frozen=True, slots=True)
class LinkArgs:
    """LINK3args."""

    file: bytes
    link: DirOpArgs


@dataclass(frozen=True, slots=True)
class LinkRes:
    """LINK3res: file_attributes and linkdir_wcc in both arms."""

    status: Nfsstat3 | int
    file_attributes: Fattr3 | None = None
    linkdir_wcc: WccData = EMPTY_WCC


@dataclass(frozen=True, slots=True)
class ReaddirArgs:
    """READDIR3args."""

    dir: bytes
    cookie: int
    cookieverf: bytes
    count: int


@dataclass(frozen=True, slots=True)
class ReaddirRes:
    """READDIR3res: the failure arm carries dir_attributes only."""

    status: Nfsstat3 | int
    dir_attributes: Fattr3 | None = None
    cookieverf: bytes = b""
    entries: list[Entry3] = field(default_factory=list)
    eof: bool = False


@dataclass(frozen=True, slots=True)
class ReaddirplusArgs:
    """READDIRPLUS3args."""

    dir: bytes
    cookie: int
    cookieverf: bytes
    dircount: int
    maxcount: int


@dataclass(frozen=True, slots=True)
class ReaddirplusRes:
    """READDIRPLUS3res: the failure arm carries dir_attributes only."""

    status: Nfsstat3 | int
    dir_attributes: Fattr3 | None = None
    cookieverf: bytes = b""
    entries: list[EntryPlus3] = field(default_factory=list)
    eof: bool = False


@dataclass(frozen=True, slots=True)
class FsstatArgs:
    """FSSTAT3args."""

    fsroot: bytes


@dataclass(frozen=True, slots=True)
class FsstatRes:
    """FSSTAT3res: the failure arm carries obj_attributes only."""

    status: Nfsstat3 | int
    obj_attributes: Fattr3 | None = None
    tbytes: int = 0
    fbytes: int = 0
    abytes: int = 0
    tfiles: int = 0
    ffiles: int = 0
    afiles: int = 0
    invarsec: int = 0


@dataclass(frozen=True, slots=True)
class FsinfoArgs:
    """FSINFO3args."""

    fsroot: bytes


@dataclass(frozen=True, slots=True)
class FsinfoRes:
    """FSINFO3res: the failure arm carries obj_attributes only; properties = FSF3_* bits."""

    status: Nfsstat3 | int
    obj_attributes: Fattr3 | None = None
    rtmax: int = 0
    rtpref: int = 0
    rtmult: int = 0
    wtmax: int = 0
    wtpref: int = 0
    wtmult: int = 0
    dtpref: int = 0
    maxfilesize: int = 0
    time_delta: NfsTime = _ZERO_TIME
    properties: int = 0


@dataclass(frozen=True, slots=True)
class PathconfArgs:
    """PATHCONF3args."""

    object: bytes


@dataclass(frozen=True, slots=True)
class PathconfRes:
    """PATHCONF3res: the failure arm carries obj_attributes only."""

    status: Nfsstat3 | int
    obj_attributes: Fattr3 | None = None
    linkmax: int = 0
    name_max: int = 0
    no_trunc: bool = False
    chown_restricted: bool = False
    case_insensitive: bool = False
    case_preserving: bool = False


@dataclass(frozen=True, slots=True)
class CommitArgs:
    """COMMIT3args."""

    file: bytes
    offset: int
    count: int


@dataclass(frozen=True, slots=True)
class CommitRes:
    """COMMIT3res: file_wcc in both arms; verf on success."""

    status: Nfsstat3 | int
    file_wcc: WccData = EMPTY_WCC
    verf: bytes = b""


# --- the per-procedure codec tables ----------------------------------------------

_Pk = Callable[[Packer, Any], None]
_Uk = Callable[[Unpacker], Any]
_Field = tuple[str, _Pk, _Uk]

_FH: tuple[_Pk, _Uk] = (_p_fh, _u_fh)
_UINT: tuple[_Pk, _Uk] = (_p_uint, _u_uint)
_UINT64: tuple[_Pk, _Uk] = (_p_uint64, _u_uint64)
_BOOL: tuple[_Pk, _Uk] = (_p_bool, _u_bool)
_VERF: tuple[_Pk, _Uk] = (_p_verf, _u_verf)
_OPAQUE: tuple[_Pk, _Uk] = (_p_opaque, _u_opaque)
_TIME_C: tuple[_Pk, _Uk] = (_p_time, _u_time)
_ATTR: tuple[_Pk, _Uk] = (_p_post_op_attr, _u_post_op_attr)
_FATTR_C: tuple[_Pk, _Uk] = (_p_fattr, _u_fattr)
_WCC: tuple[_Pk, _Uk] = (_p_wcc, _u_wcc)
_POST_FH: tuple[_Pk, _Uk] = (_p_post_op_fh, _u_post_op_fh)
_SATTR: tuple[_Pk, _Uk] = (_p_sattr, _u_sattr)
_GUARD: tuple[_Pk, _Uk] = (_p_guard, _u_guard)
_DIROP: tuple[_Pk, _Uk] = (_p_diropargs, _u_diropargs)
_STABLE: tuple[_Pk, _Uk] = (_p_stable, _u_stable)
_ENTRIES: tuple[_Pk, _Uk] = (_p_entries, _u_entries)
_ENTRIES_PLUS: tuple[_Pk, _Uk] = (_p_entries_plus, _u_entries_plus)


def _f(*pairs: tuple[str, tuple[_Pk, _Uk]]) -> tuple[_Field, ...]:
    return tuple((name, pk, uk) for name, (pk, uk) in pairs)


def _p_create_args(p: Packer, a: CreateArgs) -> None:
    _p_diropargs(p, a.where)
    mode = CreateMode(a.mode)
    p.pack_enum(mode)
    if mode == CreateMode.EXCLUSIVE:
        if a.verf is None:
            raise ValueError("EXCLUSIVE create needs an 8-byte verf")
        _p_verf(p, a.verf)
    else:
        _p_sattr(p, a.obj_attributes if a.obj_attributes is not None else Sattr3())


def _u_create_args(u: Unpacker) -> CreateArgs:
    where = _u_diropargs(u)
    mode = u.unpack_enum_of(CreateMode)
    if mode == CreateMode.EXCLUSIVE:
        return CreateArgs(where, mode, None, _u_verf(u))
    return CreateArgs(where, mode, _u_sattr(u), None)


_DEVICE_TYPES = (Ftype3.CHR, Ftype3.BLK)
_PIPE_TYPES = (Ftype3.SOCK, Ftype3.FIFO)


def _p_mknod_args(p: Packer, a: MknodArgs) -> None:
    _p_diropargs(p, a.where)
    _p_ftype(p, a.type)
    if a.type in _DEVICE_TYPES or a.type in _PIPE_TYPES:
        _p_sattr(p, a.attributes if a.attributes is not None else Sattr3())
    if a.type in _DEVICE_TYPES:
        _p_spec(p, a.spec if a.spec is not None else (0, 0))


def _u_mknod_args(u: Unpacker) -> MknodArgs:
    where = _u_diropargs(u)
    ftype = _u_ftype(u)
    if ftype in _DEVICE_TYPES:
        return MknodArgs(where, ftype, _u_sattr(u), _u_spec(u))
    if ftype in _PIPE_TYPES:
        return MknodArgs(where, ftype, _u_sattr(u), None)
    return MknodArgs(where, ftype, None, None)


@dataclass(frozen=True, slots=True)
class _ArgSpec:
    proc: Proc
    cls: type
    fields: tuple[_Field, ...] = ()
    pack: Callable[[Packer, Any], None] | None = None  # custom codec for unions
    unpack: Callable[[Unpacker], Any] | None = None


@dataclass(frozen=True, slots=True)
class _ResSpec:
    proc: Proc
    cls: type
    ok: tuple[_Field, ...] = ()
    fail: tuple[_Field, ...] = ()
    has_status: bool = True


_DIROP_RES_OK = _f(("object", _POST_FH), ("obj_attributes", _ATTR), ("dir_wcc", _WCC))
_DIROP_RES_FAIL = _f(("dir_wcc", _WCC))
_ATTR_ONLY = _f(("obj_attributes", _ATTR))

_ARG_SPECS: tuple[_ArgSpec, ...] = (
    _ArgSpec(Proc.NULL, NullArgs),
    _ArgSpec(Proc.GETATTR, GetattrArgs, _f(("object", _FH))),
    _ArgSpec(Proc.SETATTR, SetattrArgs,
             _f(("object", _FH), ("new_attributes", _SATTR), ("guard", _GUARD))),
    _ArgSpec(Proc.LOOKUP, LookupArgs, _f(("what", _DIROP))),
    _ArgSpec(Proc.ACCESS, AccessArgs, _f(("object", _FH), ("access", _UINT))),
    _ArgSpec(Proc.READLINK, ReadlinkArgs, _f(("symlink", _FH))),
    _ArgSpec(Proc.READ, ReadArgs, _f(("file", _FH), ("offset", _UINT64), ("count", _UINT))),
    _ArgSpec(Proc.WRITE, WriteArgs,
             _f(("file", _FH), ("offset", _UINT64), ("count", _UINT), ("stable", _STABLE),
                ("data", _OPAQUE))),
    _ArgSpec(Proc.CREATE, CreateArgs, pack=_p_create_args, unpack=_u_create_args),
    _ArgSpec(Proc.MKDIR, MkdirArgs, _f(("where", _DIROP), ("attributes", _SATTR))),
    _ArgSpec(Proc.SYMLINK, SymlinkArgs,
             _f(("where", _DIROP), ("symlink_attributes", _SATTR), ("symlink_data", _OPAQUE))),
    _ArgSpec(Proc.MKNOD, MknodArgs, pack=_p_mknod_args, unpack=_u_mknod_args),
    _ArgSpec(Proc.REMOVE, RemoveArgs, _f(("object", _DIROP))),
    _ArgSpec(Proc.RMDIR, RmdirArgs, _f(("object", _DIROP))),
    _ArgSpec(Proc.RENAME, RenameArgs, _f(("from_", _DIROP), ("to", _DIROP))),
    _ArgSpec(Proc.LINK, LinkArgs, _f(("file", _FH), ("link", _DIROP))),
    _ArgSpec(Proc.READDIR, ReaddirArgs,
             _f(("dir", _FH), ("cookie", _UINT64), ("cookieverf", _VERF), ("count", _UINT))),
    _ArgSpec(Proc.READDIRPLUS, ReaddirplusArgs,
             _f(("dir", _FH), ("cookie", _UINT64), ("cookieverf", _VERF), ("dircount", _UINT),
                ("maxcount", _UINT))),
    _ArgSpec(Proc.FSSTAT, FsstatArgs, _f(("fsroot", _FH))),
    _ArgSpec(Proc.FSINFO, FsinfoArgs, _f(("fsroot", _FH))),
    _ArgSpec(Proc.PATHCONF, PathconfArgs, _f(("object", _FH))),
    _ArgSpec(Proc.COMMIT, CommitArgs, _f(("file", _FH), ("offset", _UINT64), ("count", _UINT))),
)  # fmt: skip

_RES_SPECS: tuple[_ResSpec, ...] = (
    _ResSpec(Proc.NULL, NullRes, has_status=False),
    _ResSpec(Proc.GETATTR, GetattrRes, _f(("attributes", _FATTR_C))),
    _ResSpec(Proc.SETATTR, SetattrRes, _f(("obj_wcc", _WCC)), _f(("obj_wcc", _WCC))),
    _ResSpec(Proc.LOOKUP, LookupRes,
             _f(("object", _FH), ("obj_attributes", _ATTR), ("dir_attributes", _ATTR)),
             _f(("dir_attributes", _ATTR))),
    _ResSpec(Proc.ACCESS, AccessRes, _f(("obj_attributes", _ATTR), ("access", _UINT)),
             _ATTR_ONLY),
    _ResSpec(Proc.READLINK, ReadlinkRes,
             _f(("symlink_attributes", _ATTR), ("data", _OPAQUE)),
             _f(("symlink_attributes", _ATTR))),
    _ResSpec(Proc.READ, ReadRes,
             _f(("file_attributes", _ATTR), ("count", _UINT), ("eof", _BOOL), ("data", _OPAQUE)),
             _f(("file_attributes", _ATTR))),
    _ResSpec(Proc.WRITE, WriteRes,
             _f(("file_wcc", _WCC), ("count", _UINT), ("committed", _STABLE), ("verf", _VERF)),
             _f(("file_wcc", _WCC))),
    _ResSpec(Proc.CREATE, CreateRes, _DIROP_RES_OK, _DIROP_RES_FAIL),
    _ResSpec(Proc.MKDIR, MkdirRes, _DIROP_RES_OK, _DIROP_RES_FAIL),
    _ResSpec(Proc.SYMLINK, SymlinkRes, _DIROP_RES_OK, _DIROP_RES_FAIL),
    _ResSpec(Proc.MKNOD, MknodRes, _DIROP_RES_OK, _DIROP_RES_FAIL),
    _ResSpec(Proc.REMOVE, RemoveRes, _f(("dir_wcc", _WCC)), _f(("dir_wcc", _WCC))),
    _ResSpec(Proc.RMDIR, RmdirRes, _f(("dir_wcc", _WCC)), _f(("dir_wcc", _WCC))),
    _ResSpec(Proc.RENAME, RenameRes,
             _f(("fromdir_wcc", _WCC), ("todir_wcc", _WCC)),
             _f(("fromdir_wcc", _WCC), ("todir_wcc", _WCC))),
    _ResSpec(Proc.LINK, LinkRes,
             _f(("file_attributes", _ATTR), ("linkdir_wcc", _WCC)),
             _f(("file_attributes", _ATTR), ("linkdir_wcc", _WCC))),
    _ResSpec(Proc.READDIR, ReaddirRes,
             _f(("dir_attributes", _ATTR), ("cookieverf", _VERF), ("entries", _ENTRIES),
                ("eof", _BOOL)),
             _f(("dir_attributes", _ATTR))),
    _ResSpec(Proc.READDIRPLUS, ReaddirplusRes,
             _f(("dir_attributes", _ATTR), ("cookieverf", _VERF), ("entries", _ENTRIES_PLUS),
                ("eof", _BOOL)),
             _f(("dir_attributes", _ATTR))),
    _ResSpec(Proc.FSSTAT, FsstatRes,
             _f(("obj_attributes", _ATTR), ("tbytes", _UINT64), ("fbytes", _UINT64),
                ("abytes", _UINT64), ("tfiles", _UINT64), ("ffiles", _UINT64),
                ("afiles", _UINT64), ("invarsec", _UINT)),
             _ATTR_ONLY),
    _ResSpec(Proc.FSINFO, FsinfoRes,
             _f(("obj_attributes", _ATTR), ("rtmax", _UINT), ("rtpref", _UINT),
                ("rtmult", _UINT), ("wtmax", _UINT), ("wtpref", _UINT), ("wtmult", _UINT),
                ("dtpref", _UINT), ("maxfilesize", _UINT64), ("time_delta", _TIME_C),
                ("properties", _UINT)),
             _ATTR_ONLY),
    _ResSpec(Proc.PATHCONF, PathconfRes,
             _f(("obj_attributes", _ATTR), ("linkmax", _UINT), ("name_max", _UINT),
                ("no_trunc", _BOOL), ("chown_restricted", _BOOL),
                ("case_insensitive", _BOOL), ("case_preserving", _BOOL)),
             _ATTR_ONLY),
    _ResSpec(Proc.COMMIT, CommitRes, _f(("file_wcc", _WCC), ("verf", _VERF)),
             _f(("file_wcc", _WCC))),
)  # fmt: skip

_ARGS_BY_PROC: dict[int, _ArgSpec] = {s.proc: s for s in _ARG_SPECS}
_ARGS_BY_TYPE: dict[type, _ArgSpec] = {s.cls: s for s in _ARG_SPECS}
_RES_BY_PROC: dict[int, _ResSpec] = {s.proc: s for s in _RES_SPECS}
_RES_BY_TYPE: dict[type, _ResSpec] = {s.cls: s for s in _RES_SPECS}

ARGS: dict[Proc, type] = {s.proc: s.cls for s in _ARG_SPECS}
"""Procedure -> its Args dataclass."""
RESULTS: dict[Proc, type] = {s.proc: s.cls for s in _RES_SPECS}
"""Procedure -> its Res dataclass."""

CHANGES_NOTHING: frozenset[Proc] = frozenset({
    Proc.NULL, Proc.GETATTR, Proc.LOOKUP, Proc.ACCESS, Proc.READLINK, Proc.READ,
    Proc.READDIR, Proc.READDIRPLUS, Proc.FSSTAT, Proc.FSINFO, Proc.PATHCONF, Proc.COMMIT,
})  # fmt: skip
"""Procedures that change nothing a client sees (COMMIT only makes WRITEs durable)."""

IDEMPOTENT: frozenset[Proc] = frozenset({
    Proc.NULL, Proc.GETATTR, Proc.SETATTR, Proc.LOOKUP, Proc.ACCESS, Proc.READLINK, Proc.READ,
    Proc.WRITE, Proc.READDIR, Proc.READDIRPLUS, Proc.FSSTAT, Proc.FSINFO, Proc.PATHCONF,
    Proc.COMMIT,
})  # fmt: skip
"""Procedures that are safe to retransmit after a lost reply.

SETATTR counts as idempotent: setting the same attributes twice gives the
same result.  With a guard, a retransmission after the first call succeeded
can fail with NFS3ERR_NOT_SYNC (the ctime moved); callers that use guards
should re-check attributes on NOT_SYNC rather than report it.  CREATE, MKDIR,
SYMLINK, MKNOD, REMOVE, RMDIR, RENAME and LINK are not idempotent (a retry
can see EXIST / NOENT for its own earlier success).
"""


def _arg_spec_of(proc: int) -> _ArgSpec:
    spec = _ARGS_BY_PROC.get(proc)
    if spec is None:
        raise ValueError(f"unknown NFSv3 procedure {proc}")
    return spec


def _res_spec_of(proc: int) -> _ResSpec:
    spec = _RES_BY_PROC.get(proc)
    if spec is None:
        raise ValueError(f"unknown NFSv3 procedure {proc}")
    return spec


def proc_of(args_or_res: object) -> Proc:
    """The procedure an Args or Res object belongs to."""
    t = type(args_or_res)
    spec: _ArgSpec | _ResSpec | None = _ARGS_BY_TYPE.get(t) or _RES_BY_TYPE.get(t)
    if spec is None:
        raise TypeError(f"{t.__name__} is not an NFSv3 Args or Res type")
    return spec.proc


def encode_args(args: object) -> bytes:
    """XDR-encode the arguments of any procedure (dispatch on the Args type)."""
    spec = _ARGS_BY_TYPE.get(type(args))
    if spec is None:
        raise TypeError(f"{type(args).__name__} is not an NFSv3 Args type")
    p = Packer()
    if spec.pack is not None:
        spec.pack(p, args)
    else:
        for name, pk, _ in spec.fields:
            pk(p, getattr(args, name))
    return p.get_buffer()


def encode_args_parts(args: object) -> list[bytes]:
    """`encode_args` as parts to send in order (their concatenation): a WRITE's data
    is one of them, not copied (rpc.frame_call copies it once, into the record)."""
    if type(args) is not WriteArgs:
        return [encode_args(args)]
    p = Packer()
    _p_fh(p, args.file)
    p.pack_uhyper(args.offset)
    p.pack_uint(args.count)
    _p_stable(p, args.stable)
    p.pack_uint(len(args.data))
    return [p.get_buffer(), args.data, _PAD[len(args.data) & 3]]


def decode_args(proc: int, data: bytes | bytearray | memoryview) -> Any:
    """Decode the arguments of ``proc``; XdrError on garbage, truncation or trailing bytes.

    ValueError if ``proc`` is not an NFSv3 procedure (answer PROC_UNAVAIL).
    """
    spec = _arg_spec_of(proc)
    u = Unpacker(data)
    if spec.unpack is not None:
        args = spec.unpack(u)
    else:
        args = spec.cls(*[uk(u) for _, _, uk in spec.fields])
    u.done()
    return args


def encode_res(res: object) -> bytes:
    """XDR-encode the results of any procedure (dispatch on the Res type).

    Only the arm selected by ``res.status`` is encoded.
    """
    spec = _RES_BY_TYPE.get(type(res))
    if spec is None:
        raise TypeError(f"{type(res).__name__} is not an NFSv3 Res type")
    p = Packer()
    if spec.has_status:
        status: int = res.status  # type: ignore[attr-defined]
        p.pack_enum(status)
        for name, pk, _ in spec.ok if status == NFS3_OK else spec.fail:
            pk(p, getattr(res, name))
    return p.get_buffer()


def decode_res(proc: int, data: bytes | bytearray | memoryview) -> Any:
    """Decode the results of ``proc``; XdrError on garbage, truncation or trailing bytes."""
    spec = _res_spec_of(proc)
    u = Unpacker(data)
    if not spec.has_status:
        res = spec.cls()
    else:
        status = _status(u.unpack_enum())
        fields = spec.ok if status == NFS3_OK else spec.fail
        res = spec.cls(status, **{name: uk(u) for name, _, uk in fields})
    u.done()
    return res


def raise_for_status(res: Any) -> None:
    """Raise NfsError (carrying ``res``) unless ``res.status`` is NFS3_OK."""
    status = getattr(res, "status", NFS3_OK)
    if status != NFS3_OK:
        raise NfsError(status, proc_of(res).name, res)
