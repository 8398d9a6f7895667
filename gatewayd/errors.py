"""Typed request errors: each knows the CoAP response it becomes."""

from __future__ import annotations

from aiocoap import Message, numbers
from aiocoap.error import RenderableError


class RequestError(RenderableError):
    """An error that answers the request with ``code`` and a short text diagnostic.

    aiocoap renders any RenderableError raised by a handler with ``to_message``.
    """

    code: numbers.Code = numbers.codes.BAD_REQUEST

    def __init__(self, diagnostic: str) -> None:
        super().__init__(diagnostic)
        self.diagnostic = diagnostic

    def to_message(self) -> Message:
        msg = Message(code=self.code, payload=self.diagnostic.encode("utf-8")[:200])
        msg.opt.content_format = 0  # text/plain
        return msg


class BadPayload(RequestError):
    """The body is not valid CBOR or SenML-CBOR of the expected shape (4.00)."""


class UnsupportedFormat(RequestError):
    """The Content-Format is not one gatewayd accepts (4.15)."""

    code = numbers.codes.UNSUPPORTED_CONTENT_FORMAT


class BadOption(RequestError):
    """A critical option gatewayd does not understand, or one whose value it cannot read (4.02)."""

    code = numbers.codes.BAD_OPTION


class Incomplete(RequestError):
    """A Block1 block that does not continue the blocks received so far (4.08)."""

    code = numbers.codes.REQUEST_ENTITY_INCOMPLETE


class NotAProxy(RequestError):
    """A Proxy-Uri or Proxy-Scheme request: gatewayd is no proxy (5.05, RFC 7252 §5.7.2)."""

    code = numbers.codes.PROXYING_NOT_SUPPORTED


class TooLarge(RequestError):
    """The body exceeds the configured maximum (4.13 with Size1 = that maximum)."""

    code = numbers.codes.REQUEST_ENTITY_TOO_LARGE

    def __init__(self, diagnostic: str, max_size: int) -> None:
        super().__init__(diagnostic)
        self.max_size = max_size

    def to_message(self) -> Message:
        msg = super().to_message()
        msg.opt.size1 = self.max_size
        return msg


class RetryLater(RequestError):
    """An answer that tells the node when to try again (Max-Age = seconds to wait)."""

    #: Why, for logs and metrics: store_full, queue_full, shutting_down, rate_limited, ...
    reason = "unavailable"

    def __init__(self, diagnostic: str, retry_after_s: int, reason: str | None = None) -> None:
        super().__init__(diagnostic)
        self.retry_after_s = retry_after_s
        if reason is not None:
            self.reason = reason

    def to_message(self) -> Message:
        msg = super().to_message()
        msg.opt.max_age = self.retry_after_s
        return msg


class Unavailable(RetryLater):
    """Store full, queue full or shutting down: the gateway cannot take it now (5.03)."""

    code = numbers.codes.SERVICE_UNAVAILABLE


class TooManyRequests(RetryLater):
    """This node is over its rate (4.29, RFC 8516): its own fault, other nodes are served."""

    code = numbers.codes.TOO_MANY_REQUESTS
    reason = "rate_limited"


class Unauthenticated(RequestError):
    """A POST without OSCORE where the config wants one (4.01); see ``[security] unauthenticated``."""

    code = numbers.codes.UNAUTHORIZED
    reason = "unauthenticated"


class WrongNode(RequestError):
    """An OSCORE-authenticated node posting under another node's id (4.03)."""

    code = numbers.codes.FORBIDDEN
    reason = "wrong_node"


class OscoreRefused(RequestError):
    """A protected request that failed OSCORE verification: unknown context, replay, bad COSE or tag.

    ``reason`` names which for logs and metrics; the answer is unprotected (RFC 8613 §8.2).
    """

    def __init__(self, code: numbers.Code, diagnostic: str, reason: str, max_age: int | None = None) -> None:
        super().__init__(diagnostic)
        self.code = code
        self.reason = reason
        self.max_age = max_age

    def to_message(self) -> Message:
        msg = super().to_message()
        if self.max_age is not None:
            msg.opt.max_age = self.max_age
        return msg
