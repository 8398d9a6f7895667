#!/usr/bin/env python3
"""Overload benchmark: an offered load of 5x the measured capacity for a bounded time.

    .venv/bin/python tests/benchmarks/bench_overload.py [--factor 5] [--seconds 20] [--rss-bound-mb 300]
        [--p99-bound-s 2] [--max-inflight N] [--nodes 2000] [--sockets 256]

One run against one ``gatewayd run`` subprocess: durable store (SQLite WAL, synchronous FULL), MQTT
QoS 1 to a private Mosquitto, the reference ``anomaly`` plugin (one worker) so every reading also
costs an inference, a results commit and a second publish. Per-node rate limit and metrics off.

1. Capacity, closed loop: C nodes (bench_ingest's LoadGen, one CON in flight each) for a warm-up
   and a measured window: capacity = 2.04 answers per second.
2. Overload, open loop: ``factor`` x capacity CON POSTs per second on a fixed schedule for
   ``seconds``, from a pool of sockets, every message id and token new, spread over many node ids
   (so neither duplicate detection nor a per-node bucket is involved), never waiting for an
   answer and never retransmitting. Answers are tallied by code; a 5.03 by its Max-Age and its
   diagnostic. RSS (gatewayd + its plugin worker) is sampled every second, with the server
   socket's kernel receive queue.
3. Recovery: the load stops; time until a fresh POST gets 2.04; every 2.04-answered reading must
   reach MQTT, with its anomaly result; then fresh POSTs must be answered 2.04 quickly.

Each criterion is printed PASS/FAIL with its bound; the exit status is 1 if any failed.
A silently dropped datagram (no answer) is told apart from a server that answers slowly by the
kernel's counters: the server socket's ``drops`` (/proc/net/udp6) and Udp6RcvbufErrors.

Not a pytest test: no ``test_`` names. The MQTT subscriber child is bench_ingest's ``MqttTally``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import importlib.metadata
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

# The script's own directory is on sys.path: reuse the ingest benchmark's raw CoAP and launchers.
from bench_ingest import (
    ACK,
    CODE_CHANGED,
    CON,
    HOST,
    PAYLOAD,
    RST,
    LoadGen,
    MqttTally,
    Probe,
    Server,
    children,
    code_str,
    con_post,
    empty_ack,
    free_udp6_port,
    gatewayd_exe,
    machine_jiffies,
    post_tail,
    proc_cpu_s,
    proc_status_kb,
    workdir,
)

from gatewayd.config import CoapConfig
from gatewayd.testing import Mosquitto

CODE_UNAVAILABLE = 0xA3  # 5.03
OPT_MAX_AGE = 14
PLUGIN = "anomaly"

# --- CoAP replies ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    mtype: int
    code: int
    mid: int
    token: bytes
    max_age: int | None
    payload: bytes


def parse_reply(data: bytes) -> Reply | None:
    """Header, token, Max-Age and payload of a CoAP message (RFC 7252 §3); None if malformed."""
    if len(data) < 4 or data[0] >> 6 != 1 or data[0] & 15 > 8:
        return None
    tkl = data[0] & 15
    pos, number, max_age = 4 + tkl, 0, None
    payload = b""
    while pos < len(data):
        b = data[pos]
        pos += 1
        if b == 0xFF:
            payload = data[pos:]
            break
        nibbles = []
        for nib in (b >> 4, b & 15):
            if nib == 13:
                nibbles.append(data[pos] + 13)
                pos += 1
            elif nib == 14:
                nibbles.append(int.from_bytes(data[pos : pos + 2], "big") + 269)
                pos += 2
            elif nib == 15:
                return None
            else:
                nibbles.append(nib)
        number += nibbles[0]
        if number == OPT_MAX_AGE:
            max_age = int.from_bytes(data[pos : pos + nibbles[1]], "big")
        pos += nibbles[1]
    return Reply((data[0] >> 4) & 3, data[1], data[2] << 8 | data[3], data[4 : 4 + tkl], max_age, payload)


def reason(payload: bytes) -> str:
    """A 5.03's diagnostic without its variable detail ("store full: 1000 readings" -> "store full")."""
    return payload.decode("utf-8", "replace").split(":", 1)[0][:40]


# --- the open-loop generator ----------------------------------------------------------------------------


