"""The plugin contract: the only gatewayd module a plugin imports.

A plugin is a synchronous class that runs inside a worker process. It never
touches asyncio, CoAP or MQTT: the daemon hands it batches of readings and
publishes what it returns.

Lifecycle of one plugin instance, as the supervisor drives it::

    cls(options)        -> construct with the [plugins.options] table from config
    plugin.load()       -> open model files (state: loading)
    plugin.process(plugin.sample())  -> warm-up inference (state: warming)
    plugin.process(batch) ...        -> serve (state: ready)

A plugin that raises :class:`PluginNotReady` from ``load`` or ``process`` asks
to be retried later with backoff; any other exception counts as a failure of
that batch (or of the load) and is retried a bounded number of times.
"""

from __future__ import annotations

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
    """What a plugin says about one reading; ``data`` must be JSON-serialisable."""

    reading_id: str
    data: Mapping[str, Any]


class PluginError(Exception):
    """Base of the errors a plugin may raise on purpose."""


class PluginNotReady(PluginError):
    """The plugin cannot serve yet (model missing, device busy): retry later with backoff."""


class Plugin(ABC):
    """Base class of every gatewayd plugin.

    Subclasses set ``name`` and ``version`` and implement ``load``, ``sample``
    and ``process``. ``options`` is the plugin's ``options`` table from the
    gateway config, passed through untouched: validate it in ``__init__`` and
    raise ``ValueError`` with a clear message when it is wrong.
    """

    name: ClassVar[str]
    version: ClassVar[str] = "0"

    def __init__(self, options: Mapping[str, Any]) -> None:
        self.options = dict(options)

    @abstractmethod
    def load(self) -> None:
        """Open the model(s); called once per worker process before anything else."""

    @abstractmethod
    def sample(self) -> Sequence[Reading]:
        """Return a representative batch used for warm-up; the worker is ready after it succeeds."""

    @abstractmethod
    def process(self, batch: Sequence[Reading]) -> Sequence[Result]:
        """Turn a batch of readings into results, at most one per reading.

        A reading left without a result is published with no result; return a
        result carrying an ``error`` key for a reading the plugin cannot score.
        """
