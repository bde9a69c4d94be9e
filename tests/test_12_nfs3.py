"""NFSv3 codec (RFC 1813): hand-built replies, every procedure's round trip, the errno table."""

from __future__ import annotations

import errno
import pickle
import stat
import tracemalloc
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wancache.nfs_backend import errors, nfs3
from wancache.nfs_backend.errors import NfsError, XdrError
from wancache.nfs_backend.nfs3 import (
    EMPTY_WCC,
    SERVER_TIME,
    AccessArgs,
    AccessRes,
    CommitArgs,
    CommitRes,
    CreateArgs,
    CreateMode,
    CreateRes,
    DirOpArgs,
    Entry3,
    EntryPlus3,
    Fattr3,
    FsinfoArgs,
    FsinfoRes,
    FsstatArgs,
    FsstatRes,
    Ftype3,
    GetattrArgs,
    GetattrRes,
    LinkArgs,
    LinkRes,
    LookupArgs,
    LookupRes,
    MkdirArgs,
    MkdirRes,
    MknodArgs,
    MknodRes,
    Nfsstat3,
    NfsTime,
    NullArgs,
    NullRes,
    PathconfArgs,
    PathconfRes,
    Proc,
    ReadArgs,
    ReaddirArgs,
    ReaddirplusArgs,
    ReaddirplusRes,
    ReaddirRes,
    ReadlinkArgs,
    ReadlinkRes,
    ReadRes,
    RemoveArgs,
    RemoveRes,
    RenameArgs,
    RenameRes,
    RmdirArgs,
    RmdirRes,
    Sattr3,
    SetattrArgs,
    SetattrRes,
    StableHow,
    SymlinkArgs,
    SymlinkRes,
    TimeHow,
    WccAttr,
    WccData,
    WriteArgs,
    WriteRes,
    decode_args,
    decode_res,
    encode_args,
    encode_res,
    proc_of,
)


def w(*vals: int) -> bytes:
    """Big-endian 32-bit words, built without the codec."""
    return b"".join(v.to_bytes(4, "big") for v in vals)


def h(v: int) -> bytes:
    """A big-endian 64-bit word."""
    return v.to_bytes(8, "big")


# --- hypothesis strategies (also used by test_14_codec_fuzz) ----------------------------

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
times = st.builds(NfsTime, u32, u32)
fhs = st.binary(max_size=nfs3.NFS3_FHSIZE)
names = st.binary(max_size=40)
verfs = st.binary(min_size=8, max_size=8)
fattrs = st.builds(
    Fattr3, st.sampled_from(Ftype3), u32, u32, u32, u32, u64, u64, st.tuples(u32, u32), u64,
    u64, times, times, times,
)  # fmt: skip
post_op = st.none() | fattrs
wcc_attrs = st.builds(WccAttr, u64, times, times)
wccs = st.builds(WccData, st.none() | wcc_attrs, post_op)
set_times = st.none() | st.just(SERVER_TIME) | times
opt_u32 = st.none() | u32
sattrs = st.builds(Sattr3, opt_u32, opt_u32, opt_u32, st.none() | u64, set_times, set_times)
dirops = st.builds(DirOpArgs, fhs, names)
ok = st.just(Nfsstat3.NFS3_OK)
fail = st.sampled_from([s for s in Nfsstat3 if s != Nfsstat3.NFS3_OK]) | st.integers(1, 2**31 - 1)
stables = st.sampled_from(StableHow)
entries = st.lists(st.builds(Entry3, u64, names, u64), max_size=5)
entries_plus = st.lists(
    st.builds(EntryPlus3, u64, names, u64, post_op, st.none() | fhs), max_size=4
)

