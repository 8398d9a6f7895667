"""The CoAP front: ``POST /s/{node}``, ``/.well-known/core``, and the limits aiocoap lacks.

aiocoap remembers every (remote, message id) for EXCHANGE_LIFETIME (247 s) to
answer duplicates, with a timer per message: about 1.5 KB per exchange, which
grows without bound under load. :class:`DedupCache` replaces that memory with
one bounded, insertion-ordered map (no timer per message): entries expire after
``lifetime`` and the oldest go first when ``max_entries`` is reached.
"""

from __future__ import annotations

import copy
import itertools
import random
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import aiocoap
import structlog
from aiocoap import error, resource
from aiocoap.messagemanager import MessageManager
from aiocoap.numbers import Code, codes
from aiocoap.numbers.constants import TransportTuning
from aiocoap.tokenmanager import TokenManager
from aiocoap.util.linkformat import Link, LinkFormat

from gatewayd import coapguard
from gatewayd.access import Access, OscoreFront, log_refusal
from gatewayd.codec import SUPPORTED_FORMATS
from gatewayd.config import CoapConfig
from gatewayd.errors import RequestError, TooLarge, Unavailable
from gatewayd.intake import Intake
from gatewayd.uploads import Block1Spool

log = structlog.get_logger("gatewayd.coap")

READINGS_PATH = ("s",)

#: Told each answer to ``POST /s/{node}``: its code, and the error when refused (the metrics' hook).
OnResponse = Callable[[Code, BaseException | None], None]


def _not_counted(code: Code, err: BaseException | None) -> None:
    pass


class DedupCache:
    """Bounded duplicate detection for one aiocoap MessageManager (RFC 7252 §4.5)."""

    def __init__(self, max_entries: int, lifetime_s: float) -> None:
        self.max_entries = max_entries
        self.lifetime_s = lifetime_s
        self._recent: OrderedDict[tuple[Any, int], list[Any]] = OrderedDict()
        #: Entries dropped before their lifetime because the cache was full.
        self.evicted_early = 0
        self.duplicates = 0

    def __len__(self) -> int:
        return len(self._recent)

    def install(self, mman: MessageManager) -> None:
        def deduplicate(message: aiocoap.Message) -> bool:
            key = (message.remote, message.mid)
            now = time.monotonic()
            entry = self._recent.get(key)
            if entry is not None and entry[0] > now:
                self.duplicates += 1
                if message.mtype is aiocoap.CON and entry[1] is not None:
                    mman._send_initially(entry[1])
                return True
            self._recent.pop(key, None)
            self._expire(now)
            self._recent[key] = [now + self.lifetime_s, None]
            return False

        def store_response(message: aiocoap.Message) -> None:
            entry = self._recent.get((message.remote, message.mid))
            if entry is not None:
                # A shallow copy without ``.request``: the answer to an upload's last block refers to the
                # whole reassembled body (a camera frame) and would keep it for the entry's lifetime.
                slim = copy.copy(message)
                slim.request = None
                entry[1] = slim

        mman._deduplicate_message = deduplicate
        mman._store_response_for_duplicates = store_response
        mman._recent_messages = self._recent

    def knows(self, remote: Any, mid: int) -> bool:
        """Whether a message from ``remote`` with ``mid`` is remembered (a duplicate if it came again)."""
        entry = self._recent.get((remote, mid))
        return entry is not None and entry[0] > time.monotonic()

    def _expire(self, now: float) -> None:
        recent = self._recent
        # All entries share one lifetime, so insertion order is expiry order.
        while recent:
            expiry = next(iter(recent.values()))[0]
            if expiry > now and len(recent) < self.max_entries:
                break
            if expiry > now:
                self.evicted_early += 1
            recent.popitem(last=False)