@dataclass
class Tally:
    """Answers seen by an open-loop generator (in one window)."""

    sent: int = 0
    codes: collections.Counter[int] = field(default_factory=collections.Counter)
    #: 5.03 answers by (Max-Age, None when absent; diagnostic).
    unavailable: collections.Counter[tuple[int | None, str]] = field(default_factory=collections.Counter)
    lat_ok: list[float] = field(default_factory=list)
    #: 2.04s that came as separate responses (CON after an empty ACK), not piggybacked on the ACK.
    ok_separate: int = 0
    lat_ok_separate: list[float] = field(default_factory=list)
    lat_unavailable: list[float] = field(default_factory=list)
    #: Empty ACKs: the server took over 0.1 s and answers separately (as a CON we acknowledge).
    separate: int = 0
    #: Requests given up: no answer within the generator's answer timeout, or at the end.
    unanswered: int = 0
    #: Answers to requests already answered or given up (a separate response sent again, or late).
    late: int = 0
    rst: int = 0
    malformed: int = 0
    #: ICMP errors reported on a socket (e.g. port unreachable: the server is gone).
    socket_errors: int = 0

    @property
    def answered(self) -> int:
        return sum(self.codes.values())

    def add(self, other: Tally) -> None:
        """Add ``other``'s counts (not its latencies) to this one."""
        self.sent += other.sent
        self.codes.update(other.codes)
        self.unavailable.update(other.unavailable)
        for name in ("ok_separate", "separate", "unanswered", "late", "rst", "malformed", "socket_errors"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


class _Sock(asyncio.DatagramProtocol):
    def __init__(self, gen: OpenLoop) -> None:
        self.gen = gen
        self.mid = random.randrange(0x10000)
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The selector loop's UDP transport does not subclass DatagramTransport in 3.11.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.gen.on_reply(self, data)

    def error_received(self, exc: Exception) -> None:
        self.gen.tally.socket_errors += 1


class OpenLoop:
    """CON POSTs on a fixed schedule from a pool of sockets; answers matched by token, never awaited.

    Socket ``seq % sockets`` sends request ``seq`` with the body ``tail_for(seq)`` (options + payload),
    the next message id of that socket and the token ``seq``: (source port, message id) stays unique
    as long as no socket sends more than 65,536 requests within the server's dedup lifetime.
    """

    def __init__(self, port: int, sockets: int, tail_for: Callable[[int], bytes]) -> None:
        self.port = port
        self.n_sockets = sockets
        self.tail_for = tail_for
        self.socks: list[_Sock] = []
        self.seq = 0
        #: token -> send time, in send order (so the oldest are first when giving up).
        self.pending: dict[bytes, float] = {}
        self.tally = Tally()
        #: Final answers over the generator's life (all tallies).
        self.answered = 0
        self.last_reply = time.perf_counter()
        #: Seconds the sender was behind its schedule at worst (a starved generator).
        self.max_lag_s = 0.0
        self.send_seconds = 0.0

    async def open(self) -> OpenLoop:
        loop = asyncio.get_running_loop()
        for _ in range(self.n_sockets):
            _, sock = await loop.create_datagram_endpoint(
                lambda: _Sock(self), local_addr=(HOST, 0), remote_addr=(HOST, self.port)
            )
            self.socks.append(sock)
        return self

    def local_ports(self) -> set[int]:
        return {int(s.transport.get_extra_info("sockname")[1]) for s in self.socks if s.transport}

    def close(self) -> None:
        for s in self.socks:
            if s.transport is not None:
                s.transport.close()

    def take_tally(self) -> Tally:
        t, self.tally = self.tally, Tally()
        return t

    def send_one(self) -> None:
        seq = self.seq
        self.seq += 1
        s = self.socks[seq % len(self.socks)]
        assert s.transport is not None
        s.mid = (s.mid + 1) & 0xFFFF
        token = (seq & 0xFFFFFFFF).to_bytes(4, "big")
        self.pending[token] = time.perf_counter()
        s.transport.sendto(con_post(s.mid, token, self.tail_for(seq)))
        self.tally.sent += 1

    async def run(self, rate: float, seconds: float, tick_s: float = 0.002) -> None:
        """Send ``rate * seconds`` requests on schedule; a late tick sends what is due at once."""
        total = int(rate * seconds)
        t0 = time.perf_counter()
        issued = 0
        while issued < total:  # bounded: every pass sends what the clock says is due
            await asyncio.sleep(tick_s)
            elapsed = time.perf_counter() - t0
            due = min(total, int(rate * elapsed)) - issued
            self.max_lag_s = max(self.max_lag_s, due / rate - tick_s)
            for _ in range(due):
                self.send_one()
            issued += due
        self.send_seconds = time.perf_counter() - t0

    def on_reply(self, sock: _Sock, data: bytes) -> None:
        now = time.perf_counter()
        self.last_reply = now
        r = parse_reply(data)
        t = self.tally
        if r is None:
            t.malformed += 1
            return
        if r.mtype == CON and sock.transport is not None:
            sock.transport.sendto(empty_ack(r.mid))  # else the server sends its separate response again
        if r.mtype == RST:
            t.rst += 1
            return
        if r.mtype == ACK and r.code == 0:
            t.separate += 1
            return
        t0 = self.pending.pop(r.token, None)
        if t0 is None:
            t.late += 1
            return
        t.codes[r.code] += 1
        self.answered += 1
        if r.code == CODE_CHANGED:
            t.lat_ok.append(now - t0)
            if r.mtype != ACK:
                t.ok_separate += 1
                t.lat_ok_separate.append(now - t0)
        elif r.code == CODE_UNAVAILABLE:
            t.lat_unavailable.append(now - t0)
            t.unavailable[(r.max_age, reason(r.payload))] += 1

    def expire(self, older_than_s: float) -> int:
        """Give up requests sent more than ``older_than_s`` ago; returns how many."""
        cutoff = time.perf_counter() - older_than_s
        # One pass in send order; next(iter()) after each deletion would rescan the deleted slots.
        old = []
        for token, t0 in self.pending.items():
            if t0 > cutoff:
                break
            old.append(token)
        for token in old:
            del self.pending[token]
        self.tally.unanswered += len(old)
        return len(old)

    async def drain(self, quiet_s: float, timeout_s: float) -> float:
        """Wait until every request is answered, or none was for ``quiet_s``, or ``timeout_s``; give up
        the rest. Returns the seconds waited."""
        t0 = time.perf_counter()
        while self.pending:
            now = time.perf_counter()
            if now - t0 > timeout_s or now - self.last_reply > quiet_s:
                break
            await asyncio.sleep(0.05)
        self.expire(0.0)
        return time.perf_counter() - t0


# --- gatewayd, its processes and the kernel's counters -------------------------------------------------


def plugin_gateway(
    wd: Path, gw: str, broker_port: int, *, coap: dict[str, float] | None = None, plugin: str = ""
) -> Server:
    """gatewayd with the durable store (FULL) in ``wd``, MQTT to the broker and the anomaly plugin
    (``plugin``: extra TOML lines for its table), log level warning."""
    port = free_udp6_port()
    extra = "".join(f"{k} = {v}\n" for k, v in (coap or {}).items())
    cfg = wd / f"{gw}.toml"
    cfg.write_text(
        f'[gateway]\nid = "{gw}"\n\n'
        f'[coap]\nbind = "{HOST}"\nport = {port}\n{extra}\n'
        f'[store]\npath = "{wd / gw}.db"\nsynchronous = "FULL"\n\n'
        f'[mqtt]\nhost = "127.0.0.1"\nport = {broker_port}\nclient_id = "{gw}"\n\n'
        # The token bucket and the metrics endpoint are not what these benchmarks measure.
        "[limits]\nrate_per_s = 0\n\n[metrics]\nenabled = false\n\n"
        '[security]\nunauthenticated = "allow"\n\n'  # plain CoAP: no OSCORE here
        '[log]\nlevel = "warning"\nformat = "json"\n\n'
        f'[[plugins]]\nname = "{PLUGIN}"\nplugin = "{PLUGIN}"\nthreads = 1\n{plugin}'
    )
    return Server(f"gatewayd {gw}", [*gatewayd_exe(), "run", "--config", str(cfg)], port, wd / f"{gw}.log")


def broker_unbounded_queue(broker: Mosquitto) -> Mosquitto:
    """Lift Mosquitto's per-client queue (1000 QoS 1 messages by default): a burst beyond it would be
    dropped by the broker for a slow subscriber and look like a reading gatewayd lost."""
    broker.conf.write_text(broker.conf.read_text() + "max_queued_messages 0\n")
    return broker


def rss_kb(pid: int) -> int:
    """VmRSS, or 0 for a process that just exited (a worker being replaced)."""
    try:
        return proc_status_kb(pid)
    except (OSError, KeyError):
        return 0


def tree_cpu_s(pids: list[int]) -> float:
    total = 0.0
    for p in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += proc_cpu_s(p)
    return total


def udp6_sockets(ports: set[int]) -> tuple[int, int]:
    """(bytes queued to receive, datagrams dropped) summed over the IPv6 UDP sockets bound to ``ports``."""
    queued = drops = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/udp6").read_text().splitlines()[1:]:
            f = line.split()
            if int(f[1].rsplit(":", 1)[1], 16) in ports:
                queued += int(f[4].split(":")[1], 16)
                drops += int(f[-1])
    return queued, drops


def udp6_rcvbuf_errors() -> int:
    """Datagrams the kernel dropped for a full receive buffer, whole network namespace."""
    for line in Path("/proc/net/snmp6").read_text().splitlines():
        if line.startswith("Udp6RcvbufErrors"):
            return int(line.split()[1])
    return 0


def log_lines(server: Server) -> list[str]:
    """gatewayd logs at warning and above only: every line is worth showing."""
    return [line[:300] for line in server.log_tail(1 << 20).splitlines() if line.strip()]


# --- a fresh POST -------------------------------------------------------------------------------------------


async def fresh_post(port: int, node: str, timeout_s: float) -> tuple[int | None, float]:
    """One CON POST from a new socket: (final code or None if none within ``timeout_s``, seconds)."""
    loop = asyncio.get_running_loop()
    transport, probe = await loop.create_datagram_endpoint(
        Probe, local_addr=(HOST, 0), remote_addr=(HOST, port)
    )
    t0 = time.perf_counter()
    try:
        token = random.randbytes(4)
        transport.sendto(con_post(random.randrange(0x10000), token, post_tail(node, PAYLOAD)))
        while True:  # bounded by the deadline
            left = timeout_s - (time.perf_counter() - t0)
            r = parse_reply(await asyncio.wait_for(probe.replies.get(), max(0.0, left)))
            if r is not None and r.code != 0 and r.token == token:
                return r.code, time.perf_counter() - t0
    except TimeoutError:
        return None, time.perf_counter() - t0
    finally:
        transport.close()


async def time_to_recover(port: int, fresh_bound_s: float, limit_s: float) -> tuple[float | None, list[str]]:
    """Seconds from now until a fresh POST gets 2.04 within ``fresh_bound_s``; the attempts' outcomes."""
    t0 = time.perf_counter()
    seen: list[str] = []
    for i in range(int(limit_s / 0.2) + 1):  # bounded in count and by limit_s
        if time.perf_counter() - t0 > limit_s:
            break
        code, lat = await fresh_post(port, f"fresh-{i}", max(2.0, fresh_bound_s))
        seen.append(f"{code_str(code) if code is not None else 'none'}/{lat * 1000:.0f}ms")
        if code == CODE_CHANGED and lat <= fresh_bound_s:
            return time.perf_counter() - t0, seen
        await asyncio.sleep(0.2)
    return None, seen


# --- the run ---------------------------------------------------------------------------------------


@dataclass
class Sample:
    t: float
    rss_kb: int
    workers_kb: int
    rx_queue: int
    answered: int
    pending: int


@dataclass
class Result:
    capacity: float = 0.0
    cap_codes: dict[str, int] = field(default_factory=dict)
    cap_p99_ms: float = 0.0
    catchup_s: float = 0.0
    rate: float = 0.0
    tally: Tally = field(default_factory=Tally)
    drain_s: float = 0.0
    send_seconds: float = 0.0
    max_lag_s: float = 0.0
    samples: list[Sample] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)
    window_s: float = 0.0
    machine_busy_pct: float = 0.0
    server_drops: int = 0
    client_drops: int = 0
    rcvbuf_errors: int = 0
    recover_s: float | None = None
    recover_attempts: list[str] = field(default_factory=list)
    mqtt: dict[str, Any] = field(default_factory=dict)
    expected_readings: int = 0
    mqtt_wait_s: float = 0.0
    fresh: list[tuple[int | None, float]] = field(default_factory=list)
    alive_after: bool = False
    exit_code: int | None = None
    problems: list[str] = field(default_factory=list)


