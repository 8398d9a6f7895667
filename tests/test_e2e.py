"""End to end over real UDP CoAP and a real Mosquitto: readings and results flow, errors are answered."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from pathlib import Path

import aiocoap
import cbor2
import pytest
from aiocoap.numbers import codes
from conftest import collect, make_config, post, running

from gatewayd.testing import Mosquitto

ANOMALY = {"name": "anomaly", "plugin": "anomaly", "max_wait_ms": 10}
PUMP = {"temperature": 55.0, "humidity": 45.0, "vibration": 2.2}


async def test_cbor_map_reading_and_result_reach_mqtt(
    tmp_path: Path, broker: Mosquitto, coap_client: aiocoap.Context
) -> None:
    """A CBOR map posted by aiocoap is answered 2.04 and appears on MQTT with its anomaly result."""
    cfg = make_config(tmp_path, broker.port, plugins=[ANOMALY])
    async with collect(broker.port) as got, running(cfg):
        resp = await post(coap_client, cfg.coap.port, "pump-1", cbor2.dumps(PUMP))
        assert resp.code == codes.CHANGED
        await got.wait(lambda g: g.json("results/anomaly/pump-1"))
        reading = got.json("gatewayd/gw1/readings/pump-1")[0]
        result = got.json("gatewayd/gw1/results/anomaly/pump-1")[0]
    assert reading["fields"] == PUMP and reading["node"] == "pump-1"
    assert abs(reading["ts"] - time.time()) < 60
    assert result["reading_id"] == reading["id"] and result["anomaly"] is False
    assert result["score"] < result["threshold"]


async def test_status_is_retained_online_and_offline_after_stop(tmp_path: Path, broker: Mosquitto) -> None:
    """The status topic is retained 'online' while running and 'offline' after a clean stop."""
    cfg = make_config(tmp_path, broker.port)
    async with running(cfg):
        async with collect(broker.port, "gatewayd/gw1/status") as live:
            await live.wait(lambda g: any(m[1] == b"online" for m in g.messages))
        # A subscriber that comes later gets the retained message.
        async with collect(broker.port, "gatewayd/gw1/status") as late:
            await late.wait(lambda g: bool(g.messages))
            assert late.messages[0] == ("gatewayd/gw1/status", b"online", True)
    async with collect(broker.port, "gatewayd/gw1/status") as after:
        await after.wait(lambda g: bool(g.messages))
        assert after.messages[0] == ("gatewayd/gw1/status", b"offline", True)


async def test_senml_pack_is_resolved(
    tmp_path: Path, broker: Mosquitto, coap_client: aiocoap.Context
) -> None:
    """SenML-CBOR base name, base time and base unit are resolved; records at one time form one reading."""
    pack = [
        {-2: "pump.", -3: 1_700_000_000.0, -4: "Cel", 0: "temperature", 2: 51.5},
        {0: "humidity", 1: "%RH", 2: 40},
        {0: "state", 3: "running"},
        {0: "vibration", 6: 10, 1: "mm/s", 2: 2.5},
    ]
    cfg = make_config(tmp_path, broker.port)
    async with collect(broker.port) as got, running(cfg):
        resp = await post(coap_client, cfg.coap.port, "pump-2", cbor2.dumps(pack), cf=112)
        assert resp.code == codes.CHANGED
        await got.wait(lambda g: len(g.json("readings/pump-2")) == 2)
    first, second = got.json("readings/pump-2")
    assert first["ts"] == 1_700_000_000.0
    assert first["fields"] == {"pump.temperature": 51.5, "pump.humidity": 40, "pump.state": "running"}
    assert first["units"] == {"pump.temperature": "Cel", "pump.humidity": "%RH", "pump.state": "Cel"}
    assert second["ts"] == 1_700_000_010.0 and second["fields"] == {"pump.vibration": 2.5}


def coap_client_exe() -> str:
    """libcoap's client; Debian ships it as coap-client-{notls,openssl,gnutls}."""
    for name in ("coap-client", "coap-client-notls", "coap-client-openssl", "coap-client-gnutls"):
        if exe := shutil.which(name):
            return exe
    pytest.fail("libcoap's coap-client not found: install the Debian package libcoap3-bin")


