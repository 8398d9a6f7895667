"""One plugin's throughput through the whole gateway, for the plugin benchmarks (bench_ocr, bench_glm).

``gatewayd run`` in its own process with one plugin (one worker) and a private Mosquitto; C clients
(aiocoap contexts, one CON in flight each, as real nodes) POST the payloads, each to its own node
``{node_prefix}-{i}``; the clock runs from the first POST to the last result on MQTT. Not a test.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiocoap
import aiomqtt
from aiocoap.numbers import codes

from gatewayd.testing import Mosquitto, free_port


@dataclass
class Run:
    rate: float  # results per second
    results: list[dict[str, Any]]  # in payload order; {} where none came
    exit_code: int


def _toml(value: object) -> str:
    return (
        json.dumps(value)
        if isinstance(value, str)
        else str(value).lower()
        if isinstance(value, bool)
        else str(value)
    )


async def run_plugin_e2e(
    plugin: str,
    options: Mapping[str, object],
    payloads: Sequence[tuple[bytes, int]],
    workdir: Path,
    *,
    threads: int = 1,
    clients: int = 4,
    max_batch: int = 4,
    cpus: Sequence[int] | None = None,
    max_body_bytes: int = 262_144,
    node_prefix: str = "node",
) -> Run:
    """Post each (payload, content-format) and collect the plugin's results, in payload order."""
    port = free_port(socket.SOCK_DGRAM)
    with Mosquitto() as broker:
        conf = workdir / "gw.toml"
        conf.write_text(
            f'[coap]\nbind = "127.0.0.1"\nport = {port}\nmax_body_bytes = {max_body_bytes}\n'
            f'[store]\npath = "{workdir / "store.db"}"\n[mqtt]\nport = {broker.port}\n'
            '[limits]\nrate_per_s = 0\n[metrics]\nenabled = false\n[log]\nlevel = "warning"\n'
            '[security]\nunauthenticated = "allow"\n'  # plain CoAP clients: OSCORE is not what is measured
            f'[[plugins]]\nname = "bench"\nplugin = "{plugin}"\n'
            f"threads = {threads}\nmax_batch = {max_batch}\nmax_wait_ms = 5\n"
            "queue_size = 10000\ndeadline_s = 60\n"
            + (f"cpus = {list(cpus)}\n" if cpus is not None else "")
            + "[plugins.options]\n"
            + "".join(f"{k} = {_toml(v)}\n" for k, v in options.items())
        )
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        cmd = [sys.executable, "-m", "gatewayd.cli", "run", "--config", str(conf)]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env=env)
        results: dict[str, dict[str, Any]] = {}
        ready = asyncio.Event()
        try:
            async with aiomqtt.Client("127.0.0.1", broker.port) as mqtt:
                await mqtt.subscribe("gatewayd/gw1/status/plugins/#", qos=1)
                await mqtt.subscribe("gatewayd/gw1/results/#", qos=1)

                async def listen() -> None:
                    async for m in mqtt.messages:
                        topic = str(m.topic)
                        doc = json.loads(m.payload) if isinstance(m.payload, bytes | str) else {}
                        if topic.endswith("status/plugins/bench") and doc.get("state") == "ready":
                            ready.set()
                        elif "/results/bench/" in topic:
                            results[str(doc["node"])] = doc

                listener = asyncio.create_task(listen())
                await asyncio.wait_for(ready.wait(), 120)
                ctxs = [
                    await aiocoap.Context.create_client_context(transports=["udp6"]) for _ in range(clients)
                ]

                async def client(k: int) -> None:
                    for i in range(k, len(payloads), len(ctxs)):
                        body, cf = payloads[i]
                        uri = f"coap://127.0.0.1:{port}/s/{node_prefix}-{i}"
                        msg = aiocoap.Message(code=aiocoap.POST, uri=uri, payload=body)
                        msg.opt.content_format = cf
                        resp = await asyncio.wait_for(ctxs[k].request(msg).response, 60)
                        assert resp.code == codes.CHANGED, resp

                t0 = time.perf_counter()
                await asyncio.gather(*(client(k) for k in range(len(ctxs))))
                deadline = time.monotonic() + 600
                while len(results) < len(payloads) and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                elapsed = time.perf_counter() - t0
                listener.cancel()
                for c in ctxs:
                    await c.shutdown()
        finally:
            proc.terminate()
            code = await asyncio.to_thread(proc.wait, 60)
    got = [results.get(f"{node_prefix}-{i}", {}) for i in range(len(payloads))]
    return Run(len(results) / elapsed, got, code)