async def sampler(server_pid: int, port: int, gen: OpenLoop, out: list[Sample], stop: asyncio.Event) -> None:
    """RSS of gatewayd and its workers and the server's kernel queue, once a second until ``stop``."""
    t0 = time.perf_counter()
    for i in range(100_000):  # bounded; ``stop`` ends it
        kids = children(server_pid)
        rxq, _ = udp6_sockets({port})
        answered = gen.answered
        out.append(
            Sample(time.perf_counter() - t0, rss_kb(server_pid), sum(map(rss_kb, kids)), rxq, answered,
                   len(gen.pending))
        )  # fmt: skip
        delay = t0 + (i + 1) - time.perf_counter()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(0.0, delay))
        if stop.is_set():
            return


#: The [coap] settings this benchmark can change, by command-line option (0: the default).
COAP_OPTIONS = {
    "max_inflight": "max_inflight_requests",
    "empty_ack_delay": "empty_ack_delay_s",
    "shed_after_ms": "shed_after_ms",
    "receive_buffer": "receive_buffer_bytes",
}


def coap_overrides(args: argparse.Namespace) -> dict[str, float]:
    return {key: getattr(args, opt) for opt, key in COAP_OPTIONS.items() if getattr(args, opt)}


async def run(args: argparse.Namespace) -> Result:
    res = Result()
    gw = "overload"
    coap = coap_overrides(args)
    with workdir() as wd, broker_unbounded_queue(Mosquitto()) as broker:
        assert broker.proc is not None
        mq = MqttTally(broker.port, gw)
        server = plugin_gateway(wd, gw, broker.port, coap=coap)
        try:
            with server:
                if not await mq.wait_ready(PLUGIN, 120):
                    raise RuntimeError(f"plugin not ready in 120 s: {server.log_tail(1000)}")
                await phases(server, broker.proc.pid, mq, args, res)
                res.alive_after = server.proc is not None and server.proc.poll() is None
        finally:
            res.exit_code = server.returncode
            res.problems = log_lines(server)
            mq.close()
    return res


