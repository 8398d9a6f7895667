"""Who may post readings: per-node OSCORE identities (RFC 8613) and the policy for unprotected posts.

aiocoap verifies and decrypts OSCORE, but its site wrapper enforces no access control, answers
its refusals outside the resource (so nothing would count or log them) and finds a context by
scanning all of them. Here:

* :class:`OscoreFront` unprotects a request that carries the OSCORE option with its node's security
  context (one per node, from ``[security] oscore_credentials``, looked up by key ID), hands the
  inner request to the site and protects the answers. Every verification failure (unknown key,
  replay, bad COSE, bad tag) is answered as aiocoap would, and counted and logged as a refusal.
* :meth:`Access.check`, called by the readings resource for every request and every block before
  a body is buffered or a node's rate is charged, lets an authenticated node post only as itself
  (4.03 otherwise) and an unprotected request only as ``[security] unauthenticated`` says (4.01).

Sequence numbers and the replay window live in each context's directory (aiocoap writes them);
:meth:`Access.close` writes the exact state back at shutdown and releases the contexts' locks.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Awaitable, Callable
from fnmatch import fnmatchcase
from typing import Any

import aiocoap
import aiocoap.pipe
import structlog
from aiocoap import error, oscore
from aiocoap.credentials import CredentialsLoadError, CredentialsMap
from aiocoap.numbers import codes
from aiocoap.transports.oscore import OSCOREAddress

from gatewayd import credentials
from gatewayd.config import SecurityConfig
from gatewayd.credentials import CredentialsError
from gatewayd.errors import OscoreRefused, RequestError, Unauthenticated, WrongNode

log = structlog.get_logger("gatewayd.coap.access")  # under gatewayd.coap: rate-limited (log.py)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def source_ip(remote: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The remote's IP address; IPv4 for an IPv4-mapped one (aiocoap's socket is IPv6)."""
    sockaddr = getattr(remote, "sockaddr", None)
    if not sockaddr:
        return None
    try:
        ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def load_contexts(entries: list[credentials.Entry]) -> CredentialsMap:
    """aiocoap's FilesystemSecurityContext for each entry (checked by credentials.read), or
    CredentialsError (all released again)."""
    cmap = CredentialsMap()
    try:
        for e in entries:
            try:
                cmap.load_from_dict({e.label: {"oscore": {"basedir": str(e.basedir)}}})
            except TimeoutError:  # filelock's Timeout: another process has this context open
                raise CredentialsError(
                    f"{e.label}: {e.basedir} is in use by another process (lock)"
                ) from None
            except (CredentialsLoadError, ValueError, OSError) as err:
                raise CredentialsError(f"{e.label}: cannot load the context in {e.basedir}: {err}") from None
    except BaseException:
        release(cmap)
        raise
    return cmap


def release(cmap: CredentialsMap) -> None:
    """Write each context's sequence numbers and replay window back, and release its lock.

    aiocoap 0.4.17 does this only when a context is garbage-collected; a restart in the same
    process (or a late collection) would find the lock still held and lose the replay window.
    """
    for label, sc in list(cmap.items()):
        if isinstance(sc, oscore.FilesystemSecurityContext) and sc.lockfile is not None:
            try:
                sc._destroy()
            except OSError as e:  # the directory went away or read-only: the next start uses Echo recovery
                log.error("oscore_state_not_saved", label=label, basedir=sc.basedir, error=str(e))
    cmap.clear()


class Access:
    """The access policy for ``POST /s/{node}``, and the nodes' OSCORE contexts."""

    def __init__(
        self, cfg: SecurityConfig, contexts: CredentialsMap | None = None, nodes: dict[str, str] | None = None
    ) -> None:
        self.mode = cfg.unauthenticated
        self.allow_nodes = tuple(cfg.allow_nodes)
        self.allow_from: tuple[Network, ...] = tuple(ipaddress.ip_network(n) for n in cfg.allow_from)
        self.contexts = contexts if contexts is not None else CredentialsMap()
        #: credentials label (the context's authenticated claim) -> node id
        self.nodes = nodes or {}
        #: (recipient ID, ID context) -> context: the key ID a request carries finds its context
        self._by_kid: dict[tuple[bytes, bytes | None], Any] = {}
        for label, sc in self.contexts.items():
            key = (sc.recipient_id, sc.id_context)
            if key in self._by_kid:
                other = next(k for k, v in self.contexts.items() if v is self._by_kid[key])
                release(self.contexts)
                raise CredentialsError(
                    f"{label} and {other} share the recipient ID {sc.recipient_id.hex()!r}"
                )
            self._by_kid[key] = sc

    @classmethod
    def from_config(cls, cfg: SecurityConfig) -> Access:
        """Load the contexts ``cfg`` names (locking them); CredentialsError if one cannot be used."""
        if cfg.oscore_credentials is None:
            return cls(cfg)
        entries = credentials.read(cfg.oscore_credentials, cfg.identities)
        return cls(cfg, load_contexts(entries), {e.label: e.node for e in entries})

    @property
    def oscore(self) -> bool:
        return bool(self._by_kid)

    def close(self) -> None:
        """Persist the sequence numbers and release the contexts (idempotent)."""
        release(self.contexts)
        self._by_kid.clear()

    def find(self, unprotected: dict[int, Any]) -> Any | None:
        """The security context for a request's key ID (and ID context), or None."""
        kid = unprotected.get(oscore.COSE_KID)
        return self._by_kid.get((kid, unprotected.get(oscore.COSE_KID_CONTEXT))) if kid is not None else None

    def node_of(self, sc: Any) -> str | None:
        """The node a security context authenticates (by its credentials label), or None."""
        return next(filter(None, map(self.nodes.get, sc.authenticated_claims)), None)

    def identity(self, remote: Any) -> str | None:
        """The node a request was authenticated as, or None for an unprotected one."""
        if not isinstance(remote, OSCOREAddress):
            return None
        return self.node_of(remote.security_context) or "?"  # a context that maps to no node: matches none

    def check(self, request: aiocoap.Message, node: str) -> None:
        """Raise WrongNode (4.03) or Unauthenticated (4.01) unless ``request`` may post as ``node``."""
        remote = request.remote
        who = self.identity(remote)
        if who is not None:
            if who != node:
                raise WrongNode(f"authenticated as {who}, not {node}")
            return
        if self.mode == "refuse":
            raise Unauthenticated("OSCORE required: unprotected posts are refused")
        if self.mode == "allow-listed" and not any(fnmatchcase(node, p) for p in self.allow_nodes):
            raise Unauthenticated(f"OSCORE required: {node} may not post unprotected")
        if self.allow_from:
            ip = source_ip(remote)
            if ip is None or not any(ip in net for net in self.allow_from if net.version == ip.version):
                raise Unauthenticated(f"OSCORE required: unprotected posts not accepted from {ip}")


