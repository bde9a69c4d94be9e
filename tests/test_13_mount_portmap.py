"""MOUNT v3 (RFC 1813 appendix I) and portmapper/rpcbind (RFC 1833) codecs."""

from __future__ import annotations

import errno

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wancache.nfs_backend import mount3, portmap
from wancache.nfs_backend.errors import MountError, XdrError
from wancache.nfs_backend.mount3 import ExportNode, MntRes, MountBody, Mountstat3


def w(*vals: int) -> bytes:
    """Big-endian 32-bit words, built without the codec."""
    return b"".join(v.to_bytes(4, "big") for v in vals)


# --- MOUNT ------------------------------------------------------------------------------


def test_mount_constants() -> None:
    assert (mount3.PROGRAM, mount3.VERSION) == (100005, 3)
    assert [int(p) for p in mount3.Proc] == [0, 1, 2, 3, 4, 5]
    assert (int(mount3.Proc.EXPORT), int(mount3.Proc.UMNT)) == (5, 3)
    assert int(Mountstat3.MNT3ERR_NOTSUPP) == 10004


def test_mnt_args_vector() -> None:
    data = w(7) + b"/export\0"
    assert mount3.encode_mnt_args(b"/export") == data
    assert mount3.decode_mnt_args(data) == b"/export"
    assert mount3.encode_umnt_args(b"/export") == data
    assert mount3.decode_umnt_args(data) == b"/export"
    with pytest.raises(ValueError):
        mount3.encode_mnt_args(b"/" * 1025)
    with pytest.raises(XdrError):
        mount3.decode_mnt_args(w(1025) + b"/" * 1028)


def test_mnt_res_vectors() -> None:
    data = w(0) + w(6) + b"rootfh\0\0" + w(2, 1, 0)
    res = mount3.decode_mnt_res(data)
    assert res == MntRes(Mountstat3.MNT3_OK, b"rootfh", [1, 0])
    assert mount3.encode_mnt_res(res) == data
    assert mount3.mnt_fhandle(res) == b"rootfh"

    denied = mount3.decode_mnt_res(w(13))
    assert denied == MntRes(Mountstat3.MNT3ERR_ACCES)
    assert mount3.encode_mnt_res(denied) == w(13)
    with pytest.raises(MountError) as ei:
        mount3.mnt_fhandle(denied, b"/secret")
    assert ei.value.errno == errno.EACCES
    assert ei.value.path == b"/secret"
    assert ei.value.name == "MNT3ERR_ACCES"

    e = MountError(2, b"/x", "srv:/x: no such export")
    assert (str(e), e.status, e.path, e.errno) == ("srv:/x: no such export", 2, b"/x", errno.ENOENT)

    odd = mount3.decode_mnt_res(w(777))
    assert odd.status == 777
    assert MountError(777).errno == errno.EIO


def test_mnt_res_limits() -> None:
    with pytest.raises(XdrError):
        mount3.decode_mnt_res(w(0, 65) + b"x" * 68 + w(0))
    with pytest.raises(XdrError):
        mount3.decode_mnt_res(w(0, 0, 0xFFFFFFFF))
    with pytest.raises(XdrError):
        mount3.decode_mnt_res(w(0, 0, 0, 0))  # trailing
    with pytest.raises(ValueError):
        mount3.encode_mnt_res(MntRes(Mountstat3.MNT3_OK))


def test_export_res_vector() -> None:
    data = (
        w(1) + w(4) + b"/pub"  # exportnode 1: "/pub"
        + w(1) + w(1) + b"*\0\0\0"  # group "*"
        + w(0)  # end of groups
        + w(1) + w(5) + b"/home\0\0\0"  # exportnode 2: "/home"
        + w(1) + w(6) + b"lan-a1\0\0"  # group "lan-a1"
        + w(1) + w(3) + b"lab\0"  # group "lab"
        + w(0)  # end of groups
        + w(0)  # end of exports
    )  # fmt: skip
    nodes = mount3.decode_export_res(data)
    assert nodes == [ExportNode(b"/pub", [b"*"]), ExportNode(b"/home", [b"lan-a1", b"lab"])]
    assert mount3.encode_export_res(nodes) == data
    assert mount3.decode_export_res(w(0)) == []
    with pytest.raises(XdrError):
        mount3.decode_export_res(w(1, 4) + b"/pub")  # truncated: no groups list


def test_dump_res() -> None:
    data = w(1, 6) + b"client\0\0" + w(4) + b"/pub" + w(0)
    assert mount3.decode_dump_res(data) == [MountBody(b"client", b"/pub")]
    assert mount3.encode_dump_res([MountBody(b"client", b"/pub")]) == data