async def phases(
    server: Server, broker_pid: int, mq: MqttTally, args: argparse.Namespace, res: Result
) -> None:
    # 1. Capacity, closed loop.
    print(f"capacity: C={args.concurrency}, {args.cap_seconds:g} s ...", file=sys.stderr, flush=True)
    cap = await LoadGen(server.port, args.concurrency, prefix="cap").open()
    try:
        cap.start()
        await asyncio.sleep(2.0)
        cap.take_stats()
        t0 = time.perf_counter()
        await asyncio.sleep(args.cap_seconds)
        st = cap.take_stats()
        res.capacity = st.ok / (time.perf_counter() - t0)
        res.cap_codes = {code_str(c): n for c, n in st.codes.items()}
        res.cap_p99_ms = st.pct_ms(0.99)
        await cap.stop()
    finally:
        cap.close()
    done_ok = cap.total_ok
    # Start the overload from an empty backlog, so it measures the overload and not leftovers.
    counts, res.catchup_s = await mq.wait_for(done_ok, done_ok, 120)
    if counts["readings"] < done_ok or counts["results"] < done_ok:
        raise RuntimeError(f"capacity phase not drained in 120 s: {counts} of {done_ok}")

    # 2. Overload, open loop.
    res.rate = args.factor * res.capacity
    print(f"overload: {res.rate:.0f} req/s for {args.seconds:g} s ...", file=sys.stderr, flush=True)
    tails = [post_tail(f"ov-{i}", PAYLOAD) for i in range(args.nodes)]
    gen = await OpenLoop(server.port, args.sockets, lambda seq: tails[seq % len(tails)]).open()
    stop = asyncio.Event()
    sampling = asyncio.create_task(sampler(server.pid, server.port, gen, res.samples, stop))
    try:
        worker_pids = children(server.pid)
        _, srv_drops0 = udp6_sockets({server.port})
        _, cli_drops0 = udp6_sockets(gen.local_ports())
        rcvbuf0 = udp6_rcvbuf_errors()
        pids = {
            "gatewayd": [server.pid],
            "worker": worker_pids,
            "broker": [broker_pid],
            "mqtt sub": [mq.proc.pid],
        }
        cpu0 = {k: tree_cpu_s(v) for k, v in pids.items()}
        g0, m0, t0 = time.process_time(), machine_jiffies(), time.perf_counter()
        await gen.run(res.rate, args.seconds)
        res.send_seconds, res.max_lag_s = gen.send_seconds, gen.max_lag_s
        # 3. Recovery: probe at once, while the answers to the last requests still come in.
        probe = asyncio.create_task(time_to_recover(server.port, args.fresh_bound_s, 60.0))
        res.drain_s = await gen.drain(quiet_s=5.0, timeout_s=60.0)
        res.window_s = time.perf_counter() - t0
        res.cpu = {k: tree_cpu_s(v) - cpu0[k] for k, v in pids.items()}
        res.cpu["this script"] = time.process_time() - g0
        m1 = machine_jiffies()
        res.machine_busy_pct = 100 * (m1[0] - m0[0]) / max(1, m1[1] - m0[1])
        res.server_drops = udp6_sockets({server.port})[1] - srv_drops0
        res.client_drops = udp6_sockets(gen.local_ports())[1] - cli_drops0
        res.rcvbuf_errors = udp6_rcvbuf_errors() - rcvbuf0
        res.tally = gen.take_tally()
        res.recover_s, res.recover_attempts = await probe
        # Every reading answered 2.04 so far, the probes' included, must reach MQTT with a result.
        res.expected_readings = (
            done_ok + res.tally.codes[CODE_CHANGED] + sum(a.startswith("2.04") for a in res.recover_attempts)
        )
        res.mqtt, res.mqtt_wait_s = await mq.wait_for(
            res.expected_readings, res.expected_readings, args.recovery_timeout_s
        )
        for i in range(5):
            res.fresh.append(await fresh_post(server.port, f"after-{i}", 5.0))
    finally:
        stop.set()
        await sampling
        gen.close()


