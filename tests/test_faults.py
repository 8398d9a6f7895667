"""Faults: the broker goes away, the daemon is told to stop, a worker crashes, a CON is retransmitted."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import aiocoap
import cbor2
import pytest
from aiocoap.numbers import codes
from conftest import collect, gatewayd_cli, make_config, post, running

from gatewayd.testing import Mosquitto

ECHO = {
    "name": "echo",
    "plugin": "fake_plugins:Echo",
    "max_wait_ms": 5,
    "backoff_initial_s": 0.1,
    "backoff_max_s": 0.5,
}


@pytest.mark.parametrize("persistence", [True, False], ids=["persistent-broker", "empty-broker"])
async def test_broker_restart_mid_stream_loses_nothing(
    persistence: bool, tmp_path: Path, coap_client: aiocoap.Context
) -> None:
    """Stop the broker mid-stream and restart it (with its persistence, or empty): every id answered
    2.04 arrives, in order per node. gatewayd reconnects later than the subscriber re-subscribes, as a
    consumer with a lost session would before it can receive again."""
    broker = Mosquitto(persistence=persistence).start()
    try:
        cfg = make_config(tmp_path, broker.port, mqtt={"backoff_initial_s": 1.0, "backoff_max_s": 2.0})
        acked: dict[str, list[int]] = defaultdict(list)
        async with collect(broker.port, "gatewayd/gw1/readings/#", clean=False) as got, running(cfg):

            async def node(name: str, n: int, gap: float) -> None:
                for i in range(n):
                    resp = await post(coap_client, cfg.coap.port, name, cbor2.dumps({"i": i}))
                    assert resp.code == codes.CHANGED
                    acked[name].append(i)
                    await asyncio.sleep(gap)

            nodes = [asyncio.create_task(node(f"n{k}", 60, 0.01)) for k in range(3)]
            await asyncio.sleep(0.2)
            broker.stop()
            await asyncio.sleep(1.0)  # readings keep being accepted into the store meanwhile
            broker.start()
            await asyncio.gather(*nodes)
            await got.wait(lambda g: len({m["id"] for m in g.json("readings/")}) >= 180, timeout=30)
        seen: dict[str, list[int]] = defaultdict(list)
        for m in got.json("readings/"):
            seen[m["node"]].append(m["fields"]["i"])
        for name, sent in acked.items():
            # Duplicates are allowed (same id); after dropping them each node's order is preserved.
            first_seen = list(dict.fromkeys(seen[name]))
            assert first_seen == sent, f"{name}: {first_seen[:10]}... vs {sent[:10]}..."
        ids = [m["id"] for m in got.json("readings/")]
        by_id = {m["id"]: m["fields"]["i"] for m in got.json("readings/")}
        assert len(by_id) == 180 and all(
            by_id[i] == m["fields"]["i"] for i, m in zip(ids, got.json("readings/"), strict=False)
        )
    finally:
        broker.stop()


async def test_sigterm_drains_and_goes_offline(
    tmp_path: Path, broker: Mosquitto, coap_client: aiocoap.Context
) -> None:
    """SIGTERM to a running `gatewayd run`: exit 0 promptly, outbox published, status offline."""
    cfg = make_config(tmp_path, broker.port, plugins=[ECHO])
    conf = tmp_path / "gw.toml"
    conf.write_text(f"""
