"""The metadata caches on disk, so a restart (even while the server is unreachable)
starts from them instead of re-reading every directory.

`cache_dir/state.pickle` (0600, written atomically) holds what the server told us
at mount time (`ServerInfo`), the attribute cache and the directory listings.  On
load every entry comes back *expired*: trusted only after one GETATTR shows it is
unchanged, or, while the server cannot be reached, served as it was (the mount
is then disconnected and says so).  A missing, damaged or foreign file is not an
error: the caches simply start empty.  The cache directory is root-only, so
pickle's trust-what-you-load is acceptable here.

Serving saved entries while disconnected is right only for a state saved at a clean
unmount.  A mount that serves marks the cache_dir (`state.inuse`) until its last
save; a state found with the mark is from a run that died (kill -9, power loss), up
to a minute after its last save, and may predate our own changes flushed since
(served as it was, it would show a listing without the files made since, and the
files in it at their old sizes).  Of such a state the listings and names are
dropped: no path leads to its attributes while disconnected (they still serve the
replay of the journal, as the handles it names).
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from wancache.nfs_backend.client import ServerInfo
from wancache.nfs_backend.nfs3 import Fattr3

from .dirs import DirRecord

log = logging.getLogger(__name__)

FORMAT = 1
STATE_FILE = "state.pickle"
IN_USE = "state.inuse"


@dataclass
class SavedState:
    """Everything worth keeping across a restart."""

    format: int = FORMAT
    export: str = ""
    info: ServerInfo | None = None
    attrs: Mapping[bytes, Fattr3] = field(default_factory=dict)
    listings: dict[bytes, tuple[tuple[int, int, int], list[DirRecord]]] = field(
        default_factory=dict)
    names: dict[tuple[bytes, bytes], bytes] = field(default_factory=dict)   # looked up


def save_state(cache_dir: Path, state: SavedState) -> None:
    """Write `state` atomically (temp file, fsync, rename)."""
    path = cache_dir / STATE_FILE
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        pickle.dump(state, f, protocol=pickle.HIGHEST_PROTOCOL)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_state(cache_dir: Path, export: str) -> SavedState | None:
    """The saved state of `export` under `cache_dir`, or None."""
    path = cache_dir / STATE_FILE
    try:
        with path.open("rb") as f:
            state = pickle.load(f)
    except FileNotFoundError:
        return None
    except Exception as exc:   # damaged or from another version: start empty
        log.info("ignoring saved metadata %s: %s", path, exc)
        return None
    if not isinstance(state, SavedState) or state.format != FORMAT or state.export != export:
        return None
    if (cache_dir / IN_USE).exists():
        log.info("the last mount did not end cleanly: its saved listings are not used")
        state.listings, state.names = {}, {}
    return state


def mark_in_use(cache_dir: Path) -> None:
    """A mount serves from `cache_dir`: until `mark_clean`, a saved state may be stale."""
    fd = os.open(cache_dir / IN_USE, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    _sync_dir(cache_dir)


def mark_clean(cache_dir: Path) -> None:
    """The state just saved in `cache_dir` is that of a clean unmount."""
    try:
        os.unlink(cache_dir / IN_USE)
    except FileNotFoundError:
        return
    _sync_dir(cache_dir)


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
