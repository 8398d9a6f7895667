#!/usr/bin/env python3
"""Memory benchmark: gatewayd's RSS stays flat under sustained load because duplicate detection is bounded.

    .venv/bin/python tests/benchmarks/bench_memory.py [--seconds 90] [--rate 1000] [--sample 5]

aiocoap remembers every (remote, message id) for EXCHANGE_LIFETIME (247 s) with the response
it sent, so its memory grows with the request rate. gatewayd replaces that with
``coap.DedupCache``, capped by ``[coap] dedup_max_entries``. This script runs gatewayd twice
under the same paced load of CON POSTs (many sockets, so every message id is new): once with
the default cap (20000) and once with a cap so large (10,000,000) that nothing is evicted within
the run, which behaves like aiocoap's unbounded memory. It samples the daemon's VmRSS and prints
the series and its slope over the second half of each run.

During each run it also sends the SAME CON datagram twice (same source port, message id and
token) from a probe socket: once a few seconds apart, once further apart than the cache reaches
at this rate (``dedup_max_entries / rate`` seconds). A caught duplicate is answered with the
stored response and stores nothing. Byte-identical responses do not prove that (a re-processed
request gets an identical 2.04 too), so the proof is on MQTT: after the duplicate the probe posts
a marker reading on the same node; the outbox publishes in order, so once the marker arrives,
every reading stored from the pair has arrived too, and there must be exactly one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import cbor2

# The script's own directory is on sys.path: reuse the ingest benchmark's raw CoAP client and launchers.
from bench_ingest import (
    HOST,
    PAYLOAD,
    LoadGen,
    Probe,
    Server,
    code_str,
    con_post,
    gatewayd_server,
    log_problems,
    post_tail,
    proc_cpu_s,
    proc_status_kb,
    workdir,
)

from gatewayd.testing import Mosquitto

MARKER = cbor2.dumps({"marker": 1.0})
#: gatewayd's default ``dedup_lifetime_s`` (RFC 7252 EXCHANGE_LIFETIME).
LIFETIME_S = 247.0
#: MQTT readings messages (decoded JSON) per node.
Seen = dict[str, list[dict[str, Any]]]


# --- duplicate probe ---------------------------------------------------------------------------------


class _Probe(Probe):
    """A node's socket that can also run one exchange to its final response."""

    async def exchange(self, datagram: bytes, timeout_s: float = 10.0) -> tuple[bytes, int]:
        """Send ``datagram``; return the first reply (the ACK) and the final response code."""
        assert self.transport is not None
        self.transport.sendto(datagram)
        first = await asyncio.wait_for(self.replies.get(), timeout_s)
        code = first[1]
        if code == 0:  # empty ACK: the response follows as its own CON
            code = (await asyncio.wait_for(self.replies.get(), 30.0))[1]
        return first, code


@dataclass
class DupResult:
    node: str
    gap_s: float
    identical: bool = False
    codes: list[str] = field(default_factory=list)
    #: Readings stored from the duplicated datagram, as seen on MQTT (1 = the duplicate was caught).
    stored: int | None = None
    error: str = ""

    def verdict(self, reach_s: float) -> str:
        """The outcome, and whether it is what a cache reaching back ``reach_s`` seconds should give."""
        if self.error:
            return f"ERROR {self.error}"
        caught = self.stored == 1
        same = "identical" if self.identical else "different"
        if self.gap_s < 0.8 * reach_s:
            expect = "as expected" if caught else "UNEXPECTED: inside the cache's reach"
        elif self.gap_s > 1.2 * reach_s:
            expect = "as expected: beyond the cache's reach" if not caught else "kept longer than expected"
        else:
            expect = "gap close to the cache's reach"
        return (
            f"codes {'/'.join(self.codes)}, second response {same}, readings stored from the pair:"
            f" {self.stored} -> duplicate {'caught' if caught else 'NOT caught'} ({expect})"
        )