[gateway]
id = "gw1"
[coap]
bind = "127.0.0.1"
port = {cfg.coap.port}
[store]
path = "{tmp_path / "store.db"}"
[mqtt]
port = {broker.port}
[log]
level = "info"
[security]
unauthenticated = "allow"
[[plugins]]
name = "echo"
plugin = "fake_plugins:Echo"
max_wait_ms = 5
""")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gatewayd.cli", "run", "--config", str(conf)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=os.environ.copy(),
    )
    try:
        async with collect(broker.port) as got:
            await got.wait(
                lambda g: any(
                    json.loads(p).get("state") == "ready" for t, p, _ in g.messages if "status/plugins" in t
                ),
                timeout=30,
            )
            answers = await asyncio.gather(
                *(post(coap_client, cfg.coap.port, f"s{i}", cbor2.dumps({"i": i})) for i in range(20))
            )
            assert all(a.code == codes.CHANGED for a in answers)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            rc = await asyncio.to_thread(proc.wait, 30)
            elapsed = time.monotonic() - t0
            await got.wait(lambda g: ("gatewayd/gw1/status", b"offline", False) in g.messages)
        assert rc == 0 and elapsed < 15, (rc, elapsed)
        assert len({m["id"] for m in got.json("readings/")}) == 20
        out = proc.stdout.read().decode() if proc.stdout else ""
        assert '"event": "stopped"' in out and '"outbox_left": 0' in out, out[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()


async def test_worker_crash_is_restarted_and_poison_batch_gets_error(
    tmp_path: Path, broker: Mosquitto, coap_client: aiocoap.Context
) -> None:
    """A plugin that os._exit()s on one reading: restarted with backoff, that reading gets an error
    result after max_attempts, and the readings after it are processed by a fresh worker."""
    cfg = make_config(tmp_path, broker.port, plugins=[{**ECHO, "max_batch": 1, "max_attempts": 2}])
    async with collect(broker.port) as got, running(cfg) as app:
        port = cfg.coap.port
        assert (await post(coap_client, port, "n", cbor2.dumps({"x": 1}))).code == codes.CHANGED
        assert (await post(coap_client, port, "n", cbor2.dumps({"crash": 1}))).code == codes.CHANGED
        assert (await post(coap_client, port, "n", cbor2.dumps({"y": 1}))).code == codes.CHANGED
        await got.wait(lambda g: len(g.json("results/echo/n")) == 3, timeout=30)
        states = [m["state"] for m in got.json("status/plugins/echo")]
        restarts = app.runners[0].restarts
    results = {tuple(r.get("fields", ["error"])): r for r in got.json("results/echo/n")}
    assert "gave up after 2 attempts" in results[("error",)]["error"]
    assert results[("x",)]["pid"] != results[("y",)]["pid"], "a new worker process served after the crash"
    assert "backoff" in states and states[-1] == "ready" and restarts == 2


async def test_plugin_exception_is_retried_then_answered_with_error(
    tmp_path: Path, broker: Mosquitto, coap_client: aiocoap.Context
) -> None:
    """A plugin that raises keeps its worker; the batch becomes error results after max_attempts."""
    cfg = make_config(tmp_path, broker.port, plugins=[{**ECHO, "max_attempts": 3}])
    async with collect(broker.port) as got, running(cfg) as app:
        assert (await post(coap_client, cfg.coap.port, "n", cbor2.dumps({"boom": 1}))).code == codes.CHANGED
        await got.wait(lambda g: g.json("results/echo/n"))
        restarts = app.runners[0].restarts
    assert "ValueError: boom requested" in got.json("results/echo/n")[0]["error"] and restarts == 0


async def test_plugin_that_fails_to_load_backs_off_and_daemon_keeps_ingesting(
    tmp_path: Path, broker: Mosquitto, coap_client: aiocoap.Context
) -> None:
    """A plugin whose load() raises stays in backoff; readings are still stored and published."""
    flag = tmp_path / "fault"
    flag.touch()
    failing = {**ECHO, "options": {"fault": "load", "flag": str(flag)}}
    not_a_plugin = {**ECHO, "name": "nothing", "plugin": "fake_plugins:NotAPlugin"}
    cfg = make_config(tmp_path, broker.port, plugins=[failing, not_a_plugin])
    async with collect(broker.port) as got, running(cfg) as app:
        await got.wait(lambda g: sum(m["state"] == "backoff" for m in g.json("status/plugins/")) >= 4)
        resp = await post(coap_client, cfg.coap.port, "n", cbor2.dumps({"x": 1}))
        await got.wait(lambda g: g.json("readings/n"))
        details = " ".join(m["detail"] for m in got.json("status/plugins/"))
        backoffs = [r.restarts for r in app.runners]
    assert resp.code == codes.CHANGED
    assert "load failure requested" in details and "not a subclass" in details
    assert all(n >= 2 for n in backoffs)


async def test_unknown_plugin_is_skipped(
    tmp_path: Path, broker: Mosquitto, coap_client: aiocoap.Context
) -> None:
    """A plugin name no entry point provides is logged and skipped; the daemon serves."""
    cfg = make_config(tmp_path, broker.port, plugins=[{"name": "ghost", "plugin": "no-such-plugin"}])
    async with running(cfg) as app:
        resp = await post(coap_client, cfg.coap.port, "n", cbor2.dumps({"x": 1}))
    assert resp.code == codes.CHANGED and app.runners == []


async def test_retransmitted_con_is_answered_once(tmp_path: Path, broker: Mosquitto) -> None:
    """The same CON datagram sent twice gets the same 2.04 and stores one reading (bounded dedup)."""
    cfg = make_config(tmp_path, broker.port, coap={"dedup_max_entries": 100})
    payload = cbor2.dumps({"x": 1})
    # CoAP header: ver 1, CON, TKL 2, POST; mid 0x1234; token; Uri-Path "s", "n"; Content-Format 60.
    datagram = (
        bytes([0x42, 0x02, 0x12, 0x34, 0xAB, 0xCD, 0xB1])
        + b"s"
        + bytes([0x01])
        + b"n"
        + bytes([0x11, 60, 0xFF])
        + payload
    )
    async with collect(broker.port) as got, running(cfg) as app:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.settimeout(5)
        try:
            answers = []
            for _ in range(2):
                sock.sendto(datagram, ("127.0.0.1", cfg.coap.port))
                answers.append(await asyncio.to_thread(sock.recv, 2048))
                await asyncio.sleep(0.3)
        finally:
            sock.close()
        await got.wait(lambda g: g.json("readings/n"))
        await asyncio.sleep(0.3)
        duplicates = app.dedup[0].duplicates
    assert answers[0] == answers[1] and answers[0][1] == 0x44  # the same piggy-backed 2.04
    assert len(got.json("readings/n")) == 1 and duplicates == 1


async def test_dedup_cache_is_bounded(tmp_path: Path, broker: Mosquitto) -> None:
    """Many distinct message ids never grow the duplicate cache past its cap, and all are served."""
    cfg = make_config(tmp_path, broker.port, coap={"dedup_max_entries": 100})
    async with collect(broker.port) as got, running(cfg) as app:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            for mid in range(300):
                # NON POST with a 2-byte token unique per request (RFC 7252 §5.3.1: aiocoap cancels a
                # request still in flight when another comes with the same endpoint and token).
                head = bytes([0x52, 0x02]) + mid.to_bytes(2, "big") + mid.to_bytes(2, "big")
                options = bytes([0xB1]) + b"s" + bytes([0x01]) + b"n" + bytes([0x11, 60, 0xFF])
                sock.sendto(head + options + cbor2.dumps({"i": mid}), ("127.0.0.1", cfg.coap.port))
                if mid % 20 == 19:
                    await asyncio.sleep(0.02)  # stay within the socket buffer
            await got.wait(lambda g: len(g.json("readings/n")) == 300)
        finally:
            sock.close()
        cache = app.dedup[0]
        assert len(cache) <= 100 and cache.evicted_early >= 200


def test_check_config_names_file_line_and_key(tmp_path: Path) -> None:
    """`gatewayd check-config` prints file:line: key: message and exits non-zero; a good file passes."""
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[gateway]\nid = "gw1"\n\n[coap]\nport = "five"\n\n[[plugins]]\nname = "a"\nplugin = "x"\nbogus = 1\n'
    )
    out = gatewayd_cli("check-config", str(bad))
    assert out.returncode == 2
    assert f"{bad}:5: coap.port:" in out.stderr and f"{bad}:10: plugins.0.bogus: Extra inputs" in out.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text("[gateway\n")
    out = gatewayd_cli("run", "--config", str(broken))
    assert out.returncode == 2 and "invalid TOML" in out.stderr and "line 1" in out.stderr
    good = Path(__file__).parents[1] / "examples" / "gatewayd.toml"
    out = gatewayd_cli("check-config", str(good))
    assert out.returncode == 0, out.stderr


async def test_worker_killed_while_idle_is_restarted_without_blaming_a_batch(
    tmp_path: Path, broker: Mosquitto, coap_client: aiocoap.Context
) -> None:
    """SIGKILL of an idle worker (as the OOM killer would): restarted, and the next reading is processed."""
    cfg = make_config(tmp_path, broker.port, plugins=[{**ECHO, "max_attempts": 1}])
    async with collect(broker.port) as got, running(cfg) as app:
        await got.wait(lambda g: any(m["state"] == "ready" for m in g.json("status/plugins/echo")))
        pid = app.runners[0].instances[0].pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        await got.wait(lambda g: any(m["state"] == "backoff" for m in g.json("status/plugins/echo")))
        assert (await post(coap_client, cfg.coap.port, "n", cbor2.dumps({"x": 1}))).code == codes.CHANGED
        await got.wait(lambda g: g.json("results/echo/n"))
    result = got.json("results/echo/n")[0]
    assert result["fields"] == ["x"] and "error" not in result
