"""The soak's faults and when they happen.

Each fault begins, holds for a while and ends; faults never overlap, and each is
followed by a quiet gap, so a workload step that fails can be told apart from one
that should have worked (see `FaultLog.overlaps`).  The schedule leaves a warm-up at
the start and a quiet tail at the end, and repeats the chosen faults as long as they
fit.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Protocol


class Env(Protocol):
    """What a fault acts on (see `bench.soak.SoakEnv`)."""

    def wan_down(self, down: bool) -> None: ...
    def wan_stall(self, on: bool) -> None: ...
    def restart_server(self) -> str: ...
    def kill_and_remount(self) -> str: ...
    def fill_cache_disk(self) -> str: ...
    def free_cache_disk(self) -> str: ...
    def other_burst(self, ops: int) -> str: ...
    def check_daemon(self) -> str: ...


@dataclass(frozen=True)
class Fault:
    """One kind of fault: what it does, how long it holds, the quiet gap after it."""

    name: str
    text: str
    hold: float
    gap: float = 25.0

    def begin(self, env: Env) -> str:
        if self.name == "outage":
            env.wan_down(True)
        elif self.name == "stall":
            env.wan_stall(True)
        elif self.name == "ganesha-restart":
            return env.restart_server()
        elif self.name == "kill":
            return env.kill_and_remount()
        elif self.name == "disk-full":
            return env.fill_cache_disk()
        elif self.name == "other-client":
            return env.other_burst(40)
        return ""

    def end(self, env: Env) -> str:
        if self.name == "outage":
            env.wan_down(False)
        elif self.name == "stall":
            env.wan_stall(False)
        elif self.name == "disk-full":
            return env.free_cache_disk()
        return ""


FAULTS: dict[str, Fault] = {f.name: f for f in (
    Fault("outage", "WAN outage: the link refuses connections", 30.0, 30.0),
    Fault("stall", "stalled link: packets held, connections open", 20.0, 30.0),
    Fault("ganesha-restart", "nfs-ganesha restarted (same ports)", 0.0, 25.0),
    Fault("disk-full", "the cache disk full (a ballast file fills it)", 30.0, 30.0),
    Fault("other-client", "another client changes and deletes 40 shared files", 5.0, 20.0),
    Fault("kill", "kill -9 of the daemon, remount with the same cache_dir", 0.0, 25.0),
)}


def plan(names: list[str], seconds: float) -> list[tuple[float, Fault]]:
    """(start second, fault) for a soak of `seconds`: the faults in turn, repeated."""
    if not names:
        return []
    warmup = min(60.0, max(15.0, 0.1 * seconds))
    tail = min(120.0, max(30.0, 0.15 * seconds))
    out: list[tuple[float, Fault]] = []
    t, i = warmup, 0
    while True:
        fault = FAULTS[names[i % len(names)]]
        if t + fault.hold > seconds - tail:
            return out
        out.append((t, fault))
        t += fault.hold + fault.gap
        i += 1


@dataclass
class Event:
    """A fault as it happened (seconds since the soak began)."""

    name: str
    start: float
    end: float | None = None
    notes: list[str] = field(default_factory=list)


class FaultLog:
    """Faults begun and ended so far; thread-safe."""

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.events: list[Event] = []
        self._lock = threading.Lock()

    def begin(self, name: str) -> Event:
        with self._lock:
            ev = Event(name, time.time() - self.t0)
            self.events.append(ev)
            return ev

    def end(self, ev: Event) -> None:
        with self._lock:
            ev.end = time.time() - self.t0

    def overlaps(self, a: float, b: float, after: float = 40.0) -> bool:
        """Whether a fault (or the `after` seconds following it) overlaps the wall-clock
        interval [a, b]: then a failure or an error there is expected."""
        a, b = a - self.t0, b - self.t0
        with self._lock:
            return any(ev.start <= b and (ev.end if ev.end is not None else b) + after >= a
                       for ev in self.events)


class Injector(threading.Thread):
    """Runs the plan, and between faults checks that the daemon did not die by itself."""

    def __init__(self, env: Env, schedule: list[tuple[float, Fault]], log: FaultLog,
                 stop: threading.Event) -> None:
        super().__init__(name="faults", daemon=True)
        self.env = env
        self.schedule = schedule
        self.log = log
        self.stop = stop
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for at, fault in self.schedule:
                if self._wait_until(self.log.t0 + at):
                    return
                ev = self.log.begin(fault.name)
                try:
                    ev.notes.append(fault.begin(self.env))
                    self._wait_until(time.time() + fault.hold)
                except BaseException as exc:
                    ev.notes.append(f"failed: {exc}")
                    raise
                finally:
                    ev.notes.append(fault.end(self.env))
                    self.log.end(ev)
                    ev.notes = [n for n in ev.notes if n]
            while not self.stop.wait(1.0):
                self._watch()
        except BaseException as exc:   # reported by the driver, which then stops
            self.error = exc

    def _wait_until(self, when: float) -> bool:
        """Sleep until `when`, watching the daemon; True if the soak is stopping."""
        while (left := when - time.time()) > 0:
            if self.stop.wait(min(1.0, left)):
                return True
            self._watch()
        return self.stop.is_set()

    def _watch(self) -> None:
        note = self.env.check_daemon()
        if note:
            ev = self.log.begin("crash")
            ev.notes.append(note)
            self.log.end(ev)
