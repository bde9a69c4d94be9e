"""The soak's measurements over time: what the sampler records, the table and the plot.

Every `interval` seconds the sampler reads the daemon's resident memory and peak
(/proc/PID/status), its open file descriptors (/proc/PID/fd), the sizes on disk of
cache_dir, its block cache (`blocks/`) and its journal (`journal/`) as `du` counts
them, and from the control socket's `status`: dirty bytes, pending changes, RPC calls
and errors.  A remount (a new daemon) restarts the RPC counters; rates account for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.soak_faults import Event
from wancache import control

MIB = 1 << 20


def du(path: Path) -> int:
    """Bytes allocated below `path` (as `du` counts them); files vanishing are skipped."""
    total = 0
    for root, dirs, files in os.walk(path):
        for name in (*dirs, *files):
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    with contextlib.suppress(OSError):
        total += os.lstat(path).st_blocks * 512
    return total


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of `pid` in bytes (empty if it is gone)."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


@dataclass
class Sample:
    """The daemon and its cache_dir at one moment (None: could not be read)."""

    t: float
    pid: int | None = None
    rss: int | None = None
    hwm: int | None = None
    fds: int | None = None
    blocks: int = 0
    journal: int = 0
    cache_dir: int = 0
    dirty: int | None = None
    pending: int | None = None
    rpc_calls: int | None = None
    rpc_errors: int | None = None
    state: str = ""


class Sampler(threading.Thread):
    """Takes a `Sample` every `interval` seconds until `stop` is set."""

    def __init__(self, daemon: Callable[[], tuple[int | None, Path]], cache_dir: Path,
                 t0: float, interval: float) -> None:
        super().__init__(name="sampler", daemon=True)
        self.daemon_of = daemon       # () -> (pid or None, mount point)
        self.cache_dir = cache_dir
        self.t0 = t0
        self.interval = interval
        self.samples: list[Sample] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            self.samples.append(self.take())

    def take(self) -> Sample:
        pid, mountpoint = self.daemon_of()
        s = Sample(round(time.time() - self.t0, 2), pid)
        if pid is not None:
            st = proc_status(pid)
            s.rss, s.hwm = st.get("VmRSS"), st.get("VmHWM")
            with contextlib.suppress(OSError):
                s.fds = len(os.listdir(f"/proc/{pid}/fd"))
        s.blocks = du(self.cache_dir / "blocks")
        s.journal = du(self.cache_dir / "journal")
        s.cache_dir = du(self.cache_dir)
        try:
            st = control.request(mountpoint, "status", timeout=5)
        except (control.ControlError, OSError, ValueError):
            s.state = "no answer"
            return s
        s.state = st["state"]
        s.dirty, s.pending = st["writeback"]["dirty_bytes"], st["writeback"]["pending_ops"]
        s.rpc_calls, s.rpc_errors = st["rpc"]["calls"], st["rpc"]["errors"]
        return s


def _delta(prev: int | None, cur: int | None) -> int:
    """Counter growth between two samples (a new daemon starts again from zero)."""
    if cur is None:
        return 0
    if prev is None or cur < prev:
        return cur
    return cur - prev


@dataclass
class Bucket:
    """Samples of one stretch of time, summarised for the table."""

    start: float
    end: float
    faults: str
    rss: float | None
    fds: int | None
    blocks: float
    journal: float
    cache_dir: float
    dirty: float | None
    rpc_rate: float
    rpc_errors: int


def rates(samples: list[Sample]) -> list[tuple[float, float, int]]:
    """(t, RPC calls per second, RPC errors) between each sample and the one before."""
    out = []
    for a, b in itertools.pairwise(samples):
        dt = b.t - a.t
        calls = _delta(a.rpc_calls, b.rpc_calls) if b.pid == a.pid else (b.rpc_calls or 0)
        errs = _delta(a.rpc_errors, b.rpc_errors) if b.pid == a.pid else (b.rpc_errors or 0)
        out.append((b.t, calls / dt if dt > 0 else 0.0, errs))
    return out


def buckets(samples: list[Sample], events: list[Event], width: float) -> list[Bucket]:
    """The samples in stretches of `width` seconds."""
    if not samples:
        return []
    rate = {t: (r, e) for t, r, e in rates(samples)}
    out = []
    start = 0.0
    last = samples[-1].t
    while start <= last:
        end = start + width
        group = [s for s in samples if start <= s.t < end]
        if group:
            active = sorted({e.name for e in events if e.start < end
                             and (e.end if e.end is not None else last) >= start})

            def top(values: list[int | None]) -> int | None:
                known = [v for v in values if v is not None]
                return max(known) if known else None

            rss = top([s.rss for s in group])
            dirty = top([s.dirty for s in group])
            rs = [rate[s.t] for s in group if s.t in rate]
            out.append(Bucket(
                start, min(end, last), ",".join(active),
                None if rss is None else rss / MIB, top([s.fds for s in group]),
                max(s.blocks for s in group) / MIB, max(s.journal for s in group) / MIB,
                max(s.cache_dir for s in group) / MIB,
                None if dirty is None else dirty / MIB,
                sum(r for r, _ in rs) / len(rs) if rs else 0.0, sum(e for _, e in rs)))
        start = end
    return out


HEAD = ("time", "faults", "RSS MiB", "fds", "blocks MiB", "journal MiB", "cache_dir MiB",
        "dirty MiB", "RPC/s", "RPC errors")


def _cells(rows: list[Bucket]) -> list[list[str]]:
    def n(v: float | None, fmt: str = ".0f") -> str:
        return "-" if v is None else format(v, fmt)

    return [list(HEAD)] + [[
        f"{r.start / 60:4.1f}-{r.end / 60:4.1f} min", r.faults, n(r.rss), n(r.fds),
        n(r.blocks), n(r.journal, ".1f"), n(r.cache_dir), n(r.dirty, ".1f"),
        n(r.rpc_rate), str(r.rpc_errors)] for r in rows]


def table(rows: list[Bucket]) -> str:
    """The stretches as a fixed-width table (maxima within each; RPC/s on average)."""
    cells = _cells(rows)
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEAD))]
    lines = []
    for i, c in enumerate(cells):
        lines.append("  ".join(v.ljust(w) if j < 2 else v.rjust(w)
                               for j, (v, w) in enumerate(zip(c, widths, strict=True))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown(rows: list[Bucket]) -> str:
    """The same table as markdown."""
    cells = _cells(rows)
    sep = "|" + "|".join(" --- " if j < 2 else " ---: " for j in range(len(HEAD))) + "|"
    lines = ["| " + " | ".join(c) + " |" for c in cells]
    return "\n".join([lines[0], sep, *lines[1:]])


def plot(samples: list[Sample], events: list[Event], limits: dict[str, float],
         title: str, path: Path, load_end: float) -> None:
    """Six panels over time, faults shaded: RSS, cache bytes, dirty bytes, fds, RPCs;
    a dotted line where the load ends (then the workloads finish and it flushes)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s.t / 60 for s in samples]

    def mib(values: list[int | None]) -> list[float]:
        return [float("nan") if v is None else v / MIB for v in values]

    fig, axes = plt.subplots(6, 1, figsize=(11, 13), sharex=True)
    ax = axes[0]
    ax.plot(t, mib([s.rss for s in samples]), label="RSS")
    ax.plot(t, mib([s.hwm for s in samples]), label="peak (VmHWM)", alpha=0.6)
    ax.axhline(limits["rss"] / MIB, color="red", ls="--", label="bound")
    ax.set_ylabel("daemon MiB")
    ax = axes[1]
    ax.plot(t, mib([s.cache_dir for s in samples]), label="cache_dir")
    ax.plot(t, mib([s.blocks for s in samples]), label="blocks/")
    ax.plot(t, mib([s.journal for s in samples]), label="journal/")
    ax.axhline(limits["cache_dir"] / MIB, color="red", ls="--", label="bound")
    ax.set_ylabel("on disk MiB")
    axes[2].plot(t, mib([s.dirty for s in samples]), label="dirty")
    axes[2].set_ylabel("dirty MiB")
    axes[3].plot(t, [float("nan") if s.fds is None else s.fds for s in samples], label="fds")
    axes[3].set_ylabel("open fds")
    r = rates(samples)
    axes[4].plot([x / 60 for x, _, _ in r], [y for _, y, _ in r], label="RPC/s")
    axes[4].set_ylabel("RPC calls/s")
    axes[5].bar([x / 60 for x, _, _ in r], [e for _, _, e in r], width=0.02, label="errors",
                color="red")
    axes[5].set_ylabel("RPC errors")
    axes[5].set_xlabel("minutes")
    colors = {"outage": "#d62728", "stall": "#ff7f0e", "ganesha-restart": "#9467bd",
              "kill": "#000000", "disk-full": "#8c564b", "other-client": "#2ca02c",
              "crash": "#e377c2"}
    for ax in axes:
        for ev in events:
            end = ev.end if ev.end is not None else ev.start
            ax.axvspan(ev.start / 60, max(end, ev.start + 2) / 60, alpha=0.15,
                       color=colors.get(ev.name, "grey"))
        ax.axvline(load_end / 60, color="grey", ls=":")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    for ev in events:
        axes[0].text(ev.start / 60, axes[0].get_ylim()[1] * 0.95, ev.name, fontsize=6,
                     rotation=90, va="top")
    axes[0].set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def samples_json(samples: list[Sample]) -> list[dict[str, Any]]:
    return [dataclasses.asdict(s) for s in samples]
