"""Wiring and lifecycle: start the parts in order, run until a signal, stop them in reverse."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from pathlib import Path

import aiocoap
import structlog

from gatewayd import coap, registry, systemd
from gatewayd.access import Access
from gatewayd.batching import PluginQueue
from gatewayd.config import Config
from gatewayd.credentials import CredentialsError
from gatewayd.intake import Intake
from gatewayd.metrics import Metrics
from gatewayd.mqtt import Publisher
from gatewayd.ratelimit import NodeLimiter
from gatewayd.router import Route, Router
from gatewayd.scheduler import Slots
from gatewayd.store import Store
from gatewayd.supervisor import PluginRunner
from gatewayd.updates import ModelStore, Updater
from gatewayd.uploads import Block1Spool

log = structlog.get_logger("gatewayd.app")

#: How long plugin runners get to finish their batch at shutdown.
RUNNER_STOP_S = 10.0


def status_path(cfg: Config) -> Path:
    return cfg.store.path.parent / "status.json"


class App:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.stop_requested = asyncio.Event()
        self.store: Store | None = None
        self.publisher: Publisher | None = None
        self.runners: list[PluginRunner] = []
        self.intake: Intake | None = None
        self.dedup: list[coap.DedupCache] = []
        self.coap_ctx: aiocoap.Context | None = None
        self.uploads: Block1Spool | None = None
        #: The access policy and the nodes' OSCORE contexts (locked while gatewayd runs).
        self.access: Access | None = None
        #: The Prometheus endpoint, when [metrics] enabled.
        self.metrics: Metrics | None = None
        #: Model updates over the air (commands on {prefix}/{gateway}/cmd/models/update).
        self.updater: Updater | None = None
        #: Set once the CoAP server answers (tests and the demo wait on it).
        self.serving = asyncio.Event()

    def request_stop(self, signame: str = "request") -> None:
        """Signal handlers only set this flag; the main task does the shutdown."""
        log.info("stop_requested", signal=signame)
        self.stop_requested.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_stop, sig.name)
        try:
            return await self._run()
        finally:
            if self.access is not None:  # after the CoAP server: a request in flight may need its context
                self.access.close()  # sequence numbers and replay windows to disk, locks released
            if self.metrics is not None:
                await self.metrics.stop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(sig)

    async def _run(self) -> int:
        cfg = self.cfg
        try:
            access = self.access = Access.from_config(cfg.security)
        except CredentialsError as e:  # e.g. a context another process holds, or one changed since check
            log.error("oscore_credentials_unusable", error=str(e))
            return 2
        if not access.oscore and cfg.security.unauthenticated == "refuse":
            log.warning(
                "every_post_refused",
                why='[security] unauthenticated = "refuse" and no node has an OSCORE context '
                "(oscore_credentials): every POST /s/{node} gets 4.01",
            )
        systemd.notify("STATUS=opening store")
        store = self.store = await Store.open(
            cfg.store.path,
            synchronous=cfg.store.synchronous,
            max_readings=cfg.store.max_readings,
            max_group=cfg.store.max_group,
        )
        publisher = self.publisher = Publisher(cfg.mqtt, cfg.gateway.id, store)
        store.on_outbox = publisher.wake
        metrics = None
        if cfg.metrics.enabled:
            metrics = self.metrics = Metrics(self)
            metrics.start(cfg.metrics)  # a port in use is logged; the daemon runs on without it

        routes = []
        slots = Slots(cfg.runtime.slots())
        models = ModelStore(cfg.models.store_path(cfg.store))
        for p in cfg.plugins:
            if not p.enabled:
                continue
            try:
                target = registry.resolve(p.plugin)
                fallback = p.fallback.plugin if p.fallback else None
                fallback_target = registry.resolve(fallback) if fallback else None
            except registry.PluginNotFound as e:
                log.error("plugin_skipped", plugin=p.name, error=str(e))
                continue
            queue = PluginQueue(p.queue_size)
            runner = PluginRunner(
                p, target, queue, store, slots, cfg.runtime.threads(), fallback_target, self._publish_state,
                on_batch=metrics.batch_observer(p.name) if metrics else None,
                worker_env=cfg.models.environ(),  # the bundle signature policy, for the plugins to apply
            )  # fmt: skip
            runner.bundle = models.current(p.name)  # installed by an update: it outlives restarts
            self.runners.append(runner)
            routes.append(Route(p.name, p.match, queue, p.retry_after_s))
        # A configured plugin that is missing now keeps its pending readings for when it is back.
        forgotten = await store.forget_plugins_except(p.name for p in cfg.plugins if p.enabled)
        if forgotten:
            log.warning("pending_dropped_for_unconfigured_plugins", readings=forgotten)
        for route in routes:
            backlog = await store.pending(route.name)
            route.queue.put(backlog)
            if backlog:
                log.info("plugin_backlog_restored", plugin=route.name, readings=len(backlog))

        self.updater = Updater(
            models, {r.cfg.name: r for r in self.runners},
            lambda doc: publisher.note("cmd/models/response", doc),
            trusted_keys=cfg.models.trusted_keys, require_signature=cfg.models.signature_required(),
        )  # fmt: skip
        publisher.on_command("cmd/models/update", self.updater.submit)

        limiter = NodeLimiter(cfg.limits.rate_per_s, cfg.limits.burst, cfg.limits.max_nodes)
        self.intake = Intake(
            store,
            Router(routes),
            retry_after_s=cfg.store.retry_after_s,
            limiter=limiter,
            max_inflight=cfg.coap.max_inflight_requests,
            overload_retry_after_s=cfg.coap.overload_retry_after_s,
        )
        self.coap_ctx, self.dedup, self.uploads = await coap.serve(
            self.intake, cfg.coap, metrics.count_response if metrics else None, access
        )
        tasks = {
            asyncio.create_task(publisher.run(), name="mqtt"),
            *(asyncio.create_task(r.run(), name=f"plugin:{r.cfg.name}") for r in self.runners),
        }
        watchdog = asyncio.create_task(self._watchdog(), name="watchdog")
        log.info(
            "serving",
            coap=f"[{cfg.coap.bind}]:{cfg.coap.port}",
            plugins=[r.cfg.name for r in self.runners],
            oscore_nodes=sorted(set(access.nodes.values())),
            unauthenticated=cfg.security.unauthenticated,
            store=str(cfg.store.path),
            readings=store.readings_count,
            outbox=store.outbox_count,
        )
        systemd.notify("READY=1", f"STATUS=serving on port {cfg.coap.port}")
        self.serving.set()
        self._write_status()

        stopper = asyncio.create_task(self.stop_requested.wait())
        done, _ = await asyncio.wait({stopper, *tasks}, return_when=asyncio.FIRST_COMPLETED)
        crashed = [t for t in done if t is not stopper]
        for t in crashed:
            log.error("task_crashed", task=t.get_name(), error=repr(t.exception()))
        await self._shutdown(tasks, watchdog, stopper)
        return 1 if crashed else 0

    async def _shutdown(self, tasks: set[asyncio.Task[None]], *others: asyncio.Task[object]) -> None:
        t0 = time.monotonic()
        systemd.notify("STOPPING=1", "STATUS=draining")
        assert self.intake is not None and self.store is not None and self.publisher is not None
        self.intake.closed = True
        if self.coap_ctx is not None:
            await self.coap_ctx.shutdown()
        if self.updater is not None:
            self.updater.cancel()  # the serving bundle stays; an unfinished probation is not retried
        for r in self.runners:
            r.stop()
        runner_tasks = [t for t in tasks if t.get_name().startswith("plugin:")]
        if runner_tasks:
            _, late = await asyncio.wait(runner_tasks, timeout=RUNNER_STOP_S)
            for t in late:
                t.cancel()
        self.publisher.stop(self.cfg.mqtt.drain_timeout_s)
        mqtt_tasks = [t for t in tasks if t.get_name() == "mqtt"]
        _, late = await asyncio.wait(mqtt_tasks, timeout=self.cfg.mqtt.drain_timeout_s + 5)
        for t in late:
            t.cancel()
        for o in others:
            o.cancel()
        await asyncio.gather(*tasks, *others, return_exceptions=True)
        self._write_status()
        await self.store.close()
        log.info("stopped", seconds=round(time.monotonic() - t0, 3), outbox_left=self.store.outbox_count)

    def _publish_state(self, runner: PluginRunner) -> None:
        snapshot = runner.snapshot()
        if self.publisher is not None:
            self.publisher.set_live(f"status/plugins/{runner.cfg.name}", snapshot)
        self._write_status()
        systemd.notify(f"STATUS=plugin {runner.cfg.name}: {snapshot['state']}")

    def status(self) -> dict[str, object]:
        """What `gatewayd status` shows: the daemon's and each plugin's state."""
        store = self.store
        return {
            "pid": os.getpid(),
            "gateway": self.cfg.gateway.id,
            "serving": self.serving.is_set() and not self.stop_requested.is_set(),
            "mqtt_connected": bool(self.publisher and self.publisher.connected),
            "readings_stored": store.readings_count if store else None,
            "outbox": store.outbox_count if store else None,
            "plugins": {r.cfg.name: r.snapshot() for r in self.runners},
            "ts": time.time(),
        }

    def _write_status(self) -> None:
        """Write status.json beside the store, atomically, for `gatewayd status`."""
        path = status_path(self.cfg)
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(self.status(), indent=1))
            tmp.replace(path)
        except OSError as e:
            log.warning("status_write_failed", error=str(e))

    async def _watchdog(self) -> None:
        """WATCHDOG=1 at half the unit's interval while the loop and the store answer."""
        interval = systemd.watchdog_interval_s()
        if interval is None or self.store is None:
            return
        while True:
            await asyncio.sleep(interval / 2)
            try:
                await asyncio.wait_for(self.store.ping(), interval / 4)
            except Exception as e:
                log.error("watchdog_store_unhealthy", error=repr(e))
                continue  # no WATCHDOG=1: systemd restarts us if this persists
            systemd.notify("WATCHDOG=1")
