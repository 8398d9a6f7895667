"""The path of one accepted request: decode, check room, store durably, then dispatch."""

from __future__ import annotations

import re

import structlog

from gatewayd import codec
from gatewayd.errors import BadPayload, Unavailable
from gatewayd.plugin_api import Reading
from gatewayd.ratelimit import NodeLimiter
from gatewayd.router import Router
from gatewayd.store import Store, StoreError, StoreFull

# \Z, not $: "$" also matches before a final newline, and "n1\n" in an MQTT topic makes
# Mosquitto drop the connection at every publish (found by tests/test_fuzz.py).
NODE_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}\Z")

log = structlog.get_logger("gatewayd.intake")


class Intake:
    def __init__(
        self,
        store: Store,
        router: Router,
        *,
        retry_after_s: int,
        limiter: NodeLimiter | None = None,
        max_inflight: int = 512,
        overload_retry_after_s: int = 2,
    ) -> None:
        self.store = store
        self.router = router
        self.retry_after_s = retry_after_s
        self.limiter = limiter
        self.max_inflight = max_inflight
        self.overload_retry_after_s = overload_retry_after_s
        #: Requests between arrival and their answer; bounded so overload cannot grow memory and latency.
        self.inflight = 0
        #: Requests the CoAP front answered 5.03 before parsing them, because ``inflight`` was at the limit.
        self.shed_early = 0
        #: Set while shutting down: new requests get 5.03.
        self.closed = False

    async def accept(self, node: str, content_format: int | None, body: bytes) -> list[Reading]:
        """Return the stored readings; raise a RequestError for anything the node must hear about."""
        if self.inflight >= self.max_inflight:
            raise Unavailable("overloaded", self.overload_retry_after_s, "overloaded")
        self.inflight += 1
        try:
            return await self._accept(node, content_format, body)
        finally:
            self.inflight -= 1

    async def _accept(self, node: str, content_format: int | None, body: bytes) -> list[Reading]:
        if not NODE_ID.match(node):
            raise BadPayload("node id must be 1-64 characters of A-Z a-z 0-9 _ . -")
        if self.limiter is not None:
            self.limiter.check(node)  # before decoding: an over-eager node costs little
        drafts = codec.decode(content_format, body)
        if self.closed:
            raise Unavailable("gateway is shutting down", self.retry_after_s, "shutting_down")
        per_reading = [self.router.targets(node, d.fields) for d in drafts]
        self.router.admit(per_reading)
        try:
            readings = await self.store.append(node, drafts, [[r.name for r in t] for t in per_reading])
        except StoreFull as e:
            log.warning("store_full", node=node, error=str(e))
            raise Unavailable(f"store full: {e}", self.retry_after_s, "store_full") from None
        except StoreError as e:
            log.error("store_error", node=node, error=str(e))
            raise Unavailable("store unavailable", self.retry_after_s, "store_error") from None
        self.router.dispatch(readings, per_reading)
        return readings
