"""Exception hierarchy of the NFS backend and the one NFS3ERR_* -> errno table.

Status numbers are those of RFC 1813 section 2.6 (nfsstat3) and section 5.1.3 of
its appendix I (mountstat3).  This module imports nothing from the package but
the root exception, so every other module can import it without cycles.
"""

from __future__ import annotations

import errno as _errno
from enum import IntEnum

from wancache.errors import WancacheError

# --- nfsstat3 (RFC 1813 §2.6) -------------------------------------------------


class Nfsstat3(IntEnum):
    """nfsstat3 (RFC 1813 §2.6).  Decoders keep unknown values as plain ints."""

    NFS3_OK = 0
    NFS3ERR_PERM = 1
    NFS3ERR_NOENT = 2
    NFS3ERR_IO = 5
    NFS3ERR_NXIO = 6
    NFS3ERR_ACCES = 13
    NFS3ERR_EXIST = 17
    NFS3ERR_XDEV = 18
    NFS3ERR_NODEV = 19
    NFS3ERR_NOTDIR = 20
    NFS3ERR_ISDIR = 21
    NFS3ERR_INVAL = 22
    NFS3ERR_FBIG = 27
    NFS3ERR_NOSPC = 28
    NFS3ERR_ROFS = 30
    NFS3ERR_MLINK = 31
    NFS3ERR_NAMETOOLONG = 63
    NFS3ERR_NOTEMPTY = 66
    NFS3ERR_DQUOT = 69
    NFS3ERR_STALE = 70
    NFS3ERR_REMOTE = 71
    NFS3ERR_BADHANDLE = 10001
    NFS3ERR_NOT_SYNC = 10002
    NFS3ERR_BAD_COOKIE = 10003
    NFS3ERR_NOTSUPP = 10004
    NFS3ERR_TOOSMALL = 10005
    NFS3ERR_SERVERFAULT = 10006
    NFS3ERR_BADTYPE = 10007
    NFS3ERR_JUKEBOX = 10008


NFS3ERR_NAMES: dict[int, str] = {int(s): s.name for s in Nfsstat3}
"""Status number -> RFC name (includes 0 -> "NFS3_OK")."""

NFS3ERR_ERRNO: dict[int, int] = {
    Nfsstat3.NFS3ERR_PERM: _errno.EPERM,
    Nfsstat3.NFS3ERR_NOENT: _errno.ENOENT,
    Nfsstat3.NFS3ERR_IO: _errno.EIO,
    Nfsstat3.NFS3ERR_NXIO: _errno.ENXIO,
    Nfsstat3.NFS3ERR_ACCES: _errno.EACCES,
    Nfsstat3.NFS3ERR_EXIST: _errno.EEXIST,
    Nfsstat3.NFS3ERR_XDEV: _errno.EXDEV,
    Nfsstat3.NFS3ERR_NODEV: _errno.ENODEV,
    Nfsstat3.NFS3ERR_NOTDIR: _errno.ENOTDIR,
    Nfsstat3.NFS3ERR_ISDIR: _errno.EISDIR,
    Nfsstat3.NFS3ERR_INVAL: _errno.EINVAL,
    Nfsstat3.NFS3ERR_FBIG: _errno.EFBIG,
    Nfsstat3.NFS3ERR_NOSPC: _errno.ENOSPC,
    Nfsstat3.NFS3ERR_ROFS: _errno.EROFS,
    Nfsstat3.NFS3ERR_MLINK: _errno.EMLINK,
    Nfsstat3.NFS3ERR_NAMETOOLONG: _errno.ENAMETOOLONG,
    Nfsstat3.NFS3ERR_NOTEMPTY: _errno.ENOTEMPTY,
    Nfsstat3.NFS3ERR_DQUOT: _errno.EDQUOT,
    Nfsstat3.NFS3ERR_STALE: _errno.ESTALE,
    Nfsstat3.NFS3ERR_REMOTE: _errno.EREMOTE,
    Nfsstat3.NFS3ERR_BADHANDLE: _errno.ESTALE,
    Nfsstat3.NFS3ERR_NOT_SYNC: _errno.EIO,
    # Linux maps BAD_COOKIE to its kernel-internal EBADCOOKIE (512), which user
    # space never sees; EINVAL is the closest public errno.
    Nfsstat3.NFS3ERR_BAD_COOKIE: _errno.EINVAL,
    Nfsstat3.NFS3ERR_NOTSUPP: _errno.EOPNOTSUPP,
    Nfsstat3.NFS3ERR_TOOSMALL: _errno.EINVAL,
    Nfsstat3.NFS3ERR_SERVERFAULT: _errno.EIO,
    Nfsstat3.NFS3ERR_BADTYPE: _errno.EINVAL,
    Nfsstat3.NFS3ERR_JUKEBOX: _errno.EAGAIN,
}
"""THE table: every NFS3ERR_* of RFC 1813 -> errno (NFS3_OK is not in it)."""