# --- report ----------------------------------------------------------------------------------------


def coap_settings(args: argparse.Namespace) -> str:
    given = coap_overrides(args)
    defaults = CoapConfig()
    return ", ".join(
        f"{key} = {given[key]}" if key in given else f"{key} = {getattr(defaults, key)} (default)"
        for key in COAP_OPTIONS.values()
    )


def report(res: Result, args: argparse.Namespace) -> bool:
    t = res.tally
    ok = t.codes[CODE_CHANGED]
    print(
        f"gatewayd {importlib.metadata.version('gatewayd')} (durable store FULL, MQTT QoS 1 to a local"
        f" Mosquitto, plugin {PLUGIN} x1, rate limit off, [coap] {coap_settings(args)}),"
        f" Python {sys.version.split()[0]},"
        f" aiocoap {importlib.metadata.version('aiocoap')}, {os.cpu_count()} CPUs shared by everything,"
        f" net.core.rmem_max = {Path('/proc/sys/net/core/rmem_max').read_text().strip()}."
    )
    print(
        f"capacity (closed loop, C={args.concurrency}, {args.cap_seconds:g} s): {res.capacity:.0f} req/s,"
        f" p99 {res.cap_p99_ms:.0f} ms, answers {res.cap_codes}; MQTT readings + results caught up"
        f" {res.catchup_s:.1f} s after it"
    )
    print(
        f"offered: {args.factor:g} x {res.capacity:.0f} = {res.rate:.0f} CON/s open loop"
        f" for {args.seconds:g} s"
        f" ({t.sent} sent in {res.send_seconds:.1f} s, sender at most {1000 * res.max_lag_s:.0f} ms behind"
        f" schedule) from {args.sockets} sockets over {args.nodes} node ids; no retransmissions"
    )
    print()
    print(f"{'t s':>5}{'RSS MB':>8}{'worker MB':>10}{'rx queue KB':>12}{'answered/s':>11}{'awaiting':>11}")
    prev = 0
    for s in res.samples:
        print(
            f"{s.t:>5.0f}{s.rss_kb / 1024:>8.1f}{s.workers_kb / 1024:>10.1f}{s.rx_queue / 1024:>12.0f}"
            f"{s.answered - prev:>11}{s.pending:>11}"
        )
        prev = s.answered
    print()
    rows = [("sent", t.sent, "")]
    for code, n in sorted(t.codes.items()):
        rows.append((f"answered {code_str(code)}", n, f"{100 * n / max(1, t.sent):.1f}%"))
    for (age, why), n in sorted(t.unavailable.items(), key=lambda kv: -kv[1]):
        rows.append((f"  5.03 Max-Age {age} '{why}'", n, ""))
    rows += [
        ("no answer", t.unanswered, f"{100 * t.unanswered / max(1, t.sent):.1f}%"),
        ("separate responses (empty ACK first)", t.separate, ""),
        ("late / repeated answers", t.late, ""),
        ("RST, malformed, ICMP errors", t.rst + t.malformed + t.socket_errors, ""),
        ("server socket drops (/proc/net/udp6)", res.server_drops, ""),
        ("generator sockets' drops", res.client_drops, ""),
        ("Udp6RcvbufErrors (whole host)", res.rcvbuf_errors, ""),
    ]
    for name, n, note in rows:
        print(f"{name:<44}{n:>9} {note}")
    print(
        f"2.04 latency: p50 {1000 * pct(t.lat_ok, 0.5):.0f} ms, p99 {1000 * pct(t.lat_ok, 0.99):.0f} ms,"
        f" max {1000 * max(t.lat_ok, default=float('nan')):.0f} ms; {t.ok_separate} of them separate"
        f" (p50 {1000 * pct(t.lat_ok_separate, 0.5):.0f} ms); 5.03 latency p50"
        f" {1000 * pct(t.lat_unavailable, 0.5):.0f} ms, p99 {1000 * pct(t.lat_unavailable, 0.99):.0f} ms"
    )
    print(f"2.04 throughput under overload: {ok / max(1e-9, res.send_seconds):.0f} req/s")
    cpu = ", ".join(f"{k} {v:.1f} s ({100 * v / res.window_s:.0f}%)" for k, v in res.cpu.items())
    print(
        f"CPU over the {res.window_s:.1f} s of load + {res.drain_s:.1f} s answer drain: {cpu};"
        f" machine {res.machine_busy_pct:.0f}% busy (all cores)"
    )
    fresh = ", ".join(f"{code_str(c) if c is not None else 'none'} {1000 * s:.0f} ms" for c, s in res.fresh)
    rec = "never" if res.recover_s is None else f"{res.recover_s:.2f} s"
    print(
        f"after the load: first fresh 2.04 within {args.fresh_bound_s:g} s came after {rec}"
        f" (attempts: {' '.join(res.recover_attempts[:8])}{' ...' if len(res.recover_attempts) > 8 else ''})"
    )
    print(
        f"MQTT: {res.mqtt.get('readings')} distinct readings and {res.mqtt.get('results')} distinct results"
        f" of {res.expected_readings} answered 2.04 (after {res.mqtt_wait_s:.1f} s); plugin state"
        f" {res.mqtt.get('plugins', {}).get(PLUGIN)}; fresh POSTs after that: {fresh}"
    )
    print(f"gatewayd exit code on SIGTERM: {res.exit_code}; log lines at warning+: {len(res.problems)}")
    for p in res.problems[:5]:
        print(f"  {p}")
    print()

    max_rss = max((s.rss_kb + s.workers_kb for s in res.samples), default=0) / 1024
    max_srv = max((s.rss_kb for s in res.samples), default=0) / 1024
    p99 = pct(t.lat_ok, 0.99)
    others = t.answered - ok - t.codes[CODE_UNAVAILABLE]
    no_age = sum(n for (age, _), n in t.unavailable.items() if age is None)
    restarts = (res.mqtt.get("plugins", {}).get(PLUGIN) or {}).get("restarts")
    fresh_max = max((s for _, s in res.fresh), default=float("inf"))
    fresh_ok = len(res.fresh) == 5 and all(c == CODE_CHANGED for c, _ in res.fresh)
    seen_r, seen_p, want = res.mqtt.get("readings", 0), res.mqtt.get("results", 0), res.expected_readings
    lost_pct = 100 * t.unanswered / max(1, t.sent)
    checks = [
        (
            "no crash",
            res.alive_after and res.exit_code == 0 and not restarts,
            f"gatewayd alive after the load, exit 0 on SIGTERM (got {res.exit_code}), plugin restarts 0"
            f" (got {restarts})",
        ),
        (
            "excess refused with 5.03 + Max-Age",
            t.codes[CODE_UNAVAILABLE] > 0 and no_age == 0 and others == 0,
            f"5.03 count > 0 (got {t.codes[CODE_UNAVAILABLE]}), all with Max-Age (without: {no_age}),"
            f" no other codes (got {others})",
        ),
        (
            "excess answered, not dropped",
            t.unanswered <= args.max_unanswered_pct / 100 * t.sent,
            f"no answer <= {args.max_unanswered_pct:g}% of sent (got {lost_pct:.2f}%)",
        ),
        (
            "RSS bounded",
            max_rss <= args.rss_bound_mb,
            f"max RSS gatewayd + worker <= {args.rss_bound_mb:g} MB"
            f" (got {max_rss:.1f}; gatewayd alone {max_srv:.1f})",
        ),
        (
            "admitted latency bounded",
            ok > 0 and p99 <= args.p99_bound_s,
            f"p99 of 2.04 <= {args.p99_bound_s:g} s (got {p99:.3f} s over {ok} answers)",
        ),
        (
            "recovery: nothing lost",
            seen_r >= want and seen_p >= want,
            f"every 2.04 reading on MQTT with its {PLUGIN} result within {args.recovery_timeout_s:g} s"
            f" (readings {seen_r}, results {seen_p} of {want})",
        ),
        (
            "recovery: fresh POSTs quick",
            fresh_ok and fresh_max <= args.fresh_bound_s,
            f"5 fresh POSTs 2.04 within {args.fresh_bound_s:g} s each (max {1000 * fresh_max:.0f} ms)",
        ),
    ]
    for name, passed, bound in checks:
        print(f"{'PASS' if passed else 'FAIL'}  {name}: {bound}")
    return all(p for _, p, _ in checks)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--factor", type=float, default=5.0, help="offered load / measured capacity")
    ap.add_argument("--seconds", type=float, default=20.0, help="duration of the overload")
    ap.add_argument("--cap-seconds", type=float, default=8.0, help="measured seconds of the capacity run")
    ap.add_argument(
        "--concurrency", type=int, default=0, help="requests in flight for the capacity run; 0: 64 or less"
    )
    ap.add_argument("--max-inflight", type=int, default=0, help="[coap] max_inflight_requests; 0: default")
    ap.add_argument("--empty-ack-delay", type=float, default=0.0, help="[coap] empty_ack_delay_s; 0: default")
    ap.add_argument("--shed-after-ms", type=float, default=0.0, help="[coap] shed_after_ms; 0: default")
    ap.add_argument("--receive-buffer", type=int, default=0, help="[coap] receive_buffer_bytes; 0: default")
    ap.add_argument("--nodes", type=int, default=2000, help="distinct node ids of the overload")
    ap.add_argument("--sockets", type=int, default=256, help="UDP sockets the overload is sent from")
    ap.add_argument("--rss-bound-mb", type=float, default=300.0, help="bound on gatewayd + worker RSS")
    ap.add_argument("--p99-bound-s", type=float, default=2.0, help="bound on the 2.04s' p99 latency")
    ap.add_argument("--max-unanswered-pct", type=float, default=1.0, help="requests allowed no answer")
    ap.add_argument("--fresh-bound-s", type=float, default=0.5, help="a fresh POST's latency after the load")
    ap.add_argument("--recovery-timeout-s", type=float, default=120.0, help="wait for MQTT to catch up")
    args = ap.parse_args()
    if not (1 <= args.factor <= 50 and 1 <= args.seconds <= 300 and 1 <= args.cap_seconds <= 120):
        ap.error("--factor 1..50, --seconds 1..300, --cap-seconds 1..120")
    if not (0 <= args.concurrency <= 1024 and 1 <= args.sockets <= 1024 and 1 <= args.nodes <= 100_000):
        ap.error("--concurrency 0..1024, --sockets 1..1024, --nodes 1..100000")
    # More in flight than max_inflight_requests would measure how fast 5.03s come, not capacity.
    args.concurrency = args.concurrency or min(64, args.max_inflight or 512)
    res = asyncio.run(run(args))
    if res.tally.sent / args.sockets > 60_000:
        print("WARNING: a socket wrapped its message ids: use more --sockets", file=sys.stderr)
    return 0 if report(res, args) else 1


if __name__ == "__main__":
    sys.exit(main())
