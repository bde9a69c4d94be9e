"""Attribute cache: every attribute the server sends, held under a lease.

An entry is trusted without asking the server until its lease expires; then one
GETATTR revalidates it.  Leases adapt like the Linux NFS client's attribute
timeouts: a file seen for the first time gets a lease proportional to how long ago
it last changed (a tenth of its age), within acregmin..acregmax (acdirmin..acdirmax
for directories); each revalidation that finds it unchanged doubles the lease up to
the maximum, and any change resets it to the minimum.

A lease is counted from the moment the call that returned the attributes was
*sent*, so a reply delayed by the WAN never extends what we trust.

Memory (issue 14): an entry is kept packed, the lease times and every attribute in
one 100-byte `bytes` object (~140 bytes; a Fattr3 with its three NfsTimes, rdev
tuple, ints and an entry object took ~800), in a plain LRU of one OrderedDict.  The
`AttrEntry` and `Fattr3` callers see are made from it when asked for.
"""

from __future__ import annotations

import math
import struct
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace

import trio
from cachetools import LRUCache

from wancache.config import Config
from wancache.nfs_backend.nfs3 import Fattr3, Ftype3, NfsTime, WccAttr

from .lru import Lru

# (handle, old attributes or None, new attributes, the change was our own)
ChangeListener = Callable[[bytes, Fattr3 | None, Fattr3, bool], None]


def version(attrs: Fattr3) -> tuple[int, int, int]:
    """What identifies a file's state: (mtime, ctime, size)."""
    return (attrs.mtime.to_ns(), attrs.ctime.to_ns(), attrs.size)


def data_version(attrs: Fattr3) -> str:
    """The version string data caches key a file's blocks by."""
    m, c, s = version(attrs)
    return f"{m:x}-{c:x}-{s:x}"


def content_version_of(mtime_ns: int, size: int) -> str:
    """`content_version` of a file with this mtime and size."""
    return f"{mtime_ns:x}-{size:x}"


def content_version(attrs: Fattr3) -> str:
    """What tells another writer changed a file's contents: (mtime, size).

    ctime is left out on purpose: our own LINK, RENAME or chmod change it too, and
    those are not conflicts.  (A writer who restores mtime and size goes unnoticed.)
    """
    return content_version_of(attrs.mtime.to_ns(), attrs.size)


def _pre_version(before: WccAttr) -> tuple[int, int, int]:
    return (before.mtime.to_ns(), before.ctime.to_ns(), before.size)


@dataclass(slots=True)
class AttrEntry:
    """Attributes and their lease."""

    attrs: Fattr3
    fetched: float      # trio clock: when the call that brought them was sent
    lease: float        # seconds

    @property
    def expires(self) -> float:
        return self.fetched + self.lease

    @property
    def before_our_change(self) -> bool:
        """Kept across a `barrier` without a reply showing our change: older than it."""
        return self.fetched == -math.inf

    def remaining(self, now: float) -> float:
        return max(0.0, self.expires - now)


# fetched, lease, then fattr3's fields in XDR order (rdev and the times flattened).
_PACKED = struct.Struct("=ddIIIIIQQIIQQIIIIII")
_FTYPES = {int(t): t for t in Ftype3}


def _pack(attrs: Fattr3, fetched: float, lease: float) -> bytes | AttrEntry:
    """An entry in its compact form (attributes no fattr3 can carry: kept as they are)."""
    at, mt, ct = attrs.atime, attrs.mtime, attrs.ctime
    if type(attrs.type) is not Ftype3 or type(attrs.rdev) is not tuple or \
            type(at) is not NfsTime or type(mt) is not NfsTime or type(ct) is not NfsTime:
        return AttrEntry(attrs, fetched, lease)
    try:
        return _PACKED.pack(fetched, lease, attrs.type, attrs.mode, attrs.nlink, attrs.uid,
                            attrs.gid, attrs.size, attrs.used, attrs.rdev[0], attrs.rdev[1],
                            attrs.fsid, attrs.fileid, at.seconds, at.nseconds, mt.seconds,
                            mt.nseconds, ct.seconds, ct.nseconds)
    except (struct.error, TypeError, ValueError, IndexError):
        return AttrEntry(attrs, fetched, lease)


