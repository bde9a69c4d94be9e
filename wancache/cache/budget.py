"""A budget of bytes held at once (RAM by design, issue 14).

`ByteBudget(limit)` hands out shares of `limit` bytes: `async with budget.take(n)`
waits until `n` more bytes fit, holds them for the block, and gives them back.
Waiters are served first come, first served, so a big share is not starved by a
stream of small ones.  A share larger than the whole budget is cut to the budget
(it then runs alone): a caller is never refused, and `in_use` never exceeds `limit`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio


class ByteBudget:
    """At most `limit` bytes handed out at once (see the module docstring)."""

    def __init__(self, limit: int) -> None:
        if limit <= 0:
            raise ValueError(f"a byte budget needs a positive limit, not {limit}")
        self.limit = limit
        self.in_use = 0
        self.peak = 0                    # the most ever handed out at once
        self._waiters: deque[tuple[int, trio.Event]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @asynccontextmanager
    async def take(self, nbytes: int) -> AsyncIterator[int]:
        """Hold `nbytes` (at most `limit`) for the block; yields the share held."""
        n = max(0, min(nbytes, self.limit))
        await self._acquire(n)
        try:
            yield n
        finally:
            self._release(n)

    async def _acquire(self, n: int) -> None:
        if not self._waiters and self.in_use + n <= self.limit:
            self._grant(n)
            try:
                await trio.lowlevel.checkpoint()
            except BaseException:
                self._release(n)
                raise
            return
        ticket = (n, trio.Event())
        self._waiters.append(ticket)
        try:
            await ticket[1].wait()
        except BaseException:
            if ticket[1].is_set():      # granted, but the caller is gone: give it back
                self._release(n)
            else:
                self._waiters.remove(ticket)
                self._serve()           # a big share at the head may have blocked others
            raise

    def _grant(self, n: int) -> None:
        self.in_use += n
        self.peak = max(self.peak, self.in_use)

    def _release(self, n: int) -> None:
        self.in_use -= n
        self._serve()

    def _serve(self) -> None:
        """Grant the waiters at the head of the queue whose shares fit now."""
        while self._waiters and self.in_use + self._waiters[0][0] <= self.limit:
            n, event = self._waiters.popleft()
            self._grant(n)
            event.set()