ARG_STRATEGIES: dict[Proc, st.SearchStrategy[Any]] = {
    Proc.NULL: st.just(NullArgs()),
    Proc.GETATTR: st.builds(GetattrArgs, fhs),
    Proc.SETATTR: st.builds(SetattrArgs, fhs, sattrs, st.none() | times),
    Proc.LOOKUP: st.builds(LookupArgs, dirops),
    Proc.ACCESS: st.builds(AccessArgs, fhs, u32),
    Proc.READLINK: st.builds(ReadlinkArgs, fhs),
    Proc.READ: st.builds(ReadArgs, fhs, u64, u32),
    Proc.WRITE: st.builds(WriteArgs, fhs, u64, u32, stables, st.binary(max_size=100)),
    Proc.CREATE: st.builds(
        CreateArgs, dirops, st.sampled_from([CreateMode.UNCHECKED, CreateMode.GUARDED]), sattrs
    )
    | st.builds(CreateArgs, dirops, st.just(CreateMode.EXCLUSIVE), st.none(), verfs),
    Proc.MKDIR: st.builds(MkdirArgs, dirops, sattrs),
    Proc.SYMLINK: st.builds(SymlinkArgs, dirops, sattrs, st.binary(max_size=100)),
    Proc.MKNOD: st.builds(
        MknodArgs, dirops, st.sampled_from([Ftype3.CHR, Ftype3.BLK]), sattrs, st.tuples(u32, u32)
    )
    | st.builds(MknodArgs, dirops, st.sampled_from([Ftype3.SOCK, Ftype3.FIFO]), sattrs)
    | st.builds(MknodArgs, dirops, st.sampled_from([Ftype3.REG, Ftype3.DIR, Ftype3.LNK])),
    Proc.REMOVE: st.builds(RemoveArgs, dirops),
    Proc.RMDIR: st.builds(RmdirArgs, dirops),
    Proc.RENAME: st.builds(RenameArgs, dirops, dirops),
    Proc.LINK: st.builds(LinkArgs, fhs, dirops),
    Proc.READDIR: st.builds(ReaddirArgs, fhs, u64, verfs, u32),
    Proc.READDIRPLUS: st.builds(ReaddirplusArgs, fhs, u64, verfs, u32, u32),
    Proc.FSSTAT: st.builds(FsstatArgs, fhs),
    Proc.FSINFO: st.builds(FsinfoArgs, fhs),
    Proc.PATHCONF: st.builds(PathconfArgs, fhs),
    Proc.COMMIT: st.builds(CommitArgs, fhs, u64, u32),
}


def _dirop_res(cls: type) -> tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]:
    return (
        st.builds(cls, ok, st.none() | fhs, post_op, wccs),
        st.builds(cls, fail, dir_wcc=wccs),
    )


RES_STRATEGIES: dict[Proc, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]] = {
    Proc.NULL: (st.just(NullRes()), st.just(NullRes())),
    Proc.GETATTR: (st.builds(GetattrRes, ok, fattrs), st.builds(GetattrRes, fail)),
    Proc.SETATTR: (st.builds(SetattrRes, ok, wccs), st.builds(SetattrRes, fail, wccs)),
    Proc.LOOKUP: (
        st.builds(LookupRes, ok, fhs, post_op, post_op),
        st.builds(LookupRes, fail, dir_attributes=post_op),
    ),
    Proc.ACCESS: (
        st.builds(AccessRes, ok, post_op, u32),
        st.builds(AccessRes, fail, post_op),
    ),
    Proc.READLINK: (
        st.builds(ReadlinkRes, ok, post_op, st.binary(max_size=100)),
        st.builds(ReadlinkRes, fail, post_op),
    ),
    Proc.READ: (
        st.builds(ReadRes, ok, post_op, u32, st.booleans(), st.binary(max_size=100)),
        st.builds(ReadRes, fail, post_op),
    ),
    Proc.WRITE: (
        st.builds(WriteRes, ok, wccs, u32, stables, verfs),
        st.builds(WriteRes, fail, wccs),
    ),
    Proc.CREATE: _dirop_res(CreateRes),
    Proc.MKDIR: _dirop_res(MkdirRes),
    Proc.SYMLINK: _dirop_res(SymlinkRes),
    Proc.MKNOD: _dirop_res(MknodRes),
    Proc.REMOVE: (st.builds(RemoveRes, ok, wccs), st.builds(RemoveRes, fail, wccs)),
    Proc.RMDIR: (st.builds(RmdirRes, ok, wccs), st.builds(RmdirRes, fail, wccs)),
    Proc.RENAME: (
        st.builds(RenameRes, ok, wccs, wccs),
        st.builds(RenameRes, fail, wccs, wccs),
    ),
    Proc.LINK: (st.builds(LinkRes, ok, post_op, wccs), st.builds(LinkRes, fail, post_op, wccs)),
    Proc.READDIR: (
        st.builds(ReaddirRes, ok, post_op, verfs, entries, st.booleans()),
        st.builds(ReaddirRes, fail, post_op),
    ),
    Proc.READDIRPLUS: (
        st.builds(ReaddirplusRes, ok, post_op, verfs, entries_plus, st.booleans()),
        st.builds(ReaddirplusRes, fail, post_op),
    ),
    Proc.FSSTAT: (
        st.builds(FsstatRes, ok, post_op, u64, u64, u64, u64, u64, u64, u32),
        st.builds(FsstatRes, fail, post_op),
    ),
    Proc.FSINFO: (
        st.builds(FsinfoRes, ok, post_op, u32, u32, u32, u32, u32, u32, u32, u64, times, u32),
        st.builds(FsinfoRes, fail, post_op),
    ),
    Proc.PATHCONF: (
        st.builds(
            PathconfRes,
            ok,
            post_op,
            u32,
            u32,
            st.booleans(),
            st.booleans(),
            st.booleans(),
            st.booleans(),
        ),
        st.builds(PathconfRes, fail, post_op),
    ),
    Proc.COMMIT: (st.builds(CommitRes, ok, wccs, verfs), st.builds(CommitRes, fail, wccs)),
}