class ReadingsResource(resource.Resource, resource.PathCapable):
    """``POST /s/{node}``: store the body's readings, answer 2.04 once they are durable."""

    def __init__(
        self,
        intake: Intake,
        cfg: CoapConfig,
        on_response: OnResponse | None = None,
        access: Access | None = None,
    ) -> None:
        super().__init__()  # aiocoap's block-wise state lives in the base class
        self.intake = intake
        #: Who may post as which node; None: anyone (tests of the CoAP front alone).
        self.access = access
        self.max_body = cfg.max_body_bytes
        self.on_response = on_response or _not_counted
        self.uploads = self._block1 = upload_spool(cfg)

    def _too_large(self, size: int) -> TooLarge:
        return TooLarge(f"body of {size} bytes exceeds {self.max_body}", self.max_body)

    def _refused(self, e: error.RenderableError) -> error.RenderableError:
        if not getattr(e, "_counted", False):
            self.on_response(getattr(e, "code", codes.INTERNAL_SERVER_ERROR), e)
            e._counted = True
        return e

    async def needs_blockwise_assembly(self, request: aiocoap.Message) -> bool:
        # Called per request and per block: refuse during the transfer, before the whole body is buffered.
        if self.access is not None:
            path = request.opt.uri_path[len(READINGS_PATH) :]
            if len(path) == 1:  # anything else is 4.04 in render_post
                try:
                    self.access.check(request, path[0])
                except RequestError as e:
                    log_refusal(e, path[0], request.remote)
                    raise self._refused(e) from None
        block1 = request.opt.block1
        if block1 is not None:
            size = block1.start + len(request.payload)
            if request.opt.size1 is not None and request.opt.size1 > self.max_body:
                size = request.opt.size1
            if size > self.max_body:
                self.uploads.discard(request)  # its earlier blocks are not needed any more
                raise self._refused(self._too_large(size))
        return True

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        """Store the body's readings and answer 2.04 once they are durable; every answer is counted."""
        path = request.opt.uri_path[len(READINGS_PATH) :]
        node = path[0] if len(path) == 1 else "?"
        try:
            if len(path) != 1:
                raise error.NotFound("use /s/{node}")
            if len(request.payload) > self.max_body:
                raise self._too_large(len(request.payload))
            cf = request.opt.content_format
            await self.intake.accept(node, None if cf is None else int(cf), request.payload)
        except error.RenderableError as e:
            log.info(
                "request_refused",
                node=node,
                code=str(e.code) if hasattr(e, "code") else "?",
                diagnostic=getattr(e, "diagnostic", str(e)),
            )
            raise self._refused(e) from None
        except Exception:
            log.exception("request_failed", node=node)
            raise self._refused(error.InternalServerError("internal error")) from None
        self.on_response(codes.CHANGED, None)
        return aiocoap.Message(code=codes.CHANGED)


class _Root(resource.Site):
    """A Site that hands ``/s/...`` to the readings resource as is.

    aiocoap's Site copies every request to strip the matched path: about a tenth
    of the server's CPU per reading. The readings resource strips it itself.
    """

    def __init__(self, readings: ReadingsResource, cfg: CoapConfig) -> None:
        super().__init__()
        self._readings = readings
        self._cfg = cfg
        self._counted = readings._refused  # refusals here are counted like the resource's own
        access = readings.access
        #: Unprotects OSCORE requests into this site; None when no node has an OSCORE context.
        self._oscore = (
            OscoreFront(access, self._render_plain, self._counted) if access and access.oscore else None
        )

    def add_resource(self, path: Any, res: Any) -> None:
        res._block1 = upload_spool(self._cfg)  # a Block1 upload elsewhere is bounded and 4.08 there too
        super().add_resource(path, res)

    async def render_to_pipe(self, pipe: Any) -> None:
        if self._oscore is not None and pipe.request.opt.oscore is not None:
            await self._oscore.render_to_pipe(pipe)  # the inner request comes back to _render_plain
        else:
            await self._render_plain(pipe)

    async def _render_plain(self, pipe: Any) -> None:
        # Every (inner) request and every Block1 block passes here: refuse unknown critical options first.
        try:
            coapguard.check_options(pipe.request)
            await super().render_to_pipe(pipe)
        except error.RenderableError as e:
            if getattr(e, "code", None) == codes.CONTINUE:
                raise  # 2.31 for a Block1 block in the middle: not an answer to count
            raise self._counted(e) from None  # 4.02 here, 4.08 from block-wise assembly, ...

    def _find_child_and_pathstripped_message(self, request: aiocoap.Message) -> tuple[Any, aiocoap.Message]:
        if request.opt.uri_path[: len(READINGS_PATH)] == READINGS_PATH:
            return self._readings, request
        found: tuple[Any, aiocoap.Message] = super()._find_child_and_pathstripped_message(request)
        return found