async def duplicate_check(
    port: int, node: str, gap_s: float, seen: Seen, start_after_s: float = 0.0
) -> DupResult:
    """Post one CON twice, ``gap_s`` apart, then a marker; count the pair's readings on MQTT."""
    res = DupResult(node, gap_s)
    await asyncio.sleep(start_after_s)
    loop = asyncio.get_running_loop()
    transport, probe = await loop.create_datagram_endpoint(
        _Probe, local_addr=(HOST, 0), remote_addr=(HOST, port)
    )
    try:
        mid = random.randrange(0x10000)
        datagram = con_post(mid, b"dupcheck", post_tail(node, PAYLOAD))
        first, code1 = await probe.exchange(datagram)
        await asyncio.sleep(gap_s)
        second, code2 = await probe.exchange(datagram)
        _, code3 = await probe.exchange(con_post((mid + 1) & 0xFFFF, b"marker", post_tail(node, MARKER)))
        res.codes = [code_str(c) for c in (code1, code2, code3)]
        res.identical = first == second
        deadline = time.monotonic() + 60
        while not any("marker" in m["fields"] for m in seen[node]):
            if time.monotonic() > deadline:
                res.error = "marker reading never reached MQTT"
                return res
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # margin for a reading published out of order
        res.stored = sum(1 for m in seen[node] if "marker" not in m["fields"])
    except TimeoutError:
        res.error = "no response from gatewayd"
    finally:
        transport.close()
    return res


async def collect(broker_port: int, topics: list[str], seen: Seen, subscribed: asyncio.Event) -> None:
    """Append each readings message on ``topics`` to ``seen[node]`` (runs until cancelled)."""
    async with aiomqtt.Client("127.0.0.1", broker_port, identifier="bench-memory-probe") as client:
        for t in topics:
            await client.subscribe(t, qos=1)
        subscribed.set()
        async for msg in client.messages:
            assert isinstance(msg.payload, bytes)
            doc = json.loads(msg.payload)
            seen.setdefault(doc["node"], []).append(doc)


# --- one run -------------------------------------------------------------------------------------------


@dataclass
class Run:
    max_entries: int
    samples: list[tuple[float, int, int]] = field(default_factory=list)  # (t, RSS kB, 2.04s so far)
    dups: list[DupResult] = field(default_factory=list)
    ok: int = 0
    errors: int = 0
    retransmits: int = 0
    timeouts: int = 0
    skipped: int = 0
    separate: int = 0
    seconds: float = 0.0
    cpu_s: float = 0.0
    problems: list[str] = field(default_factory=list)

    def slope_kb_s(self) -> float:
        """Least-squares slope of RSS over the second half of the run."""
        half = [(t, kb) for t, kb, _ in self.samples if t >= self.seconds / 2]
        if len(half) < 2:
            return float("nan")
        mt = sum(t for t, _ in half) / len(half)
        mk = sum(kb for _, kb in half) / len(half)
        num = sum((t - mt) * (kb - mk) for t, kb in half)
        den = sum((t - mt) ** 2 for t, _ in half)
        return num / den


async def run_once(wd: Path, broker: Mosquitto, max_entries: int, args: argparse.Namespace) -> Run:
    run = Run(max_entries)
    gw = f"mem-{max_entries}"
    server: Server = gatewayd_server(
        wd, f"gatewayd dedup_max_entries={max_entries}", gw, broker.port, dedup_max_entries=max_entries
    )
    seen: Seen = {"dup-short": [], "dup-long": []}
    subscribed = asyncio.Event()
    topics = [f"gatewayd/{gw}/readings/{n}" for n in seen]
    collector = asyncio.create_task(collect(broker.port, topics, seen, subscribed))
    await asyncio.wait_for(subscribed.wait(), 10)
    with server:
        gen = await LoadGen(server.port, args.nodes, prefix="mem").open()
        try:
            cpu0, t0 = proc_cpu_s(server.pid), time.perf_counter()
            gen.start(rate=args.rate)
            # The long-gap probe starts early so that it ends well inside the run.
            probes = [
                asyncio.create_task(duplicate_check(server.port, "dup-long", args.long_gap, seen)),
                asyncio.create_task(
                    duplicate_check(server.port, "dup-short", args.short_gap, seen, args.seconds / 2)
                ),
            ]
            n_samples = int(args.seconds / args.sample)
            for i in range(n_samples + 1):
                # Sample on a fixed schedule from t0, so a slow sample does not shift the rest.
                await asyncio.sleep(max(0.0, t0 + i * args.seconds / n_samples - time.perf_counter()))
                t = time.perf_counter() - t0
                run.samples.append((t, proc_status_kb(server.pid), gen.total_ok + gen.stats.ok))
            run.seconds = time.perf_counter() - t0
            run.cpu_s = proc_cpu_s(server.pid) - cpu0
            st = await gen.stop()
            run.dups = list(await asyncio.wait_for(asyncio.gather(*probes), 120))
        finally:
            gen.close()
            collector.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await collector
    run.ok = gen.total_ok
    run.errors, run.retransmits, run.timeouts = st.errors, st.retransmits, st.timeouts
    run.skipped, run.separate = st.skipped, st.separate
    run.problems = log_problems(server)
    if server.returncode not in (0, None):
        run.problems.append(f"exit code {server.returncode}")
    return run


