#!/usr/bin/env python3
"""Plugin runtime benchmark: the anomaly plugin through gatewayd at saturation, batched vs batch 1,
against the same model run directly.

    .venv/bin/python tests/benchmarks/bench_plugins.py [--readings N] [--readings-b1 N] [--batches 64 256]

Saturation without CoAP: a store is pre-filled with N pump readings pending for ``anomaly`` (each
with its readings-message in the outbox, exactly as intake leaves them), and ``gatewayd run`` is
started on a copy of it, so the plugin queue is full from the first batch on. The clock starts
when the plugin becomes ``ready`` and stops when all N readings are done. Rows:

  gateway +MQTT, results on MQTT   broker up; a subscriber child counts distinct ``reading_id`` on
                                   ``{prefix}/{gw}/results/anomaly/#``; t0 = the retained
                                   ``status/plugins/anomaly`` message with state ready. Includes,
                                   per reading: the plugin, the results' SQLite commit, and two QoS 1
                                   publishes (its readings-message and its result).
  gateway +MQTT, pending drained   the same run, clock stopped when the store's ``pending`` table
                                   (read-only connection, polled) is empty: the plugin pipeline
                                   while the publisher competes for the same event loop.
  gateway, no publisher            MQTT pointed at a port nobody listens on (long reconnect
                                   backoff), clock stopped when ``pending`` is empty; t0 from the
                                   ``plugin_state ready`` log line. Batching + worker pipe + store
                                   commit of results, nothing else.
  direct: worker pipe              ``python -m gatewayd.worker`` driven synchronously over its pipe
                                   (CBOR frames, ``process()``), no event loop, no store.
  direct: plugin.process()         ``AnomalyPlugin.process`` in this process (its Python pre/post).
  direct: ort.run                  bare ``InferenceSession.run`` on float32 [B, 3].

All inference is single-threaded (intra-op 1, inter-op 1, sequential) as in the gateway's worker.
CPU seconds are user+sys from /proc over each measured window: the gateway process (all threads),
its worker process, Mosquitto, the MQTT subscriber, this script, and the rest of the machine's busy
time (kernel threads, other tenants: the noise on a shared machine).

Batch 1 is 4-5x slower, so its runs use a smaller N (``--readings-b1``) to keep the whole benchmark
near 1.5 minutes; every row shows its N. ``--synchronous NORMAL`` shows what the per-commit fsync
costs (the default FULL is the daemon's default).

Not a pytest test: no ``test_`` names. The MQTT subscriber child is bench_ingest's ``MqttTally``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

import cbor2
import numpy as np
import onnxruntime as ort

# The script's own directory is on sys.path: reuse the ingest benchmark's launchers and /proc readers.
from bench_ingest import (
    HOST,
    MqttTally,
    Server,
    children,
    free_udp6_port,
    gatewayd_exe,
    machine_jiffies,
    proc_cpu_s,
    proc_status_kb,
    workdir,
)

from gatewayd.codec import Draft
from gatewayd.plugin_api import FieldValue, Reading
from gatewayd.simulator import pump_reading
from gatewayd.store import Store
from gatewayd.testing import Mosquitto, free_port
from gatewayd.worker import HEADER, encode_frame, reading_to_wire

PLUGIN = "anomaly"
TARGET = "gatewayd_anomaly.plugin:AnomalyPlugin"
UNITS = {"temperature": "Cel", "humidity": "%RH", "vibration": "mm/s"}
NODES = 16
#: Poll period of the store's pending table and of /proc: the resolution of "pending drained".
POLL_S = 0.025
CLK_TCK = os.sysconf("SC_CLK_TCK")
RUN_TIMEOUT_S = 120.0


# --- the pre-filled store ---------------------------------------------------------------------------


def pump_readings(n: int, seed: int = 1) -> list[tuple[str, dict[str, float]]]:
    """(node, fields) of n readings from NODES simulated pumps; every 5th is a fault, as in the demo."""
    rng = random.Random(seed)
    return [(f"pump-{i % NODES}", pump_reading(i, rng, anomalous=i % 5 == 4)) for i in range(n)]


async def _fill(path: Path, n: int) -> None:
    store = await Store.open(path, synchronous="NORMAL", max_readings=max(n, 10))
    try:
        now = time.time()
        by_node: dict[str, list[Draft]] = {}
        for i, (node, reading) in enumerate(pump_readings(n)):
            fields: dict[str, FieldValue] = dict(reading)
            by_node.setdefault(node, []).append(Draft(now + i * 1e-4, fields, dict(UNITS)))
        # Chunks of 50 per node, nodes interleaved as they would arrive, all queued at once so they
        # share group commits like concurrent POSTs.
        ops = [
            store.append(node, drafts[k : k + 50], [[PLUGIN]] * len(drafts[k : k + 50]))
            for k in range(0, max(map(len, by_node.values())), 50)
            for node, drafts in by_node.items()
            if drafts[k : k + 50]
        ]
        await asyncio.gather(*ops)
    finally:
        await store.close()  # checkpoints the WAL: the .db file alone is the template


def make_template(wd: Path, n: int) -> Path:
    path = wd / f"template-{n}.db"
    if not path.exists():
        asyncio.run(_fill(path, n))
    return path


# --- one gateway run --------------------------------------------------------------------------------


def cpu_or_none(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        return proc_cpu_s(pid)
    except (OSError, ValueError, IndexError):
        return None  # exited


@dataclass
class Sample:
    t: float
    cpu: dict[str, float]
    pending: int


@dataclass
class GatewayRun:
    max_batch: int
    max_wait_ms: float
    publish: bool
    n: int
    ready_t: float = math.nan
    ready_log_t: float = math.nan
    drained_t: float = math.nan
    published_t: float = math.nan
    results_seen: int = 0
    result_msgs: int = 0
    result_errors: int = 0
    synchronous: str = "FULL"
    start_t: float = math.nan
    #: After the clean stop (SIGTERM): what the gateway left for its next start.
    left_after_stop: tuple[int, int] = (-1, -1)
    #: Peak RSS (VmHWM, MB) of the gateway: it holds the whole backlog in memory after start.
    peak_rss_mb: float = math.nan
    worker_pids: set[int] = field(default_factory=set)
    samples: list[Sample] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        b = "batch 1" if self.max_batch == 1 else f"batch {self.max_batch}/{self.max_wait_ms:g}ms"
        return f"{b}, {'+MQTT' if self.publish else 'no publisher'}"

    def cpu_between(self, t0: float, t1: float) -> dict[str, float]:
        """CPU seconds per process from the last sample at or before t0 to the first at or after t1."""
        before = [s for s in self.samples if s.t <= t0] or self.samples[:1]
        after = [s for s in self.samples if s.t >= t1] or self.samples[-1:]
        a, b = before[-1].cpu, after[0].cpu
        cpu = {k: b[k] - a.get(k, 0.0) for k in b}
        # Busy CPU of the whole machine not used by any process of this benchmark: other tenants.
        cpu["others"] = cpu.pop("machine") - sum(cpu.values())
        return cpu


def gateway_config(wd: Path, gw: str, db: Path, run: GatewayRun, mqtt_port: int) -> tuple[Path, int]:
    """The config file and its CoAP port (the launcher pings it to know the daemon is up)."""
    cfg, coap_port = wd / f"{gw}.toml", free_udp6_port()
    # No publisher: a port nobody listens on, and a reconnect backoff longer than the run.
    backoff = "" if run.publish else "backoff_initial_s = 600\nbackoff_max_s = 600\ndrain_timeout_s = 0\n"
    cfg.write_text(
        f'[gateway]\nid = "{gw}"\n\n'
        f'[coap]\nbind = "{HOST}"\nport = {coap_port}\n\n'
        f'[store]\npath = "{db}"\nmax_readings = {run.n + 1000}\nsynchronous = "{run.synchronous}"\n\n'
        f'[mqtt]\nhost = "127.0.0.1"\nport = {mqtt_port}\nclient_id = "{gw}"\n{backoff}\n'
        # info: only lifecycle lines (no per-batch logging); the ready line is the no-publisher t0.
        "[limits]\nrate_per_s = 0\n\n[metrics]\nenabled = false\n\n"
        '[security]\nunauthenticated = "allow"\n\n'  # plain CoAP: no OSCORE here
        '[log]\nlevel = "info"\nformat = "json"\n\n'
        f'[[plugins]]\nname = "{PLUGIN}"\nplugin = "{PLUGIN}"\nthreads = 1\n'
        f"max_batch = {run.max_batch}\nmax_wait_ms = {run.max_wait_ms}\nqueue_size = {run.n + 1000}\n"
    )
    return cfg, coap_port


def ready_from_log(log_path: Path) -> float:
    """Monotonic time of the first ``plugin_state`` ready line (the log has UTC wall-clock stamps)."""
    offset = time.time() - time.monotonic()
    with contextlib.suppress(OSError):
        for line in log_path.read_text(errors="replace").splitlines():
            if '"plugin_state"' not in line or '"ready"' not in line:
                continue
            with contextlib.suppress(ValueError, KeyError):
                doc = json.loads(line)
                if doc.get("event") == "plugin_state" and doc.get("state") == "ready":
                    return datetime.fromisoformat(doc["timestamp"]).timestamp() - offset
    return math.nan


#: Warnings a run without a broker is expected to log.
NO_BROKER_EVENTS = ("mqtt_disconnected", "mqtt_stopped_disconnected", "mqtt_drain_timeout")


def log_problems(log_path: Path, publish: bool) -> list[str]:
    """Log lines above info, except those a run without a broker expects."""
    out = []
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            doc = {"level": "unparsed"}
        if doc.get("level") in ("info", "debug") or (not publish and doc.get("event") in NO_BROKER_EVENTS):
            continue
        out.append(line[:300])
    return out


def count_rows(db: Path, sql: str) -> int:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as c:
        return int(c.execute(sql).fetchone()[0])


def run_gateway(
    wd: Path, template: Path, run: GatewayRun, broker: Mosquitto, broker_pid: int, idx: int
) -> GatewayRun:
    gw = f"bench-{idx}-b{run.max_batch}-{'mqtt' if run.publish else 'nopub'}"
    db = wd / f"{gw}.db"
    shutil.copyfile(template, db)
    cfg, coap_port = gateway_config(wd, gw, db, run, broker.port if run.publish else free_port())
    counter = MqttTally(broker.port, gw) if run.publish else None
    server = Server(gw, [*gatewayd_exe(), "run", "--config", str(cfg)], coap_port, wd / f"{gw}.log")
    pending_db: sqlite3.Connection | None = None
    try:
        run.start_t = time.monotonic()
        server.start()
        pending_db = sqlite3.connect(f"file:{db}?mode=ro", uri=True, isolation_level=None)
        sub_pid = counter.proc.pid if counter else None
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while time.monotonic() < deadline:
            t = time.monotonic()
            workers = children(server.pid)
            run.worker_pids.update(workers)
            cpus = {
                "gateway": cpu_or_none(server.pid),
                "worker": sum(c for c in map(cpu_or_none, run.worker_pids) if c is not None),
                "broker": cpu_or_none(broker_pid),
                "subscriber": cpu_or_none(sub_pid),
                "bench": time.process_time(),  # this script: the poller's own cost
                "machine": machine_jiffies()[0] / CLK_TCK,
            }
            (pending,) = pending_db.execute(
                "SELECT count(*) FROM pending WHERE plugin = ?", (PLUGIN,)
            ).fetchone()
            run.samples.append(Sample(t, {k: v for k, v in cpus.items() if v is not None}, pending))
            if pending == 0 and math.isnan(run.drained_t):
                run.drained_t = t
            if counter is not None:
                st = counter.poll()
                run.results_seen, run.result_msgs = st["results"], st["results_msgs"]
                run.result_errors = st["result_errors"]
                if (ready_t := st["plugins"].get(PLUGIN, {}).get("ready_t")) is not None:
                    run.ready_t = ready_t
                if st["results"] >= run.n:
                    run.published_t = st["last_result_t"]
            if math.isnan(run.ready_log_t):
                run.ready_log_t = ready_from_log(server.log_path)
            if not run.publish:
                run.ready_t = run.ready_log_t
            if not math.isnan(run.drained_t) and (not run.publish or not math.isnan(run.published_t)):
                break
            if server.proc is not None and server.proc.poll() is not None:
                run.problems.append(f"gatewayd exited with {server.proc.returncode}")
                break
            time.sleep(max(0.0, POLL_S - (time.monotonic() - t)))
        else:
            run.problems.append(f"not done within {RUN_TIMEOUT_S:g} s")
        with contextlib.suppress(OSError, KeyError):
            run.peak_rss_mb = proc_status_kb(server.pid, "VmHWM") / 1024
    finally:
        if pending_db is not None:
            pending_db.close()
        server.stop()
        if counter is not None:
            counter.close()
    if server.returncode not in (0, None):
        run.problems.append(f"gatewayd exited with {server.returncode}")
    pending_left = count_rows(db, f"SELECT count(*) FROM pending WHERE plugin = '{PLUGIN}'")
    run.left_after_stop = (pending_left, count_rows(db, "SELECT count(*) FROM outbox"))
    if len(run.worker_pids) > 1:
        run.problems.append(f"{len(run.worker_pids)} worker processes (restarts?)")
    run.problems += [f"log: {p}" for p in log_problems(server.log_path, run.publish)[:3]]
    return run


# --- direct runs -------------------------------------------------------------------------------------


def timed_rate(step: Callable[[], int], seconds: float, reps: int) -> float:
    """Median over ``reps`` windows of readings/s, each window calling ``step`` for ``seconds``."""
    rates = []
    for _ in range(reps):
        n, t0 = 0, time.perf_counter()
        while (dt := time.perf_counter() - t0) < seconds:
            n += step()
        rates.append(n / dt)
    return statistics.median(rates)


def as_readings(n: int) -> list[Reading]:
    return [
        Reading(f"r-{i}", node, time.time(), fields, dict(UNITS))
        for i, (node, fields) in enumerate(pump_readings(n))
    ]


def cycle_batches(readings: Sequence[Reading], b: int) -> Callable[[], list[Reading]]:
    batches = [list(readings[i : i + b]) for i in range(0, len(readings) - b + 1, b)]
    k = [0]

    def nxt() -> list[Reading]:
        k[0] = (k[0] + 1) % len(batches)
        return batches[k[0]]

    return nxt


def direct_plugin(
    readings: Sequence[Reading], sizes: Sequence[int], seconds: float, reps: int
) -> dict[int, float]:
    from gatewayd_anomaly.plugin import AnomalyPlugin

    plugin = AnomalyPlugin({})
    plugin.threads = 1  # what the gateway's worker sets before load
    plugin.load()
    plugin.process(list(plugin.sample()))

    def stepper(b: int) -> Callable[[], int]:
        nxt = cycle_batches(readings, b)
        return lambda: len(plugin.process(nxt()))

    return {b: timed_rate(stepper(b), seconds, reps) for b in sizes}


def direct_ort(
    readings: Sequence[Reading], sizes: Sequence[int], seconds: float, reps: int
) -> dict[int, float]:
    from gatewayd_anomaly.plugin import PACKAGED_MODEL

    model = (resources.files("gatewayd_anomaly") / PACKAGED_MODEL).read_bytes()
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = 1, 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sess = ort.InferenceSession(model, sess_options=so, providers=["CPUExecutionProvider"])
    inp, outp = sess.get_inputs()[0].name, sess.get_outputs()[0].name
    rows = np.asarray([[r.fields[f] for f in UNITS] for r in readings], np.float32)
    out = {}
    for b in sizes:
        xs = [np.ascontiguousarray(rows[i : i + b]) for i in range(0, len(rows) - b + 1, b)]

        def step(xs: list[Any] = xs, k: list[int] = [0]) -> int:  # noqa: B006 (a per-size counter)
            k[0] = (k[0] + 1) % len(xs)
            sess.run([outp], {inp: xs[k[0]]})
            return len(xs[k[0]])

        out[b] = timed_rate(step, seconds, reps)
    return out


def direct_worker(
    readings: Sequence[Reading], sizes: Sequence[int], seconds: float, reps: int
) -> dict[int, float]:
    """The worker process over its pipe, one batch in flight, frames built as the supervisor builds them."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "gatewayd.worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert proc.stdin is not None and proc.stdout is not None
    src, dst = proc.stdout, proc.stdin

    def request(obj: Any) -> dict[str, Any]:
        dst.write(encode_frame(obj))
        dst.flush()
        (n,) = HEADER.unpack(src.read(HEADER.size))
        reply: dict[str, Any] = cbor2.loads(src.read(n))
        return reply

    try:
        reply = request({"op": "load", "target": TARGET, "options": {}, "threads": 1})
        while reply.get("state") != "ready":  # "warming" first
            if "error" in reply:
                raise RuntimeError(f"worker failed to load: {reply['error']}")
            (n,) = HEADER.unpack(src.read(HEADER.size))
            reply = cbor2.loads(src.read(n))
        out = {}
        for b in sizes:
            nxt = cycle_batches(readings, b)

            def step(nxt: Callable[[], list[Reading]] = nxt) -> int:
                batch = nxt()
                res = request({"op": "process", "batch": [reading_to_wire(r) for r in batch]})
                return len(res["results"])

            out[b] = timed_rate(step, seconds, reps)
        return out
    finally:
        dst.close()
        proc.wait(10)