def upload_spool(cfg: CoapConfig) -> Block1Spool:
    return Block1Spool(cfg.upload_timeout_s, cfg.max_uploads, cfg.overload_retry_after_s)


def site(
    intake: Intake, cfg: CoapConfig, on_response: OnResponse | None = None, access: Access | None = None
) -> _Root:
    root = _Root(ReadingsResource(intake, cfg, on_response, access), cfg)
    links = LinkFormat(
        [
            Link(
                "/s",
                rt="gatewayd.readings",
                ct=" ".join(str(c) for c in SUPPORTED_FORMATS),
                title="POST readings to /s/{node}",
            )
        ]
    )
    # A fresh LinkFormat per request: WKCResource appends its impl-info link to the object it gets and
    # applies ?rt= filters to it in place, so a shared one grew with every GET and lost </s> for good.
    root.add_resource((".well-known", "core"), resource.WKCResource(lambda: LinkFormat(list(links.links))))
    return root


class _Shedder:
    """While intake is at ``max_inflight_requests``, or for a request that waited longer than
    ``shed_after_ms`` in the socket (the gateway is behind), answer 5.03 before aiocoap parses it.

    A retransmission of a request aiocoap already took (the duplicate cache knows
    it) still goes to aiocoap, so it gets that request's answer, not a 5.03 that
    would make the node send it again as a new request.
    """

    def __init__(self, intake: Intake, cache: DedupCache, cfg: CoapConfig, on_response: OnResponse) -> None:
        self.intake = intake
        self.cache = cache
        self.retry_after_s = cfg.overload_retry_after_s
        self.shed_after_s = cfg.shed_after_ms / 1000
        self.on_response = on_response
        self.refusal = Unavailable("overloaded", cfg.overload_retry_after_s, "overloaded")
        self.mids = itertools.count(random.randrange(0x10000))

    def active(self) -> bool:
        return self.intake.inflight >= self.intake.max_inflight

    def answer(self, data: bytes, remote: Any) -> bytes | None:
        if len(data) < 4 or self.cache.knows(remote, int.from_bytes(data[2:4], "big")):
            return None
        answer = coapguard.overload_answer(data, self.retry_after_s, next(self.mids))
        if answer is not None:
            self.intake.shed_early += 1
            self.on_response(self.refusal.code, self.refusal)
        return answer


def _receive_buffer(sock: socket.socket, wanted: int) -> None:
    """Ask for a receive buffer that holds a burst; Linux caps it at net.core.rmem_max, silently."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, wanted)
    got = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2  # Linux reports twice the size
    if got < wanted:
        log.warning(
            "coap_receive_buffer_capped", wanted_bytes=wanted, got_bytes=got,
            hint=f"sysctl net.core.rmem_max={wanted} lets the kernel queue a burst instead of dropping it",
        )  # fmt: skip


async def serve(
    intake: Intake, cfg: CoapConfig, on_response: OnResponse | None = None, access: Access | None = None
) -> tuple[aiocoap.Context, list[DedupCache], Block1Spool]:
    """Start the UDP CoAP server; returns the context, its duplicate caches and its readings' uploads."""
    # aiocoap reads this per message from the class: gatewayd is the process's only CoAP server.
    TransportTuning.EMPTY_ACK_DELAY = cfg.empty_ack_delay_s
    root = site(intake, cfg, on_response, access)
    ctx = await aiocoap.Context.create_server_context(root, bind=(cfg.bind, cfg.port), transports=["udp6"])
    caches = []
    for ri in ctx.request_interfaces:
        if isinstance(ri, TokenManager) and isinstance(ri.token_interface, MessageManager):
            cache = DedupCache(cfg.dedup_max_entries, cfg.dedup_lifetime_s)
            cache.install(ri.token_interface)
            caches.append(cache)
            shedder = _Shedder(intake, cache, cfg, on_response or _not_counted)
            interface = ri.token_interface.message_interface
            _receive_buffer(interface.transport.get_extra_info("socket"), cfg.receive_buffer_bytes)
            coapguard.harden_udp(interface, shedder)
    if not caches:
        raise RuntimeError("aiocoap's UDP message manager not found: cannot bound duplicate memory")
    return ctx, caches, root._readings.uploads