paths = st.binary(max_size=100)
mnt_results = st.builds(
    MntRes, st.just(Mountstat3.MNT3_OK), st.binary(max_size=64),
    st.lists(st.integers(-(2**31), 2**31 - 1), max_size=5),
) | st.builds(MntRes, st.sampled_from([s for s in Mountstat3 if s]))  # fmt: skip


@settings(max_examples=100, deadline=None)
@given(
    paths,
    mnt_results,
    st.lists(st.builds(ExportNode, paths, st.lists(st.binary(max_size=20), max_size=3)),
             max_size=4),
    st.lists(st.builds(MountBody, st.binary(max_size=20), paths), max_size=4),
)  # fmt: skip
def test_mount_round_trips(
    path: bytes, res: MntRes, exports: list[ExportNode], dump: list[MountBody]
) -> None:
    assert mount3.decode_mnt_args(mount3.encode_mnt_args(path)) == path
    assert mount3.decode_umnt_args(mount3.encode_umnt_args(path)) == path
    assert mount3.decode_mnt_res(mount3.encode_mnt_res(res)) == res
    assert mount3.decode_export_res(mount3.encode_export_res(exports)) == exports
    assert mount3.decode_dump_res(mount3.encode_dump_res(dump)) == dump


# --- portmapper v2 -------------------------------------------------------------------------


def test_getport_vectors() -> None:
    data = w(100003, 3, 6, 0)
    assert portmap.encode_getport_args(100003, 3) == data
    assert portmap.decode_getport_args(data) == portmap.Mapping(100003, 3, 6, 0)
    assert portmap.encode_getport_args(100005, 3, portmap.IPPROTO_UDP) == w(100005, 3, 17, 0)
    assert portmap.decode_getport_res(w(2049)) == 2049
    assert portmap.decode_getport_res(w(0)) == 0
    assert portmap.encode_getport_res(2049) == w(2049)
    with pytest.raises(XdrError):
        portmap.decode_getport_res(w(65536))
    with pytest.raises(XdrError):
        portmap.decode_getport_res(w(1, 2))
    with pytest.raises(ValueError):
        portmap.encode_getport_res(70000)


# --- rpcbind v3/v4 -----------------------------------------------------------------------


def test_getaddr_vectors() -> None:
    data = w(100003, 3) + w(3) + b"tcp\0" + w(0) + w(0)
    assert portmap.encode_getaddr_args(100003, 3) == data
    assert portmap.decode_getaddr_args(data) == portmap.Rpcb(100003, 3, "tcp", "", "")
    full = portmap.encode_getaddr_args(100005, 3, "tcp6", "::1.0.111", "root")
    assert full == w(100005, 3) + w(4) + b"tcp6" + w(9) + b"::1.0.111\0\0\0" + w(4) + b"root"

    assert portmap.decode_getaddr_res(w(13) + b"127.0.0.1.8.1\0\0\0") == 2049
    assert portmap.decode_getaddr_res(w(7) + b"::1.8.1\0") == 2049
    assert portmap.decode_getaddr_res(w(0)) is None
    assert portmap.encode_getaddr_res("127.0.0.1.8.1") == w(13) + b"127.0.0.1.8.1\0\0\0"


@pytest.mark.parametrize(
    "uaddr",
    ["127.0.0.1", "8.1", ".8.1", "1.2.3.4.256.1", "1.2.3.4.1.x", "1.2.3.4.-1.1", "h.1.0001",
     "1.2.3.4.\u0661.1"],
)  # fmt: skip
def test_bad_universal_addresses(uaddr: str) -> None:
    with pytest.raises(XdrError):
        portmap.parse_uaddr(uaddr)
    with pytest.raises(XdrError):
        portmap.decode_getaddr_res(portmap.encode_getaddr_res(uaddr))


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 65535), st.sampled_from(["127.0.0.1", "10.1.2.3", "::1", "fe80::1:2"]))
def test_uaddr_round_trip(port: int, host: str) -> None:
    uaddr = portmap.format_uaddr(host, port)
    assert portmap.parse_uaddr(uaddr) == (host, port)
    assert portmap.decode_getaddr_res(portmap.encode_getaddr_res(uaddr)) == port


@settings(max_examples=100, deadline=None)
@given(
    st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.text(max_size=10),
    st.text(max_size=30), st.text(max_size=10),
)  # fmt: skip
def test_getaddr_args_round_trip(prog: int, vers: int, netid: str, addr: str, owner: str) -> None:
    enc = portmap.encode_getaddr_args(prog, vers, netid, addr, owner)
    assert portmap.decode_getaddr_args(enc) == portmap.Rpcb(prog, vers, netid, addr, owner)
