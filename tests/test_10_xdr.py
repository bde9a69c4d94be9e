"""XDR primitives (RFC 4506): byte vectors derived by hand, range checks, hostile lengths."""

from __future__ import annotations

import tracemalloc
from enum import IntEnum

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wancache.nfs_backend.errors import ProtocolError, XdrError
from wancache.nfs_backend.xdr import Packer, Unpacker, padded


def w(*vals: int) -> bytes:
    """Big-endian 32-bit words (two's complement for negatives), built without the codec."""
    return b"".join((v & 0xFFFFFFFF).to_bytes(4, "big") for v in vals)


def packed(fn_name: str, *args: object) -> bytes:
    p = Packer()
    getattr(p, fn_name)(*args)
    return p.get_buffer()


# --- encoding: hand-derived vectors ---------------------------------------------------


@pytest.mark.parametrize(
    ("method", "args", "expected"),
    [
        ("pack_uint", (0,), b"\x00\x00\x00\x00"),
        ("pack_uint", (1,), b"\x00\x00\x00\x01"),
        ("pack_uint", (0xDEADBEEF,), b"\xde\xad\xbe\xef"),
        ("pack_uint", (2**32 - 1,), b"\xff\xff\xff\xff"),
        ("pack_int", (-1,), b"\xff\xff\xff\xff"),
        ("pack_int", (-(2**31),), b"\x80\x00\x00\x00"),
        ("pack_int", (2**31 - 1,), b"\x7f\xff\xff\xff"),
        ("pack_uhyper", (0x0102030405060708,), b"\x01\x02\x03\x04\x05\x06\x07\x08"),
        ("pack_uhyper", (2**64 - 1,), b"\xff" * 8),
        ("pack_hyper", (-2,), b"\xff" * 7 + b"\xfe"),
        ("pack_bool", (True,), b"\x00\x00\x00\x01"),
        ("pack_bool", (False,), b"\x00\x00\x00\x00"),
        ("pack_enum", (3,), b"\x00\x00\x00\x03"),
        ("pack_fopaque", (3, b"abc"), b"abc\x00"),
        ("pack_fopaque", (4, b"abcd"), b"abcd"),
        ("pack_fopaque", (0, b""), b""),
        ("pack_opaque", (b"hello",), b"\x00\x00\x00\x05hello\x00\x00\x00"),
        ("pack_opaque", (b"",), b"\x00\x00\x00\x00"),
        ("pack_opaque", (b"12345678",), b"\x00\x00\x00\x0812345678"),
        ("pack_string", (b"\xff\xfe",), b"\x00\x00\x00\x02\xff\xfe\x00\x00"),
    ],
)
def test_primitive_vectors(method: str, args: tuple[object, ...], expected: bytes) -> None:
    assert packed(method, *args) == expected


def test_array_and_optional_vectors() -> None:
    p = Packer()
    p.pack_array([1, 2, 3], p.pack_uint)
    assert p.get_buffer() == w(3, 1, 2, 3)

    p = Packer()
    p.pack_optional(None, p.pack_uint)
    p.pack_optional(7, p.pack_uint)
    assert p.get_buffer() == w(0, 1, 7)


def test_packer_accumulates_in_order() -> None:
    p = Packer()
    p.pack_uint(1)
    p.pack_string(b"ab")
    p.pack_hyper(-1)
    assert p.get_buffer() == w(1, 2) + b"ab\0\0" + b"\xff" * 8
    assert len(p) == 20


# --- encoding: range checks -----------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "value"),
    [
        ("pack_uint", -1),
        ("pack_uint", 2**32),
        ("pack_int", 2**31),
        ("pack_int", -(2**31) - 1),
        ("pack_uhyper", -1),
        ("pack_uhyper", 2**64),
        ("pack_hyper", 2**63),
        ("pack_hyper", -(2**63) - 1),
        ("pack_enum", 2**31),
        ("pack_uint", 1.5),
    ],
)
def test_out_of_range_values_are_refused(method: str, value: object) -> None:
    with pytest.raises(ValueError, match="XDR"):
        packed(method, value)


def test_length_limits_on_encode() -> None:
    with pytest.raises(ValueError):
        packed("pack_fopaque", 8, b"short")
    with pytest.raises(ValueError):
        Packer().pack_opaque(b"x" * 65, 64)
    with pytest.raises(ValueError):
        Packer().pack_array([1, 2, 3], Packer().pack_uint, 2)
    with pytest.raises(TypeError):
        Packer().pack_string("text")  # type: ignore[arg-type]


# --- decoding -------------------------------------------------------------------------


def test_unpack_vectors_and_position() -> None:
    data = w(1, 0xFFFFFFFF, 0xFFFFFFFE) + b"\x00\x00\x00\x01\x00\x00\x00\x02" + w(1, 0)
    u = Unpacker(data)
    assert u.remaining == len(data)
    assert u.unpack_uint() == 1
    assert u.unpack_uint() == 2**32 - 1
    assert u.unpack_int() == -2
    assert u.position == 12
    assert u.unpack_uhyper() == 2**32 + 2
    assert u.unpack_bool() is True
    assert u.unpack_bool() is False
    assert u.remaining == 0
    u.done()


def test_unpack_opaque_string_array_optional() -> None:
    data = (
        w(5) + b"hello\0\0\0"  # opaque
        + b"abc\0"  # opaque[3]
        + w(2, 10, 20)  # array
        + w(0) + w(1, 99)  # two optionals
    )  # fmt: skip
    u = Unpacker(data)
    assert u.unpack_opaque() == b"hello"
    assert u.unpack_fopaque(3) == b"abc"
    assert u.unpack_array(u.unpack_uint) == [10, 20]
    assert u.unpack_optional(u.unpack_uint) is None
    assert u.unpack_optional(u.unpack_uint) == 99
    u.done()