def report(run: Run, args: argparse.Namespace) -> None:
    reach = min(run.max_entries / args.rate, LIFETIME_S)
    print(
        f"\n== gatewayd, [coap] dedup_max_entries = {run.max_entries:,}"
        f" (reaches back {reach:.0f} s at {args.rate:g} req/s; lifetime 247 s)"
    )
    print(f"{'t s':>6}{'RSS MB':>9}{'req/s':>8}")
    prev_t, prev_ok = 0.0, 0
    for t, kb, ok in run.samples:
        rate = (ok - prev_ok) / (t - prev_t) if t > prev_t else 0.0
        print(f"{t:>6.0f}{kb / 1024:>9.1f}{rate:>8.0f}")
        prev_t, prev_ok = t, ok
    slope = run.slope_kb_s()
    achieved = run.ok / run.seconds
    print(
        f"slope over the second half: {slope:+.1f} KB/s ({1024 * slope / achieved:+.0f} bytes per request);"
        f" {run.ok} x 2.04 in {run.seconds:.0f} s ({achieved:.0f} req/s), server CPU {run.cpu_s:.0f} s,"
        f" errors {run.errors}, retransmits {run.retransmits}, timeouts {run.timeouts},"
        f" separate responses {run.separate}, requests skipped (all nodes busy) {run.skipped}"
    )
    for d in run.dups:
        print(f"same CON twice, {d.gap_s:g} s apart ({d.node}): {d.verdict(reach)}")
    for p in run.problems[:5]:
        print(f"gatewayd logged: {p[:300]}")


async def bench(args: argparse.Namespace) -> int:
    runs = []
    with workdir() as wd, Mosquitto() as broker:
        for n in args.max_entries:
            print(f"running dedup_max_entries={n} for {args.seconds:g} s ...", file=sys.stderr, flush=True)
            runs.append(await run_once(wd, broker, n, args))
    print(
        f"gatewayd (SQLite WAL synchronous FULL, MQTT to a local Mosquitto, no plugins) under {args.rate:g}"
        f" CON POST/s from {args.nodes} sockets, every message id new; VmRSS sampled every {args.sample:g} s."
    )
    for r in runs:
        report(r, args)
    print()
    print(f"{'dedup_max_entries':>18}{'RSS start MB':>14}{'RSS end MB':>12}{'slope KB/s':>12}")
    for r in runs:
        print(
            f"{r.max_entries:>18,}{r.samples[0][1] / 1024:>14.1f}{r.samples[-1][1] / 1024:>12.1f}"
            f"{r.slope_kb_s():>12.1f}"
        )
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=90.0, help="load duration of each run")
    ap.add_argument("--rate", type=float, default=1000.0, help="CON POSTs per second")
    ap.add_argument("--sample", type=float, default=5.0, help="seconds between RSS samples")
    ap.add_argument("--nodes", type=int, default=64, help="sockets sharing the load")
    ap.add_argument("--max-entries", type=int, nargs="+", default=[20_000, 10_000_000])
    ap.add_argument("--short-gap", type=float, default=3.0, help="seconds between a duplicate pair")
    ap.add_argument("--long-gap", type=float, default=30.0, help="a gap beyond the small cache's reach")
    args = ap.parse_args()
    if not 10 <= args.seconds <= 600 or not 1 <= args.rate <= 20_000 or not 1 <= args.nodes <= 1024:
        ap.error("--seconds 10..600, --rate 1..20000, --nodes 1..1024")
    if args.long_gap + 5 > args.seconds or args.seconds / 2 + args.short_gap + 5 > args.seconds:
        ap.error("the duplicate gaps must fit inside --seconds")
    return asyncio.run(bench(args))


if __name__ == "__main__":
    sys.exit(main())
