"""Directory cache: listings (names, handles, types, cookies) and negative lookups.

A listing is valid while its directory's attributes are within their lease and
still show the version (mtime, ctime, size) the listing was read at; the store
decides with one GETATTR when that lease has run out.  Our own changes to a
directory patch its listing when the reply's pre-operation attributes prove that
nobody else changed the directory in between; otherwise the listing is dropped.

A directory the write-back layer created gets an empty listing of its own, trusted
for the directory lease without version checks (every change in it so far is
ours, and their replies may come back in any order).

A name that is not there is remembered for `neg_lease` seconds, per directory
(LRU, bounded), and forgotten at once when we create that name ourselves.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio
from cachetools import LRUCache

from wancache.config import Config
from wancache.nfs_backend.nfs3 import Ftype3

NEGATIVE_ENTRIES = 100_000


@dataclass(slots=True)
class DirRecord:
    """One name in a listing."""

    name: bytes
    fileid: int
    fh: bytes | None
    ftype: Ftype3 | None

    def __reduce__(self) -> tuple[type[DirRecord], tuple[bytes, int, bytes | None, Ftype3 | None]]:
        # Pickled (the saved state) as one tuple: the default state list and reduce
        # tuples, kept by the pickler until done, took ~400 bytes a record.
        return (DirRecord, (self.name, self.fileid, self.fh, self.ftype))


@dataclass
class Listing:
    """A whole directory as read with READDIRPLUS, in server order (a dict keeps the
    order and makes adding and removing a name O(1))."""

    by_name: dict[bytes, DirRecord]
    version: tuple[int, int, int]
    # A directory we created ourselves is known without asking: until then its
    # listing is trusted as ours, whatever order our own changes' replies come in.
    trusted_until: float = 0.0

    @classmethod
    def of(cls, records: list[DirRecord], version: tuple[int, int, int]) -> Listing:
        return cls({r.name: r for r in records}, version)

    def __len__(self) -> int:
        return len(self.by_name)

    @property
    def records(self) -> list[DirRecord]:
        """A snapshot of the entries, in order."""
        return list(self.by_name.values())

    def add(self, name: bytes, fileid: int, fh: bytes | None, ftype: Ftype3 | None) -> None:
        """A name we created (replaces an existing one of that name)."""
        self.by_name.pop(name, None)
        self.by_name[name] = DirRecord(name, fileid, fh, ftype)

    def remove(self, name: bytes) -> DirRecord | None:
        """A name we removed."""
        return self.by_name.pop(name, None)


@dataclass
class DirStats:
    """Listings and lookups answered from the cache (hits) or not (misses)."""

    hits: int = 0
    misses: int = 0


class DirCache:
    """dir handle -> Listing (LRU bounded by the total number of names)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.stats = DirStats()
        self._listings: LRUCache[bytes, Listing] = LRUCache(
            maxsize=cfg.dir_entries, getsizeof=lambda listing: len(listing) + 1)
        self._negative: LRUCache[tuple[bytes, bytes], float] = LRUCache(NEGATIVE_ENTRIES)

    def __len__(self) -> int:
        return len(self._listings)

    def get(self, fh: bytes) -> Listing | None:
        return self._listings.get(fh)

    def put(self, fh: bytes, listing: Listing) -> None:
        if len(listing) + 1 <= self._listings.maxsize:
            self._listings[fh] = listing

    def drop(self, fh: bytes) -> Listing | None:
        return self._listings.pop(fh, None)

    def items(self) -> list[tuple[bytes, Listing]]:
        return list(self._listings.items())

    # -- negative lookups -----------------------------------------------------------

    def remember_missing(self, dir_fh: bytes, name: bytes, when: float) -> None:
        """`name` was not in `dir_fh` according to a call sent at `when`."""
        if self.cfg.neg_lease > 0:
            self._negative[(dir_fh, name)] = when + self.cfg.neg_lease

    def missing_for(self, dir_fh: bytes, name: bytes) -> float:
        """Seconds `name` is still known to be missing (0: not known)."""
        expires = self._negative.get((dir_fh, name))
        if expires is None:
            return 0.0
        left = expires - trio.current_time()
        if left <= 0:
            del self._negative[(dir_fh, name)]
            return 0.0
        return left

    def forget_missing(self, dir_fh: bytes, name: bytes) -> None:
        self._negative.pop((dir_fh, name), None)
