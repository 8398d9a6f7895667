"""The demo: gatewayd on a built-in config, a simulated pump node posting through OSCORE, and the MQTT
traffic printed. The node is provisioned as `gatewayd nodes provision pump-1 --dir DIR` would."""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
from pathlib import Path

import aiomqtt
import cbor2

from gatewayd import credentials, registry, simulator
from gatewayd.app import App
from gatewayd.codec import CF_CBOR
from gatewayd.config import (
    CoapConfig,
    Config,
    GatewayConfig,
    LogConfig,
    MqttConfig,
    PluginConfig,
    SecurityConfig,
    StoreConfig,
)
from gatewayd.testing import Mosquitto, free_port, port_open


def default_config(store_dir: Path, mqtt_port: int, coap_port: int, oscore: Path | None = None) -> Config:
    """The built-in demo config: loopback only, a throw-away store, the anomaly plugin if installed,
    unprotected posts refused, the nodes in the ``oscore`` credentials map authenticated."""
    plugins = []
    if any(d.name == "anomaly" for d in registry.discovered()):
        plugins.append(PluginConfig(name="anomaly", plugin="anomaly", max_wait_ms=50))
    return Config(
        gateway=GatewayConfig(id="demo"),
        coap=CoapConfig(bind="127.0.0.1", port=coap_port),
        store=StoreConfig(path=store_dir / "gatewayd.db"),
        mqtt=MqttConfig(host="127.0.0.1", port=mqtt_port),
        log=LogConfig(level="warning", format="console"),
        security=SecurityConfig(unauthenticated="refuse", oscore_credentials=oscore),
        plugins=plugins,
    )


async def _print_messages(port: int, prefix: str, ready: asyncio.Event) -> None:
    async with aiomqtt.Client("127.0.0.1", port) as client:
        await client.subscribe(f"{prefix}/#", qos=1)
        ready.set()
        async for msg in client.messages:
            text = msg.payload.decode() if isinstance(msg.payload, bytes) else str(msg.payload)
            with contextlib.suppress(ValueError):
                text = json.dumps(json.loads(text), ensure_ascii=False)
            print(f"MQTT {msg.topic}  {text}", flush=True)


async def run(count: int = 20, interval_s: float = 0.5) -> int:
    from gatewayd import log

    with contextlib.ExitStack() as stack:
        if port_open("127.0.0.1", 1883):
            mqtt_port = 1883
            print("demo: using the MQTT broker already listening on 127.0.0.1:1883")
        else:
            mqtt_port = stack.enter_context(Mosquitto()).port
            print(f"demo: no broker on 127.0.0.1:1883, started mosquitto on 127.0.0.1:{mqtt_port}")
        store_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gatewayd-demo-")))
        coap_port = 5683 if _udp_free(5683) else free_port(2)
        node = credentials.provision("pump-1", store_dir / "oscore")
        print(
            f"demo: provisioned node pump-1 (OSCORE, RFC 8613), as `gatewayd nodes provision pump-1 --dir "
            f"{store_dir / 'oscore'}` does: gateway side {node.gateway_map}, node side {node.node_dir}"
        )
        cfg = default_config(store_dir, mqtt_port, coap_port, node.gateway_map)
        log.setup(cfg.log.level, cfg.log.format)
        names = [p.name for p in cfg.plugins] or "none"
        print(f"demo: gatewayd on coap://127.0.0.1:{coap_port}, plugins: {names}")
        app = App(cfg)
        app_task = asyncio.create_task(app.run())
        subscribed = asyncio.Event()
        printer = asyncio.create_task(
            _print_messages(mqtt_port, f"{cfg.mqtt.prefix}/{cfg.gateway.id}", subscribed)
        )
        await asyncio.wait_for(asyncio.gather(app.serving.wait(), subscribed.wait()), 60)
        print(f"demo: an unprotected POST as pump-1 is answered {await _post_unprotected(coap_port)}")
        codes = await simulator.run(
            "127.0.0.1",
            coap_port,
            "pump-1",
            count,
            interval_s,
            False,
            5,
            credentials=node.node_dir / credentials.NODE_MAP,
        )
        print(f"demo: node pump-1 posted {len(codes)} readings through OSCORE, answers: {sorted(set(codes))}")
        await asyncio.sleep(1.5)  # let the last results arrive
        app.request_stop("demo end")
        rc = await app_task
        await asyncio.sleep(0.3)
        printer.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
            await printer
        return rc


async def _post_unprotected(port: int) -> str:
    ctx = await simulator.client()
    try:
        post = simulator.post(ctx, f"coap://127.0.0.1:{port}/s/pump-1", cbor2.dumps({}), CF_CBOR)
        resp = await asyncio.wait_for(post, 30)
        return f"{resp.code} {resp.payload.decode(errors='replace')!r}"
    finally:
        await simulator.close(ctx)


def _udp_free(port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