def test_offset_and_memoryview_input() -> None:
    buf = bytearray(b"junk" + w(42))
    u = Unpacker(memoryview(buf), offset=4)
    assert u.unpack_uint() == 42
    with pytest.raises(ValueError):
        Unpacker(b"1234", offset=5)


def test_truncation_is_an_xdr_error() -> None:
    for method, data in [
        ("unpack_uint", b"\0\0\0"),
        ("unpack_int", b""),
        ("unpack_uhyper", b"\0" * 7),
        ("unpack_hyper", b"\0" * 4),
        ("unpack_bool", b"\0"),
        ("unpack_opaque", w(5) + b"hell"),  # data shorter than its length
        ("unpack_opaque", w(5) + b"hello"),  # padding missing
        ("unpack_string", b"\0\0"),
    ]:
        with pytest.raises(XdrError):
            getattr(Unpacker(data), method)()
    with pytest.raises(XdrError):
        Unpacker(b"ab").unpack_fopaque(2)  # needs 4 bytes with its padding


def test_xdr_error_is_a_protocol_error() -> None:
    assert issubclass(XdrError, ProtocolError)


def test_bool_must_be_zero_or_one() -> None:
    with pytest.raises(XdrError):
        Unpacker(w(2)).unpack_bool()
    u = Unpacker(w(2, 0))
    with pytest.raises(XdrError):
        u.unpack_optional(u.unpack_uint)  # optional-data discriminant is a bool too


def test_trailing_bytes_fail_done() -> None:
    u = Unpacker(w(1, 2))
    u.unpack_uint()
    with pytest.raises(XdrError, match="trailing"):
        u.done()


def test_decoded_limits() -> None:
    with pytest.raises(XdrError, match="limit"):
        Unpacker(w(65) + b"x" * 68).unpack_opaque(64)
    with pytest.raises(XdrError, match="limit"):
        Unpacker(w(3, 1, 2, 3)).unpack_array(lambda: 0, max_items=2)


class Color(IntEnum):
    RED = 1
    GREEN = 2


def test_closed_enums_reject_unknown_values() -> None:
    assert Unpacker(w(2)).unpack_enum_of(Color) is Color.GREEN
    with pytest.raises(XdrError, match="Color"):
        Unpacker(w(3)).unpack_enum_of(Color)
    assert Unpacker(w(0xFFFFFFFF)).unpack_enum() == -1  # open enum: a plain int


def test_huge_lengths_fail_before_allocating_or_looping() -> None:
    calls = []

    def item() -> int:
        calls.append(1)
        return 0

    tracemalloc.start()
    try:
        for data in (w(0xFFFFFFFF), w(0xFFFFFFFF) + b"\0" * 1000, w(0x7FFFFFFD) + b"abc\0"):
            with pytest.raises(XdrError):
                Unpacker(data).unpack_opaque()
            with pytest.raises(XdrError):
                Unpacker(data).unpack_array(item)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 100_000
    assert calls == []


def test_opaque_payload_is_copied_once_or_viewed() -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB
    data = w(len(payload)) + payload
    tracemalloc.start()
    try:
        out = Unpacker(data).unpack_opaque()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out == payload
    assert peak < 1.5 * len(payload)  # exactly one copy of the payload

    view = Unpacker(data).unpack_opaque_view()
    assert view.obj is data and view == payload  # zero-copy


def test_unpack_rest_is_a_view_of_the_remaining_bytes() -> None:
    data = w(7) + b"tail"
    u = Unpacker(data)
    u.unpack_uint()
    rest = u.unpack_rest()
    assert bytes(rest) == b"tail"
    assert rest.obj is data
    u.done()


def test_padded() -> None:
    assert [padded(n) for n in range(9)] == [0, 4, 4, 4, 4, 8, 8, 8, 8]


# --- round trips ------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 2**32 - 1),
    st.integers(-(2**31), 2**31 - 1),
    st.integers(0, 2**64 - 1),
    st.integers(-(2**63), 2**63 - 1),
    st.booleans(),
    st.binary(max_size=50),
    st.lists(st.integers(0, 2**32 - 1), max_size=10),
    st.none() | st.binary(max_size=9),
)
def test_round_trip(
    ui: int, i: int, uh: int, h: int, b: bool, data: bytes, arr: list[int], opt: bytes | None
) -> None:
    p = Packer()
    p.pack_uint(ui)
    p.pack_int(i)
    p.pack_uhyper(uh)
    p.pack_hyper(h)
    p.pack_bool(b)
    p.pack_opaque(data)
    p.pack_fopaque(len(data), data)
    p.pack_array(arr, p.pack_uint)
    p.pack_optional(opt, p.pack_string)
    enc = p.get_buffer()
    assert len(enc) % 4 == 0
    u = Unpacker(enc)
    assert u.unpack_uint() == ui
    assert u.unpack_int() == i
    assert u.unpack_uhyper() == uh
    assert u.unpack_hyper() == h
    assert u.unpack_bool() is b
    assert u.unpack_opaque() == data
    assert u.unpack_fopaque(len(data)) == data
    assert u.unpack_array(u.unpack_uint) == arr
    assert u.unpack_optional(u.unpack_string) == opt
    u.done()
