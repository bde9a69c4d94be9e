"""The parts of one mount, as the composition root (mount.py) wired them: what the
control socket and the metrics exporter look at."""

from __future__ import annotations

from dataclasses import dataclass

from wancache.cache.blocks import BlockStore
from wancache.cache.flusher import Flusher
from wancache.cache.journal import Journal
from wancache.cache.store import Store
from wancache.cache.writeback import WriteBack
from wancache.config import Config
from wancache.nfs_backend.client import NfsClient


@dataclass
class Components:
    """One mount's parts; the write-back ones are None when writing through."""

    cfg: Config
    client: NfsClient
    store: Store
    blocks: BlockStore | None = None
    journal: Journal | None = None
    writeback: WriteBack | None = None
    flusher: Flusher | None = None
