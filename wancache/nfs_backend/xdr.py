"""XDR primitives (RFC 4506): a Packer that builds and an Unpacker that parses.

Covered: int/unsigned int (§4.1-4.2), enum (§4.3), bool (§4.4), hyper/unsigned
hyper (§4.5), fixed-length opaque (§4.9), variable-length opaque (§4.10), string
(§4.11), variable-length array (§4.13) and optional-data (§4.19).

Encoding a value that the XDR type cannot hold raises ``ValueError`` (a bug on
our side); decoding bytes that are not valid XDR raises ``XdrError`` (garbage
from the wire).  Every length read from the wire is checked against the bytes
that remain before anything is allocated or looped over.  Padding bytes are
not checked for zero on decode (as most implementations do).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from enum import IntEnum
from typing import Any, TypeVar

from .errors import XdrError

T = TypeVar("T")
E = TypeVar("E", bound=IntEnum)

_U32 = struct.Struct(">I")
_I32 = struct.Struct(">i")
_U64 = struct.Struct(">Q")
_I64 = struct.Struct(">q")
_U32x2 = struct.Struct(">II")

_PAD = (b"", b"\0\0\0", b"\0\0", b"\0")
"""Padding to append after n bytes of opaque data: _PAD[n % 4]."""

_TRUE = _U32.pack(1)
_FALSE = _U32.pack(0)


def padded(n: int) -> int:
    """n rounded up to a multiple of 4 (the XDR unit)."""
    return (n + 3) & ~3


class Packer:
    """Append-only XDR encoder over a bytearray."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def get_buffer(self) -> bytes:
        """The encoded bytes so far."""
        return bytes(self._buf)

    def __len__(self) -> int:
        return len(self._buf)

    def pack_struct(self, st: struct.Struct, *values: object) -> None:
        """Append values with a precompiled big-endian Struct (fast path for records)."""
        try:
            self._buf += st.pack(*values)
        except struct.error as e:
            raise ValueError(f"cannot XDR-encode {values!r} as {st.format!r}: {e}") from None

    def pack_uint(self, n: int) -> None:
        """unsigned int: 0 .. 2**32-1."""
        try:
            self._buf += _U32.pack(n)
        except struct.error:
            raise ValueError(f"not an XDR unsigned int: {n!r}") from None

    def pack_int(self, n: int) -> None:
        """int: -2**31 .. 2**31-1."""
        try:
            self._buf += _I32.pack(n)
        except struct.error:
            raise ValueError(f"not an XDR int: {n!r}") from None

    def pack_uhyper(self, n: int) -> None:
        """unsigned hyper: 0 .. 2**64-1."""
        try:
            self._buf += _U64.pack(n)
        except struct.error:
            raise ValueError(f"not an XDR unsigned hyper: {n!r}") from None

    def pack_hyper(self, n: int) -> None:
        """hyper: -2**63 .. 2**63-1."""
        try:
            self._buf += _I64.pack(n)
        except struct.error:
            raise ValueError(f"not an XDR hyper: {n!r}") from None

    def pack_bool(self, b: bool) -> None:
        """bool: TRUE=1, FALSE=0."""
        self._buf += _TRUE if b else _FALSE

    def pack_enum(self, n: int) -> None:
        """enum: encoded as a signed int."""
        self.pack_int(n)

    def pack_fopaque(self, n: int, data: bytes | bytearray | memoryview) -> None:
        """Fixed-length opaque[n]: exactly n bytes plus zero padding."""
        if len(data) != n:
            raise ValueError(f"fixed opaque needs exactly {n} bytes, got {len(data)}")
        self._buf += data
        self._buf += _PAD[n & 3]

    def pack_opaque(self, data: bytes | bytearray | memoryview, max_len: int | None = None) -> None:
        """Variable-length opaque<>: length, bytes, zero padding."""
        n = len(data)
        if max_len is not None and n > max_len:
            raise ValueError(f"opaque of {n} bytes exceeds its limit of {max_len}")
        self.pack_uint(n)
        self._buf += data
        self._buf += _PAD[n & 3]

    def pack_string(self, data: bytes | bytearray | memoryview, max_len: int | None = None) -> None:
        """string<>: same wire format as opaque<> (names are bytes, any encoding)."""
        if isinstance(data, str):
            raise TypeError("XDR strings are packed from bytes, not str")
        self.pack_opaque(data, max_len)

    def pack_array(
        self, items: Iterable[T], pack_item: Callable[[T], object], max_items: int | None = None
    ) -> None:
        """Variable-length array<>: count then each item."""
        seq = items if isinstance(items, list | tuple) else list(items)
        if max_items is not None and len(seq) > max_items:
            raise ValueError(f"array of {len(seq)} items exceeds its limit of {max_items}")
        self.pack_uint(len(seq))
        for item in seq:
            pack_item(item)

    def pack_optional(self, value: T | None, pack_item: Callable[[T], object]) -> None:
        """Optional-data (*T): FALSE, or TRUE then the value."""
        if value is None:
            self._buf += _FALSE
        else:
            self._buf += _TRUE
            pack_item(value)

    def pack_raw(self, data: bytes | bytearray | memoryview) -> None:
        """Append already-encoded XDR bytes verbatim (length must be a multiple of 4)."""
        if len(data) & 3:
            raise ValueError("raw XDR data must be a multiple of 4 bytes")
        self._buf += data


