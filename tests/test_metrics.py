"""The Prometheus endpoint: real gatewayd, real CoAP over UDP, real Mosquitto, scraped over HTTP."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import aiocoap
import cbor2
import pytest
from aiocoap.numbers import codes
from aiocoap.optiontypes import OpaqueOption
from conftest import collect, make_config, post, running
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from gatewayd import metrics as metrics_module
from gatewayd.testing import Mosquitto, free_port

ROOT = Path(__file__).parent.parent
DASHBOARD = ROOT / "examples" / "grafana-dashboard.json"
ANOMALY = {"name": "anomaly", "plugin": "anomaly", "max_wait_ms": 10}
PUMP = {"temperature": 55.0, "humidity": 45.0, "vibration": 2.2}
FAST = {"max_wait_ms": 5, "backoff_initial_s": 0.1, "backoff_max_s": 0.4, "restart_budget": 100}


def metrics_on() -> dict[str, Any]:
    return {"enabled": True, "port": free_port()}


def fetch(port: int, host: str = "127.0.0.1") -> str:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as resp:
        body: bytes = resp.read()
    return body.decode()


class Scrape:
    """One scrape, parsed by prometheus_client's own parser."""

    def __init__(self, text: str) -> None:
        self.families = list(text_string_to_metric_families(text))

    def samples(self, name: str, **labels: str) -> list[Sample]:
        return [
            s
            for f in self.families
            for s in f.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]

    def value(self, name: str, **labels: str) -> float:
        """The sum over all samples of ``name`` whose labels include ``labels`` (0 if none)."""
        return sum(s.value for s in self.samples(name, **labels))

    def names(self) -> set[str]:
        """Every series name this scrape offers, including a histogram's and a counter's suffixes."""
        out = set()
        for f in self.families:
            out.add(f.name)
            out.update(s.name for s in f.samples)
            if f.type == "counter":
                out.add(f"{f.name}_total")
            if f.type == "histogram":
                out.update(f"{f.name}_{suffix}" for suffix in ("bucket", "count", "sum"))
        return out


async def scrape(port: int) -> Scrape:
    return Scrape(await asyncio.to_thread(fetch, port))


