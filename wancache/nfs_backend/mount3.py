"""MOUNT protocol version 3 (RFC 1813 appendix I), program 100005, sans I/O.

Procedures: NULL (§5.2.0), MNT (§5.2.1), DUMP (§5.2.2), UMNT (§5.2.3),
UMNTALL (§5.2.4, no arguments or results) and EXPORT (§5.2.5).
Paths, host names and group names are ``bytes``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

from .errors import MountError, Mountstat3
from .xdr import Packer, Unpacker

PROGRAM = 100005
VERSION = 3

MNTPATHLEN = 1024
MNTNAMLEN = 255
FHSIZE3 = 64


class Proc(IntEnum):
    """MOUNT v3 procedure numbers."""

    NULL = 0
    MNT = 1
    DUMP = 2
    UMNT = 3
    UMNTALL = 4
    EXPORT = 5



_STATUS_OF = {int(s): s for s in Mountstat3}


@dataclass(frozen=True, slots=True)
class MntRes:
    """mountres3: on MNT3_OK the root file handle and the auth flavors the server accepts."""

    status: Mountstat3 | int
    fhandle: bytes | None = None
    auth_flavors: list[int] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ExportNode:
    """exportnode: an exported directory and the groups (hosts/netgroups) allowed to mount it."""

    dir: bytes
    groups: list[bytes] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class MountBody:
    """mountbody of a DUMP reply: a client host and the directory it mounted."""

    hostname: bytes
    directory: bytes


def _pack_path(path: bytes) -> bytes:
    p = Packer()
    p.pack_string(path, MNTPATHLEN)
    return p.get_buffer()


def _unpack_path(data: bytes | bytearray | memoryview) -> bytes:
    u = Unpacker(data)
    path = u.unpack_string(MNTPATHLEN)
    u.done()
    return path


def encode_mnt_args(path: bytes) -> bytes:
    """MNT arguments: dirpath (at most 1024 bytes)."""
    return _pack_path(path)


def decode_mnt_args(data: bytes | bytearray | memoryview) -> bytes:
    """The dirpath of MNT arguments."""
    return _unpack_path(data)


def encode_umnt_args(path: bytes) -> bytes:
    """UMNT arguments: dirpath."""
    return _pack_path(path)


def decode_umnt_args(data: bytes | bytearray | memoryview) -> bytes:
    """The dirpath of UMNT arguments."""
    return _unpack_path(data)


def encode_mnt_res(res: MntRes) -> bytes:
    """XDR-encode mountres3 (only the arm selected by res.status)."""
    p = Packer()
    p.pack_enum(res.status)
    if res.status == Mountstat3.MNT3_OK:
        if res.fhandle is None:
            raise ValueError("MNT3_OK needs a file handle")
        p.pack_opaque(res.fhandle, FHSIZE3)
        p.pack_array(res.auth_flavors, p.pack_int)
    return p.get_buffer()


def decode_mnt_res(data: bytes | bytearray | memoryview) -> MntRes:
    """Decode mountres3; XdrError on garbage."""
    u = Unpacker(data)
    raw = u.unpack_enum()
    status = _STATUS_OF.get(raw, raw)
    if status != Mountstat3.MNT3_OK:
        u.done()
        return MntRes(status)
    fhandle = u.unpack_opaque(FHSIZE3)
    flavors = u.unpack_array(u.unpack_int)
    u.done()
    return MntRes(status, fhandle, flavors)


def mnt_fhandle(res: MntRes, path: bytes = b"") -> bytes:
    """The root file handle of a MNT reply; MountError if the mount was refused."""
    if res.status != Mountstat3.MNT3_OK or res.fhandle is None:
        raise MountError(res.status, path)
    return res.fhandle


def encode_export_res(nodes: list[ExportNode]) -> bytes:
    """XDR-encode exports (a linked list of exportnode, each with a linked list of groups)."""
    p = Packer()
    for node in nodes:
        p.pack_bool(True)
        p.pack_string(node.dir, MNTPATHLEN)
        for group in node.groups:
            p.pack_bool(True)
            p.pack_string(group, MNTNAMLEN)
        p.pack_bool(False)
    p.pack_bool(False)
    return p.get_buffer()


def decode_export_res(data: bytes | bytearray | memoryview) -> list[ExportNode]:
    """Decode exports; XdrError on garbage."""
    u = Unpacker(data)
    nodes: list[ExportNode] = []
    while u.unpack_bool():  # each node and group consumes >= 8 bytes: bounded
        path = u.unpack_string(MNTPATHLEN)
        groups: list[bytes] = []
        while u.unpack_bool():
            groups.append(u.unpack_string(MNTNAMLEN))
        nodes.append(ExportNode(path, groups))
    u.done()
    return nodes


def encode_dump_res(mounts: list[MountBody]) -> bytes:
    """XDR-encode mountlist (a linked list of mountbody)."""
    p = Packer()
    for m in mounts:
        p.pack_bool(True)
        p.pack_string(m.hostname, MNTNAMLEN)
        p.pack_string(m.directory, MNTPATHLEN)
    p.pack_bool(False)
    return p.get_buffer()


def decode_dump_res(data: bytes | bytearray | memoryview) -> list[MountBody]:
    """Decode mountlist; XdrError on garbage."""
    u = Unpacker(data)
    out: list[MountBody] = []
    while u.unpack_bool():
        hostname = u.unpack_string(MNTNAMLEN)
        out.append(MountBody(hostname, u.unpack_string(MNTPATHLEN)))
    u.done()
    return out