def _unpack(stored: bytes | AttrEntry) -> AttrEntry:
    if type(stored) is not bytes:
        assert isinstance(stored, AttrEntry)
        return stored
    (fetched, lease, t, mode, nlink, uid, gid, size, used, r1, r2, fsid, fileid,
     a_s, a_ns, m_s, m_ns, c_s, c_ns) = _PACKED.unpack(stored)  # fmt: skip
    at = NfsTime(a_s, a_ns)     # (equal times share one object: it is immutable)
    mt = at if m_s == a_s and m_ns == a_ns else NfsTime(m_s, m_ns)
    ct = mt if c_s == m_s and c_ns == m_ns else NfsTime(c_s, c_ns)
    return AttrEntry(Fattr3(_FTYPES[t], mode, nlink, uid, gid, size, used, (r1, r2), fsid,
                            fileid, at, mt, ct), fetched, lease)


_LEASE = struct.Struct("=dd")
HOT_ENTRIES = 1024   # entries last made into AttrEntry objects, kept made (speed)


def _times(stored: bytes | AttrEntry) -> tuple[float, float]:
    """(fetched, lease) of a stored entry, without decoding the attributes."""
    if type(stored) is bytes:
        fetched, lease = _LEASE.unpack_from(stored)
        return fetched, lease
    assert isinstance(stored, AttrEntry)
    return stored.fetched, stored.lease


class SavedAttrs(Mapping[bytes, Fattr3]):
    """The entries to be saved (`persist`), handle -> attributes, as they are kept:
    pickled packed, they cost nothing to hand over (100 000 Fattr3 objects, each
    reduced to lists the pickler keeps until done, took ~170 MiB at its peak)."""

    __slots__ = ("_stored",)

    def __init__(self, stored: dict[bytes, bytes | AttrEntry]) -> None:
        self._stored = stored

    def __getitem__(self, fh: bytes) -> Fattr3:
        return _unpack(self._stored[fh]).attrs

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._stored)

    def __len__(self) -> int:
        return len(self._stored)

    def __getstate__(self) -> dict[bytes, bytes | AttrEntry]:
        return self._stored

    def __setstate__(self, state: dict[bytes, bytes | AttrEntry]) -> None:
        self._stored = state


@dataclass
class AttrStats:
    hits: int = 0
    misses: int = 0
    changes: int = 0