async def scrape_until(port: int, ok: Any, timeout: float = 15.0) -> Scrape:
    """Scrape until ``ok(scrape)`` holds; the last scrape is returned for the assertions."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        s = await scrape(port)
        if ok(s) or loop.time() > deadline:
            return s
        await asyncio.sleep(0.1)


async def test_requests_are_counted_by_code_and_reason(
    tmp_path: Path, broker: Mosquitto, coap_client: aiocoap.Context
) -> None:
    """2.04, 4.00, 4.15 and 4.02 counts match what was posted, with a reason per refusal."""
    cfg = make_config(tmp_path, broker.port, metrics=metrics_on())
    async with collect(broker.port) as got, running(cfg):
        port = cfg.coap.port
        for i in range(3):
            assert (await post(coap_client, port, "n1", cbor2.dumps({"x": i}))).code == codes.CHANGED
        for _ in range(2):
            assert (await post(coap_client, port, "n1", b"\xff\x00garbage")).code == codes.BAD_REQUEST
        assert (await post(coap_client, port, "n1", b"t=1", cf=0)).code == codes.UNSUPPORTED_CONTENT_FORMAT
        bad_option = aiocoap.Message(
            code=aiocoap.POST,
            uri=f"coap://127.0.0.1:{port}/s/n1",
            payload=cbor2.dumps({"x": 1}),
            content_format=60,
        )
        bad_option.opt.add_option(OpaqueOption(2049, b"x"))
        assert (await coap_client.request(bad_option).response).code == codes.BAD_OPTION
        await got.wait(lambda g: len(g.json("readings/n1")) == 3)
        m = await scrape_until(cfg.metrics.port, lambda s: s.value("gatewayd_outbox_entries") == 0)
    assert m.value("gatewayd_requests_total", code="2.04") == 3
    assert m.value("gatewayd_requests_total", code="4.00") == 2
    assert m.value("gatewayd_requests_total", code="4.15") == 1
    assert m.value("gatewayd_requests_total", code="4.02") == 1  # refused before the resource
    assert m.value("gatewayd_requests_total") == 7
    assert m.value("gatewayd_requests_refused_total", code="4.00", reason="bad_payload") == 2
    assert m.value("gatewayd_requests_refused_total", code="4.15", reason="unsupported_format") == 1
    assert m.value("gatewayd_readings_accepted_total") == 3
    assert m.value("gatewayd_mqtt_published_total") >= 3
    assert m.value("gatewayd_mqtt_connected") == 1
    assert m.value("gatewayd_outbox_entries") == 0 and m.value("gatewayd_store_readings") == 0
    assert m.value("gatewayd_serving") == 1
    assert m.value("gatewayd_info", gateway="gw1") == 1


async def test_plugin_state_counters_and_histograms(
    tmp_path: Path, broker: Mosquitto, coap_client: aiocoap.Context
) -> None:
    """The anomaly plugin is ready, counts what it processed, and its latency histogram counts its batches."""
    n = 12
    cfg = make_config(tmp_path, broker.port, plugins=[ANOMALY], metrics=metrics_on())
    async with collect(broker.port) as got, running(cfg):
        for _ in range(n):
            assert (await post(coap_client, cfg.coap.port, "pump-1", cbor2.dumps(PUMP))).code == codes.CHANGED
        await got.wait(lambda g: len(g.json("results/anomaly/pump-1")) == n)
        m = await scrape_until(
            cfg.metrics.port, lambda s: s.value("gatewayd_plugin_readings_processed_total") == n
        )
    a = {"plugin": "anomaly"}
    assert m.value("gatewayd_plugin_state", **a, state="ready") == 1
    assert m.value("gatewayd_plugin_state", **a) == 1, "exactly one state is current"
    assert len(m.samples("gatewayd_plugin_state", **a)) >= 6, "every state is exported"
    assert m.value("gatewayd_plugin_instances_ready", **a) == 1
    assert m.value("gatewayd_plugin_readings_processed_total", **a) == n
    assert m.value("gatewayd_plugin_results_total", **a, variant="main") == n
    batches = m.value("gatewayd_plugin_batches_total", **a)
    assert 1 <= batches <= n
    assert m.value("gatewayd_plugin_inference_seconds_count", **a) == batches
    assert m.value("gatewayd_plugin_inference_seconds_sum", **a) > 0
    assert m.value("gatewayd_plugin_inference_seconds_bucket", **a, variant="main", le="+Inf") == batches
    assert m.value("gatewayd_plugin_batch_size_count", **a) == batches
    assert m.value("gatewayd_plugin_batch_size_sum", **a) == n
    assert m.value("gatewayd_plugin_queue_depth", **a) == 0
    assert m.value("gatewayd_plugin_queue_capacity", **a) == 10_000
    assert m.value("gatewayd_plugin_worker_resident_memory_bytes", **a, instance="main-0") > 1e6
    for zero in ("restarts", "expired", "given_up", "degraded", "recycled"):
        assert m.value(f"gatewayd_plugin_{zero}_total", **a) == 0, zero


async def test_degraded_expired_and_restarts_are_each_named(
    tmp_path: Path, broker: Mosquitto, coap_client: aiocoap.Context
) -> None:
    """A plugin that cannot load counts restarts and degraded results; a stale reading counts as expired."""
    flag = tmp_path / "fault"
    flag.touch()
    broken = {"name": "dg", "plugin": "fake_plugins:Echo", **FAST, "fallback": {"degraded": True}}
    broken["options"] = {"flag": str(flag), "fault": "load"}
    stale = {"name": "old", "plugin": "fake_plugins:Echo", **FAST, "max_age_s": 10}
    cfg = make_config(tmp_path, broker.port, plugins=[broken, stale], metrics=metrics_on())
    async with running(cfg):
        port = cfg.metrics.port
        await scrape_until(port, lambda s: s.value("gatewayd_plugin_state", plugin="dg", state="degraded"))
        old = {"t": -100, "a": 1}  # t below 2**28 is relative to now: 100 s ago
        assert (await post(coap_client, cfg.coap.port, "n", cbor2.dumps(old))).code == codes.CHANGED
        m = await scrape_until(
            port,
            lambda s: s.value("gatewayd_plugin_degraded_total") and s.value("gatewayd_plugin_expired_total"),
        )
    assert m.value("gatewayd_plugin_state", plugin="dg", state="degraded") == 1
    assert m.value("gatewayd_plugin_fallback_active", plugin="dg") == 1
    assert m.value("gatewayd_plugin_restarts_total", plugin="dg") >= 1
    assert m.value("gatewayd_plugin_degraded_total", plugin="dg") == 1
    assert m.value("gatewayd_plugin_results_total", plugin="dg", variant="degraded") == 1
    assert m.value("gatewayd_plugin_expired_total", plugin="old") == 1
    assert m.value("gatewayd_plugin_results_total", plugin="old", variant="expired") == 1
    assert m.value("gatewayd_plugin_inference_seconds_count", plugin="old") == 0, "expired: never processed"


async def test_backlog_gauges_and_store_full_by_reason(
    tmp_path: Path, coap_client: aiocoap.Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the broker away the backlog gauges grow, its age shows, and 5.03s are counted as store_full."""
    monkeypatch.setattr(metrics_module, "BACKLOG_REFRESH_S", 0.1)
    broker = Mosquitto()  # never started: nothing drains the outbox
    cfg = make_config(tmp_path, broker.port, store={"max_readings": 10}, metrics=metrics_on())
    async with running(cfg):
        port = cfg.coap.port
        answers = [await post(coap_client, port, "n", cbor2.dumps({"t": -100, "x": i})) for i in range(12)]
        assert [a.code for a in answers].count(codes.SERVICE_UNAVAILABLE) == 2
        m = await scrape_until(
            cfg.metrics.port,
            lambda s: s.value("gatewayd_backlog_age_seconds") and s.value("gatewayd_mqtt_reconnects_total"),
        )
    assert m.value("gatewayd_store_readings") == 10
    assert m.value("gatewayd_store_readings_max") == 10
    assert m.value("gatewayd_outbox_entries") == 10
    assert 99 <= m.value("gatewayd_backlog_age_seconds") < 200
    assert m.value("gatewayd_requests_total", code="5.03") == 2
    assert m.value("gatewayd_requests_refused_total", code="5.03", reason="store_full") == 2
    assert m.value("gatewayd_readings_accepted_total") == 10
    assert m.value("gatewayd_mqtt_connected") == 0
    assert m.value("gatewayd_mqtt_reconnects_total") >= 1


