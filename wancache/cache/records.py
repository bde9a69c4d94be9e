"""The write-back layer's journal records: one `Op` per change, its bytes after it.

A record is MAGIC | u32 header length | JSON header | raw data (a write's bytes).
The header names nodes by reference: 'f<hex handle>' for a node that exists on the
server, 'l<local id>' for one created here whose handle is not known yet (a BIND
record gives it later).  A BASE record says which content version our own flushed
changes left a file at, so a replay after a crash does not take them for another
client's.  Replay reads headers only; a write's bytes stay in the
journal and are read back from there when needed.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

from wancache.creds import Cred

MAGIC = b"WBO1"
PREFIX = 8                    # MAGIC + u32 header length
CREATES = ("create", "mkdir", "symlink", "mknod")
KINDS = (*CREATES, "link", "remove", "rmdir", "rename", "write", "setattr", "bind", "base")
_BYTES_FIELDS = ("name", "name2", "target", "fh")


@dataclass(slots=True)
class Op:
    """One journaled change (see the module docstring for node references)."""

    kind: str
    uid: int = 0
    gid: int = 0
    groups: tuple[int, ...] = ()
    time_ns: int = 0
    node: str = ""
    parent: str = ""
    name: bytes = b""
    parent2: str = ""
    name2: bytes = b""
    offset: int = 0
    ftype: int = 0
    mode: int = 0
    target: bytes = b""
    rdev: tuple[int, int] = (0, 0)
    sattr: dict[str, int] = field(default_factory=dict)
    base: str = ""
    fh: bytes = b""
    # not in the header: where the record is and where its data starts
    seq: int = 0
    data_skip: int = 0
    data_len: int = 0

    @property
    def cred(self) -> Cred:
        return Cred(self.uid, self.gid, self.groups)

    def refs(self) -> tuple[str, ...]:
        """Every node reference the op names."""
        target = self.target.decode(errors="replace") if self.kind == "rename" else ""
        return tuple(r for r in (self.node, self.parent, self.parent2, target) if r)

    def local_ids(self) -> list[int]:
        return [int(r[1:]) for r in self.refs() if r.startswith("l") and r[1:].isdigit()]


_HEADER_FIELDS = tuple(f for f in Op.__dataclass_fields__
                       if f not in ("seq", "data_skip", "data_len"))
_DEFAULTS = Op("")


def encode_op(op: Op, data: bytes | memoryview = b"") -> bytes:
    """The record of `op`, followed by `data`."""
    head: dict[str, Any] = {}
    for f in _HEADER_FIELDS:
        value = getattr(op, f)
        if f != "kind" and value == getattr(_DEFAULTS, f):
            continue
        head[f] = value.hex() if f in _BYTES_FIELDS else value
    raw = json.dumps(head, separators=(",", ":")).encode()
    return b"".join((MAGIC, struct.pack("<I", len(raw)), raw, data))


def header_length(prefix: bytes) -> int:
    """The JSON header's length, from a record's first PREFIX bytes."""
    if len(prefix) < PREFIX or prefix[:4] != MAGIC:
        raise ValueError("not a write-back record")
    return int(struct.unpack_from("<I", prefix, 4)[0])


def decode_op(seq: int, head: bytes, record_length: int) -> Op:
    """The Op of record `seq` from its first PREFIX + header_length bytes."""
    n = header_length(head)
    try:
        fields = json.loads(head[PREFIX:PREFIX + n])
    except ValueError as exc:
        raise ValueError(f"bad header: {exc}") from None
    if not isinstance(fields, dict) or fields.get("kind") not in KINDS:
        raise ValueError("unknown kind of change")
    for f in _BYTES_FIELDS:
        if f in fields:
            fields[f] = bytes.fromhex(fields[f])
    for f in ("groups", "rdev"):
        if f in fields:
            fields[f] = tuple(fields[f])
    try:
        op = Op(**fields)
    except TypeError as exc:
        raise ValueError(f"bad header: {exc}") from None
    op.seq, op.data_skip, op.data_len = seq, PREFIX + n, record_length - PREFIX - n
    return op
