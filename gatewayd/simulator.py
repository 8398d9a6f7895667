"""A simulated sensor node: a pump that posts temperature, humidity and vibration over CoAP.

``python -m gatewayd.simulator --port 5683 --node pump-1 --count 10 [--credentials FILE]``
Every ``anomaly_every``-th reading is a fault (high vibration) so the anomaly plugin has something to say.
With ``--credentials`` (the node's map from ``gatewayd nodes provision``, ``nodes/NODE/credentials.json``)
it posts through OSCORE.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import time
from pathlib import Path
from typing import Any

import aiocoap
import cbor2

from gatewayd.codec import CF_CBOR, CF_SENML_CBOR


def pump_reading(i: int, rng: random.Random, anomalous: bool = False) -> dict[str, float]:
    """A plausible pump reading: vibration and temperature rise with load, humidity falls."""
    load = 0.5 + 0.4 * math.sin(i / 7) + rng.uniform(-0.05, 0.05)
    reading = {
        "temperature": round(42 + 26 * load + rng.gauss(0, 0.6), 2),
        "humidity": round(58 - 22 * load + rng.gauss(0, 0.8), 2),
        "vibration": round(1.1 + 2.6 * load**1.5 + rng.gauss(0, 0.05), 3),
    }
    if anomalous:
        reading["vibration"] = round(reading["vibration"] * 4, 3)
    return reading


def senml_pack(reading: dict[str, float], base_time: float) -> list[dict[int, Any]]:
    """The same reading as SenML-CBOR (integer labels): base time, then one record per field."""
    units = {"temperature": "Cel", "humidity": "%RH", "vibration": "mm/s"}
    pack: list[dict[int, Any]] = [{0: name, 1: units[name], 2: value} for name, value in reading.items()]
    pack[0][-3] = base_time  # bt
    return pack


async def post(ctx: aiocoap.Context, uri: str, payload: bytes, content_format: int) -> aiocoap.Message:
    req = aiocoap.Message(code=aiocoap.POST, uri=uri, payload=payload, content_format=content_format)
    return await ctx.request(req).response


async def client(credentials: Path | None = None) -> aiocoap.Context:
    """A client context; with a node's credentials map (aiocoap's format), requests to the URIs it
    names go through OSCORE. Release it with :func:`close`."""
    if credentials is None:
        return await aiocoap.Context.create_client_context(transports=["udp6"])
    from gatewayd.credentials import client_map

    entries = client_map(credentials)  # before the context: a bad file leaves nothing to clean up
    ctx = await aiocoap.Context.create_client_context(transports=["oscore", "udp6"])
    try:
        ctx.client_credentials.load_from_dict(entries)
    except BaseException:
        await close(ctx)
        raise
    return ctx


async def close(ctx: aiocoap.Context) -> None:
    """Shut the context down and write its OSCORE sequence numbers back (releasing their locks)."""
    await ctx.shutdown()
    from gatewayd.access import release

    release(ctx.client_credentials)


async def run(
    host: str,
    port: int,
    node: str,
    count: int,
    interval_s: float,
    senml: bool,
    anomaly_every: int,
    seed: int = 1,
    credentials: Path | None = None,
) -> list[str]:
    """Post ``count`` readings (through OSCORE with ``credentials``); returns the response codes as text."""
    rng = random.Random(seed)
    ctx = await client(credentials)
    codes = []
    try:
        for i in range(count):
            reading = pump_reading(
                i, rng, anomalous=anomaly_every > 0 and i % anomaly_every == anomaly_every - 1
            )
            if senml:
                payload, cf = cbor2.dumps(senml_pack(reading, time.time())), CF_SENML_CBOR
            else:
                payload, cf = cbor2.dumps(reading), CF_CBOR
            resp = await post(ctx, f"coap://{host}:{port}/s/{node}", payload, cf)
            codes.append(str(resp.code))
            await asyncio.sleep(interval_s)
    finally:
        await close(ctx)
    return codes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=5683)
    ap.add_argument("--node", default="pump-1")
    ap.add_argument("--count", type=int, default=10)
    ap.add_argument("--interval", type=float, default=0.5)
    ap.add_argument("--senml", action="store_true", help="post SenML-CBOR (112) instead of a CBOR map (60)")
    ap.add_argument("--anomaly-every", type=int, default=5)
    ap.add_argument("--credentials", type=Path, help="the node's OSCORE credentials map (JSON)")
    a = ap.parse_args()
    posts = run(a.host, a.port, a.node, a.count, a.interval, a.senml, a.anomaly_every, 1, a.credentials)
    for code in asyncio.run(posts):
        print(code, flush=True)


if __name__ == "__main__":
    main()
