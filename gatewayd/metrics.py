"""The Prometheus endpoint: a private registry per daemon, read mostly at scrape time.

The hot path pays almost nothing: a request adds one to a plain dict entry
(:meth:`Metrics.count_response`), a batch observes two histograms
(:meth:`Metrics.batch_observer`). Everything else (store, outbox, MQTT, plugin
states, queues, duplicate caches) is read from the parts' own counters by
:class:`GatewayCollector` when Prometheus scrapes, on the HTTP server's thread.
Those reads are of ints and lengths the event loop writes; the GIL makes each
read whole, and a scrape needs no more consistency than that.

The backlog age needs the store, whose operations run on its writer thread, so
a small task refreshes it every :data:`BACKLOG_REFRESH_S` and the collector
reads the cached value.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

import structlog
from aiocoap.numbers import Code
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    CollectorRegistry,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

import gatewayd
from gatewayd.config import MetricsConfig
from gatewayd.store import StoreError
from gatewayd.supervisor import State

if TYPE_CHECKING:
    from gatewayd.app import App
    from gatewayd.supervisor import PluginRunner

log = structlog.get_logger("gatewayd.metrics")

#: How often the backlog age (the oldest stored reading) is read from the store.
BACKLOG_REFRESH_S = 5.0

#: Seconds one batch spends in ``worker.process`` (pipe round trip included).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
#: Readings per batch (``max_batch`` is at most 4096).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)

_CAMEL = re.compile(r"(?<!^)(?=[A-Z])")


def _reason_label(reason: str) -> str:
    """``store_full`` stays as is; an error class name ``BadPayload`` becomes ``bad_payload``."""
    return _CAMEL.sub("_", reason).lower()


class Metrics:
    """One daemon's metrics: the registry, the hot-path counters and the HTTP endpoint."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, open fds, CPU
        if GC_COLLECTOR is not None:
            GCCollector(registry=self.registry)
        if PLATFORM_COLLECTOR is not None:
            PlatformCollector(registry=self.registry)
        #: Requests by response code, and refusals by (code, reason): plain ints, read at scrape time.
        self.responses: dict[Code, int] = {}
        self.refusals: dict[tuple[Code, str], int] = {}
        #: Timestamp (``ts``) of the oldest reading still stored; None when the store is empty.
        self.oldest_ts: float | None = None
        self.latency = Histogram(
            "gatewayd_plugin_inference_seconds",
            "Time one batch spent in the plugin's worker (worker.process), by plugin and variant",
            ["plugin", "variant"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "gatewayd_plugin_batch_size",
            "Readings per batch a plugin's worker processed, by plugin",
            ["plugin"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(GatewayCollector(self))
        self.server: WSGIServer | None = None
        #: (address, port) the endpoint listens on, once serving.
        self.address: tuple[str, int] | None = None
        self._refresher: asyncio.Task[None] | None = None

    # -- the hot path ---------------------------------------------------------------------

    def count_response(self, code: Code, error: BaseException | None = None) -> None:
        """Count one ``POST /s/{node}`` answer; ``error`` is the RequestError/RenderableError if refused."""
        responses = self.responses
        responses[code] = responses.get(code, 0) + 1
        if error is not None:
            key = (code, getattr(error, "reason", None) or type(error).__name__)
            self.refusals[key] = self.refusals.get(key, 0) + 1

    def batch_observer(self, plugin: str) -> Callable[[str, int, float], None]:
        """The callback a PluginRunner calls after each processed batch: (variant, size, seconds)."""
        size = self.batch_size.labels(plugin)
        latency: dict[str, Histogram] = {}

        def observe(variant: str, n: int, seconds: float) -> None:
            child = latency.get(variant)
            if child is None:
                child = latency[variant] = self.latency.labels(plugin, variant)
            child.observe(seconds)
            size.observe(n)

        return observe

    # -- the endpoint -----------------------------------------------------------------------

    def start(self, cfg: MetricsConfig) -> bool:
        """Start the backlog-age task and the HTTP endpoint on its own thread.

        A bind failure is logged and returns False: the daemon runs on without the endpoint.
        """
        if self._refresher is None:
            self._refresher = asyncio.get_running_loop().create_task(self._refresh(), name="metrics")
        try:
            server, _thread = start_http_server(cfg.port, addr=cfg.bind, registry=self.registry)
        except OSError as e:
            log.error("metrics_bind_failed", bind=cfg.bind, port=cfg.port, error=str(e))
            return False
        self.server = server
        host, port = server.server_address[:2]
        self.address = (str(host), int(port))
        log.info("metrics_serving", url=f"http://{_host(self.address[0])}:{self.address[1]}/metrics")
        return True

    async def stop(self) -> None:
        """Stop the backlog-age task and the endpoint, and close its socket."""
        task, self._refresher = self._refresher, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        server, self.server = self.server, None
        if server is not None:
            await asyncio.to_thread(server.shutdown)  # waits for serve_forever's poll (≤ 0.5 s)
            server.server_close()

    async def _refresh(self) -> None:
        """Keep :attr:`oldest_ts` fresh for the backlog age."""
        while True:
            store = self.app.store
            if store is not None:
                try:
                    self.oldest_ts = await store.oldest_ts() if store.readings_count else None
                except StoreError as e:
                    log.debug("metrics_backlog_unavailable", error=str(e))
            await asyncio.sleep(BACKLOG_REFRESH_S)


def _host(addr: str) -> str:
    return f"[{addr}]" if ":" in addr else addr


class GatewayCollector(Collector):
    """Reads the daemon's state when Prometheus scrapes; nothing is kept between scrapes."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[Metric]:
        yield from self._requests()
        yield from self._store()
        yield from self._mqtt()
        yield from self._coap()
        yield from self._plugins()

    def _requests(self) -> Iterator[Metric]:
        app = self.m.app
        info = GaugeMetricFamily(
            "gatewayd_info", "The gateway's id and gatewayd's version", labels=["gateway", "version"]
        )
        info.add_metric([app.cfg.gateway.id, gatewayd.__version__], 1)
        yield info
        serving = app.serving.is_set() and not app.stop_requested.is_set()
        yield GaugeMetricFamily(
            "gatewayd_serving",
            "1 while the CoAP server takes readings, 0 while starting or stopping",
            value=int(serving),
        )
        req = CounterMetricFamily(
            "gatewayd_requests", "POST /s/{node} requests answered, by CoAP response code", labels=["code"]
        )
        for code, n in sorted(self.m.responses.copy().items()):
            req.add_metric([code.dotted], n)
        yield req
        intake = app.intake
        yield GaugeMetricFamily(
            "gatewayd_requests_inflight",
            "Requests being decoded and stored now (beyond [coap] max_inflight_requests: 5.03 overloaded)",
            value=intake.inflight if intake is not None else 0,
        )
        ref = CounterMetricFamily(
            "gatewayd_requests_refused",
            "POST /s/{node} requests refused, by CoAP code and reason (5.03: store_full, queue_full, "
            "shutting_down, ...; 4.xx: the error, e.g. bad_payload, too_large)",
            labels=["code", "reason"],
        )
        for (code, reason), n in sorted(self.m.refusals.copy().items()):
            ref.add_metric([code.dotted, _reason_label(reason)], n)
        yield ref

    def _store(self) -> Iterator[Metric]:
        store = self.m.app.store
        if store is None:
            return
        yield CounterMetricFamily(
            "gatewayd_readings_accepted", "Readings stored durably and answered 2.04", value=store.appended
        )
        yield GaugeMetricFamily(
            "gatewayd_store_readings",
            "Readings held in the store (not yet published or processed)",
            value=store.readings_count,
        )
        yield GaugeMetricFamily(
            "gatewayd_store_readings_max",
            "The store's bound ([store] max_readings); beyond it POSTs get 5.03",
            value=store.max_readings,
        )
        yield GaugeMetricFamily(
            "gatewayd_outbox_entries",
            "Messages (readings and results) waiting in the outbox to be published",
            value=store.outbox_count,
        )
        oldest = self.m.oldest_ts
        age = 0.0 if oldest is None or not store.readings_count else max(0.0, time.time() - oldest)
        yield GaugeMetricFamily(
            "gatewayd_backlog_age_seconds",
            f"Age (from its timestamp) of the oldest reading still stored, i.e. not yet published or "
            f"processed; 0 when none; refreshed every {BACKLOG_REFRESH_S:g} s",
            value=age,
        )
        yield CounterMetricFamily(
            "gatewayd_store_commits", "Store transactions committed (group commits)", value=store.commits
        )

    def _mqtt(self) -> Iterator[Metric]:
        pub = self.m.app.publisher
        if pub is None:
            return
        yield GaugeMetricFamily(
            "gatewayd_mqtt_connected", "1 while connected to the MQTT broker", value=int(pub.connected)
        )
        yield CounterMetricFamily(
            "gatewayd_mqtt_published",
            "Outbox messages published and acknowledged (PUBACK)",
            value=pub.published,
        )
        yield CounterMetricFamily(
            "gatewayd_mqtt_reconnects",
            "MQTT connections lost or failed to open (each followed by a reconnect after backoff)",
            value=pub.reconnects,
        )

    def _coap(self) -> Iterator[Metric]:
        caches = list(self.m.app.dedup)
        yield GaugeMetricFamily(
            "gatewayd_coap_dedup_entries",
            "(remote, message id) pairs remembered for duplicate detection",
            value=sum(len(c) for c in caches),
        )
        yield CounterMetricFamily(
            "gatewayd_coap_duplicates",
            "Duplicate CoAP messages answered from the cache (not stored again)",
            value=sum(c.duplicates for c in caches),
        )
        yield CounterMetricFamily(
            "gatewayd_coap_dedup_evicted_early",
            "Duplicate-cache entries dropped before their lifetime because the cache was full",
            value=sum(c.evicted_early for c in caches),
        )
        uploads = self.m.app.uploads
        if uploads is not None:
            yield GaugeMetricFamily(
                "gatewayd_coap_uploads_open", "Block-wise uploads in progress", value=len(uploads)
            )
            yield GaugeMetricFamily(
                "gatewayd_coap_upload_bytes",
                "Bytes held by block-wise uploads in progress",
                value=uploads.buffered_bytes(),
            )
            yield CounterMetricFamily(
                "gatewayd_coap_uploads_expired",
                "Block-wise uploads dropped because no block came for upload_timeout_s",
                value=uploads.expired,
            )

    def _plugins(self) -> Iterator[Metric]:
        runners = list(self.m.app.runners)
        state = GaugeMetricFamily(
            "gatewayd_plugin_state",
            "1 for the plugin's current state, 0 for the others",
            labels=["plugin", "state"],
        )
        for r in runners:
            for s in State:
                state.add_metric([r.cfg.name, str(s)], int(s is r.state))
        yield state
        for family, name, help_text, value in _PER_PLUGIN:
            metric = family(name, help_text, labels=["plugin"])
            for r in runners:
                metric.add_metric([r.cfg.name], value(r))
            yield metric
        rss = GaugeMetricFamily(
            "gatewayd_plugin_worker_resident_memory_bytes",
            "Resident memory of each worker process",
            labels=["plugin", "instance"],
        )
        results = CounterMetricFamily(
            "gatewayd_plugin_results",
            "Readings completed by variant: main, fallback, degraded, expired, error",
            labels=["plugin", "variant"],
        )
        for r in runners:
            for inst in [*r.instances, *([r.fallback] if r.fallback else [])]:
                worker = inst.worker
                if worker is not None:
                    rss.add_metric([r.cfg.name, inst.label], worker.rss_mb() * 1024 * 1024)
            for variant, n in sorted(r.results.copy().items()):
                results.add_metric([r.cfg.name, variant], n)
        yield rss
        yield results


#: The series with one sample per plugin: (family, name, help, the runner's value).
_PER_PLUGIN: tuple[
    tuple[type[GaugeMetricFamily | CounterMetricFamily], str, str, Callable[[PluginRunner], float]], ...
]
_PER_PLUGIN = (
    (GaugeMetricFamily, "gatewayd_plugin_instances_ready", "Main worker instances ready",
     lambda r: sum(1 for i in r.instances if i.state is State.READY)),
    (GaugeMetricFamily, "gatewayd_plugin_fallback_active", "1 while the fallback (or degraded mode) serves",
     lambda r: int(r.fallback_active)),
    (GaugeMetricFamily, "gatewayd_plugin_queue_depth",
     "Readings queued for the plugin, waiting or in a batch (what queue_size bounds)",
     lambda r: len(r.queue)),
    (GaugeMetricFamily, "gatewayd_plugin_queue_waiting", "Readings queued and not yet in a batch",
     lambda r: r.queue.waiting),
    (GaugeMetricFamily, "gatewayd_plugin_queue_capacity", "The plugin's queue_size; beyond it POSTs get 5.03",
     lambda r: r.queue.capacity),
    (CounterMetricFamily, "gatewayd_plugin_restarts",
     "Worker restarts (crash, hang past the deadline, failed load)",
     lambda r: r.restarts),
    (CounterMetricFamily, "gatewayd_plugin_recycled", "Workers replaced for passing memory_limit_mb",
     lambda r: r.recycled),
    (CounterMetricFamily, "gatewayd_plugin_batches",
     "Batches completed (processed, expired, degraded or given up)",
     lambda r: r.batches),
    (CounterMetricFamily, "gatewayd_plugin_readings_processed", "Readings completed, whatever the outcome",
     lambda r: r.processed),
    (CounterMetricFamily, "gatewayd_plugin_expired",
     "Readings older than max_age_s when their turn came (result expired, not processed)",
     lambda r: r.expired),
    (CounterMetricFamily, "gatewayd_plugin_given_up", "Readings given up after max_attempts (result error)",
     lambda r: r.errors),
    (CounterMetricFamily, "gatewayd_plugin_degraded",
     "Readings answered by the degraded fallback (result degraded, not processed)",
     lambda r: r.results.get("degraded", 0)),
)  # fmt: skip
