"""Node identity: OSCORE (RFC 8613) with a real aiocoap OSCORE client over UDP loopback against gatewayd.

Each node gets its own security context (``gatewayd nodes provision``); a request is authenticated
as the node whose context decrypts it, may post only as that node, cannot be replayed, and the
sequence numbers on both sides survive restarts (clean ones and kill -9) without reuse.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiocoap
import cbor2
import pytest
from aiocoap import oscore
from aiocoap.numbers import codes
from conftest import collect, logged, make_config, post, running, send_datagram, udp_port
from prometheus_client.parser import text_string_to_metric_families
from test_metrics import fetch, metrics_on

from gatewayd import cli, config, credentials, simulator
from gatewayd import log as gatewayd_log
from gatewayd.credentials import NODE_MAP, Provisioned
from gatewayd.testing import Mosquitto, free_port

PUMP = {"temperature": 55.0, "humidity": 45.0, "vibration": 2.2}
ROOT = Path(__file__).parent.parent


def secured(prov: Provisioned, **extra: Any) -> dict[str, Any]:
    """The [security] section of a gateway that refuses unprotected posts and knows ``prov``'s nodes."""
    return {"unauthenticated": "refuse", "oscore_credentials": str(prov.gateway_map), **extra}


def node_map(prov: Provisioned) -> Path:
    return prov.node_dir / NODE_MAP


@contextlib.asynccontextmanager
async def oscore_client(prov: Provisioned) -> AsyncIterator[aiocoap.Context]:
    """An aiocoap client context that posts through ``prov``'s node context; persisted at the end."""
    ctx = await simulator.client(node_map(prov))
    try:
        yield ctx
    finally:
        await simulator.close(ctx)


class _Hop(asyncio.DatagramProtocol):
    def __init__(self, received: Callable[[bytes, Any], None]) -> None:
        self.received = received

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.received(data, addr)


class Relay:
    """A UDP hop between one client and gatewayd that keeps every datagram the client sent."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self._client: Any = None
        self._front: Any = None
        self._back: Any = None
        self.port = 0

    async def start(self, target_port: int) -> Relay:
        loop = asyncio.get_running_loop()
        self._back, _ = await loop.create_datagram_endpoint(
            lambda: _Hop(self._from_server), remote_addr=("127.0.0.1", target_port)
        )
        self._front, _ = await loop.create_datagram_endpoint(
            lambda: _Hop(self._from_client), local_addr=("127.0.0.1", 0)
        )
        self.port = self._front.get_extra_info("sockname")[1]
        return self

    def _from_client(self, data: bytes, addr: Any) -> None:
        self._client = addr
        self.sent.append(data)
        self._back.sendto(data)

    def _from_server(self, data: bytes, addr: Any) -> None:
        if self._client is not None:
            self._front.sendto(data, self._client)

    def requests(self) -> list[bytes]:
        """The OSCORE-protected requests sent so far, without retransmissions (byte-identical),
        ACKs or plain requests."""
        seen = dict.fromkeys(d for d in self.sent if d[1] == 2 and aiocoap.Message.decode(d).opt.oscore)
        return list(seen)

    def close(self) -> None:
        self._front.close()
        self._back.close()


def piv(datagram: bytes) -> int:
    """The sender sequence number (OSCORE Partial IV) of a protected request."""
    option = aiocoap.Message.decode(datagram).opt.oscore
    n = option[0] & 0x07 if option else 0
    return int.from_bytes(option[1 : 1 + n], "big")


def with_mid(datagram: bytes, mid: int) -> bytes:
    """The same datagram with another message id: CoAP sees a new request, OSCORE the same one."""
    return datagram[:2] + mid.to_bytes(2, "big") + datagram[4:]


async def send_raw(port: int, datagram: bytes) -> aiocoap.Message:
    """Send one datagram to gatewayd from a fresh socket and decode the answer."""
    return aiocoap.Message.decode(await send_datagram(port, datagram, timeout=10.0))


async def refusals(port: int) -> dict[tuple[str, str], float]:
    """gatewayd_requests_refused_total by (code, reason), scraped from the metrics endpoint."""
    text = await asyncio.to_thread(fetch, port)
    return {
        (s.labels["code"], s.labels["reason"]): s.value
        for fam in text_string_to_metric_families(text)
        if fam.name == "gatewayd_requests_refused"
        for s in fam.samples
        if s.name.endswith("_total")
    }


async def test_provisioned_node_posts_through_oscore(tmp_path: Path, broker: Mosquitto) -> None:
    """A provisioned node's protected POST: 2.04, the reading on MQTT, nothing readable on the wire."""
    prov = credentials.provision("pump-1", tmp_path / "oscore")
    cfg = make_config(tmp_path, broker.port, security=secured(prov))
    relay = await Relay().start(cfg.coap.port)
    try:
        async with collect(broker.port) as got, running(cfg), oscore_client(prov) as ctx:
            resp = await post(ctx, relay.port, "pump-1", cbor2.dumps(PUMP))
            assert resp.code == codes.CHANGED, resp
            assert resp.remote.authenticated_claims == ["coap://*/*"]  # the answer was protected too
            await got.wait(lambda g: any(m["node"] == "pump-1" for m in g.json("readings/pump-1")))
        assert got.json("readings/pump-1")[0]["fields"] == PUMP
        (request,) = relay.requests()
        assert b"temperature" not in request and cbor2.dumps(PUMP) not in request  # encrypted
    finally:
        relay.close()