class AttrCache:
    """handle -> attributes under an adaptive lease (LRU, bounded by entry count)."""

    def __init__(self, cfg: Config, *, enabled: bool = True) -> None:
        self.cfg = cfg
        self.enabled = enabled
        self._entries: Lru[bytes, bytes | AttrEntry] = Lru(cfg.attr_entries)
        # handle -> (stored, its AttrEntry): a file is often asked for a few times
        # in a row (readdir, then stat, open, fstat), and making the objects again
        # costs a few microseconds.  Valid while `stored` is what is kept.
        self._made: dict[bytes, tuple[bytes | AttrEntry, AttrEntry]] = {}
        self.listeners: list[ChangeListener] = []
        self.stats = AttrStats()
        # handle -> when our own last change to it was known done on the server
        self._barriers: LRUCache[bytes, float] = LRUCache(maxsize=cfg.attr_entries)

    def __len__(self) -> int:
        return len(self._entries)

    def _put(self, fh: bytes, attrs: Fattr3, fetched: float, lease: float) -> None:
        self._entries[fh] = _pack(attrs, fetched, lease)

    def _entry(self, fh: bytes, stored: bytes | AttrEntry) -> AttrEntry:
        made = self._made.get(fh)
        if made is not None and made[0] is stored:
            return made[1]
        entry = _unpack(stored)
        if entry is not stored:
            made_ = self._made
            made_.pop(fh, None)
            if len(made_) >= HOT_ENTRIES:
                del made_[next(iter(made_))]
            made_[fh] = (stored, entry)
        return entry

    def _valid_entry(self, fh: bytes) -> AttrEntry | None:
        stored = self._entries.get(fh)
        if stored is None:
            return None
        fetched, lease = _times(stored)
        return self._entry(fh, stored) if fetched + lease > trio.current_time() else None

    def peek(self, fh: bytes) -> AttrEntry | None:
        """The entry, valid or not (not counted as a hit or miss)."""
        stored = self._entries.get(fh)
        return self._entry(fh, stored) if stored is not None else None

    def get(self, fh: bytes) -> AttrEntry | None:
        """The entry if its lease still holds (counted as hit or miss)."""
        entry = self._valid_entry(fh)
        if entry is not None:
            self.stats.hits += 1
            return entry
        self.stats.misses += 1
        return None

    def valid(self, fh: bytes) -> Fattr3 | None:
        """Attributes within their lease, without counting a hit or miss."""
        entry = self._valid_entry(fh)
        return entry.attrs if entry is not None else None

    def holds(self, fh: bytes) -> bool:
        """`valid(fh) is not None`, without making the attributes."""
        stored = self._entries.get(fh)
        if stored is None:
            return False
        fetched, lease = _times(stored)
        return fetched + lease > trio.current_time()

    def remaining(self, fh: bytes) -> float:
        """Seconds left on the lease of `fh` (0 if unknown or expired)."""
        stored = self._entries.get(fh)
        if stored is None:
            return 0.0
        fetched, lease = _times(stored)
        return max(0.0, fetched + lease - trio.current_time())

    def _bounds(self, attrs: Fattr3) -> tuple[float, float]:
        return self.cfg.lease_bounds(attrs.type is Ftype3.DIR)

    def _first_lease(self, attrs: Fattr3) -> float:
        lo, hi = self._bounds(attrs)
        age = max(0.0, time.time() - attrs.mtime.seconds)
        return min(hi, max(lo, age / 10))

    def update(self, fh: bytes, attrs: Fattr3, before: WccAttr | None, when: float) -> None:
        """Attributes the server sent (with pre-op attributes `before` if any) in a
        reply to a call sent at `when` (the client's AttrSink signature)."""
        if not self.enabled:
            return
        if when < self._barriers.get(fh, -math.inf):
            return   # sent before our own change was done: it may not show it
        stored = self._entries.get(fh)
        if stored is not None and _times(stored)[0] > when:
            return   # a newer reply already arrived
        old = self._entry(fh, stored) if stored is not None else None
        lo, hi = self._bounds(attrs)
        if old is None:
            lease = self._first_lease(attrs)
        elif version(old.attrs) != version(attrs):
            lease = lo
        elif old.expires <= when:
            lease = min(hi, max(lo, old.lease * 2))   # revalidated, unchanged
        else:
            lease = min(hi, max(lo, old.lease))
        self._put(fh, attrs, when, lease)
        if old is not None and version(old.attrs) != version(attrs):
            self.stats.changes += 1
            ours = before is not None and _pre_version(before) == version(old.attrs)
            for listener in self.listeners:
                listener(fh, old.attrs, attrs, ours)

    def barrier(self, fh: bytes, done: float, after: Fattr3 | None = None,
                sent: float | None = None, *, nlink: int = 0) -> None:
        """Our own change to `fh` was done on the server at `done`: attributes from
        calls sent before then may not show it, so they are dropped, and replies to
        such calls still on their way are ignored.  `after`: the attributes the
        change's last call (sent at `sent`) returned, which do show it."""
        self._barriers[fh] = done
        old = self.peek(fh)
        if after is None:
            if old is not None:     # kept (the last we knew), but asked again first
                attrs = old.attrs if not nlink else \
                    replace(old.attrs, nlink=max(0, old.attrs.nlink + nlink))
                self._put(fh, attrs, -math.inf, 0.0)
            return
        if self.enabled:
            lo, _ = self._bounds(after)
            self._put(fh, after, done if sent is None else sent, lo)
            if old is not None and version(old.attrs) != version(after):
                for listener in self.listeners:
                    listener(fh, old.attrs, after, True)

    def load(self, fh: bytes, attrs: Fattr3) -> None:
        """An entry saved before a restart: known, but expired (revalidate first)."""
        if self.enabled and fh not in self._entries:
            self._put(fh, attrs, -math.inf, 0.0)

    def items(self) -> list[tuple[bytes, Fattr3]]:
        """Every (handle, attributes)."""
        return [(fh, _unpack(stored).attrs) for fh, stored in self._entries.items()]

    def saved(self, keep: Callable[[bytes], bool]) -> SavedAttrs:
        """The entries of the handles `keep` accepts, for saving."""
        return SavedAttrs({fh: stored for fh, stored in self._entries.items() if keep(fh)})

    def expire(self, fh: bytes) -> None:
        """Force the next use of `fh` to revalidate (keeps the attributes)."""
        entry = self.peek(fh)
        if entry is not None:
            lease = min(entry.lease, max(0.0, trio.current_time() - entry.fetched))
            if lease != entry.lease:
                self._put(fh, entry.attrs, entry.fetched, lease)

    def forget(self, fh: bytes) -> None:
        self._entries.pop(fh, None)
        self._made.pop(fh, None)
