"""Structured logs: JSON lines on stdout (journald keeps them), library loggers routed through structlog."""

from __future__ import annotations

import atexit
import logging
import sys
import threading
import time
from collections.abc import Callable

import structlog

#: Loggers whose records a remote peer can cause, one per datagram: rate-limited.
RATE_LIMITED = ("coap", "coap-server", "gatewayd.coap")
#: Of those, the ones whose tracebacks are aiocoap's internals: written as one line.
ONE_LINE_EXCEPTIONS = ("coap", "coap-server")


class RateLimit(logging.Filter):
    """At most ``burst`` records of one kind per ``interval_s``; then one "suppressed K" line.

    A kind is (logger, message template): aiocoap's "Ignoring unparsable message from %s" is one
    kind whatever the address, a structlog event one kind per event name. The count of what was
    held back is written when the kind's interval is over, with its next record, with the next
    record of any rate-limited logger after the interval, or at exit. At most ``max_kinds`` kinds
    are remembered (the oldest go first), so the state stays small whatever arrives. Records of
    the ``one_line`` loggers lose their traceback: the exception becomes ``[Type: message]``.
    """

    def __init__(
        self,
        loggers: tuple[str, ...] = RATE_LIMITED,
        *,
        burst: int = 10,
        interval_s: float = 60.0,
        max_kinds: int = 256,
        one_line: tuple[str, ...] = ONE_LINE_EXCEPTIONS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.burst = burst
        self.interval_s = interval_s
        self.max_kinds = max_kinds
        self._names = frozenset(loggers)
        self._prefixes = tuple(n + "." for n in loggers)
        self._one_line = frozenset(one_line)
        self._one_line_prefixes = tuple(n + "." for n in one_line)
        self._clock = clock
        self._lock = threading.Lock()
        #: (logger, template) -> [window start, records in window, records held back]
        self._kinds: dict[tuple[str, str], list[float]] = {}
        self._next_sweep = clock() + interval_s
        #: Records held back since start (all kinds).
        self.suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.name
        if not (name in self._names or name.startswith(self._prefixes)):
            return True
        if getattr(record, "rate_limit_summary", False):
            return True
        msg = record.msg
        template = msg.get("event") if isinstance(msg, dict) else msg
        key = (name, str(template)[:200])
        due: list[tuple[tuple[str, str], list[float]]] = []
        with self._lock:
            now = self._clock()
            if now >= self._next_sweep:
                self._next_sweep = now + self.interval_s
                due = [(k, s) for k, s in self._kinds.items() if now - s[0] >= self.interval_s]
                for k, _ in due:
                    del self._kinds[k]
            state = self._kinds.get(key)
            if state is not None and now - state[0] >= self.interval_s:
                due.append((key, self._kinds.pop(key)))
                state = None
            if state is None:
                if len(self._kinds) >= self.max_kinds:
                    oldest = next(iter(self._kinds))
                    due.append((oldest, self._kinds.pop(oldest)))
                state = self._kinds[key] = [now, 0, 0]
            state[1] += 1
            allowed = state[1] <= self.burst
            if not allowed:
                state[2] += 1
                self.suppressed += 1
        for k, s in due:
            self._summarise(k, s, now)
        one_line = name in self._one_line or name.startswith(self._one_line_prefixes)
        if allowed and record.exc_info and one_line:
            _one_line(record)
        return allowed

    def flush(self) -> None:
        """Write the pending "suppressed K" lines now (at exit)."""
        with self._lock:
            pending, self._kinds = list(self._kinds.items()), {}
        now = self._clock()
        for k, s in pending:
            self._summarise(k, s, now)

    def _summarise(self, key: tuple[str, str], state: list[float], now: float) -> None:
        held = int(state[2])
        if not held:
            return
        name, template = key
        logger = logging.getLogger(name)
        record = logger.makeRecord(
            name,
            logging.WARNING,
            "(rate limit)",
            0,
            "suppressed %d similar messages in %.0f s: %s",
            (held, now - state[0], template[:120]),
            None,
        )
        record.rate_limit_summary = True
        logger.handle(record)


def _one_line(record: logging.LogRecord) -> None:
    exc_info = record.exc_info
    exc = exc_info[1] if isinstance(exc_info, tuple) else None
    summary = f"{type(exc).__name__}: {str(exc)[:200]}" if exc is not None else "exception"
    try:
        text = record.getMessage()
    except Exception:  # a filter must not raise where the handler's emit would have coped
        text = str(record.msg)
    record.msg = f"{text} [{summary}]"
    record.args = None
    record.exc_info = None
    record.exc_text = None
    record.stack_info = None


_limit: RateLimit | None = None


def _flush_at_exit() -> None:
    if _limit is not None:
        _limit.flush()


atexit.register(_flush_at_exit)


def setup(level: str = "info", fmt: str = "json") -> None:
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    # Garbage from the network must not fill the journal: aiocoap logs per datagram.
    global _limit
    _limit = RateLimit()
    handler.addFilter(_limit)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiocoap logs every duplicate and retransmission at info: keep the journal for what matters.
    logging.getLogger("coap").setLevel(max(logging.WARNING, root.level))
    logging.getLogger("coap-server").setLevel(max(logging.WARNING, root.level))
