"""The plugin contract: the only gatewayd module a plugin imports.

A plugin is a synchronous class that runs inside a worker process. It never
touches asyncio, CoAP or MQTT: the daemon hands it batches of readings and
publishes what it returns.

Lifecycle of one plugin instance, as the supervisor drives it::

    plugin = cls(options)         # the [plugins.options] table from config; validate it here
    plugin.threads = n            # the worker's share of the CPU budget (before load)
    plugin.load()                 # open model files                       state: loading
    plugin.process(plugin.sample())  # one warm-up inference               state: warming
    plugin.process(batch) ...     # serve                                  state: ready

Errors: raise :class:`PluginNotReady` from ``load`` or ``process`` to ask for
a retry after a backoff (a model file not there yet, a device busy). Any other
exception fails that load or that batch: a load is retried with exponential
backoff (and a cool-down once the restart budget is spent); a batch is retried
up to ``max_attempts`` times, then each of its readings is published with an
``error`` result. A worker that crashes, hangs past ``deadline_s`` or grows
past ``memory_limit_mb`` is replaced; the daemon itself never stops for it.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

#: The value types a reading field may hold after decoding.
FieldValue = float | int | str | bool | bytes

ENTRY_POINT_GROUP = "gatewayd.plugins"


@dataclass(frozen=True, slots=True)
class Reading:
    """One accepted reading, as stored in the journal.

    ``id`` is unique per gateway and stable across restarts: consumers use it
    to drop duplicates of an at-least-once delivery. ``ts`` is the measurement
    time in Unix seconds (the node's if it sent one, else the arrival time).
    ``units`` maps a field name to its SenML unit, where the node gave one.
    """

    id: str
    node: str
    ts: float
    fields: Mapping[str, FieldValue]
    units: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Result:
    """What a plugin says about one reading.

    ``data`` must be JSON-serialisable with finite numbers; it is published as
    the result's payload, next to the keys the gateway adds (``reading_id``,
    ``node``, ``ts``, ``plugin``, ``variant``). Put an ``error`` key in it for a
    reading the plugin cannot judge.
    """

    reading_id: str
    data: Mapping[str, Any]


class PluginError(Exception):
    """Base of the errors a plugin may raise on purpose."""


class PluginNotReady(PluginError):
    """The plugin cannot serve yet (model missing, device busy): retry later with backoff."""


def numeric(value: FieldValue | None) -> float | None:
    """``value`` as a finite float, or None for text, bytes, booleans, NaN and infinities."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        f = float(value)
    except OverflowError:  # an int beyond float range
        return None
    return f if math.isfinite(f) else None


class Plugin(ABC):
    """Base class of every gatewayd plugin.

    Subclasses set ``name`` and ``version`` and implement ``load``, ``sample``
    and ``process``. ``options`` is the plugin's ``options`` table from the
    gateway config, passed through untouched: validate it in ``__init__`` and
    raise ``ValueError`` with a clear message when it is wrong.
    """

    name: ClassVar[str]
    version: ClassVar[str] = "0"
    #: The ``options`` key that takes a model bundle folder. A plugin that names one can have its
    #: model replaced over the air: gatewayd then passes the installed bundle's folder under it.
    bundle_option: ClassVar[str | None] = None
    #: The result keys that are the plugin's answer (not its timings), compared between the current
    #: and a new model while the new one runs in shadow before an update; None: the whole result.
    answer_keys: ClassVar[tuple[str, ...] | None] = None

    def __init__(self, options: Mapping[str, Any]) -> None:
        self.options = dict(options)
        #: Intra-op threads this worker may use (pass it to onnxruntime's SessionOptions).
        #: The gateway sets it before ``load`` from its CPU budget; 1 when run by hand.
        self.threads = 1

    @abstractmethod
    def load(self) -> None:
        """Open the model(s); called once per worker process, after ``threads`` is set."""

    @abstractmethod
    def sample(self) -> Sequence[Reading]:
        """A representative batch for warm-up, called after ``load``; the worker is ready once
        ``process`` succeeds on it."""

    @abstractmethod
    def process(self, batch: Sequence[Reading]) -> Sequence[Result]:
        """Turn a batch of readings into results, at most one per reading, matched by ``reading_id``.

        Order does not matter; results for ids not in the batch are ignored. A
        reading left without a result is marked processed with nothing published.
        """