any_args = st.sampled_from(list(Proc)).flatmap(lambda p: ARG_STRATEGIES[p])
any_res = st.sampled_from(list(Proc)).flatmap(
    lambda p: st.one_of(RES_STRATEGIES[p][0], RES_STRATEGIES[p][1])
)


def test_strategies_cover_every_procedure() -> None:
    assert set(ARG_STRATEGIES) == set(Proc) == set(RES_STRATEGIES)
    assert set(nfs3.ARGS) == set(Proc) == set(nfs3.RESULTS)
    assert len(Proc) == 22


# --- hand-built byte vectors -------------------------------------------------------------

# fattr3 (RFC 1813 §2.6), word by word.
FATTR_BYTES = (
    w(1)  # type NF3REG
    + w(0o644)  # mode
    + w(1)  # nlink
    + w(1000, 1000)  # uid, gid
    + h(0x1_0000_0005)  # size (uint64, above 4 GiB)
    + h(8192)  # used
    + w(0, 0)  # rdev specdata3
    + h(0x0102030405060708)  # fsid
    + h(42)  # fileid
    + w(1, 2) + w(3, 4) + w(5, 6)  # atime, mtime, ctime
)  # fmt: skip
FATTR = Fattr3(
    Ftype3.REG, 0o644, 1, 1000, 1000, 0x1_0000_0005, 8192, (0, 0), 0x0102030405060708, 42,
    NfsTime(1, 2), NfsTime(3, 4), NfsTime(5, 6),
)  # fmt: skip


def test_getattr_reply_vector() -> None:
    assert len(FATTR_BYTES) == 84
    data = w(0) + FATTR_BYTES
    res = decode_res(Proc.GETATTR, data)
    assert res == GetattrRes(Nfsstat3.NFS3_OK, FATTR)
    assert res.status is Nfsstat3.NFS3_OK
    assert res.attributes.type is Ftype3.REG
    assert encode_res(res) == data
    assert decode_res(Proc.GETATTR, w(70)) == GetattrRes(Nfsstat3.NFS3ERR_STALE)


DIR_FATTR_BYTES = (
    w(2, 0o755, 2, 0, 0) + h(4096) + h(4096) + w(0, 0) + h(7) + h(2) + w(9, 0, 9, 0, 9, 0)
)
DIR_FATTR = Fattr3(
    Ftype3.DIR, 0o755, 2, 0, 0, 4096, 4096, (0, 0), 7, 2, NfsTime(9, 0), NfsTime(9, 0),
    NfsTime(9, 0),
)  # fmt: skip

READDIRPLUS_REPLY = (
    w(0)  # NFS3_OK
    + w(1) + DIR_FATTR_BYTES  # dir_attributes: post_op_attr present
    + b"VERFVERF"  # cookieverf3
    + w(1)  # entries: first entryplus3 follows
    + h(10) + w(1) + b"a\0\0\0" + h(1)  # fileid, name "a" padded, cookie
    + w(0)  # name_attributes absent
    + w(1) + w(4) + b"fh01"  # name_handle present
    + w(1)  # second entry follows
    + h(11) + w(2) + b"\xff\xfe\0\0" + h(2)  # a non-UTF-8 name
    + w(1) + FATTR_BYTES  # name_attributes present
    + w(0)  # name_handle absent
    + w(0)  # end of list
    + w(1)  # eof
)  # fmt: skip