# --- report ------------------------------------------------------------------------------------------


@dataclass
class Row:
    what: str
    batch: int
    rate: float
    seconds: float = math.nan
    cpu: dict[str, float] = field(default_factory=dict)
    n: int = 0


def gateway_rows(r: GatewayRun) -> list[Row]:
    """One row per clock stop: results on MQTT (publishing runs) and pending drained."""
    ends = [(f"{r.label}: results on MQTT", r.published_t)] if r.publish else []
    ends.append((f"{r.label}: pending drained" if r.publish else r.label, r.drained_t))
    rows = []
    for what, end in ends:
        secs = end - r.ready_t
        cpu = r.cpu_between(r.ready_t, end) if r.samples and not math.isnan(secs) else {}
        rows.append(Row(what, r.max_batch, r.n / secs if secs > 0 else math.nan, secs, cpu, r.n))
    return rows


def fmt_cpu(cpu: dict[str, float], key: str) -> str:
    return f"{cpu[key]:.2f}" if key in cpu else "-"


#: CPU columns: (header, key in Row.cpu).
CPU_COLUMNS = [
    ("gw", "gateway"),
    ("worker", "worker"),
    ("broker", "broker"),
    ("sub", "subscriber"),
    ("bench", "bench"),
    ("others", "others"),
]


