"""Port lookup over program 100000, sans I/O.

- Portmapper version 2 (RFC 1833 §3): PMAPPROC_GETPORT (procedure 3) maps
  (prog, vers, prot) to a port number, 0 meaning "not registered".
- rpcbind versions 3 and 4 (RFC 1833 §2): RPCBPROC_GETADDR (procedure 3 in
  both) maps an rpcb to a universal address; for IP transports that is
  "h1.h2.h3.h4.p1.p2" (or an IPv6 address followed by ".p1.p2"), the port
  being p1 * 256 + p2 (RFC 5665 §5.2.3).  An empty string means "not registered".
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from .errors import XdrError
from .xdr import Packer, Unpacker

PROGRAM = 100000
PMAP_VERSION = 2
RPCBIND_VERSION_3 = 3
RPCBIND_VERSION_4 = 4
PMAPPROC_NULL = 0
PMAPPROC_GETPORT = 3
RPCBPROC_GETADDR = 3

IPPROTO_TCP = 6
IPPROTO_UDP = 17


@dataclass(frozen=True, slots=True)
class Mapping:
    """pmap mapping (portmapper v2 GETPORT arguments)."""

    prog: int
    vers: int
    prot: int = IPPROTO_TCP
    port: int = 0


@dataclass(frozen=True, slots=True)
class Rpcb:
    """rpcb (rpcbind v3/v4 GETADDR arguments)."""

    prog: int
    vers: int
    netid: str = "tcp"
    addr: str = ""
    owner: str = ""


def _text(b: bytes) -> str:
    # surrogateescape: never fails, and round-trips arbitrary bytes
    return b.decode("utf-8", "surrogateescape")


def _bytes(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def encode_getport_args(prog: int, vers: int, prot: int = IPPROTO_TCP, port: int = 0) -> bytes:
    """PMAPPROC_GETPORT arguments."""
    p = Packer()
    for v in (prog, vers, prot, port):
        p.pack_uint(v)
    return p.get_buffer()


def decode_getport_args(data: bytes | bytearray | memoryview) -> Mapping:
    """Decode PMAPPROC_GETPORT arguments."""
    u = Unpacker(data)
    m = Mapping(u.unpack_uint(), u.unpack_uint(), u.unpack_uint(), u.unpack_uint())
    u.done()
    return m


def encode_getport_res(port: int) -> bytes:
    """PMAPPROC_GETPORT result: the port, 0 if not registered."""
    if not 0 <= port <= 65535:
        raise ValueError(f"not a port: {port}")
    p = Packer()
    p.pack_uint(port)
    return p.get_buffer()


def decode_getport_res(data: bytes | bytearray | memoryview) -> int:
    """The port of a PMAPPROC_GETPORT reply (0 = not registered); XdrError if not a port."""
    u = Unpacker(data)
    port = u.unpack_uint()
    u.done()
    if port > 65535:
        raise XdrError(f"portmapper returned an impossible port {port}")
    return port


def encode_getaddr_args(
    prog: int, vers: int, netid: str = "tcp", addr: str = "", owner: str = ""
) -> bytes:
    """RPCBPROC_GETADDR arguments (rpcbind v3 and v4)."""
    p = Packer()
    p.pack_uint(prog)
    p.pack_uint(vers)
    p.pack_string(_bytes(netid))
    p.pack_string(_bytes(addr))
    p.pack_string(_bytes(owner))
    return p.get_buffer()


def decode_getaddr_args(data: bytes | bytearray | memoryview) -> Rpcb:
    """Decode RPCBPROC_GETADDR arguments."""
    u = Unpacker(data)
    prog = u.unpack_uint()
    vers = u.unpack_uint()
    netid = _text(u.unpack_string())
    addr = _text(u.unpack_string())
    owner = _text(u.unpack_string())
    u.done()
    return Rpcb(prog, vers, netid, addr, owner)


def format_uaddr(host: str, port: int) -> str:
    """Universal address of an IP host and port: "<host>.<p1>.<p2>"."""
    if not 0 <= port <= 65535:
        raise ValueError(f"not a port: {port}")
    return f"{host}.{port >> 8}.{port & 0xFF}"


def parse_uaddr(uaddr: str) -> tuple[str, int]:
    """(host, port) of an IPv4 or IPv6 universal address; XdrError if it is not one."""
    parts = uaddr.rsplit(".", 2)
    if len(parts) != 3:
        raise XdrError(f"not a universal address: {uaddr!r}")
    host, hi, lo = parts
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise XdrError(f"no IP address in universal address {uaddr!r}") from None
    if not (hi.isascii() and hi.isdigit() and lo.isascii() and lo.isdigit()) or (
        len(hi) > 3 or len(lo) > 3
    ):
        raise XdrError(f"bad port in universal address {uaddr!r}")
    p1, p2 = int(hi), int(lo)
    if p1 > 255 or p2 > 255:
        raise XdrError(f"bad port in universal address {uaddr!r}")
    return host, p1 * 256 + p2


def encode_getaddr_res(uaddr: str) -> bytes:
    """RPCBPROC_GETADDR result: a universal address, "" if not registered."""
    p = Packer()
    p.pack_string(_bytes(uaddr))
    return p.get_buffer()


def decode_getaddr_res(data: bytes | bytearray | memoryview) -> int | None:
    """The port of an RPCBPROC_GETADDR reply; None if the program is not registered."""
    u = Unpacker(data)
    uaddr = _text(u.unpack_string())
    u.done()
    if not uaddr:
        return None
    return parse_uaddr(uaddr)[1]
