"""What holds the daemon's memory: the `memory` control command (for developers).

`action`:

* `start`: trace Python allocations from now on (tracemalloc, `frames` deep);
* `top`: the `limit` source lines holding the most traced memory now, with the
  traced total and peak, and the process's RSS;
* `stop`: stop tracing (tracing costs memory and time);
* `trim`: give the C allocator's free memory back to the system (glibc
  `malloc_trim`), and say how much RSS that gave back: what stays is in use.

`tasks` (not a `memory` action: it runs on the trio thread) counts the trio tasks
alive by name.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import tracemalloc
from collections import Counter
from typing import Any

from wancache.snapshot import all_tasks, read_process

MiB = 1 << 20


def _rss() -> int:
    return read_process()[0]


def top(limit: int = 25, group: str = "lineno") -> dict[str, Any]:
    """The biggest holders of traced memory (tracing must have been started)."""
    if not tracemalloc.is_tracing():
        raise ValueError("memory tracing is off: send action=start first")
    snap = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(False, tracemalloc.__file__)])
    stats = snap.statistics(group)
    current, peak = tracemalloc.get_traced_memory()
    return {"rss_bytes": _rss(), "traced_bytes": current, "traced_peak_bytes": peak,
            "top": [{"where": str(s.traceback.format(limit=4)), "bytes": s.size,
                     "blocks": s.count} for s in stats[:limit]]}


def object_counts(limit: int = 25) -> list[tuple[str, int]]:
    """The most numerous object types the garbage collector tracks."""
    return Counter(type(o).__qualname__ for o in gc.get_objects()).most_common(limit)


def trim() -> dict[str, int]:
    """glibc malloc_trim(0): RSS before and after."""
    before = _rss()
    gc.collect()
    name = ctypes.util.find_library("c")
    if name is not None:
        ctypes.CDLL(name).malloc_trim(0)
    return {"rss_before": before, "rss_after": _rss()}


def command(req: dict[str, Any]) -> Any:
    """Answer a `memory` control request."""
    action = req.get("action", "top")
    limit = int(req.get("limit", 25))
    if action == "start":
        tracemalloc.start(int(req.get("frames", 8)))
        return {"tracing": True}
    if action == "stop":
        tracemalloc.stop()
        return {"tracing": False}
    if action == "top":
        return {**top(limit, str(req.get("group", "lineno"))), "objects": object_counts(limit)}
    if action == "trim":
        return trim()
    raise ValueError(f"memory action must be start, top, stop or trim, not {action!r}")


def tasks(limit: int = 25) -> list[tuple[str, int]]:
    """The most common names of the trio tasks alive (call on the trio thread)."""
    return Counter(task.name for task in all_tasks()).most_common(limit)