def nfs_errno(status: int) -> int:
    """The errno for an NFS3ERR_* status; EIO for statuses RFC 1813 does not define."""
    return NFS3ERR_ERRNO.get(status, _errno.EIO)


def nfs_status_name(status: int) -> str:
    """RFC name of an nfsstat3 value, or "NFS3ERR_UNKNOWN(<n>)"."""
    return NFS3ERR_NAMES.get(status, f"NFS3ERR_UNKNOWN({status})")


# --- mountstat3 (RFC 1813 appendix I §5.1.3) ------------------------------------


class Mountstat3(IntEnum):
    """mountstat3 (RFC 1813 appendix I §5.1.5).  Decoders keep unknown values."""

    MNT3_OK = 0
    MNT3ERR_PERM = 1
    MNT3ERR_NOENT = 2
    MNT3ERR_IO = 5
    MNT3ERR_ACCES = 13
    MNT3ERR_NOTDIR = 20
    MNT3ERR_INVAL = 22
    MNT3ERR_NAMETOOLONG = 63
    MNT3ERR_NOTSUPP = 10004
    MNT3ERR_SERVERFAULT = 10006


MNT3ERR_NAMES: dict[int, str] = {int(s): s.name for s in Mountstat3}

MNT3ERR_ERRNO: dict[int, int] = {
    Mountstat3.MNT3ERR_PERM: _errno.EPERM,
    Mountstat3.MNT3ERR_NOENT: _errno.ENOENT,
    Mountstat3.MNT3ERR_IO: _errno.EIO,
    Mountstat3.MNT3ERR_ACCES: _errno.EACCES,
    Mountstat3.MNT3ERR_NOTDIR: _errno.ENOTDIR,
    Mountstat3.MNT3ERR_INVAL: _errno.EINVAL,
    Mountstat3.MNT3ERR_NAMETOOLONG: _errno.ENAMETOOLONG,
    Mountstat3.MNT3ERR_NOTSUPP: _errno.EOPNOTSUPP,
    Mountstat3.MNT3ERR_SERVERFAULT: _errno.EIO,
}


# --- exceptions -------------------------------------------------------------------


class ProtocolError(WancacheError):
    """Garbage, truncated or impossible bytes from the wire.

    The connection that produced them cannot be trusted any more (stream framing
    may be lost): drop it.
    """


class XdrError(ProtocolError):
    """Bytes that do not decode as the expected XDR type (RFC 4506)."""


class RpcError(WancacheError):
    """The server answered the ONC-RPC call but refused it."""


class RpcDeniedError(RpcError):
    """MSG_DENIED reply (RFC 5531 §9): RPC version mismatch or authentication error."""

    def __init__(
        self,
        reject_stat: int,
        auth_stat: int | None = None,
        mismatch: tuple[int, int] | None = None,
        xid: int | None = None,
    ) -> None:
        self.reject_stat = reject_stat
        self.auth_stat = auth_stat
        self.mismatch = mismatch
        self.xid = xid
        if auth_stat is not None:
            detail = f"auth_stat={auth_stat}"
        elif mismatch is not None:
            detail = f"supported rpc versions {mismatch[0]}..{mismatch[1]}"
        else:
            detail = ""
        super().__init__(f"RPC call denied: reject_stat={reject_stat} {detail}".rstrip())

    @property
    def errno(self) -> int:
        """The server refused our credentials."""
        return _errno.EACCES

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.reject_stat, self.auth_stat, self.mismatch, self.xid))


