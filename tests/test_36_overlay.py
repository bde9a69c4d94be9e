"""The overlay's data fold against a byte-array model, with flushes in any state."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from wancache.cache.overlay import SERVER, ZERO, FileOp, FileOverlay

MAX = 300


def view(f: FileOverlay, server: bytes, journal: dict[int, bytes],
         offset: int = 0, length: int = MAX * 3) -> bytes:
    """Read through the overlay: server bytes, zeros, journal bytes."""
    out = bytearray()
    for p in f.pieces(offset, length):
        if p.source == SERVER:
            chunk = server[p.start:p.start + p.length]
            assert len(chunk) == p.length, "server bytes asked for beyond the server's size"
            out += chunk
        elif p.source == ZERO:
            out += bytes(p.length)
        else:
            out += journal[p.source][p.skip:p.skip + p.length]
    return bytes(out)


def apply(model: bytearray, op: FileOp, journal: dict[int, bytes]) -> None:
    if op.is_truncate:
        del model[op.offset:]
        model.extend(bytes(op.offset - len(model)))
    else:
        data = journal[op.seq][op.skip:op.skip + op.length]
        model.extend(bytes(max(0, op.offset - len(model))))
        model[op.offset:op.offset + op.length] = data


ops_strategy = st.lists(st.one_of(
    st.tuples(st.just("w"), st.integers(0, MAX), st.integers(1, 80)),
    st.tuples(st.just("t"), st.integers(0, MAX), st.just(0))), max_size=25)


def make_ops(raw: list[tuple[str, int, int]]) -> tuple[list[FileOp], dict[int, bytes]]:
    ops, journal = [], {}
    for seq, (kind, a, b) in enumerate(raw, start=1):
        if kind == "w":
            journal[seq] = bytes([seq % 251 + 1]) * (b + 3)
            ops.append(FileOp(seq, a, b, 3))
        else:
            ops.append(FileOp(seq, a))
    return ops, journal


@settings(max_examples=400)
@given(server=st.binary(max_size=MAX), raw=ops_strategy, data=st.data())
def test_fold_reads_like_the_model_at_every_flush_state(server: bytes, raw: list,
                                                        data: st.DataObject) -> None:
    ops, journal = make_ops(raw)
    want = bytearray(server)
    for op in ops:
        apply(want, op, journal)
    f = FileOverlay.fold(len(server), ops)
    assert f.size == len(want)
    assert view(f, server, journal) == bytes(want)
    off = data.draw(st.integers(0, MAX * 2))
    n = data.draw(st.integers(0, MAX))
    assert view(f, server, journal, off, n) == bytes(want[off:off + n])
    # A prefix reached the server; the server may also hold any part of the next
    # batch (in flight): the view must not change either way.
    done = data.draw(st.integers(0, len(ops)))
    flushed = bytearray(server)
    for op in ops[:done]:
        apply(flushed, op, journal)
    rest = ops[done:]
    g = FileOverlay.fold(len(flushed), rest)
    partial = bytearray(flushed)
    for op in rest:
        if data.draw(st.booleans()):
            apply(partial, op, journal)   # the server applied some of it, in any subset
    # (reads use server bytes only below base_limit, which no pending op touches)
    assert view(g, bytes(partial), journal) == bytes(want)


@given(raw=ops_strategy)
def test_runs_cover_the_extents_and_respect_the_limit(raw: list) -> None:
    ops, _ = make_ops(raw)
    f = FileOverlay.fold(0, ops)
    runs = f.runs(64)
    flat = [e for run in runs for e in run]
    assert sum(e.length for e in flat) == sum(e.length for e in f.extents)
    for run in runs:
        assert sum(e.length for e in run) <= 64
        assert all(a.end == b.start for a, b in itertools.pairwise(run))
