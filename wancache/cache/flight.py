"""Single flight: concurrent requests for the same thing share one fetch."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import trio

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass(eq=False)
class _Flight(Generic[V]):
    done: trio.Event = field(default_factory=trio.Event)
    value: V | None = None
    error: Exception | None = None
    ok: bool = False


class SingleFlight(Generic[K, V]):
    """`await flights.run(key, fetch)`: one `fetch()` per key at a time.

    Followers get the leader's result or its exception.  If the leader is
    cancelled, a follower takes over the fetch instead of seeing a foreign
    cancellation.
    """

    def __init__(self) -> None:
        self._flights: dict[K, _Flight[V]] = {}

    def busy(self, key: K) -> bool:
        return key in self._flights

    async def run(self, key: K, fetch: Callable[[], Awaitable[V]]) -> V:
        while True:
            flight = self._flights.get(key)
            if flight is None:
                break
            await flight.done.wait()
            if flight.ok:
                return flight.value  # type: ignore[return-value]
            if flight.error is not None:
                raise flight.error
        flight = _Flight()
        self._flights[key] = flight
        try:
            flight.value = await fetch()
            flight.ok = True
            return flight.value
        except Exception as exc:
            flight.error = exc
            raise
        finally:
            del self._flights[key]
            flight.done.set()
