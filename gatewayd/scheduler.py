"""Inference slots shared by all plugins: at most N batches run at once, higher priority first.

Keeps onnxruntime threads from oversubscribing the cores: with N slots and T
threads per worker, at most N*T inference threads are busy.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

RANK = {"high": 0, "normal": 1, "low": 2}


class Slots:
    def __init__(self, n: int) -> None:
        self.size = n
        self.free = n
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    @property
    def waiting(self) -> int:
        return sum(1 for *_, f in self._waiters if not f.done())

    @asynccontextmanager
    async def slot(self, priority: str = "normal") -> AsyncIterator[None]:
        """Hold one slot; waiters are served by priority class, then first come first served."""
        if self.free > 0 and not self.waiting:
            self.free -= 1
        else:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            heapq.heappush(self._waiters, (RANK[priority], next(self._order), fut))
            try:
                await fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():
                    self._release()  # handed to us just as we were cancelled: pass it on
                raise
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        while self._waiters:
            *_, fut = heapq.heappop(self._waiters)
            if not fut.done():
                fut.set_result(None)
                return
        self.free += 1
