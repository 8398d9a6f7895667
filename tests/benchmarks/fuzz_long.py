#!/usr/bin/env python3
"""Long CoAP datagram fuzz against a ``gatewayd run`` process: 100k+ cases, not part of CI.

    .venv/bin/python tests/benchmarks/fuzz_long.py [--cases 100000] [--seed N] [--round 5000]

gatewayd runs as a service would (durable store, MQTT to a private Mosquitto, log level info,
JSON lines on stdout into a file). The cases come from ``tests/coapfuzz.py``: well-formed requests
with odd options and bodies (which must be answered 2.xx / 4.xx, some with an exact 4.02, never
5.00) and garbage (truncated and mutated requests, random bytes, responses, reserved codes). After
every round a valid POST must get 2.04 and the process must be alive; at the end a reading posted
last must reach MQTT (nothing fuzzed may block the outbox), and gatewayd must stop with exit 0.

Reports cases/s, answers by code, failures, crashes, RSS, and the log lines written (by logger and
event, and whether any holds a traceback).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import socket
import sys
import tempfile
import time
from pathlib import Path

import aiomqtt
import cbor2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: coapfuzz

from bench_ingest import HOST, Server, free_udp6_port, gatewayd_exe
from coapfuzz import Fuzzer, encode

from gatewayd.testing import Mosquitto


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def valid_post(port: int, node: str, mid: int) -> str:
    """POST one reading from a fresh socket; the answer's code as text."""
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        body = cbor2.dumps({"x": 1})
        data = encode(0, 2, mid, b"ok", [(11, b"s"), (11, node.encode()), (12, b"\x3c")], body)
        for _ in range(4):
            await loop.sock_sendto(s, data, (HOST, port))
            try:
                answer = await asyncio.wait_for(loop.sock_recv(s, 2048), 2.0)
            except TimeoutError:
                continue
            return f"{answer[1] >> 5}.{answer[1] & 31:02d}"
    return "no answer"


def log_summary(lines: list[str]) -> tuple[collections.Counter[str], int]:
    kinds: collections.Counter[str] = collections.Counter()
    tracebacks = 0
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            kinds[f"(not JSON) {line[:60]}"] += 1
            tracebacks += "Traceback" in line
            continue
        event = str(rec.get("event", ""))
        kinds[
            f"{rec.get('logger')}: {'suppressed ...' if event.startswith('suppressed') else event[:70]}"
        ] += 1
        tracebacks += "Traceback" in line or "exception" in rec
    return kinds, tracebacks


async def fuzz(args: argparse.Namespace, workdir: Path) -> int:
    with Mosquitto() as broker:
        port = free_udp6_port()
        cfg = workdir / "gatewayd.toml"
        cfg.write_text(
            f'[gateway]\nid = "fuzz"\n\n[coap]\nbind = "{HOST}"\nport = {port}\n'
            "shed_after_ms = 10000\n\n"  # every datagram parsed: a shed 5.03 would hide what is fuzzed
            f'[store]\npath = "{workdir / "fuzz.db"}"\n\n'
            f'[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\n\n'
            "[limits]\nrate_per_s = 0\n\n[metrics]\nenabled = false\n\n"
            '[security]\nunauthenticated = "allow"\n\n'  # plain CoAP: no OSCORE here
            '[log]\nlevel = "info"\nformat = "json"\n'
        )
        log_path = workdir / "gatewayd.log"
        server = Server("gatewayd", [*gatewayd_exe(), "run", "--config", str(cfg)], port, log_path)
        crashes = 0
        post_failures: list[str] = []
        with server:
            await asyncio.sleep(1.0)  # let the start-up lines be written
            start_lines = len(log_path.read_text().splitlines())
            rss0 = rss_mb(server.pid)
            async with Fuzzer(HOST, port, seed=args.seed) as fz:
                done = 0
                while done < args.cases:
                    n = min(args.round, args.cases - done)
                    report = await fz.run(n)
                    done += n
                    code = await valid_post(port, "fuzz-check", 1 + done // args.round)
                    if code != "2.04":
                        post_failures.append(f"after {done} cases: valid POST answered {code}")
                    if server.proc is None or server.proc.poll() is not None:
                        crashes += 1
                        print(f"gatewayd died after {done} cases", flush=True)
                        break
                    print(
                        f"  {done:>7} cases, {report.seconds:6.1f} s, failures {len(report.failures)}",
                        flush=True,
                    )
            rss1 = rss_mb(server.pid) if server.proc is not None else float("nan")
            fuzz_lines = log_path.read_text().splitlines()[start_lines:]
            # Nothing fuzzed may block the outbox: a reading posted now must reach MQTT.
            seen = asyncio.Event()

            async def watch() -> None:
                async with aiomqtt.Client("127.0.0.1", broker.port) as client:
                    await client.subscribe("gatewayd/fuzz/readings/fuzz-last", qos=1)
                    ready.set()
                    async for _ in client.messages:
                        seen.set()
                        return

            ready = asyncio.Event()
            watcher = asyncio.create_task(watch())
            await asyncio.wait_for(ready.wait(), 10)
            last = await valid_post(port, "fuzz-last", 60000)
            try:
                await asyncio.wait_for(seen.wait(), 30)
                mqtt_ok = True
            except TimeoutError:
                mqtt_ok = False
            watcher.cancel()
        exit_code = server.returncode
        all_lines = log_path.read_text().splitlines()[start_lines:]
    kinds, tracebacks = log_summary(fuzz_lines)
    exit_kinds, _ = log_summary(all_lines[len(fuzz_lines) :])
    print()
    print(f"seed {args.seed}: {report.summary()}")
    checks = post_failures or "all 2.04"
    print(f"crashes: {crashes}; gatewayd exit code {exit_code}; valid POST after each round: {checks}")
    print(f"a POST after the fuzz: {last}, its reading on MQTT: {mqtt_ok}")
    print(f"RSS: {rss0:.1f} MB before, {rss1:.1f} MB after the fuzz")
    print(
        f"log lines written during the fuzz (level info): {len(fuzz_lines)}, with a traceback: {tracebacks}"
    )
    for kind, n in kinds.most_common():
        print(f"  {n:6d}  {kind}")
    print(f"log lines after it (stop, pending 'suppressed K' lines): {len(all_lines) - len(fuzz_lines)}")
    for kind, n in exit_kinds.most_common():
        print(f"  {n:6d}  {kind}")
    for line in all_lines[len(fuzz_lines) :]:
        if "suppressed" in line:
            print(f"          {json.loads(line).get('event')}")
    for f in report.failures[:20]:
        print("FAILURE", f)
    bad = report.failures or report.missing or crashes or post_failures or exit_code != 0 or not mqtt_ok
    return 1 if bad or tracebacks or report.all_codes["5.00"] else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=100_000)
    ap.add_argument("--round", type=int, default=5_000, help="cases between two checks of a valid POST")
    ap.add_argument("--seed", type=int, default=random.randrange(1 << 30))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="gatewayd-fuzz-") as d:
        t0 = time.perf_counter()
        rc = asyncio.run(fuzz(args, Path(d)))
        print(f"total {time.perf_counter() - t0:.1f} s; {'OK' if rc == 0 else 'FAILED'}")
        return rc


if __name__ == "__main__":
    sys.exit(main())
