#!/usr/bin/env python3
"""Soak: a steady open-loop rate for a long time; gatewayd's RSS and open files must stay flat.

    .venv/bin/python tests/benchmarks/soak.py [--minutes 30] [--rate 300] [--nodes 50] [--sample-s 30]

Not run in CI (30 minutes). One ``gatewayd run`` subprocess as in bench_overload.py: durable store
(FULL), MQTT QoS 1 to a private Mosquitto, the ``anomaly`` plugin (one worker), rate limit and
metrics off. ``--nodes`` simulated pumps, one UDP socket each, share ``--rate`` CON POSTs per second
on a fixed schedule (open loop: nothing waits for an answer, nothing is retransmitted). A pump's
readings alternate between a CBOR map (Content-Format 60) and SenML-CBOR (112); every 5th reading
of a pump is a fault (vibration x4), as in the demo.

Every ``--sample-s`` seconds: gatewayd's VmRSS, threads and open fds; its plugin workers' RSS and
fds (its child processes); the store's file sizes (db, WAL); answers by code and the window's
latency; distinct readings and results seen on MQTT. At the end: the slope of each over the second
half of the run, per hour, and PASS/FAIL for "flat":
  RSS          gatewayd and workers each grow less than --rss-slope-mb-h (least squares, 2nd half)
  open files   gatewayd's fd count and thread count constant over the second half (max - min <=
               --fd-tolerance)
  store        db + WAL grow less than --store-slope-mb-h
  service      every request answered 2.04; every reading on MQTT with its result after the run;
               no worker restart; exit 0 on SIGTERM.
The first half is left out on purpose: the duplicate cache fills for dedup_max_entries / rate
seconds (20,000 / 300 = 67 s by default) and RSS rises with it.

gatewayd runs from a copy of the working tree's ``gatewayd`` and ``gatewayd_anomaly`` packages taken
at the start (PYTHONPATH; workers inherit it), so edits made during the run cannot reach a worker
started late; ``--no-snapshot`` runs the installed code.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import importlib.metadata
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cbor2

# The script's own directory is on sys.path: reuse the other benchmarks' generator and readers.
from bench_ingest import (
    CODE_CHANGED,
    MqttTally,
    children,
    code_str,
    post_tail,
    proc_cpu_s,
    proc_status_kb,
    workdir,
)
from bench_overload import (
    PLUGIN,
    OpenLoop,
    Tally,
    broker_unbounded_queue,
    log_lines,
    pct,
    plugin_gateway,
    rss_kb,
)

from gatewayd.codec import CF_CBOR, CF_SENML_CBOR
from gatewayd.simulator import pump_reading, senml_pack
from gatewayd.testing import Mosquitto

ROOT = Path(__file__).resolve().parents[2]
#: Requests without an answer after this long are counted as unanswered (no retransmission).
ANSWER_TIMEOUT_S = 30.0


class Pumps:
    """Request ``seq`` is reading ``seq // nodes`` of pump ``seq % nodes`` (one socket per pump)."""

    def __init__(self, nodes: int, seed: int = 1) -> None:
        self.names = [f"pump-{i}" for i in range(nodes)]
        self.rng = random.Random(seed)
        self.faults = 0

    def tail(self, seq: int) -> bytes:
        node, k = seq % len(self.names), seq // len(self.names)
        fault = k % 5 == 4
        self.faults += fault
        reading = pump_reading(k, self.rng, anomalous=fault)
        if k % 2:
            return post_tail(self.names[node], cbor2.dumps(senml_pack(reading, time.time())), CF_SENML_CBOR)
        return post_tail(self.names[node], cbor2.dumps(reading), CF_CBOR)


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0  # exited (a worker being replaced)


def file_mb(path: Path) -> float:
    try:
        return path.stat().st_size / 2**20
    except OSError:
        return 0.0


@dataclass
class Point:
    t: float
    rss_mb: float
    workers_mb: float
    workers: tuple[int, ...]
    fds: int
    worker_fds: int
    threads: int
    db_mb: float
    wal_mb: float
    sent: int
    codes: dict[int, int]
    unanswered: int
    p99_ms: float
    readings: int
    results: int
    anomalies: int
    cpu_pct: float