async def test_libcoap_client_posts_and_discovers(tmp_path: Path, broker: Mosquitto) -> None:
    """libcoap's coap-client (a client nobody here wrote) posts CBOR and reads /.well-known/core."""
    body = tmp_path / "reading.cbor"
    body.write_bytes(cbor2.dumps({"temperature": 20.5}))
    cfg = make_config(tmp_path, broker.port)
    base = f"coap://127.0.0.1:{cfg.coap.port}"
    async with collect(broker.port) as got, running(cfg):
        post_cmd = [coap_client_exe(), "-m", "post", "-t", "60", "-f", str(body), "-v", "6", f"{base}/s/lc-1"]
        out = await asyncio.to_thread(subprocess.run, post_cmd, capture_output=True, text=True, timeout=30)
        assert "2.04" in out.stdout + out.stderr, out
        await got.wait(lambda g: g.json("readings/lc-1"))
        wkc = await asyncio.to_thread(
            subprocess.run,
            [coap_client_exe(), "-m", "get", f"{base}/.well-known/core"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert got.json("readings/lc-1")[0]["fields"] == {"temperature": 20.5}
    assert "</s>" in wkc.stdout and 'rt="gatewayd.readings"' in wkc.stdout


async def test_error_answers(tmp_path: Path, broker: Mosquitto, coap_client: aiocoap.Context) -> None:
    """Bad CBOR is 4.00 with a diagnostic, another format 4.15, an oversized body 4.13 with Size1."""
    cfg = make_config(tmp_path, broker.port, coap={"max_body_bytes": 600})
    async with collect(broker.port) as got, running(cfg):
        port = cfg.coap.port
        bad = await post(coap_client, port, "n1", b"\xff\x00garbage")
        assert bad.code == codes.BAD_REQUEST and b"invalid CBOR" in bad.payload
        shape = await post(coap_client, port, "n1", cbor2.dumps([1, 2]))
        assert shape.code == codes.BAD_REQUEST and b"expected a map" in shape.payload
        senml = await post(coap_client, port, "n1", cbor2.dumps([{0: "x"}]), cf=112)
        assert senml.code == codes.BAD_REQUEST and b"no value" in senml.payload
        text = await post(coap_client, port, "n1", b"t=1", cf=0)
        assert text.code == codes.UNSUPPORTED_CONTENT_FORMAT
        none = await post(coap_client, port, "n1", cbor2.dumps({"x": 1}), cf=None)
        assert none.code == codes.UNSUPPORTED_CONTENT_FORMAT
        bad_node = await post(coap_client, port, "a+b", cbor2.dumps({"x": 1}))
        assert bad_node.code == codes.BAD_REQUEST
        big = await post(coap_client, port, "n1", cbor2.dumps({"blob": b"x" * 2000}))
        assert big.code == codes.REQUEST_ENTITY_TOO_LARGE and big.opt.size1 == 600
        ok = await post(coap_client, port, "n1", cbor2.dumps({"x": 1}))
        assert ok.code == codes.CHANGED
        await got.wait(lambda g: g.json("readings/n1"))
        await asyncio.sleep(0.3)
    assert len(got.json("readings/")) == 1, "only the valid post was stored"


async def test_blockwise_upload_refused_before_it_is_complete(
    tmp_path: Path, broker: Mosquitto, coap_client: aiocoap.Context
) -> None:
    """A block-wise POST that announces or reaches more than the maximum gets 4.13 during the transfer."""
    cfg = make_config(tmp_path, broker.port, coap={"max_body_bytes": 1500})
    async with running(cfg):
        fits = await post(coap_client, cfg.coap.port, "cam", cbor2.dumps({"img": b"y" * 1400}))
        assert fits.code == codes.CHANGED
        huge = await post(coap_client, cfg.coap.port, "cam", cbor2.dumps({"img": b"x" * 50_000}))
        assert huge.code == codes.REQUEST_ENTITY_TOO_LARGE and huge.opt.size1 == 1500


async def test_store_full_answers_503_with_max_age(tmp_path: Path, coap_client: aiocoap.Context) -> None:
    """With the broker away the backlog fills; past store.max_readings POSTs get 5.03 with Max-Age."""
    broker = Mosquitto()  # never started: nothing drains the outbox
    cfg = make_config(tmp_path, broker.port, store={"max_readings": 10, "retry_after_s": 7})
    async with running(cfg):
        answers = [await post(coap_client, cfg.coap.port, "n", cbor2.dumps({"x": i})) for i in range(12)]
    assert [a.code for a in answers[:10]] == [codes.CHANGED] * 10
    assert all(a.code == codes.SERVICE_UNAVAILABLE and a.opt.max_age == 7 for a in answers[10:])


async def test_plugin_queue_full_pushes_back_only_its_nodes(
    tmp_path: Path, broker: Mosquitto, coap_client: aiocoap.Context
) -> None:
    """A full plugin queue answers 5.03 + Max-Age to nodes routed to it; other nodes keep getting 2.04."""
    slow = {
        "name": "echo",
        "plugin": "fake_plugins:Echo",
        "queue_size": 2,
        "retry_after_s": 3,
        "match": {"nodes": ["busy-*"]},
        "max_batch": 1,
        "deadline_s": 2,
        "max_attempts": 1,
    }
    cfg = make_config(tmp_path, broker.port, plugins=[slow])
    async with running(cfg):
        port = cfg.coap.port
        first = await post(coap_client, port, "busy-1", cbor2.dumps({"hang": 1}))  # blocks the worker
        assert first.code == codes.CHANGED
        answers = [await post(coap_client, port, "busy-1", cbor2.dumps({"x": i})) for i in range(3)]
        other = await post(coap_client, port, "quiet-1", cbor2.dumps({"x": 1}))
    assert [a.code for a in answers[:1]] == [codes.CHANGED]
    assert answers[-1].code == codes.SERVICE_UNAVAILABLE and answers[-1].opt.max_age == 3
    assert other.code == codes.CHANGED


async def test_well_known_core_lists_readings_resource(
    tmp_path: Path, broker: Mosquitto, coap_client: aiocoap.Context
) -> None:
    """GET /.well-known/core answers RFC 6690 link-format naming /s and its content formats."""
    cfg = make_config(tmp_path, broker.port)
    async with running(cfg):
        req = aiocoap.Message(code=aiocoap.GET, uri=f"coap://127.0.0.1:{cfg.coap.port}/.well-known/core")
        resp = await coap_client.request(req).response
    assert resp.code == codes.CONTENT and resp.opt.content_format == 40
    assert b"</s>" in resp.payload and b'ct="60 112 22 23"' in resp.payload


async def test_idle_gateway_does_not_spin(
    tmp_path: Path, broker: Mosquitto, coap_client: aiocoap.Context
) -> None:
    """With nothing to publish the publisher sleeps: a quiet second costs almost no store transactions."""
    cfg = make_config(tmp_path, broker.port, plugins=[ANOMALY])
    async with collect(broker.port) as got, running(cfg) as app:
        assert (await post(coap_client, cfg.coap.port, "pump-1", cbor2.dumps(PUMP))).code == codes.CHANGED
        await got.wait(lambda g: g.json("results/anomaly/pump-1"))
        await asyncio.sleep(0.3)
        assert app.store is not None
        before = app.store.commits
        await asyncio.sleep(1.0)
        idle_commits = app.store.commits - before
    assert idle_commits <= 3, idle_commits  # the publisher's 1 s poll, nothing more