def print_table(rows: list[Row]) -> None:
    cpu_head = "".join(f"{h:>8}" for h, _ in CPU_COLUMNS)
    head = f"{'setting':<52}{'N':>7}{'wall s':>8}{'readings/s':>12}{'µs/rdg':>9}{cpu_head}{'gw µs/rdg':>10}"
    print(f"{'':<88}{'CPU seconds over the window':^48}")
    print(head)
    print("-" * len(head))
    for r in rows:
        n = str(r.n) if r.n else "-"
        wall = f"{r.seconds:.2f}" if not math.isnan(r.seconds) else "-"
        gw_per = f"{1e6 * r.cpu['gateway'] / r.n:.0f}" if r.n and "gateway" in r.cpu else "-"
        cpus = "".join(f"{fmt_cpu(r.cpu, k):>8}" for _, k in CPU_COLUMNS)
        print(f"{r.what:<52}{n:>7}{wall:>8}{r.rate:>12,.0f}{1e6 / r.rate:>9.2f}{cpus}{gw_per:>10}")


def source_state() -> str:
    """The commit, and whether gatewayd/ or plugins/ differ from it: the code under test."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "gatewayd", "plugins"],
            capture_output=True,
            text=True,
        )
    except OSError:
        return "an unknown revision (no git)"
    changed = len(dirty.stdout.splitlines())
    return f"commit {head.stdout.strip()}" + (
        f" with {changed} uncommitted file(s) changed" if changed else ""
    )


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b and not (math.isnan(a) or math.isnan(b)) else "n/a"


def bench(args: argparse.Namespace) -> int:
    sizes = sorted({1, *args.batches})
    rows: list[Row] = []
    notes: list[str] = []

    # How busy the machine is with none of this benchmark running: other tenants' share.
    m0 = machine_jiffies()
    time.sleep(1.0)
    m1 = machine_jiffies()
    idle_busy = 100 * (m1[0] - m0[0]) / max(1, m1[1] - m0[1])
    notes.append(
        f"before the runs, with nothing of this benchmark running, the machine was {idle_busy:.0f}% busy"
    )

    # Direct runs first, on a quiet machine: they are the ceiling the gateway is compared with.
    readings = as_readings(max(sizes) * 32)
    print("direct runs...", file=sys.stderr, flush=True)
    d_ort = direct_ort(readings, sizes, args.direct_seconds, args.reps)
    d_plugin = direct_plugin(readings, sizes, args.direct_seconds, args.reps)
    d_worker = direct_worker(readings, sizes, args.direct_seconds, args.reps)

    runs: list[GatewayRun] = []
    broker = Mosquitto()
    # Mosquitto drops QoS 1 messages beyond 1000 queued per subscriber by default: the subscriber
    # must see every result, so no cap (it only changes what the broker holds for the subscriber).
    broker.conf.write_text(broker.conf.read_text() + "max_queued_messages 0\n")
    with workdir() as wd, broker:
        assert broker.proc is not None
        for i, b in enumerate([*sorted(args.batches, reverse=True), 1]):
            n = args.readings_b1 if b == 1 else args.readings
            template = make_template(wd, n)
            for publish in (True, False):
                run = GatewayRun(b, args.max_wait_ms, publish, n, synchronous=args.synchronous)
                print(f"gateway {run.label}, N={n}...", file=sys.stderr, flush=True)
                runs.append(run_gateway(wd, template, run, broker, broker.proc.pid, 2 * i + publish))
                for row in gateway_rows(run):
                    print(f"  {row.what}: {row.rate:,.0f} readings/s", file=sys.stderr, flush=True)
        for run in runs:
            if run.publish and run.results_seen < run.n:
                notes.append(f"{run.label}: the subscriber saw {run.results_seen} of {run.n} results")

    for run in runs:
        rows += gateway_rows(run)
    for b in sizes:
        rows.append(Row(f"direct: worker over its pipe, b={b}", b, d_worker[b]))
        rows.append(Row(f"direct: plugin.process() in-process, b={b}", b, d_plugin[b]))
        rows.append(Row(f"direct: bare ort.run, b={b}", b, d_ort[b]))

    print()
    print(
        f"anomaly plugin ({TARGET}), onnxruntime {ort.__version__}, Python {sys.version.split()[0]},"
        f" {os.cpu_count()} CPUs shared by gatewayd, its worker, Mosquitto, the subscriber and this script."
    )
    print(f"gatewayd at {source_state()}.")
    print(
        f"Gateway: store pre-filled with N pump readings pending for the plugin; SQLite WAL synchronous"
        f" {args.synchronous}; clock from plugin ready to done. Direct: median of {args.reps} windows of"
        f" {args.direct_seconds:g} s, before any gateway runs."
    )
    print()
    print_table(rows)
    print(
        "wall s: plugin ready → last new result id seen on MQTT, or → pending table seen empty (polled every"
        f" {POLL_S * 1000:.0f} ms). µs/rdg: 1e6 / readings/s. CPU: user+sys in that window of the gateway"
        " process (all threads), its worker process, Mosquitto, the MQTT subscriber child, this script"
        " (the poller), and others = the machine's busy time outside these processes (kernel threads"
        " such as the fsync/journal work, softirq, and other tenants)."
        " gw µs/rdg: gateway CPU per reading."
    )
    print()

    def g(b: int, publish: bool, which: int) -> float:
        """A gateway rate: which=0 the first clock stop (MQTT if published), -1 pending drained."""
        run = next((x for x in runs if x.max_batch == b and x.publish == publish), None)
        return gateway_rows(run)[which].rate if run else math.nan

    for b in args.batches:
        print(
            f"batching / batch 1 (target ≥ 2x), b={b}: results on MQTT {ratio(g(b, True, 0), g(1, True, 0))};"
            f" pending drained, +MQTT {ratio(g(b, True, -1), g(1, True, -1))};"
            f" no publisher {ratio(g(b, False, -1), g(1, False, -1))}"
        )
    for b in sizes:
        print(
            f"gateway / direct (target ≥ 0.8x), b={b}: results on MQTT / plugin.process"
            f" {ratio(g(b, True, 0), d_plugin[b])}; no publisher / plugin.process"
            f" {ratio(g(b, False, -1), d_plugin[b])}; no publisher / worker pipe"
            f" {ratio(g(b, False, -1), d_worker[b])}; plugin.process / ort.run {ratio(d_plugin[b], d_ort[b])}"
        )
    for run in runs:
        pending_left, outbox_left = run.left_after_stop
        line = (
            f"{run.label}: start → ready {run.ready_t - run.start_t:.1f} s (includes loading the backlog),"
            f" gateway peak RSS {run.peak_rss_mb:.0f} MB;"
            f" after SIGTERM the store held {pending_left} pending, {outbox_left} outbox entries"
        )
        if run.publish:
            line += (
                f"; ready on MQTT {1000 * (run.ready_t - run.ready_log_t):+.0f} ms after its log line;"
                f" {run.result_msgs} result messages for {run.results_seen} ids ({run.result_errors} errors)"
            )
        notes.append(line)
        if run.problems:
            notes.append(f"{run.label}: PROBLEM: {'; '.join(run.problems)}")
    print()
    for n in notes:
        print(f"note: {n}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--readings", type=int, default=80_000, help="N for the batched gateway runs")
    ap.add_argument("--readings-b1", type=int, default=6_000, help="N for the batch-1 gateway runs")
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 256], help="max_batch values (besides 1)")
    ap.add_argument("--max-wait-ms", type=float, default=20.0)
    ap.add_argument("--synchronous", choices=["FULL", "NORMAL"], default="FULL", help="the store's mode")
    ap.add_argument("--direct-seconds", type=float, default=0.4, help="seconds per direct measurement window")
    ap.add_argument("--reps", type=int, default=5, help="direct measurement windows (the median is shown)")
    args = ap.parse_args()
    if args.readings < 1000 or args.readings_b1 < 100 or any(not 2 <= b <= 4096 for b in args.batches):
        ap.error("--readings ≥ 1000, --readings-b1 ≥ 100, --batches in 2..4096")
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())