class Unpacker:
    """XDR decoder over bytes or a memoryview (never copies except where it returns bytes)."""

    __slots__ = ("_buf", "_end", "_pos")

    def __init__(self, data: bytes | bytearray | memoryview, offset: int = 0) -> None:
        mv = data if isinstance(data, memoryview) else memoryview(data)
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        self._buf = mv
        self._end = len(mv)
        if not 0 <= offset <= self._end:
            raise ValueError(f"offset {offset} outside the {self._end}-byte buffer")
        self._pos = offset

    @property
    def position(self) -> int:
        """Offset of the next byte to decode."""
        return self._pos

    @property
    def remaining(self) -> int:
        """Number of bytes not yet decoded."""
        return self._end - self._pos

    def done(self) -> None:
        """Raise XdrError if undecoded bytes remain."""
        if self._pos != self._end:
            raise XdrError(f"{self._end - self._pos} trailing bytes after XDR data")

    def _need(self, n: int) -> int:
        """Reserve n bytes; return their start offset."""
        p = self._pos
        if self._end - p < n:
            raise XdrError(f"truncated XDR data: need {n} bytes at {p}, have {self._end - p}")
        self._pos = p + n
        return p

    def unpack_struct(self, st: struct.Struct) -> tuple[Any, ...]:
        """Decode st.size bytes with a precompiled big-endian Struct."""
        return st.unpack_from(self._buf, self._need(st.size))

    def unpack_uint(self) -> int:
        """unsigned int."""
        p = self._pos
        if self._end - p < 4:
            raise XdrError(f"truncated XDR data: need 4 bytes at {p}, have {self._end - p}")
        self._pos = p + 4
        return int(_U32.unpack_from(self._buf, p)[0])

    def unpack_int(self) -> int:
        """int."""
        return int(_I32.unpack_from(self._buf, self._need(4))[0])

    def unpack_uhyper(self) -> int:
        """unsigned hyper."""
        return int(_U64.unpack_from(self._buf, self._need(8))[0])

    def unpack_hyper(self) -> int:
        """hyper."""
        return int(_I64.unpack_from(self._buf, self._need(8))[0])

    def unpack_bool(self) -> bool:
        """bool: anything but 0 or 1 is an XdrError."""
        v = self.unpack_uint()
        if v > 1:
            raise XdrError(f"XDR bool must be 0 or 1, got {v}")
        return v == 1

    def unpack_enum(self) -> int:
        """enum as a plain int (open set)."""
        return self.unpack_int()

    def unpack_enum_of(self, enum_type: type[E]) -> E:
        """enum of a closed set: values not in enum_type are an XdrError."""
        v = self.unpack_int()
        try:
            return enum_type(v)
        except ValueError:
            raise XdrError(f"{v} is not a valid {enum_type.__name__}") from None

    def unpack_fopaque(self, n: int) -> bytes:
        """Fixed-length opaque[n] (one copy)."""
        p = self._need(padded(n))
        return bytes(self._buf[p : p + n])

    def _opaque_span(self, max_len: int | None) -> tuple[int, int]:
        n = self.unpack_uint()
        if max_len is not None and n > max_len:
            raise XdrError(f"opaque of {n} bytes exceeds its limit of {max_len}")
        if n > self._end - self._pos:
            raise XdrError(f"opaque length {n} exceeds the {self._end - self._pos} bytes left")
        p = self._need(padded(n))
        return p, n

    def unpack_opaque(self, max_len: int | None = None) -> bytes:
        """Variable-length opaque<max_len> (one copy of the payload)."""
        p, n = self._opaque_span(max_len)
        return bytes(self._buf[p : p + n])

    def unpack_opaque_view(self, max_len: int | None = None) -> memoryview:
        """Variable-length opaque<max_len> as a zero-copy view into the input."""
        p, n = self._opaque_span(max_len)
        return self._buf[p : p + n]

    def unpack_string(self, max_len: int | None = None) -> bytes:
        """string<max_len> as bytes (no character set is assumed)."""
        return self.unpack_opaque(max_len)

    def unpack_array(self, unpack_item: Callable[[], T], max_items: int | None = None) -> list[T]:
        """Variable-length array<max_items>.

        The count is checked against the bytes left assuming every item takes at
        least 4 bytes (true for every XDR type except void).
        """
        n = self.unpack_uint()
        if max_items is not None and n > max_items:
            raise XdrError(f"array of {n} items exceeds its limit of {max_items}")
        if n > (self._end - self._pos) >> 2:
            raise XdrError(f"array count {n} exceeds what {self._end - self._pos} bytes can hold")
        return [unpack_item() for _ in range(n)]

    def unpack_optional(self, unpack_item: Callable[[], T]) -> T | None:
        """Optional-data (*T): None, or the decoded value."""
        return unpack_item() if self.unpack_bool() else None

    def unpack_rest(self) -> memoryview:
        """All remaining bytes as a zero-copy view; the Unpacker is then done."""
        p = self._pos
        self._pos = self._end
        return self._buf[p:]