def log_refusal(err: RequestError | error.RenderableError, node: str | None, remote: Any) -> None:
    """One ``request_refused`` line (rate-limited with the other refusals) for an access refusal."""
    code = getattr(err, "code", None)
    log.warning(
        "request_refused",
        node=node,
        code=str(code) if code is not None else "?",
        reason=getattr(err, "reason", None) or type(err).__name__,
        diagnostic=getattr(err, "diagnostic", str(err)),
        source=str(source_ip(getattr(remote, "underlying_address", remote))),
    )


class OscoreFront:
    """Unprotects OSCORE requests for the site and protects its answers (after aiocoap's
    ``OscoreSiteWrapper.render_to_pipe``, 0.4.17), with gatewayd's lookup, counting and logging."""

    def __init__(
        self,
        access: Access,
        render_inner: Callable[[Any], Awaitable[None]],
        counted: Callable[[error.RenderableError], error.RenderableError],
    ) -> None:
        self.access = access
        self.render_inner = render_inner
        self.counted = counted
        #: aiocoap's pipe helpers log with %-formatting: a stdlib logger (rate-limited as coap-server).
        self.log = logging.getLogger("coap-server.oscore-site")

    @staticmethod
    def _unprotect(sc: Any, request: aiocoap.Message) -> tuple[aiocoap.Message, Any]:
        """The inner request and its sequence number; the answers aiocoap gives for failures."""
        try:
            inner, seqno = sc.unprotect(request)
        except oscore.ReplayErrorWithEcho as e:
            # The replay window is unknown (gatewayd was not stopped cleanly): a protected 4.01 with
            # Echo, which the node's OSCORE layer answers by repeating the request with it (RFC 8613
            # Appendix B.1.2). A replayed old message cannot carry the fresh Echo value.
            e.code, e.reason, e.diagnostic = codes.UNAUTHORIZED, "oscore_echo", "Echo required"
            raise
        except oscore.ReplayError:
            raise OscoreRefused(codes.UNAUTHORIZED, "Replay detected", "oscore_replay", max_age=0) from None
        except oscore.DecodeError:
            raise OscoreRefused(codes.BAD_OPTION, "Failed to decode COSE", "oscore_decode") from None
        except oscore.ProtectionInvalid:
            raise OscoreRefused(codes.BAD_REQUEST, "Decryption failed", "oscore_invalid") from None
        return inner, seqno

    async def render_to_pipe(self, pipe: Any) -> None:
        request = pipe.request
        sc = None
        try:
            if request.code not in (codes.POST, codes.FETCH):  # an OSCORE request's outer code (RFC 8613)
                raise OscoreRefused(
                    codes.METHOD_NOT_ALLOWED, "OSCORE requests are POST or FETCH", "oscore_method"
                )
            try:
                sc = self.access.find(oscore.verify_start(request))
            except Exception:  # untrusted bytes: aiocoap 0.4.17 raises IndexError for a truncated option
                raise OscoreRefused(codes.BAD_OPTION, "Failed to decode COSE", "oscore_decode") from None
            if sc is None:
                raise OscoreRefused(
                    codes.UNAUTHORIZED, "Security context not found", "oscore_unknown_context"
                )
            inner, seqno = self._unprotect(sc, request)
        except error.RenderableError as e:
            log_refusal(e, None if sc is None else self.access.node_of(sc), request.remote)
            self.counted(e)
            if request.mtype is not aiocoap.CON and not isinstance(e, oscore.ReplayErrorWithEcho):
                return  # as aiocoap: a NON that fails verification gets no answer
            raise
        inner.remote = OSCOREAddress(sc, request.remote)
        sc = sc.context_for_response()

        inner_pipe = aiocoap.pipe.IterablePipe(inner)
        aiocoap.pipe.run_driving_pipe(
            aiocoap.pipe.error_to_message(inner_pipe, self.log),
            self.render_inner(inner_pipe),
            name=f"OSCORE request from {request.remote}",
        )
        async for event in inner_pipe:
            if event.exception is not None:  # error_to_message renders errors: this would be a bug
                log.error("oscore_render_failed", error=repr(event.exception))
                message, is_last = aiocoap.Message(code=codes.INTERNAL_SERVER_ERROR), True
            else:
                message, is_last = event.message, event.is_last
            if not is_last:
                message.opt.observe = 0  # non-final events are notifications (as aiocoap)
            protected, _ = sc.protect(message, seqno)
            if message.opt.observe is not None:
                protected.opt.observe = sc.sender_sequence_number & 0xFFFFFFFF
            pipe.add_response(protected, is_last=is_last)
            if is_last:
                break
