"""Fixtures that start real parts: a private Mosquitto, gatewayd on a free UDP port, an MQTT collector."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiocoap
import aiomqtt
import pytest

from gatewayd import log
from gatewayd.app import App
from gatewayd.config import Config
from gatewayd.testing import Mosquitto, free_port

TESTS = Path(__file__).parent
# Worker processes import the fake plugins in tests/ by module:Class.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
log.setup(os.environ.get("GATEWAYD_TEST_LOG", "warning"), "console")


def udp_port() -> int:
    return free_port(socket.SOCK_DGRAM)


@pytest.fixture
def broker() -> Iterator[Mosquitto]:
    with Mosquitto() as b:
        yield b


@dataclass
class Collected:
    """MQTT messages seen by a subscriber, newest last."""

    messages: list[tuple[str, bytes, bool]] = field(default_factory=list)

    def json(self, topic_part: str) -> list[dict[str, Any]]:
        return [json.loads(p) for t, p, _ in self.messages if topic_part in t]

    async def wait(self, pred: Callable[[Collected], bool], timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not pred(self):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; saw {len(self.messages)} messages: {self.messages[-5:]}")
            await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def collect(
    port: int,
    topic: str = "gatewayd/#",
    clean: bool = True,
    *,
    tls: ssl.SSLContext | None = None,
    username: str | None = None,
    password: str | None = None,
) -> AsyncIterator[Collected]:
    """Subscribe (QoS 1) before yielding; a persistent session when ``clean`` is False."""
    got = Collected()
    ready = asyncio.Event()

    async def reader() -> None:
        client = aiomqtt.Client(
            "127.0.0.1", port, identifier=f"collector-{os.getpid()}-{id(got)}", clean_session=clean,
            tls_context=tls, username=username, password=password,
        )  # fmt: skip
        while True:  # rides out broker restarts; the persistent session keeps what was missed
            try:
                async with client:
                    await client.subscribe(topic, qos=1)
                    ready.set()
                    async for m in client.messages:
                        payload = m.payload if isinstance(m.payload, bytes) else str(m.payload).encode()
                        got.messages.append((str(m.topic), payload, m.retain))
            except aiomqtt.MqttError:
                await asyncio.sleep(0.1)

    task = asyncio.create_task(reader())
    await asyncio.wait_for(ready.wait(), 10)
    try:
        yield got
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def make_config(tmp_path: Path, mqtt_port: int, **sections: Any) -> Config:
    """A test config on loopback; keyword arguments override whole sections (dicts)."""
    base: dict[str, Any] = {
        "gateway": {"id": "gw1"},
        "coap": {"bind": "127.0.0.1", "port": udp_port()},
        "store": {"path": str(tmp_path / "store.db")},
        "mqtt": {"host": "127.0.0.1", "port": mqtt_port, "backoff_initial_s": 0.1, "backoff_max_s": 1.0},
        "log": {"level": "warning", "format": "console"},
        "limits": {"rate_per_s": 0},  # tests of the limit turn it on
        "metrics": {"enabled": False},  # tests of the endpoint turn it on, on a free port
        # Plain CoAP from any node, as before OSCORE (the built-in default refuses it); tests/test_oscore.py
        # sets its own policy.
        "security": {"unauthenticated": "allow"},
    }
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return Config.model_validate(base)


@contextlib.asynccontextmanager
async def running(cfg: Config) -> AsyncIterator[App]:
    """gatewayd in this event loop, stopped (and checked to stop cleanly) at the end."""
    app = App(cfg)
    task = asyncio.create_task(app.run())
    serving = asyncio.create_task(app.serving.wait())
    await asyncio.wait({task, serving}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()  # raise what stopped it
    assert app.serving.is_set(), "gatewayd did not start serving in 30 s"
    try:
        yield app
    finally:
        app.request_stop("test end")
        assert await asyncio.wait_for(task, 30) == 0


def gatewayd_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m gatewayd.cli ARGS`` in a child process, its output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "gatewayd.cli", *args], capture_output=True, text=True, timeout=60
    )


def logged(caplog: pytest.LogCaptureFixture, event: str, **fields: Any) -> list[dict[str, Any]]:
    """The structlog events named ``event`` (with these ``fields``) that ``caplog`` saw."""
    return [
        r.msg
        for r in caplog.records
        if isinstance(r.msg, dict)
        and r.msg.get("event") == event
        and all(r.msg.get(k) == v for k, v in fields.items())
    ]


async def send_datagram(
    port: int, datagram: bytes, sock: socket.socket | None = None, timeout: float = 5.0
) -> bytes:
    """Send one datagram to 127.0.0.1:``port`` from ``sock`` (or a new socket) and return the first answer."""
    loop = asyncio.get_running_loop()
    own = sock is None
    s = sock or socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.setblocking(False)
        await loop.sock_sendto(s, datagram, ("127.0.0.1", port))
        return await asyncio.wait_for(loop.sock_recv(s, 2048), timeout)
    finally:
        if own:
            s.close()


@pytest.fixture
async def coap_client() -> AsyncIterator[aiocoap.Context]:
    ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
    yield ctx
    await ctx.shutdown()


async def post(
    ctx: aiocoap.Context, port: int, node: str, payload: bytes, cf: int | None = 60
) -> aiocoap.Message:
    msg = aiocoap.Message(code=aiocoap.POST, uri=f"coap://127.0.0.1:{port}/s/{node}", payload=payload)
    if cf is not None:
        msg.opt.content_format = cf
    return await asyncio.wait_for(ctx.request(msg).response, 30)