def test_readdirplus_reply_vector() -> None:
    res = decode_res(Proc.READDIRPLUS, READDIRPLUS_REPLY)
    assert res == ReaddirplusRes(
        Nfsstat3.NFS3_OK,
        DIR_FATTR,
        b"VERFVERF",
        [EntryPlus3(10, b"a", 1, None, b"fh01"), EntryPlus3(11, b"\xff\xfe", 2, FATTR, None)],
        True,
    )
    assert encode_res(res) == READDIRPLUS_REPLY


def test_readdir_reply_vector() -> None:
    data = w(0, 0) + b"\0" * 8 + w(1) + h(5) + w(3) + b"abc\0" + h(100) + w(0) + w(0)
    res = decode_res(Proc.READDIR, data)
    assert res == ReaddirRes(Nfsstat3.NFS3_OK, None, bytes(8), [Entry3(5, b"abc", 100)], False)
    assert encode_res(res) == data


def test_lookup_failure_carries_dir_attributes_only() -> None:
    data = w(2) + w(1) + DIR_FATTR_BYTES
    res = decode_res(Proc.LOOKUP, data)
    assert res == LookupRes(Nfsstat3.NFS3ERR_NOENT, None, None, DIR_FATTR)
    assert encode_res(res) == data


def test_create_failure_carries_dir_wcc_only() -> None:
    wcc_bytes = w(1) + h(4096) + w(1, 2, 3, 4) + w(0)  # pre_op_attr present, post_op absent
    data = w(17) + wcc_bytes
    res = decode_res(Proc.CREATE, data)
    expected_wcc = WccData(WccAttr(4096, NfsTime(1, 2), NfsTime(3, 4)), None)
    assert res == CreateRes(Nfsstat3.NFS3ERR_EXIST, dir_wcc=expected_wcc)
    assert res.object is None and res.obj_attributes is None
    assert encode_res(res) == data


def test_read_reply_vector() -> None:
    data = w(0, 0, 5, 1, 5) + b"hello\0\0\0"
    assert decode_res(Proc.READ, data) == ReadRes(Nfsstat3.NFS3_OK, None, 5, True, b"hello")
    assert encode_res(ReadRes(Nfsstat3.NFS3_OK, None, 5, True, b"hello")) == data
    assert decode_res(Proc.READ, w(13, 0)) == ReadRes(Nfsstat3.NFS3ERR_ACCES)


def test_write_args_vector() -> None:
    args = WriteArgs(b"fh", 2**40, 3, StableHow.FILE_SYNC, b"xyz")
    data = w(2) + b"fh\0\0" + h(2**40) + w(3, 2, 3) + b"xyz\0"
    assert encode_args(args) == data
    assert decode_args(Proc.WRITE, data) == args


def test_sattr3_and_setattr_vector() -> None:
    args = SetattrArgs(
        b"\x01\x02\x03\x04",
        Sattr3(mode=0o600, size=0, atime=SERVER_TIME, mtime=NfsTime(7, 8)),
        guard=NfsTime(5, 6),
    )
    data = (
        w(4) + b"\x01\x02\x03\x04"
        + w(1, 0o600)  # set_mode3
        + w(0)  # uid unchanged
        + w(0)  # gid unchanged
        + w(1) + h(0)  # set_size3
        + w(1)  # atime: SET_TO_SERVER_TIME
        + w(2, 7, 8)  # mtime: SET_TO_CLIENT_TIME
        + w(1, 5, 6)  # sattrguard3 check=TRUE, obj_ctime
    )  # fmt: skip
    assert encode_args(args) == data
    assert decode_args(Proc.SETATTR, data) == args


