"""Counters of RPC calls: per procedure, bytes, latency, calls in flight.

The transport records into one `RpcStats`; the caches, the tests (which assert
round-trip counts, never wall-clock times) and the Prometheus exporter read it.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field

# Latency histogram bucket upper bounds, seconds (WAN round trips are 1 ms .. seconds).
LATENCY_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class ProcStats:
    """Totals for one procedure, e.g. "nfs3.READ"."""

    calls: int = 0
    errors: int = 0
    retransmits: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))


@dataclass
class RpcStats:
    """All RPC counters of one mount (shared by its transports)."""

    procs: dict[str, ProcStats] = field(default_factory=dict)
    in_flight: int = 0
    max_in_flight: int = 0
    reconnects: int = 0
    late_replies: int = 0
    failed_fast: int = 0    # calls refused unsent while the server was known unreachable

    def proc(self, name: str) -> ProcStats:
        """The counters of `name`, created on first use."""
        st = self.procs.get(name)
        if st is None:
            st = self.procs[name] = ProcStats()
        return st

    def started(self, name: str, nbytes: int) -> None:
        """A call went out (counted when first sent, not per retransmission)."""
        st = self.proc(name)
        st.calls += 1
        st.bytes_sent += nbytes
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def finished(self, name: str, seconds: float, nbytes: int, *, ok: bool) -> None:
        """A call ended (with a reply of `nbytes`, or an error)."""
        st = self.proc(name)
        self.in_flight -= 1
        st.bytes_received += nbytes
        st.seconds += seconds
        st.buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        if not ok:
            st.errors += 1

    def retransmitted(self, name: str, nbytes: int) -> None:
        """A call was sent again (after a reconnect or a timeout)."""
        st = self.proc(name)
        st.retransmits += 1
        st.bytes_sent += nbytes

    def calls(self, prefix: str = "nfs3.") -> Counter[str]:
        """Calls per procedure name (without the prefix) whose name starts with `prefix`."""
        return Counter({k[len(prefix):]: v.calls for k, v in self.procs.items()
                        if k.startswith(prefix) and v.calls})

    def total_calls(self, prefix: str = "nfs3.", *, exclude: tuple[str, ...] = ()) -> int:
        """Sum of calls under `prefix`, leaving out the procedures named in `exclude`."""
        return sum(n for k, n in self.calls(prefix).items() if k not in exclude)

    def reset(self) -> None:
        """Zero the counters (calls in flight stay counted)."""
        self.procs.clear()
        self.max_in_flight = self.in_flight
        self.reconnects = self.late_replies = self.failed_fast = 0

    def snapshot(self) -> Counter[str]:
        """A copy of the per-procedure call counts (all programs), for diffs in tests."""
        return Counter({k: v.calls for k, v in self.procs.items() if v.calls})
