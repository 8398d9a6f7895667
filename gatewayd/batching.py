"""A plugin's bounded queue, and the dynamic batcher that reads it."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Iterable, Sequence

from gatewayd.plugin_api import Reading


class PluginQueue:
    """Readings stored and waiting for one plugin, oldest first.

    The store is the truth (its ``pending`` table); this is the in-memory view
    the plugin's workers take batches from. A batch that fails is put back at
    the front with ``requeue``; ``len`` counts taken batches too, so admission
    (``has_room``) sees everything not yet completed.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: deque[Reading] = deque()
        self._taken = 0
        self._arrived = asyncio.Event()
        self.closed = False

    def __len__(self) -> int:
        return len(self._items) + self._taken

    @property
    def waiting(self) -> int:
        return len(self._items)

    def has_room(self, n: int) -> bool:
        return len(self) + n <= self.capacity

    def put(self, readings: Iterable[Reading]) -> None:
        self._items.extend(readings)
        self._arrived.set()

    def requeue(self, batch: Sequence[Reading]) -> None:
        """Give back a taken batch, in front of everything else (it is the oldest)."""
        self._items.extendleft(reversed(batch))
        self._taken -= len(batch)
        self._arrived.set()

    def done(self, n: int) -> None:
        """``n`` taken readings are completed."""
        self._taken -= n

    def close(self) -> None:
        """Make waiting and future ``next_batch`` calls return [] (shutdown)."""
        self.closed = True
        self._arrived.set()

    async def next_batch(self, max_batch: int, max_wait_s: float) -> list[Reading]:
        """Take up to ``max_batch`` readings, waiting ``max_wait_s`` at most after the first one.

        Returns [] once the queue is closed.
        """
        while True:
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
            if self.closed:
                return []
            if self._items:
                break
            # Another worker of this plugin took them while we waited: wait again.
        batch = self.take(max_batch)
        if self._items:
            self._arrived.set()  # another worker of this plugin may take the rest
        return batch

    def take(self, n: int) -> list[Reading]:
        """Up to ``n`` waiting readings, now (``next_batch`` waits for a batch to fill)."""
        batch = [self._items.popleft() for _ in range(min(n, len(self._items)))]
        self._taken += len(batch)
        return batch