def test_createhow3_arms() -> None:
    where = DirOpArgs(b"d", b"f")
    prefix = w(1) + b"d\0\0\0" + w(1) + b"f\0\0\0"
    excl = CreateArgs(where, CreateMode.EXCLUSIVE, None, b"12345678")
    assert encode_args(excl) == prefix + w(2) + b"12345678"
    assert decode_args(Proc.CREATE, prefix + w(2) + b"12345678") == excl
    guarded = CreateArgs(where, CreateMode.GUARDED, Sattr3(mode=0o644))
    assert encode_args(guarded) == prefix + w(1) + w(1, 0o644, 0, 0, 0, 0, 0)
    # obj_attributes=None is sent as an empty sattr3
    unchecked = CreateArgs(where, CreateMode.UNCHECKED)
    assert encode_args(unchecked) == prefix + w(0) + w(0, 0, 0, 0, 0, 0)
    with pytest.raises(ValueError):
        encode_args(CreateArgs(where, CreateMode.EXCLUSIVE))
    with pytest.raises(XdrError):
        decode_args(Proc.CREATE, prefix + w(3))


def test_mknoddata3_arms() -> None:
    where = DirOpArgs(b"d", b"n")
    prefix = w(1) + b"d\0\0\0" + w(1) + b"n\0\0\0"
    chr_ = MknodArgs(where, Ftype3.CHR, Sattr3(), (1, 3))
    assert encode_args(chr_) == prefix + w(4) + w(0) * 6 + w(1, 3)
    fifo = MknodArgs(where, Ftype3.FIFO, Sattr3(uid=5))
    assert encode_args(fifo) == prefix + w(7) + w(0, 1, 5, 0, 0, 0, 0)
    reg = MknodArgs(where, Ftype3.REG)
    assert encode_args(reg) == prefix + w(1)
    for args in (chr_, fifo, reg):
        assert decode_args(Proc.MKNOD, encode_args(args)) == args


# --- round trips of every procedure ----------------------------------------------------------


@pytest.mark.parametrize("proc", list(Proc), ids=lambda p: p.name)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_args_round_trip(proc: Proc, data: st.DataObject) -> None:
    args = data.draw(ARG_STRATEGIES[proc])
    enc = encode_args(args)
    assert len(enc) % 4 == 0
    assert proc_of(args) is proc
    assert decode_args(proc, enc) == args
    assert decode_args(proc, memoryview(enc)) == args


@pytest.mark.parametrize("arm", ["ok", "fail"])
@pytest.mark.parametrize("proc", list(Proc), ids=lambda p: p.name)
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_res_round_trip(proc: Proc, arm: str, data: st.DataObject) -> None:
    res = data.draw(RES_STRATEGIES[proc][0 if arm == "ok" else 1])
    enc = encode_res(res)
    assert len(enc) % 4 == 0
    assert proc_of(res) is proc
    dec = decode_res(proc, enc)
    assert dec == res
    assert type(dec) is type(res)


def test_failure_arm_ignores_success_fields() -> None:
    res = ReadRes(Nfsstat3.NFS3ERR_IO, None, 10, True, b"ignored")
    assert encode_res(res) == w(5, 0)
    assert decode_res(Proc.READ, encode_res(res)) == ReadRes(Nfsstat3.NFS3ERR_IO)


def test_unknown_nfsstat3_is_kept_as_int() -> None:
    res = decode_res(Proc.REMOVE, w(12345, 0, 0))
    assert res == RemoveRes(12345, EMPTY_WCC)
    assert not isinstance(res.status, Nfsstat3)
    with pytest.raises(NfsError) as ei:
        nfs3.raise_for_status(res)
    assert ei.value.errno == errno.EIO
    assert ei.value.name == "NFS3ERR_UNKNOWN(12345)"


# --- decode errors ------------------------------------------------------------------------


def test_closed_enums_are_checked() -> None:
    bad_ftype = w(0, 9) + FATTR_BYTES[4:]
    with pytest.raises(XdrError, match="ftype3"):
        decode_res(Proc.GETATTR, bad_ftype)
    with pytest.raises(XdrError, match="StableHow"):
        decode_args(Proc.WRITE, w(0) + h(0) + w(0, 3, 0))
    with pytest.raises(XdrError, match="TimeHow"):
        decode_args(Proc.MKDIR, w(0, 0) + w(0, 0, 0, 0, 3, 0))
    with pytest.raises(XdrError):
        decode_args(Proc.MKNOD, w(0, 0, 8))


