"""A simulated sensor node: a pump that posts temperature, humidity and vibration over CoAP.

``python -m gatewayd.simulator --port 5683 --node pump-1 --count 10``
Every ``anomaly_every``-th reading is a fault (high vibration) so the anomaly plugin has something to say.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import time
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


async def run(
    host: str,
    port: int,
    node: str,
    count: int,
    interval_s: float,
    senml: bool,
    anomaly_every: int,
    seed: int = 1,
) -> list[str]:
    """Post ``count`` readings; returns the response codes as text."""
    rng = random.Random(seed)
    ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
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
        await ctx.shutdown()
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
    a = ap.parse_args()
    for code in asyncio.run(run(a.host, a.port, a.node, a.count, a.interval, a.senml, a.anomaly_every)):
        print(code)


if __name__ == "__main__":
    main()