def slope_per_h(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) in value per hour."""
    if len(points) < 2:
        return float("nan")
    mt = sum(t for t, _ in points) / len(points)
    mv = sum(v for _, v in points) / len(points)
    den = sum((t - mt) ** 2 for t, _ in points)
    return 3600 * sum((t - mt) * (v - mv) for t, v in points) / den if den else float("nan")


HEAD = (
    f"{'t min':>6}{'RSS MB':>8}{'wrk MB':>8}{'fds':>5}{'wfds':>5}{'thr':>4}{'db MB':>7}{'wal MB':>7}"
    f"{'sent':>9}{'2.04':>9}{'other':>6}{'no ans':>7}{'p99 ms':>7}{'readings':>9}{'results':>9}"
    f"{'anom':>7}{'CPU%':>5}"
)


def row(p: Point) -> str:
    other = sum(n for c, n in p.codes.items() if c != CODE_CHANGED)
    return (
        f"{p.t / 60:>6.1f}{p.rss_mb:>8.1f}{p.workers_mb:>8.1f}{p.fds:>5}{p.worker_fds:>5}{p.threads:>4}"
        f"{p.db_mb:>7.1f}{p.wal_mb:>7.1f}{p.sent:>9}{p.codes.get(CODE_CHANGED, 0):>9}{other:>6}"
        f"{p.unanswered:>7}{p.p99_ms:>7.0f}{p.readings:>9}{p.results:>9}{p.anomalies:>7}{p.cpu_pct:>5.0f}"
    )


@dataclass
class Soak:
    points: list[Point] = field(default_factory=list)
    total: Tally = field(default_factory=Tally)
    faults: int = 0
    mqtt: dict[str, Any] = field(default_factory=dict)
    mqtt_wait_s: float = 0.0
    exit_code: int | None = None
    problems: list[str] = field(default_factory=list)
    send_seconds: float = 0.0
    max_lag_s: float = 0.0


async def soak(args: argparse.Namespace, wd: Path) -> Soak:
    res = Soak()
    gw = "soak"
    db = wd / f"{gw}.db"
    pumps = Pumps(args.nodes)
    with broker_unbounded_queue(Mosquitto()) as broker:
        mq = MqttTally(broker.port, gw)
        server = plugin_gateway(wd, gw, broker.port)
        try:
            with server:
                if not await mq.wait_ready(PLUGIN, 120):
                    raise RuntimeError(f"plugin not ready in 120 s: {server.log_tail(1000)}")
                gen = await OpenLoop(server.port, args.nodes, pumps.tail).open()
                try:
                    seconds = 60 * args.minutes
                    t0 = time.perf_counter()
                    sender = asyncio.create_task(gen.run(args.rate, seconds, tick_s=0.005))
                    cpu0, tc = proc_cpu_s(server.pid), t0
                    for i in range(int(seconds / args.sample_s) + 1):  # bounded: one per sample
                        await asyncio.sleep(max(0.0, t0 + i * args.sample_s - time.perf_counter()))
                        if sender.done() and sender.exception() is not None:
                            raise RuntimeError("sender failed") from sender.exception()
                        gen.expire(ANSWER_TIMEOUT_S)
                        window = gen.take_tally()
                        res.total.add(window)
                        now, cpu = time.perf_counter(), proc_cpu_s(server.pid)
                        kids = children(server.pid)
                        c = await asyncio.to_thread(mq.poll)
                        p = Point(
                            t=now - t0,
                            rss_mb=rss_kb(server.pid) / 1024,
                            workers_mb=sum(map(rss_kb, kids)) / 1024,
                            workers=tuple(kids),
                            fds=fd_count(server.pid),
                            worker_fds=sum(map(fd_count, kids)),
                            threads=proc_status_kb(server.pid, "Threads"),
                            db_mb=file_mb(db),
                            wal_mb=file_mb(db.with_name(db.name + "-wal")),
                            sent=res.total.sent,
                            codes=dict(res.total.codes),
                            unanswered=res.total.unanswered,
                            p99_ms=1000 * pct(window.lat_ok, 0.99),
                            readings=c["readings"],
                            results=c["results"],
                            anomalies=c["anomalies"],
                            cpu_pct=100 * (cpu - cpu0) / max(1e-9, now - tc),
                        )
                        cpu0, tc = cpu, now
                        res.points.append(p)
                        print(row(p), flush=True)
                    await asyncio.wait_for(sender, 60)
                    res.send_seconds, res.max_lag_s = gen.send_seconds, gen.max_lag_s
                    await gen.drain(quiet_s=5.0, timeout_s=60.0)
                    res.total.add(gen.take_tally())
                finally:
                    gen.close()
                res.faults = pumps.faults
                res.mqtt, res.mqtt_wait_s = await mq.wait_for(
                    res.total.codes[CODE_CHANGED], res.total.codes[CODE_CHANGED], 120
                )
        finally:
            res.exit_code = server.returncode
            res.problems = log_lines(server)
            mq.close()
    return res


def report(res: Soak, args: argparse.Namespace, snapshot: str) -> bool:
    pts = res.points
    if not pts:
        print("FAIL  no samples")
        return False
    t_end = pts[-1].t
    half = [p for p in pts if p.t >= t_end / 2]
    print()
    print(
        f"{args.rate:g} CON POST/s open loop from {args.nodes} pumps for {args.minutes:g} min"
        f" ({res.total.sent} sent in {res.send_seconds:.0f} s, sender at most {1000 * res.max_lag_s:.0f} ms"
        f" behind schedule; {res.faults} faults); gatewayd {importlib.metadata.version('gatewayd')}"
        f" {snapshot}, Python {sys.version.split()[0]}, {os.cpu_count()} CPUs shared by everything."
    )
    codes = ", ".join(f"{code_str(c)}: {n}" for c, n in sorted(res.total.codes.items()))
    print(
        f"answers: {codes}; no answer {res.total.unanswered}; separate {res.total.separate};"
        f" late {res.total.late}; MQTT after {res.mqtt_wait_s:.1f} s: {res.mqtt.get('readings')} readings,"
        f" {res.mqtt.get('results')} results ({res.mqtt.get('anomalies')} anomalies,"
        f" {res.mqtt.get('result_errors')} errors); plugin {res.mqtt.get('plugins', {}).get(PLUGIN)}"
    )
    worker_sets = list(dict.fromkeys(p.workers for p in pts))
    print(f"worker pids over the run: {worker_sets}; gatewayd exit code {res.exit_code}")
    for line in res.problems[:5]:
        print(f"  gatewayd logged: {line}")
    print()

    series: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
    for p in half:
        for name, v in (
            ("gatewayd RSS MB", p.rss_mb),
            ("workers RSS MB", p.workers_mb),
            ("gatewayd fds", p.fds),
            ("workers fds", p.worker_fds),
            ("gatewayd threads", p.threads),
            ("store db+wal MB", p.db_mb + p.wal_mb),
        ):
            series[name].append((p.t, float(v)))
    print(f"second half ({half[0].t / 60:.1f}-{t_end / 60:.1f} min, {len(half)} samples):")
    print(f"{'':<18}{'first':>9}{'last':>9}{'min':>9}{'max':>9}{'slope/h':>10}")
    for name, pv in series.items():
        vs = [v for _, v in pv]
        print(f"{name:<18}{vs[0]:>9.1f}{vs[-1]:>9.1f}{min(vs):>9.1f}{max(vs):>9.1f}{slope_per_h(pv):>+10.2f}")
    print()

    def spread(name: str) -> float:
        vs = [v for _, v in series[name]]
        return max(vs) - min(vs)

    ok = res.total.codes[CODE_CHANGED]
    others = sum(res.total.codes.values()) - ok
    restarts = (res.mqtt.get("plugins", {}).get(PLUGIN) or {}).get("restarts")
    seen = min(res.mqtt.get("readings", 0), res.mqtt.get("results", 0))
    checks = [
        (
            "gatewayd RSS flat",
            slope_per_h(series["gatewayd RSS MB"]) < args.rss_slope_mb_h,
            f"slope over the 2nd half < {args.rss_slope_mb_h:g} MB/h"
            f" (got {slope_per_h(series['gatewayd RSS MB']):+.2f})",
        ),
        (
            "workers RSS flat",
            slope_per_h(series["workers RSS MB"]) < args.rss_slope_mb_h,
            f"slope over the 2nd half < {args.rss_slope_mb_h:g} MB/h"
            f" (got {slope_per_h(series['workers RSS MB']):+.2f})",
        ),
        (
            "open fds constant",
            spread("gatewayd fds") <= args.fd_tolerance and spread("workers fds") <= args.fd_tolerance,
            f"max - min over the 2nd half <= {args.fd_tolerance} (gatewayd {spread('gatewayd fds'):.0f},"
            f" workers {spread('workers fds'):.0f})",
        ),
        (
            "threads constant",
            spread("gatewayd threads") <= args.fd_tolerance,
            f"max - min over the 2nd half <= {args.fd_tolerance} (got {spread('gatewayd threads'):.0f})",
        ),
        (
            "store flat",
            slope_per_h(series["store db+wal MB"]) < args.store_slope_mb_h,
            f"db + WAL slope over the 2nd half < {args.store_slope_mb_h:g} MB/h"
            f" (got {slope_per_h(series['store db+wal MB']):+.2f})",
        ),
        (
            "every request 2.04",
            others == 0 and res.total.unanswered == 0 and ok == res.total.sent,
            f"2.04 {ok} of {res.total.sent} sent; other codes {others}; no answer {res.total.unanswered}",
        ),
        (
            "nothing lost on MQTT",
            seen >= ok,
            f"every 2.04 reading and its {PLUGIN} result on MQTT within 120 s after the run"
            f" (readings {res.mqtt.get('readings')}, results {res.mqtt.get('results')} of {ok})",
        ),
        (
            "no crash",
            res.exit_code == 0 and not restarts and len(worker_sets) == 1,
            f"exit 0 on SIGTERM (got {res.exit_code}), plugin restarts 0 (got {restarts}), same worker pids",
        ),
    ]
    for name, passed, bound in checks:
        print(f"{'PASS' if passed else 'FAIL'}  {name}: {bound}")
    return all(p for _, p, _ in checks)


def take_snapshot(wd: Path) -> str:
    """Copy the packages gatewayd and its worker import, and put the copy first on PYTHONPATH."""
    snap = wd / "snapshot"
    shutil.copytree(ROOT / "gatewayd", snap / "gatewayd", ignore=shutil.ignore_patterns("__pycache__"))
    anomaly = ROOT / "plugins" / "anomaly" / "gatewayd_anomaly"
    shutil.copytree(anomaly, snap / "gatewayd_anomaly", ignore=shutil.ignore_patterns("__pycache__"))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(snap), os.environ.get("PYTHONPATH")]))
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--", "gatewayd", "plugins/anomaly"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split("\n")
    changed = sum(1 for line in dirty if line.strip())
    return f"(snapshot of {head} + {changed} uncommitted files in gatewayd/ and plugins/anomaly/)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0, help="duration of the load")
    ap.add_argument("--rate", type=float, default=300.0, help="CON POSTs per second, all pumps together")
    ap.add_argument("--nodes", type=int, default=50, help="simulated pumps (one socket each)")
    ap.add_argument("--sample-s", type=float, default=30.0, help="seconds between samples")
    ap.add_argument("--rss-slope-mb-h", type=float, default=5.0, help="bound on RSS growth, 2nd half")
    ap.add_argument("--store-slope-mb-h", type=float, default=5.0, help="bound on db + WAL growth")
    ap.add_argument("--fd-tolerance", type=int, default=0, help="allowed max - min of fds and threads")
    ap.add_argument("--no-snapshot", action="store_true", help="run the installed gatewayd as it is")
    args = ap.parse_args()
    if not (1 <= args.minutes <= 24 * 60 and 1 <= args.rate <= 5000 and 1 <= args.nodes <= 1000):
        ap.error("--minutes 1..1440, --rate 1..5000, --nodes 1..1000")
    if not 1 <= args.sample_s <= 60 * args.minutes / 4:
        ap.error("--sample-s must leave at least 4 samples")
    if 247 * args.rate / args.nodes > 60_000:  # (source port, message id) must not repeat within 247 s
        ap.error("too many requests per pump: message ids would repeat within the dedup lifetime")
    with workdir() as wd:
        snapshot = "(installed code)" if args.no_snapshot else take_snapshot(wd)
        print(f"soak: {args.minutes:g} min at {args.rate:g} req/s, gatewayd {snapshot}", flush=True)
        print(HEAD, flush=True)
        res = asyncio.run(soak(args, wd))
    with contextlib.suppress(BrokenPipeError):
        return 0 if report(res, args, snapshot) else 1
    return 1


if __name__ == "__main__":
    sys.exit(main())
