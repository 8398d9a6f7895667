"""The path of one accepted request: decode, check room, store durably, then dispatch."""

from __future__ import annotations

import re

import structlog

from gatewayd import codec
from gatewayd.errors import BadPayload, Unavailable
from gatewayd.plugin_api import Reading
from gatewayd.router import Router
from gatewayd.store import Store, StoreError, StoreFull

NODE_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

log = structlog.get_logger("gatewayd.intake")


class Intake:
    def __init__(self, store: Store, router: Router, *, retry_after_s: int) -> None:
        self.store = store
        self.router = router
        self.retry_after_s = retry_after_s
        #: Set while shutting down: new requests get 5.03.
        self.closed = False

    async def accept(self, node: str, content_format: int | None, body: bytes) -> list[Reading]:
        """Return the stored readings; raise a RequestError for anything the node must hear about."""
        if not NODE_ID.match(node):
            raise BadPayload("node id must be 1-64 characters of A-Z a-z 0-9 _ . -")
        drafts = codec.decode(content_format, body)
        if self.closed:
            raise Unavailable("gateway is shutting down", self.retry_after_s)
        per_reading = [self.router.targets(node, d.fields) for d in drafts]
        self.router.admit(per_reading)
        try:
            readings = await self.store.append(node, drafts, [[r.name for r in t] for t in per_reading])
        except StoreFull as e:
            log.warning("store_full", node=node, error=str(e))
            raise Unavailable(f"store full: {e}", self.retry_after_s) from None
        except StoreError as e:
            log.error("store_error", node=node, error=str(e))
            raise Unavailable("store unavailable", self.retry_after_s) from None
        self.router.dispatch(readings, per_reading)
        return readings