async def test_block_wise_upload_through_oscore(tmp_path: Path, broker: Mosquitto) -> None:
    """A body larger than a block goes block-wise inside OSCORE, through gatewayd's Block1 spool."""
    prov = credentials.provision("cam-1", tmp_path / "oscore")
    cfg = make_config(tmp_path, broker.port, security=secured(prov), coap={"max_body_bytes": 6000})
    body = {"note": "x" * 4000}
    async with collect(broker.port) as got, running(cfg) as app, oscore_client(prov) as ctx:
        resp = await post(ctx, cfg.coap.port, "cam-1", cbor2.dumps(body))
        assert resp.code == codes.CHANGED, resp
        await got.wait(lambda g: bool(g.json("readings/cam-1")))
        too_big = await post(ctx, cfg.coap.port, "cam-1", cbor2.dumps({"note": "x" * 7000}))
        assert too_big.code == codes.REQUEST_ENTITY_TOO_LARGE and too_big.opt.size1 == 6000
        assert app.uploads is not None and len(app.uploads) == 0
    assert got.json("readings/cam-1")[0]["fields"] == body


async def test_posting_as_another_node_is_forbidden(
    tmp_path: Path, broker: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    """Node A's context posting to /s/B: 4.03 naming both, nothing stored, counted and logged."""
    a = credentials.provision("node-a", tmp_path / "oscore")
    credentials.provision("node-b", tmp_path / "oscore")
    cfg = make_config(tmp_path, broker.port, security=secured(a), metrics=metrics_on())
    async with collect(broker.port) as got, running(cfg), oscore_client(a) as ctx:
        resp = await post(ctx, cfg.coap.port, "node-b", cbor2.dumps(PUMP))
        assert resp.code == codes.FORBIDDEN
        assert resp.payload == b"authenticated as node-a, not node-b"
        ok = await post(ctx, cfg.coap.port, "node-a", cbor2.dumps(PUMP))
        assert ok.code == codes.CHANGED
        await got.wait(lambda g: bool(g.json("readings/node-a")))
        assert not got.json("readings/node-b")
        counts = await refusals(cfg.metrics.port)
    assert counts[("4.03", "wrong_node")] == 1
    assert logged(caplog, "request_refused", reason="wrong_node")


async def test_replayed_message_is_rejected(
    tmp_path: Path, broker: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    """A captured protected request sent again (new message id, new socket): 4.01 "Replay detected",
    and the reading is stored once. The same datagram again from the same socket is a CoAP duplicate:
    answered from the duplicate cache, not processed again."""
    prov = credentials.provision("pump-1", tmp_path / "oscore")
    cfg = make_config(tmp_path, broker.port, security=secured(prov), metrics=metrics_on())
    relay = await Relay().start(cfg.coap.port)
    try:
        async with collect(broker.port) as got, running(cfg), oscore_client(prov) as ctx:
            assert (await post(ctx, relay.port, "pump-1", cbor2.dumps(PUMP))).code == codes.CHANGED
            (captured,) = relay.requests()
            mid = int.from_bytes(captured[2:4], "big")
            for n in (1, 2):
                replay = await send_raw(cfg.coap.port, with_mid(captured, (mid + n) % 0x10000))
                assert replay.code == codes.UNAUTHORIZED, replay
                assert replay.payload == b"Replay detected" and replay.opt.max_age == 0
            relay._back.sendto(captured)  # a retransmission: same source, same message id
            await asyncio.sleep(0.3)
            await got.wait(lambda g: bool(g.json("readings/pump-1")))
            await asyncio.sleep(0.5)  # a second reading would be published by now
            counts = await refusals(cfg.metrics.port)
        assert len(got.json("readings/pump-1")) == 1
        assert counts[("4.01", "oscore_replay")] == 2
        assert logged(caplog, "request_refused", reason="oscore_replay")
    finally:
        relay.close()


async def test_unprotected_post_is_refused(
    tmp_path: Path, broker: Mosquitto, coap_client: aiocoap.Context, caplog: pytest.LogCaptureFixture
) -> None:
    """Without OSCORE under "refuse" (the built-in default): 4.01 with a diagnostic, counted, logged."""
    prov = credentials.provision("pump-1", tmp_path / "oscore")
    sec = {"oscore_credentials": str(prov.gateway_map)}  # unauthenticated left at its default
    cfg = make_config(tmp_path, broker.port, metrics=metrics_on())
    cfg = cfg.model_copy(update={"security": config.SecurityConfig(**sec)})
    assert cfg.security.unauthenticated == "refuse"
    async with running(cfg):
        resp = await post(coap_client, cfg.coap.port, "pump-1", cbor2.dumps(PUMP))
        assert resp.code == codes.UNAUTHORIZED
        assert resp.payload == b"OSCORE required: unprotected posts are refused"
        # Discovery stays open; only posting readings needs an identity.
        wkc = aiocoap.Message(code=aiocoap.GET, uri=f"coap://127.0.0.1:{cfg.coap.port}/.well-known/core")
        assert (await asyncio.wait_for(coap_client.request(wkc).response, 30)).code == codes.CONTENT
        counts = await refusals(cfg.metrics.port)
    assert counts[("4.01", "unauthenticated")] == 1
    assert logged(caplog, "request_refused", reason="unauthenticated")


async def test_allow_listed_nodes_post_unprotected_from_trusted_networks(
    tmp_path: Path, broker: Mosquitto, coap_client: aiocoap.Context
) -> None:
    """ "allow-listed": a listed node from a listed network posts plain (2.04); an unlisted node, or a
    listed one from elsewhere, gets 4.01; OSCORE nodes are unaffected."""
    prov = credentials.provision("pump-1", tmp_path / "oscore")
    listed = secured(
        prov, unauthenticated="allow-listed", allow_nodes=["legacy-*"], allow_from=["127.0.0.0/8"]
    )
    cfg = make_config(tmp_path, broker.port, security=listed)
    async with collect(broker.port) as got, running(cfg):
        assert (await post(coap_client, cfg.coap.port, "legacy-7", cbor2.dumps(PUMP))).code == codes.CHANGED
        other = await post(coap_client, cfg.coap.port, "pump-1", cbor2.dumps(PUMP))
        assert other.code == codes.UNAUTHORIZED
        assert other.payload == b"OSCORE required: pump-1 may not post unprotected"
        async with oscore_client(prov) as ctx:
            assert (await post(ctx, cfg.coap.port, "pump-1", cbor2.dumps(PUMP))).code == codes.CHANGED
            # An authenticated node is held to its identity even where plain posts are allowed.
            assert (await post(ctx, cfg.coap.port, "legacy-7", cbor2.dumps(PUMP))).code == codes.FORBIDDEN
        await got.wait(lambda g: bool(g.json("readings/legacy-7")) and bool(g.json("readings/pump-1")))

    elsewhere = {**listed, "allow_from": ["10.0.0.0/8", "fd00::/8"]}
    cfg = make_config(tmp_path, broker.port, security=elsewhere)
    async with running(cfg):
        resp = await post(coap_client, cfg.coap.port, "legacy-7", cbor2.dumps(PUMP))
        assert resp.code == codes.UNAUTHORIZED
        assert resp.payload == b"OSCORE required: unprotected posts not accepted from 127.0.0.1"


async def test_unknown_and_wrong_keys_are_refused(tmp_path: Path, broker: Mosquitto) -> None:
    """A key ID the gateway has no context for: 4.01; a known key ID with another secret: 4.00."""
    prov = credentials.provision("pump-1", tmp_path / "oscore")
    rogue = tmp_path / "elsewhere"
    same_id = credentials.provision("pump-1", rogue)  # recipient ID 01 again, another secret
    credentials.provision("x", rogue)
    unknown_id = credentials.provision("pump-9", rogue)  # ID 03: not on this gateway
    cfg = make_config(tmp_path, broker.port, security=secured(prov), metrics=metrics_on())
    async with running(cfg):
        # The answers are unprotected (there is no context to protect them with): aiocoap's client
        # raises, with the answer attached.
        async with oscore_client(unknown_id) as ctx:
            with pytest.raises(oscore.NotAProtectedMessage) as e:
                await post(ctx, cfg.coap.port, "pump-9", cbor2.dumps(PUMP))
            resp = e.value.plain_message
            assert (resp.code, resp.payload) == (codes.UNAUTHORIZED, b"Security context not found")
        async with oscore_client(same_id) as ctx:
            with pytest.raises(oscore.NotAProtectedMessage) as e:
                await post(ctx, cfg.coap.port, "pump-1", cbor2.dumps(PUMP))
            resp = e.value.plain_message
            assert (resp.code, resp.payload) == (codes.BAD_REQUEST, b"Decryption failed")
        counts = await refusals(cfg.metrics.port)
    assert counts[("4.01", "oscore_unknown_context")] == 1
    assert counts[("4.00", "oscore_invalid")] == 1


async def test_sequence_numbers_survive_clean_restarts(tmp_path: Path, broker: Mosquitto) -> None:
    """gatewayd restarted (and then the node's client too): the node's sequence numbers keep
    increasing, every post is accepted, and a request captured before a restart is a replay after it."""
    prov = credentials.provision("pump-1", tmp_path / "oscore")
    cfg = make_config(tmp_path, broker.port, security=secured(prov))
    relay = await Relay().start(cfg.coap.port)
    runs: list[list[int]] = []
    try:
        async with collect(broker.port) as got:
            ctx = await simulator.client(node_map(prov))
            try:
                for _ in range(2):  # gatewayd started twice, the client kept
                    async with running(cfg):
                        for i in range(3):
                            resp = await post(
                                ctx, relay.port, "pump-1", cbor2.dumps({"i": len(runs) * 3 + i})
                            )
                            assert resp.code == codes.CHANGED
                        if runs:
                            old = relay.requests()[0]
                            replay = await send_raw(cfg.coap.port, with_mid(old, 7))
                            assert (replay.code, replay.payload) == (codes.UNAUTHORIZED, b"Replay detected")
                    runs.append([piv(d) for d in relay.requests()][len(runs) * 3 :])
            finally:
                await simulator.close(ctx)
            async with running(cfg), oscore_client(prov) as ctx2:  # the client restarted as well
                resp = await post(ctx2, relay.port, "pump-1", cbor2.dumps({"i": 6}))
                assert resp.code == codes.CHANGED
                runs.append([piv(d) for d in relay.requests()][6:])
                await got.wait(lambda g: len({m["id"] for m in g.json("readings/pump-1")}) >= 7)
        seqnos = [n for run in runs for n in run]
        assert seqnos == sorted(set(seqnos)), runs  # strictly increasing: never reused
        stored = {m["id"]: m["fields"]["i"] for m in got.json("readings/pump-1")}  # ids: at-least-once
        assert sorted(stored.values()) == list(range(7))
        state = json.loads((prov.gateway_context / "sequence.json").read_text())
        assert state["received"] != "unknown"  # the replay window was written back at shutdown
    finally:
        relay.close()


def _gatewayd(
    tmp_path: Path, port: int, mqtt_port: int, metrics_port: int, prov: Provisioned
) -> subprocess.Popen[bytes]:
    conf = tmp_path / "gw.toml"
    conf.write_text(
        f'[coap]\nbind = "127.0.0.1"\nport = {port}\n[store]\npath = "{tmp_path / "store.db"}"\n'
        f"[mqtt]\nport = {mqtt_port}\nbackoff_initial_s = 0.1\nbackoff_max_s = 0.5\n"
        f'[limits]\nrate_per_s = 0\n[metrics]\nport = {metrics_port}\n[log]\nlevel = "warning"\n'
        f'[security]\nunauthenticated = "refuse"\noscore_credentials = "{prov.gateway_map}"\n'
    )
    return subprocess.Popen(
        [sys.executable, "-m", "gatewayd.cli", "run", "--config", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def _until_serving(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """Until gatewayd answers (an unprotected post gets its 4.01)."""
    ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            assert proc.poll() is None, f"gatewayd exited with {proc.returncode}"
            assert loop.time() < deadline, "gatewayd did not answer"
            msg = aiocoap.Message(code=aiocoap.POST, uri=f"coap://127.0.0.1:{port}/s/probe", payload=b"\xa0")
            with contextlib.suppress(TimeoutError, aiocoap.error.Error):
                resp = await asyncio.wait_for(ctx.request(msg).response, 2)
                if resp.code == codes.UNAUTHORIZED:
                    return
            await asyncio.sleep(0.2)
    finally:
        await ctx.shutdown()


async def test_killed_gatewayd_still_rejects_replays(tmp_path: Path, broker: Mosquitto) -> None:
    """gatewayd killed with SIGKILL (no chance to write its replay window back): after the restart an
    old request is still refused (a protected 4.01 with Echo: the window is rebuilt from a fresh
    request, RFC 8613 B.1.2), the node's next post goes through once its client has answered the
    Echo, and from then on the old request is a plain replay."""
    prov = credentials.provision("pump-1", tmp_path / "oscore")
    port, metrics_port = udp_port(), free_port()
    relay = await Relay().start(port)
    proc = _gatewayd(tmp_path, port, broker.port, metrics_port, prov)
    try:
        async with collect(broker.port) as got, oscore_client(prov) as ctx:
            await _until_serving(port, proc)
            for i in range(2):
                assert (await post(ctx, relay.port, "pump-1", cbor2.dumps({"i": i}))).code == codes.CHANGED
            proc.kill()
            await asyncio.to_thread(proc.wait, 30)
            state = json.loads((prov.gateway_context / "sequence.json").read_text())
            assert state["received"] == "unknown"  # what aiocoap leaves while a window is in use

            proc = _gatewayd(tmp_path, port, broker.port, metrics_port, prov)
            await _until_serving(port, proc)
            old = relay.requests()[-1]
            replay = await send_raw(port, with_mid(old, 99))
            # Protected (outer code 2.04, RFC 8613 §4.2): the 4.01 + Echo inside, counted as oscore_echo.
            assert replay.opt.oscore is not None and replay.payload
            counts = await refusals(metrics_port)
            assert counts[("4.01", "oscore_echo")] == 1
            assert (await post(ctx, relay.port, "pump-1", cbor2.dumps({"i": 2}))).code == codes.CHANGED
            again = await send_raw(port, with_mid(old, 100))
            assert (again.code, again.payload) == (codes.UNAUTHORIZED, b"Replay detected")
            await got.wait(lambda g: len({m["id"] for m in g.json("readings/pump-1")}) >= 3)
            await asyncio.sleep(0.5)
        # By reading id: a reading published before the kill may come again (at-least-once delivery);
        # an accepted replay would be a new reading, with a new id.
        stored = {m["id"]: m["fields"]["i"] for m in got.json("readings/pump-1")}
        assert sorted(stored.values()) == [0, 1, 2]
        assert (await refusals(metrics_port))[("4.01", "oscore_echo")] == 2
    finally:
        relay.close()
        if proc.poll() is None:
            proc.terminate()
            await asyncio.to_thread(proc.wait, 30)


async def test_killed_node_client_does_not_reuse_sequence_numbers(tmp_path: Path, broker: Mosquitto) -> None:
    """The node's client killed with SIGKILL mid-stream, then started again: it resumes above every
    number it may have used (aiocoap reserves them on disk ahead of use), so no post is a replay."""
    prov = credentials.provision("pump-1", tmp_path / "oscore")
    cfg = make_config(tmp_path, broker.port, security=secured(prov))
    args = ["--port", str(cfg.coap.port), "--node", "pump-1", "--interval", "0.01", "--anomaly-every", "0"]
    args += ["--credentials", str(node_map(prov))]
    async with running(cfg):
        proc = subprocess.Popen(
            [sys.executable, "-m", "gatewayd.simulator", *args, "--count", "1000"],
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            assert proc.stdout is not None
            for _ in range(15):
                line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
                assert line.strip() == b"2.04 Changed", line
        finally:
            proc.kill()
            await asyncio.to_thread(proc.wait, 30)
        reserved = json.loads((prov.node_dir / "context" / "sequence.json").read_text())["next-to-send"]
        assert reserved >= 15
        again = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "gatewayd.simulator", *args, "--count", "5"],
            capture_output=True,
            timeout=60,
        )
    assert again.stdout.decode().split("\n")[:5] == ["2.04 Changed"] * 5, again


def test_provision_cli_writes_both_sides(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`gatewayd nodes provision`: the gateway's map and context, the node's folder, secrets 0600,
    distinct recipient IDs, no silent re-keying; the result passes check-config."""
    d = tmp_path / "oscore"
    assert cli.main(["nodes", "provision", "pump-1", "--dir", str(d)]) == 0
    assert cli.main(["nodes", "provision", "pump-2", "--dir", str(d), "--gateway", "coap://gw.local"]) == 0
    assert cli.main(["nodes", "provision", "pump-1", "--dir", str(d)]) == 1
    assert "already provisioned" in capsys.readouterr().err
    gateway_map = json.loads((d / "credentials.json").read_text())
    assert gateway_map == {
        ":pump-1": {"oscore": {"basedir": "contexts/pump-1/"}},
        ":pump-2": {"oscore": {"basedir": "contexts/pump-2/"}},
    }
    ids = [
        json.loads((d / "contexts" / n / "settings.json").read_text())["recipient-id_hex"]
        for n in ("pump-1", "pump-2")
    ]
    assert ids == ["01", "02"]
    node2 = json.loads((d / "nodes" / "pump-2" / NODE_MAP).read_text())
    assert node2 == {"coap://gw.local/*": {"oscore": {"basedir": "context/"}}}
    for secret in (
        d / "contexts" / "pump-1" / "secret.json",
        d / "nodes" / "pump-1" / "context" / "secret.json",
    ):
        assert secret.stat().st_mode & 0o777 == 0o600
    old = (d / "contexts" / "pump-1" / "secret.json").read_text()
    assert cli.main(["nodes", "provision", "pump-1", "--dir", str(d), "--force"]) == 0
    assert (d / "contexts" / "pump-1" / "secret.json").read_text() != old
    conf = tmp_path / "gw.toml"
    conf.write_text(f'[security]\noscore_credentials = "{d / "credentials.json"}"\n')
    assert cli.main(["check-config", str(conf)]) == 0


@pytest.mark.parametrize(
    ("security", "problem"),
    [
        (
            'oscore_credentials = "{missing}"',
            "gw.toml:3: security.oscore_credentials: Value error, {missing}: no",
        ),
        ('unauthenticated = "allow-listed"\nallow_nodes = ["a"]', "gw.toml:1: security: Value error, unauth"),
        (
            'unauthenticated = "allow-listed"\nallow_nodes = ["a"]\nallow_from = ["10.0.0.1/8"]',
            "gw.toml:5: security.allow_from: Value error, '10.0.0.1/8': 10.0.0.1/8 has host bits set",
        ),
        ('unauthenticated = "sometimes"', "gw.toml:3: security.unauthenticated: Input should be"),
        (
            'oscore_credentials = "{bad}"',
            "gw.toml:3: security.oscore_credentials: Value error, {bad}: label 'coap://*' is not",
        ),
    ],
)
def test_security_config_errors_name_file_line_and_key(tmp_path: Path, security: str, problem: str) -> None:
    """A [security] problem is reported as file:line: key, before anything runs."""
    bad = tmp_path / "bad.json"
    bad.write_text('{"coap://*": {"oscore": {"basedir": "."}}}')
    paths = {"missing": tmp_path / "none.json", "bad": bad}
    text = "[security]\n\n" + security.format(**paths) + "\n"
    with pytest.raises(config.ConfigError) as e:
        config.parse(text, "gw.toml")
    assert any(p.startswith(problem.format(**paths)) for p in e.value.problems), e.value.problems


def test_shipped_defaults_refuse_unprotected_posts() -> None:
    """The built-in default and the example config both refuse unprotected posts."""
    assert config.Config().security.unauthenticated == "refuse"
    assert config.load(ROOT / "examples" / "gatewayd.toml").security.unauthenticated == "refuse"


async def test_credentials_in_use_elsewhere_stop_the_start(tmp_path: Path, broker: Mosquitto) -> None:
    """A context another process holds (its lock): gatewayd says so and exits 2 rather than share it."""
    prov = credentials.provision("pump-1", tmp_path / "oscore")
    cfg = make_config(tmp_path, broker.port, security=secured(prov))
    from gatewayd.access import Access
    from gatewayd.app import App

    holder = Access.from_config(cfg.security)  # holds the lock, as a second gatewayd would
    try:
        logging.getLogger("gatewayd").setLevel(logging.CRITICAL)
        assert await asyncio.wait_for(App(cfg).run(), 30) == 2
    finally:
        logging.getLogger("gatewayd").setLevel(logging.NOTSET)
        holder.close()
    async with running(cfg):  # released: it starts now
        pass


async def test_garbage_oscore_requests_get_4xx(tmp_path: Path, broker: Mosquitto) -> None:
    """Random OSCORE options and ciphertexts (some with a known key ID): each CON gets a 4.xx, never
    5.00, and the gateway's context still works afterwards."""
    prov = credentials.provision("pump-1", tmp_path / "oscore")
    cfg = make_config(tmp_path, broker.port, security=secured(prov))
    rng = random.Random(7)
    async with running(cfg):
        for i in range(200):
            option = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 10)))
            if i % 3 == 0:
                option = bytes([0x09, rng.randrange(256), 0x01])  # PIV of 1 byte and the real key ID 01
            body = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 40)))
            length = bytes([0x90 | len(option)]) if len(option) < 13 else bytes([0x9D, len(option) - 13])
            datagram = (
                bytes([0x40, 0x02]) + i.to_bytes(2, "big") + length + option + b"\xff" * bool(body) + body
            )
            answer = await send_raw(cfg.coap.port, datagram)
            assert answer.code.is_response() and 128 <= int(answer.code) < 160, (option, body, answer)
        async with oscore_client(prov) as ctx:
            assert (await post(ctx, cfg.coap.port, "pump-1", cbor2.dumps(PUMP))).code == codes.CHANGED
    # The "suppressed N" line now, not at exit into a closed capture.
    for handler in logging.getLogger().handlers:
        for f in handler.filters:
            if isinstance(f, gatewayd_log.RateLimit):
                f.flush()