def outward_address() -> str | None:
    """This host's address on its default route, if it has one (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))
        except OSError:
            return None
        addr: str = s.getsockname()[0]
    return None if addr.startswith("127.") else addr


async def test_endpoint_is_loopback_only_and_reports_the_process(tmp_path: Path, broker: Mosquitto) -> None:
    """By default the endpoint listens on 127.0.0.1 only, and exports the process's RSS and open fds."""
    cfg = make_config(tmp_path, broker.port, metrics={"port": free_port(), "enabled": True})
    assert cfg.metrics.bind == "127.0.0.1", "the default"
    async with running(cfg) as app:
        assert app.metrics is not None and app.metrics.address == ("127.0.0.1", cfg.metrics.port)
        m = await scrape(cfg.metrics.port)
        if (other := outward_address()) is not None:
            with pytest.raises(OSError):
                await asyncio.to_thread(fetch, cfg.metrics.port, other)
    assert m.value("process_resident_memory_bytes") > 10e6
    assert m.value("process_open_fds") > 0
    with pytest.raises(OSError):  # stopped with the daemon, its socket closed
        fetch(cfg.metrics.port)


async def test_port_in_use_is_logged_and_the_daemon_serves(
    tmp_path: Path, broker: Mosquitto, coap_client: aiocoap.Context, caplog: pytest.LogCaptureFixture
) -> None:
    """A metrics port already taken is a logged error; CoAP keeps answering 2.04."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        cfg = make_config(tmp_path, broker.port, metrics={"enabled": True, "port": taken.getsockname()[1]})
        async with running(cfg) as app:
            assert (await post(coap_client, cfg.coap.port, "n", cbor2.dumps({"x": 1}))).code == codes.CHANGED
            assert app.metrics is not None and app.metrics.server is None
    assert any("metrics_bind_failed" in str(r.msg) for r in caplog.records), caplog.records


def dashboard_exprs(node: Any) -> Iterable[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "expr" and isinstance(v, str):
                yield v
            else:
                yield from dashboard_exprs(v)
    elif isinstance(node, list):
        for v in node:
            yield from dashboard_exprs(v)


async def test_grafana_dashboard_names_only_exported_metrics(
    tmp_path: Path, broker: Mosquitto, coap_client: aiocoap.Context
) -> None:
    """examples/grafana-dashboard.json is valid JSON whose every query names a metric the endpoint exports."""
    doc = json.loads(DASHBOARD.read_text())
    assert doc["schemaVersion"] >= 36 and doc["__inputs"][0]["name"] == "DS_PROMETHEUS"
    exprs = list(dashboard_exprs(doc["panels"]))
    assert len(exprs) >= 12
    cfg = make_config(tmp_path, broker.port, plugins=[ANOMALY], metrics=metrics_on())
    async with running(cfg):
        assert (await post(coap_client, cfg.coap.port, "pump-1", cbor2.dumps(PUMP))).code == codes.CHANGED
        m = await scrape_until(cfg.metrics.port, lambda s: s.value("gatewayd_plugin_batches_total") >= 1)
    exported = m.names()
    used = {name for e in exprs for name in re.findall(r"\b(?:gatewayd|process)_\w+", e)}
    assert used - exported == set(), f"the dashboard queries metrics nobody exports: {used - exported}"
    for family in ("gatewayd_requests", "gatewayd_plugin_inference_seconds", "gatewayd_backlog_age_seconds"):
        assert any(family in u for u in used), family
    for p in doc["panels"]:  # every panel's datasource is the input, not a hard-wired uid
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