def test_file_handles_longer_than_64_bytes() -> None:
    with pytest.raises(XdrError):
        decode_args(Proc.GETATTR, w(65) + b"x" * 68)
    assert decode_args(Proc.GETATTR, w(64) + b"x" * 64) == GetattrArgs(b"x" * 64)
    with pytest.raises(ValueError):
        encode_args(GetattrArgs(b"x" * 65))


def test_trailing_and_missing_bytes() -> None:
    good = encode_res(GetattrRes(Nfsstat3.NFS3_OK, FATTR))
    with pytest.raises(XdrError, match="trailing"):
        decode_res(Proc.GETATTR, good + w(0))
    with pytest.raises(XdrError):
        decode_res(Proc.GETATTR, good[:-4])
    with pytest.raises(XdrError):
        decode_res(Proc.NULL, w(0))
    assert decode_res(Proc.NULL, b"") == NullRes()
    assert decode_args(Proc.NULL, b"") == NullArgs()


def test_bad_values_refused_on_encode() -> None:
    with pytest.raises(ValueError):
        encode_args(ReadArgs(b"", -1, 0))
    with pytest.raises(ValueError):
        encode_args(ReadArgs(b"", 0, 2**32))
    with pytest.raises(ValueError):
        encode_args(ReaddirArgs(b"", 0, b"short", 100))
    with pytest.raises(ValueError):
        encode_args(WriteArgs(b"", 0, 0, 7, b""))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        encode_args(MkdirArgs(DirOpArgs(b"", b""), Sattr3(atime=TimeHow.SET_TO_CLIENT_TIME)))
    with pytest.raises(TypeError):
        encode_args(GetattrRes(Nfsstat3.NFS3_OK))
    with pytest.raises(TypeError):
        encode_res(GetattrArgs(b""))
    with pytest.raises(TypeError):
        proc_of(object())
    with pytest.raises(ValueError):
        decode_args(22, b"")
    with pytest.raises(ValueError):
        decode_res(99, b"")


def test_read_payload_is_copied_once() -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB
    data = encode_res(ReadRes(Nfsstat3.NFS3_OK, FATTR, len(payload), True, payload))
    body = memoryview(data)  # as rpc.decode_reply hands it over
    tracemalloc.start()
    try:
        res = decode_res(Proc.READ, body)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert res.data == payload and res.count == len(payload) and res.eof
    assert peak < 1.5 * len(payload)


# --- helpers and tables ----------------------------------------------------------------------


def test_idempotent_set() -> None:
    assert {Proc.CREATE, Proc.MKDIR, Proc.SYMLINK, Proc.MKNOD, Proc.REMOVE, Proc.RMDIR,
            Proc.RENAME, Proc.LINK}.isdisjoint(nfs3.IDEMPOTENT)  # fmt: skip
    assert nfs3.IDEMPOTENT | {Proc.CREATE, Proc.MKDIR, Proc.SYMLINK, Proc.MKNOD, Proc.REMOVE,
                              Proc.RMDIR, Proc.RENAME, Proc.LINK} == set(Proc)  # fmt: skip


def test_ftype_and_mode_helpers() -> None:
    assert nfs3.ftype_to_mode_bits(Ftype3.REG) == stat.S_IFREG
    assert nfs3.ftype_to_mode_bits(Ftype3.DIR) == stat.S_IFDIR
    assert nfs3.ftype_to_mode_bits(Ftype3.LNK) == stat.S_IFLNK
    assert nfs3.ftype_to_mode_bits(Ftype3.FIFO) == stat.S_IFIFO
    for t in Ftype3:
        assert nfs3.ftype_from_mode(nfs3.ftype_to_mode_bits(t) | 0o644) is t
    with pytest.raises(ValueError):
        nfs3.ftype_from_mode(0o644)
    assert DIR_FATTR.is_dir and not FATTR.is_dir
    assert FATTR.st_mode == stat.S_IFREG | 0o644


def test_nfstime_ns() -> None:
    t = NfsTime(1_700_000_000, 123_456_789)
    assert t.to_ns() == 1_700_000_000_123_456_789
    assert NfsTime.from_ns(t.to_ns()) == t
    assert NfsTime(1, 999_999_999) < NfsTime(2, 0)


