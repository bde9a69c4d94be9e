"""Our own changes, once the server has them: keep every cache right.

Both write policies report here: write-through right after each call, write-back
when the flusher has put a change on the server.  A directory's cached listing is
patched when the reply proves nobody else changed the directory in between (else
dropped); a file's attributes get a barrier (replies to calls sent before our change
was done cannot show it) and its cached blocks go (a block fetched before the change
could carry old bytes under a version that looks current).

Times: NFSv3 clients cannot set ctime, and a directory's mtime on the server is the
server's time of our last change in it.  Users here saw the times of their own
changes; so that those do not jump when the flush lands, the local mtime and ctime
keep being shown while the server's still are the ones our flush produced (`Times`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import trio
from cachetools import LRUCache

from wancache.config import Config
from wancache.nfs_backend.nfs3 import Fattr3, Ftype3, NfsTime, WccData

from .attrs import AttrCache, version
from .data import DataCache
from .dirs import DirCache, Listing
from .node import Node
from .nodes import NodeTable

DIR_GENERATIONS = 100_000   # directories whose count of our changes we keep
EntryListener = Callable[[Node, bytes], None]


@dataclass(slots=True)
class _Mask:
    """Show `local` (mtime, ctime[, size]) while the server's are `server` (None: not
    seen yet)."""

    local: tuple[int, ...]
    server: tuple[int, ...] | None = None


def _shown(attrs: Fattr3) -> tuple[int, ...]:
    """What a mask keeps: the times, and a directory's size (it depends on the server's
    file system, and tar calls a directory whose size changes one that changed)."""
    times = (attrs.mtime.to_ns(), attrs.ctime.to_ns())
    return (*times, attrs.size) if attrs.type is Ftype3.DIR else times


class Times:
    """Local mtime/ctime kept on display over the server's own (see module doc)."""

    def __init__(self, entries: int) -> None:
        self._masks: LRUCache[bytes, _Mask] = LRUCache(entries)

    def keep(self, fh: bytes, local: Fattr3, server: Fattr3 | None = None) -> None:
        """Our changes to `fh` are all on the server: go on showing `local`'s times
        over `server`'s (the attributes right after them; None: the next seen)."""
        self._masks[fh] = _Mask(_shown(local), _shown(server) if server is not None else None)

    def show(self, fh: bytes, attrs: Fattr3, *, stale: bool = False) -> Fattr3:
        """`attrs` as users here should see them; `stale`: attributes known to be
        older than our change (they must not become the server's values a mask
        compares with: the first reply after the change would then look like
        another client's change, and the local times would jump)."""
        mask = self._masks.get(fh)
        if mask is None:
            return attrs
        now = _shown(attrs)
        if mask.server is None and stale:
            pass
        elif mask.server is None:
            mask.server = now
        elif mask.server != now or len(now) != len(mask.local):
            del self._masks[fh]      # changed since: the server's values are the news
            return attrs
        local = mask.local
        shown = replace(attrs, mtime=NfsTime.from_ns(local[0]), ctime=NfsTime.from_ns(local[1]))
        return replace(shown, size=local[2]) if len(local) > 2 else shown

    def forget(self, fh: bytes) -> None:
        self._masks.pop(fh, None)


class OwnChanges:
    """Applies our own changes, once on the server, to the metadata and data caches."""

    def __init__(self, cfg: Config, nodes: NodeTable, attrs: AttrCache, dirs: DirCache,
                 data: DataCache | None) -> None:
        self.cfg = cfg
        self.nodes = nodes
        self.attrs = attrs
        self.dirs = dirs
        self.data = data
        self.times = Times(cfg.attr_entries)
        self.entry_listeners: list[EntryListener] = []   # a name went away
        # Count of our own changes applied to each directory (listing consistency).
        self._generations: LRUCache[bytes, int] = LRUCache(DIR_GENERATIONS)

    def generation(self, dir_fh: bytes) -> int:
        return self._generations.get(dir_fh, 0)

    def dir_changed(self, parent: Node, wcc: WccData, name: bytes, *,
                    added: Node | None = None, added_attrs: Fattr3 | None = None,
                    removed: bool = False) -> None:
        """We changed `name` in `parent`: patch its listing if the reply proves nobody
        else changed the directory in between, else drop it."""
        if removed:
            self.child_gone(parent, name)
        self.dirs.forget_missing(parent.fh, name)
        self._generations[parent.fh] = self.generation(parent.fh) + 1
        listing = self.dirs.get(parent.fh)
        if listing is None:
            return
        if listing.trusted_until <= trio.current_time() and (
                wcc.before is None or wcc.after is None or
                (wcc.before.mtime.to_ns(), wcc.before.ctime.to_ns(), wcc.before.size)
                != listing.version):
            self.dirs.drop(parent.fh)
            return
        if removed:
            listing.remove(name)
        if added is not None and not added.is_local:
            ftype = added_attrs.type if added_attrs is not None else added.ftype
            listing.add(name, added.fileid, added.fh, ftype)
        if wcc.after is not None:
            listing.version = version(wcc.after)

    def child_gone(self, parent: Node, name: bytes) -> None:
        """A name went away: its node's attributes (nlink, ctime) are stale now, for
        its other names too; a removed directory's listing goes."""
        fh = self.nodes.forget_name(parent, name)
        listing = self.dirs.get(parent.fh)
        rec = listing.by_name.get(name) if listing is not None else None
        if rec is not None and rec.fh is not None:
            fh = rec.fh
            if rec.ftype is Ftype3.DIR:
                self.dirs.drop(rec.fh)
        if fh is not None:
            self.attrs.expire(fh)
        for listener in self.entry_listeners:
            listener(parent, name)

    def own_dir(self, node: Node, attrs: Fattr3) -> None:
        """`node` is a directory we just created on the server: it is empty but for
        what we put in it, so our listing of it is trusted for the directory lease."""
        lo, _ = self.cfg.lease_bounds(True)
        self.dirs.put(node.fh, Listing({}, version(attrs),
                                       trusted_until=trio.current_time() + lo))

    def file_changed(self, node: Node, after: Fattr3 | None = None,
                     sent: float | None = None, *, nlink: int = 0) -> None:
        """Our change to `node`'s data or attributes is done on the server; `after`
        (from a call sent at `sent`) shows it, if known; else `nlink` is what it did to
        the link count (the attributes kept until asked again are not to show more
        links than there are)."""
        self.attrs.barrier(node.fh, trio.current_time(), after, sent, nlink=nlink)
        if self.data is not None and node.ftype is Ftype3.REG and not nlink:
            self.data.changed(node.key)

    def file_removed(self, node: Node) -> None:
        """`node`'s last name is gone (here at once, on the server once flushed): a
        path looked up before is ENOENT from now on; its cached blocks are garbage."""
        node.gone = True
        self.times.forget(node.fh)
        if self.data is not None and node.ftype is Ftype3.REG:
            self.data.forget(node.key)