class RpcAcceptError(RpcError):
    """Accepted reply whose accept_stat is not SUCCESS (RFC 5531 §9).

    ``mismatch`` is the supported (low, high) version range for PROG_MISMATCH.
    """

    def __init__(
        self,
        accept_stat: int,
        mismatch: tuple[int, int] | None = None,
        xid: int | None = None,
    ) -> None:
        self.accept_stat = accept_stat
        self.mismatch = mismatch
        self.xid = xid
        detail = f" (supported versions {mismatch[0]}..{mismatch[1]})" if mismatch else ""
        super().__init__(f"RPC call not executed: accept_stat={accept_stat}{detail}")

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.accept_stat, self.mismatch, self.xid))


class NfsError(WancacheError):
    """An NFSv3 procedure returned a status other than NFS3_OK.

    ``res`` is the decoded failure result; its wcc_data / post-op attributes are
    still worth feeding to caches.
    """

    def __init__(self, status: int, proc: str = "", res: object | None = None) -> None:
        self.status = status
        self.proc = proc
        self.res = res
        where = f" in {proc}" if proc else ""
        super().__init__(f"{nfs_status_name(status)}{where}")

    @property
    def errno(self) -> int:
        """errno for this status (NFS3ERR_ERRNO, EIO if unknown)."""
        return nfs_errno(self.status)

    @property
    def name(self) -> str:
        """RFC name of the status, e.g. "NFS3ERR_NOENT"."""
        return nfs_status_name(self.status)

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.status, self.proc, self.res))


_MOUNT_HINTS: dict[int, str] = {
    Mountstat3.MNT3ERR_NOENT: "no such export or directory on the server (MNT3ERR_NOENT)",
    Mountstat3.MNT3ERR_ACCES:
        "not exported to this client, or no such directory (MNT3ERR_ACCES)",
    Mountstat3.MNT3ERR_PERM:
        "not permitted: the server may require a reserved port, try -o resvport "
        "(MNT3ERR_PERM)",
    Mountstat3.MNT3ERR_NOTDIR: "not a directory (MNT3ERR_NOTDIR)",
}


class MountError(WancacheError):
    """The MOUNT protocol returned a status other than MNT3_OK."""

    def __init__(self, status: int, path: bytes = b"", message: str | None = None) -> None:
        self.status = status
        self.path = path
        self.message = message
        name = MNT3ERR_NAMES.get(status, f"MNT3ERR_UNKNOWN({status})")
        where = path.decode(errors="replace")
        super().__init__(message or f"cannot mount {where}: {_MOUNT_HINTS.get(status, name)}")

    @property
    def errno(self) -> int:
        """errno for this status (EIO if unknown)."""
        return MNT3ERR_ERRNO.get(self.status, _errno.EIO)

    @property
    def name(self) -> str:
        """RFC name of the status, e.g. "MNT3ERR_ACCES"."""
        return MNT3ERR_NAMES.get(self.status, f"MNT3ERR_UNKNOWN({self.status})")

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.status, self.path, self.message))


class TransportError(WancacheError):
    """The RPC transport could not get a call answered (raised by the transport layer).

    ``errno`` is what a soft mount reports to applications (Linux: EIO).
    """


class RpcTimeoutError(TransportError):
    """No reply within the soft-mount timeout."""


class ServerUnreachableError(TransportError):
    """The server (or the RPC program on it) could not be reached."""


class TransportClosedError(TransportError):
    """The transport was closed while the call was pending or before it was sent."""


class UnknownOutcomeError(TransportError):
    """A non-idempotent call was sent but its reply was lost: it may or may not have run."""
