"""Per-node token buckets, so one chatty or broken node cannot starve the others."""

from __future__ import annotations

import math
import time
from collections import OrderedDict

from gatewayd.errors import TooManyRequests


class NodeLimiter:
    """``rate_per_s`` sustained, ``burst`` at once, per node; memory bounded by ``max_nodes``.

    A node that runs out gets 4.29 Too Many Requests with Max-Age = seconds until
    it has a token again. Nodes not seen for longest are forgotten first (they
    come back with a full bucket, which is what an idle node would have anyway).
    """

    def __init__(self, rate_per_s: float, burst: int, max_nodes: int) -> None:
        self.rate = rate_per_s
        self.burst = float(burst)
        self.max_nodes = max_nodes
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # node -> (tokens, at)
        self.limited = 0

    def check(self, node: str, now: float | None = None) -> None:
        """Take a token for ``node`` or raise TooManyRequests."""
        if self.rate <= 0:
            return
        now = time.monotonic() if now is None else now
        tokens, at = self._buckets.pop(node, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if tokens < 1.0:
            self._buckets[node] = (tokens, now)
            self.limited += 1
            wait = max(1, math.ceil((1.0 - tokens) / self.rate))
            raise TooManyRequests(f"node {node} over {self.rate:g} requests/s", wait)
        self._buckets[node] = (tokens - 1.0, now)
        if len(self._buckets) > self.max_nodes:
            self._buckets.popitem(last=False)
