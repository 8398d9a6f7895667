"""A plugin's bounded queue, and the dynamic batcher that reads it."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Iterable
from itertools import islice

from gatewayd.plugin_api import Reading


class PluginQueue:
    """Readings stored and waiting for one plugin, oldest first.

    The store is the truth (its ``pending`` table); this is the in-memory view
    the batcher serves from. A batch stays at the head until ``done`` removes
    it, so a batch lost to a worker crash is served again.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: deque[Reading] = deque()
        self._arrived = asyncio.Event()
        self.closed = False

    def __len__(self) -> int:
        return len(self._items)

    def has_room(self, n: int) -> bool:
        return len(self._items) + n <= self.capacity

    def put(self, readings: Iterable[Reading]) -> None:
        self._items.extend(readings)
        self._arrived.set()

    def done(self, n: int) -> None:
        for _ in range(min(n, len(self._items))):
            self._items.popleft()

    def close(self) -> None:
        """Make waiting and future ``next_batch`` calls return [] (shutdown)."""
        self.closed = True
        self._arrived.set()

    async def next_batch(self, max_batch: int, max_wait_s: float) -> list[Reading]:
        """Up to ``max_batch`` readings, waiting at most ``max_wait_s`` after the first; [] once closed."""
        while not self._items and not self.closed:
            self._arrived.clear()
            await self._arrived.wait()
        deadline = time.monotonic() + max_wait_s
        while len(self._items) < max_batch and not self.closed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                break
        return [] if self.closed else list(islice(self._items, max_batch))