def test_constants() -> None:
    assert (nfs3.PROGRAM, nfs3.VERSION, nfs3.NFS3_FHSIZE) == (100003, 3, 64)
    assert nfs3.ACCESS3_READ | nfs3.ACCESS3_LOOKUP | nfs3.ACCESS3_MODIFY == 7
    assert (nfs3.ACCESS3_EXTEND, nfs3.ACCESS3_DELETE, nfs3.ACCESS3_EXECUTE) == (8, 16, 32)
    assert (nfs3.FSF3_LINK, nfs3.FSF3_SYMLINK, nfs3.FSF3_HOMOGENEOUS, nfs3.FSF3_CANSETTIME) == (
        1, 2, 8, 16,
    )  # fmt: skip
    assert SERVER_TIME is TimeHow.SET_TO_SERVER_TIME


def test_errno_table_covers_every_status() -> None:
    statuses = {int(s) for s in Nfsstat3} - {0}
    assert set(errors.NFS3ERR_ERRNO) == statuses
    assert {v: k for k, v in errors.NFS3ERR_NAMES.items()} == {s.name: int(s) for s in Nfsstat3}
    expected = {
        Nfsstat3.NFS3ERR_JUKEBOX: errno.EAGAIN,
        Nfsstat3.NFS3ERR_BADHANDLE: errno.ESTALE,
        Nfsstat3.NFS3ERR_STALE: errno.ESTALE,
        Nfsstat3.NFS3ERR_NOTSUPP: errno.EOPNOTSUPP,
        Nfsstat3.NFS3ERR_SERVERFAULT: errno.EIO,
        Nfsstat3.NFS3ERR_BAD_COOKIE: errno.EINVAL,
        Nfsstat3.NFS3ERR_TOOSMALL: errno.EINVAL,
        Nfsstat3.NFS3ERR_NAMETOOLONG: errno.ENAMETOOLONG,
        Nfsstat3.NFS3ERR_DQUOT: errno.EDQUOT,
        Nfsstat3.NFS3ERR_NOTEMPTY: errno.ENOTEMPTY,
        Nfsstat3.NFS3ERR_ROFS: errno.EROFS,
        Nfsstat3.NFS3ERR_NOT_SYNC: errno.EIO,
        Nfsstat3.NFS3ERR_BADTYPE: errno.EINVAL,
        Nfsstat3.NFS3ERR_NOENT: errno.ENOENT,
        Nfsstat3.NFS3ERR_ACCES: errno.EACCES,
        Nfsstat3.NFS3ERR_XDEV: errno.EXDEV,
    }
    for status, e in expected.items():
        assert errors.nfs_errno(status) == e, status.name
    # Statuses below 35 are the (BSD = Linux) errno of the same number; above they differ.
    for s in Nfsstat3:
        if 0 < s < 35:
            assert errors.NFS3ERR_ERRNO[s] == int(s), s.name
    assert errors.nfs_errno(424242) == errno.EIO


def test_nfs_error() -> None:
    res = LookupRes(Nfsstat3.NFS3ERR_NOENT, dir_attributes=DIR_FATTR)
    e = NfsError(Nfsstat3.NFS3ERR_NOENT, "LOOKUP", res)
    assert (e.status, e.proc, e.res) == (2, "LOOKUP", res)
    assert e.errno == errno.ENOENT
    assert e.name == "NFS3ERR_NOENT"
    assert "NFS3ERR_NOENT" in str(e) and "LOOKUP" in str(e)
    assert isinstance(e, errors.WancacheError)
    again = pickle.loads(pickle.dumps(e))
    assert (again.status, again.proc, again.res) == (2, "LOOKUP", res)
    with pytest.raises(NfsError) as ei:
        nfs3.raise_for_status(res)
    assert ei.value.proc == "LOOKUP" and ei.value.res is res
    nfs3.raise_for_status(GetattrRes(Nfsstat3.NFS3_OK, FATTR))
    nfs3.raise_for_status(NullRes())


@settings(max_examples=100, deadline=None)
@given(any_res)
def test_decoded_results_are_hashable_when_entries_are_absent(res: Any) -> None:
    if not isinstance(res, ReaddirRes | ReaddirplusRes):
        hash(decode_res(proc_of(res), encode_res(res)))
