"""The metadata caches on disk, so a restart (even while the server is unreachable)
starts from them instead of re-reading every directory.

`cache_dir/state.pickle` (0600, written atomically) holds what the server told us
at mount time (`ServerInfo`), the attribute cache and the directory listings.  On
load every entry comes back *expired*: trusted only after one GETATTR shows it is
unchanged, or, while the server cannot be reached, served as it was (the mount
is then disconnected and says so).  A missing, damaged or foreign file is not an
error: the caches simply start empty.  The cache directory is root-only, so
pickle's trust-what-you-load is acceptable here.
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
    return state
