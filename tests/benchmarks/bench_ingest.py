#!/usr/bin/env python3
"""Ingest benchmark: throughput and latency of ``POST /s/{node}`` on gatewayd and on a bare aiocoap server.

    .venv/bin/python tests/benchmarks/bench_ingest.py [--seconds N] [--concurrency C ...]

Each server runs in its own process, so the load generator's CPU is separate:
  gatewayd-FULL    ``gatewayd run`` with the durable store (SQLite WAL, synchronous FULL, group
                   commit), MQTT to a private Mosquitto (the outbox publisher runs), no plugins.
  gatewayd-NORMAL  the same with synchronous NORMAL.
  bare-aiocoap     one aiocoap resource at ``s/{node}`` that decodes the CBOR and answers 2.04 (the
                   ceiling: what aiocoap costs with nothing stored or published).

The load generator speaks raw CoAP over UDP: an aiocoap client context keeps only one CON in
flight per server (NSTART=1), so it cannot load a server. It opens C sockets, each a simulated
node with one CON in flight (as a real node with NSTART=1), which keeps C requests in flight.
One socket per node also keeps (source port, message id) unique for the 247 s a server remembers
it, and gives each separate (CON) response its own remote, which aiocoap would otherwise queue.

Not a pytest test: no ``test_`` names. ``--bare-server PORT`` and ``--mqtt-tally PORT GW`` are
the entry points of the child processes this script starts.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import importlib.metadata
import json
import logging
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import aiocoap
import cbor2
from aiocoap import resource

from gatewayd.testing import Mosquitto

HOST = "::1"
PAYLOAD = cbor2.dumps({"temperature": 21.5, "humidity": 40.1, "vibration": 2.0})
CF_CBOR = 60

# --- raw CoAP (RFC 7252 §3) ---------------------------------------------------------------------

CON, NON, ACK, RST = 0, 1, 2, 3
CODE_POST = 0x02
CODE_CHANGED = 0x44  # 2.04
OPT_URI_PATH = 11
OPT_CONTENT_FORMAT = 12
#: RFC 7252 §4.8 defaults; the random factor is left out so retransmits are reproducible.
ACK_TIMEOUT_S = 2.0
MAX_RETRANSMIT = 4
#: How long to wait for a separate response after an empty ACK before giving up.
SEPARATE_TIMEOUT_S = 30.0


def _option(delta: int, value: bytes) -> bytes:
    """One option with RFC 7252 §3.1 delta/length nibbles (extended forms up to 268)."""

    def nibble(n: int) -> tuple[int, bytes]:
        if n < 13:
            return n, b""
        if n < 269:
            return 13, bytes([n - 13])
        return 14, struct.pack("!H", n - 269)

    d, d_ext = nibble(delta)
    n, n_ext = nibble(len(value))
    return bytes([d << 4 | n]) + d_ext + n_ext + value


def post_tail(node: str, payload: bytes, content_format: int = CF_CBOR) -> bytes:
    """Everything after the token of ``POST /s/{node}``: options, payload marker, payload."""
    cf = content_format.to_bytes(max(1, (content_format.bit_length() + 7) // 8), "big")
    return (
        _option(OPT_URI_PATH, b"s")
        + _option(0, node.encode())
        + _option(OPT_CONTENT_FORMAT - OPT_URI_PATH, cf)
        + b"\xff"
        + payload
    )


def con_post(mid: int, token: bytes, tail: bytes) -> bytes:
    return struct.pack("!BBH", 0x40 | CON << 4 | len(token), CODE_POST, mid) + token + tail


def empty_ack(mid: int) -> bytes:
    return struct.pack("!BBH", 0x40 | ACK << 4, 0, mid)


def code_str(code: int) -> str:
    return "RST" if code < 0 else f"{code >> 5}.{code & 31:02d}"


# --- the load generator ---------------------------------------------------------------------------


@dataclass
class Stats:
    """What the generator saw during one window (warm-up, measurement or drain)."""

    latencies: list[float] = field(default_factory=list)
    codes: collections.Counter[int] = field(default_factory=collections.Counter)
    retransmits: int = 0
    #: Requests given up after MAX_RETRANSMIT, or with no separate response in time.
    timeouts: int = 0
    #: Datagrams that matched no request in flight (late duplicates of answered ones).
    strays: int = 0
    #: Paced mode: requests due while every node still waited for its answer.
    skipped: int = 0
    #: Empty ACKs: the server took over EMPTY_ACK_DELAY (0.1 s) and answered separately.
    separate: int = 0

    @property
    def ok(self) -> int:
        return self.codes[CODE_CHANGED]

    @property
    def errors(self) -> int:
        return sum(self.codes.values()) - self.ok

    def pct_ms(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        s = sorted(self.latencies)
        return 1000 * s[min(len(s) - 1, int(q * len(s)))]


class _Node(asyncio.DatagramProtocol):
    """One simulated node: a connected UDP socket with at most one CON in flight."""

    def __init__(self, gen: LoadGen, name: str) -> None:
        self.gen = gen
        self.tail = post_tail(name, gen.payload)
        self.transport: asyncio.DatagramTransport | None = None
        self.mid = random.randrange(0x10000)
        self.token_no = random.randrange(1 << 32)
        self.busy = False
        self.acked = False  # empty ACK seen: the response comes separately (as a CON)
        self.datagram = b""
        self.cur_mid = -1
        self.cur_token = b""
        self.t0 = 0.0
        self.deadline = 0.0
        self.timeout = ACK_TIMEOUT_S
        self.tries = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The selector loop's UDP transport does not subclass DatagramTransport in 3.11.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def send(self) -> None:
        assert self.transport is not None and not self.busy
        self.mid = (self.mid + 1) & 0xFFFF
        self.token_no = (self.token_no + 1) & 0xFFFFFFFF
        self.cur_mid, self.cur_token = self.mid, self.token_no.to_bytes(4, "big")
        self.datagram = con_post(self.cur_mid, self.cur_token, self.tail)
        self.busy, self.acked, self.tries, self.timeout = True, False, 0, ACK_TIMEOUT_S
        self.gen.in_flight += 1
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + self.timeout
        self.transport.sendto(self.datagram)

    def check_timeout(self, now: float) -> None:
        """Called by the generator's sweeper: retransmit (§4.2) or give up."""
        if not self.busy or now < self.deadline:
            return
        if self.acked or self.tries >= MAX_RETRANSMIT:
            self.gen.stats.timeouts += 1
            self._finish()
            return
        assert self.transport is not None
        self.tries += 1
        self.timeout *= 2
        self.deadline = now + self.timeout
        self.gen.stats.retransmits += 1
        self.transport.sendto(self.datagram)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if len(data) < 4 or data[0] >> 6 != 1:
            self.gen.stats.strays += 1
            return
        mtype, tkl, code = (data[0] >> 4) & 3, data[0] & 15, data[1]
        mid = data[2] << 8 | data[3]
        token = data[4 : 4 + tkl]
        if mtype == CON:
            # A separate response: acknowledge it even if already handled, or the server resends.
            assert self.transport is not None
            self.transport.sendto(empty_ack(mid))
        matched = self.busy and (
            (mtype == ACK and mid == self.cur_mid) or (mtype in (CON, NON) and token == self.cur_token)
        )
        if mtype == RST and self.busy and mid == self.cur_mid:
            self._done(-1)
        elif not matched:
            self.gen.stats.strays += 1
        elif code == 0:  # empty ACK: stop retransmitting, wait for the separate response
            self.acked = True
            self.gen.stats.separate += 1
            self.deadline = self.t0 + SEPARATE_TIMEOUT_S
        elif token != self.cur_token:
            self.gen.stats.strays += 1
        else:
            self._done(code)

    def _done(self, code: int) -> None:
        st = self.gen.stats
        st.latencies.append(time.perf_counter() - self.t0)
        st.codes[code] += 1
        self._finish()

    def _finish(self) -> None:
        self.busy = False
        self.gen.in_flight -= 1
        self.gen.on_idle(self)


class LoadGen:
    """C nodes posting to one server: closed loop (each node posts again at once) or paced."""

    def __init__(self, port: int, nodes: int, *, payload: bytes = PAYLOAD, prefix: str = "bench") -> None:
        self.port = port
        self.payload = payload
        self.names = [f"{prefix}-{i}" for i in range(nodes)]
        self.nodes: list[_Node] = []
        self.stats = Stats()
        #: 2.04 answers over the generator's whole life (all windows).
        self.total_ok = 0
        self.running = False
        self.in_flight = 0
        self._drained = asyncio.Event()
        self.rate: float | None = None
        self._idle: collections.deque[_Node] = collections.deque()
        self._tasks: list[asyncio.Task[None]] = []

    async def open(self) -> LoadGen:
        loop = asyncio.get_running_loop()
        for name in self.names:
            node = _Node(self, name)
            await loop.create_datagram_endpoint(
                lambda node=node: node,  # type: ignore[misc]
                local_addr=(HOST, 0),
                remote_addr=(HOST, self.port),
            )
            self.nodes.append(node)
        self._tasks.append(asyncio.create_task(self._sweep()))
        return self

    def take_stats(self) -> Stats:
        """Return the current window's stats and start a new window."""
        st, self.stats = self.stats, Stats()
        self.total_ok += st.ok
        return st

    def start(self, rate: float | None = None) -> None:
        """Closed loop when ``rate`` is None, else ``rate`` requests/s spread over idle nodes."""
        self.running, self.rate = True, rate
        if rate is None:
            for n in self.nodes:
                n.send()
        else:
            self._idle.extend(self.nodes)
            self._tasks.append(asyncio.create_task(self._pace(rate)))

    def on_idle(self, node: _Node) -> None:
        if not self.running:
            if not self.in_flight:
                self._drained.set()
            return
        if self.rate is None:
            node.send()
        else:
            self._idle.append(node)

    async def stop(self, timeout_s: float = 10.0) -> Stats:
        """Send nothing new; wait (bounded) for the requests in flight; return their stats.

        Requests still unanswered after ``timeout_s`` count as timeouts.
        """
        self.running = False
        if self.in_flight:
            self._drained.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), timeout_s)
        st = self.take_stats()
        st.timeouts += self.in_flight
        return st

    def close(self) -> None:
        self.running = False
        for t in self._tasks:
            t.cancel()
        for n in self.nodes:
            if n.transport is not None:
                n.transport.close()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(0.05)
            now = time.perf_counter()
            for n in self.nodes:
                n.check_timeout(now)

    async def _pace(self, rate: float) -> None:
        t0 = time.perf_counter()
        issued = 0
        while self.running:
            await asyncio.sleep(0.005)
            due = int(rate * (time.perf_counter() - t0)) - issued
            for i in range(due):
                if not self._idle:
                    # Every node waits for an answer: the server is behind. Count, do not queue up.
                    self.stats.skipped += due - i
                    break
                self._idle.popleft().send()
            issued += due


# --- processes ------------------------------------------------------------------------------------

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads included (/proc/<pid>/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may contain spaces
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def proc_status_kb(pid: int, key: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def machine_jiffies() -> tuple[int, int]:
    """(busy, total) CPU jiffies of the whole machine (/proc/stat), to tell whether it is saturated."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def free_udp6_port() -> int:
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def coap_ping(port: int, timeout_s: float) -> bool:
    """True once a CoAP ping (empty CON) is answered, as any CoAP server must (RST)."""
    deadline = time.monotonic() + timeout_s
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
        s.settimeout(0.2)
        s.connect((HOST, port))
        mid = 0
        while time.monotonic() < deadline:
            mid += 1
            with contextlib.suppress(OSError):  # ECONNREFUSED until the server binds
                s.send(struct.pack("!BBH", 0x40 | CON << 4, 0, mid))
                if s.recv(64):
                    return True
            time.sleep(0.05)
    return False


class Server:
    """A server child process: started, pinged until it answers, stopped with SIGTERM."""

    def __init__(self, name: str, argv: list[str], port: int, log_path: Path) -> None:
        self.name, self.argv, self.port, self.log_path = name, argv, port, log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout_s: float = 60.0) -> Server:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT)
        if not coap_ping(self.port, timeout_s) or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError(f"{self.name} did not answer: {self.log_tail()}")
        return self

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.returncode = self.proc.returncode
        self.proc = None

    def log_tail(self, n: int = 2000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path.exists() else ""

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()


def children(pid: int) -> list[int]:
    """Child pids of ``pid`` (any of its threads may have forked: the plugin workers), from /proc."""
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                out += [int(c) for c in (task / "children").read_text().split()]
    return out


def gatewayd_exe() -> list[str]:
    exe = Path(sys.executable).with_name("gatewayd")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "gatewayd.cli"]


def gatewayd_server(
    workdir: Path, name: str, gateway_id: str, broker_port: int, *, synchronous: str = "FULL", **coap: int
) -> Server:
    """gatewayd with a durable store in ``workdir``, MQTT to the broker, no plugins, log level warning."""
    port = free_udp6_port()
    extra = "".join(f"{k} = {v}\n" for k, v in coap.items())
    cfg = workdir / f"{gateway_id}.toml"
    cfg.write_text(
        f'[gateway]\nid = "{gateway_id}"\n\n'
        f'[coap]\nbind = "{HOST}"\nport = {port}\n{extra}\n'
        f'[store]\npath = "{workdir / gateway_id}.db"\nsynchronous = "{synchronous}"\n\n'
        f'[mqtt]\nhost = "127.0.0.1"\nport = {broker_port}\nclient_id = "{gateway_id}"\n\n'
        "[limits]\nrate_per_s = 0\n\n[metrics]\nenabled = false\n\n"
        '[security]\nunauthenticated = "allow"\n\n'  # plain CoAP: no OSCORE here
        '[log]\nlevel = "warning"\nformat = "json"\n'
    )
    return Server(name, [*gatewayd_exe(), "run", "--config", str(cfg)], port, workdir / f"{gateway_id}.log")


def bare_server(workdir: Path) -> Server:
    port = free_udp6_port()
    argv = [sys.executable, str(Path(__file__).resolve()), "--bare-server", str(port)]
    return Server("bare-aiocoap", argv, port, workdir / "bare.log")


def log_problems(server: Server) -> list[str]:
    """gatewayd logs JSON lines at warning and above only: each one is worth reporting."""
    return [line for line in server.log_tail(1 << 20).splitlines() if line.strip()]


class Probe(asyncio.DatagramProtocol):
    """A node's socket that hands every datagram to a queue, and acknowledges separate (CON) responses."""

    def __init__(self) -> None:
        self.replies: asyncio.Queue[bytes] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: object) -> None:
        if len(data) >= 4 and (data[0] >> 4) & 3 == CON and self.transport is not None:
            self.transport.sendto(empty_ack(data[2] << 8 | data[3]))
        self.replies.put_nowait(data)


class MqttTally:
    """A subscriber child for gateway ``gw``: distinct readings and results, anomalies, result errors,
    each plugin's state; started before gatewayd so nothing it publishes is missed.

    A child, so that decoding and acknowledging thousands of messages a second does not take the
    load generator's CPU. Every benchmark uses this one.
    """

    def __init__(self, broker_port: int, gw: str) -> None:
        argv = [sys.executable, str(Path(__file__).resolve()), "--mqtt-tally", str(broker_port), gw]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # "ready" once the broker acknowledged the subscriptions
        if line.strip() != "ready":
            self.close()
            raise RuntimeError(f"MQTT subscriber did not start: {line!r}")

    def poll(self) -> dict[str, Any]:
        """The tally now: see ``_mqtt_tally_main`` for the keys."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("poll\n")
        self.proc.stdin.flush()
        doc: dict[str, Any] = json.loads(self.proc.stdout.readline())
        return doc

    def plugin_state(self, plugin: str) -> str | None:
        state: str | None = self.poll()["plugins"].get(plugin, {}).get("state")
        return state

    async def wait_ready(self, plugin: str, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if await asyncio.to_thread(self.plugin_state, plugin) == "ready":
                return True
            await asyncio.sleep(0.2)
        return False

    async def wait_for(self, readings: int, results: int, timeout_s: float) -> tuple[dict[str, Any], float]:
        """Poll until that many distinct readings and results were seen (bounded); the tally and the wait."""
        t0 = time.monotonic()
        while True:
            c = await asyncio.to_thread(self.poll)
            if (c["readings"] >= readings and c["results"] >= results) or time.monotonic() - t0 > timeout_s:
                return c, time.monotonic() - t0
            await asyncio.sleep(0.1)

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --- child process entry points ---------------------------------------------------------------------


class _BareReadings(resource.Resource, resource.PathCapable):  # type: ignore[misc]
    """``POST /s/{node}``: decode the CBOR like gatewayd does, store nothing, answer 2.04."""

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        cbor2.loads(request.payload)
        return aiocoap.Message(code=aiocoap.CHANGED)


async def _bare_server_main(port: int) -> None:
    site = resource.Site()
    site.add_resource(("s",), _BareReadings())
    ctx = await aiocoap.Context.create_server_context(site, bind=(HOST, port), transports=["udp6"])
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await ctx.shutdown()


def _mqtt_tally_main(port: int, gw: str) -> None:
    """Tally ``gw``'s readings, results and plugin states; answer each line on stdin with a JSON line.

    Keys: readings / results (distinct ids), readings_msgs / results_msgs (messages, duplicates
    included), anomalies, result_errors, last_result_t (monotonic time of the last new result id),
    plugins: {name: {state, restarts, ready_t}} (ready_t: when it was first seen ready). paho in its
    own thread, no event loop, so this child costs little CPU. Reading ids are
    ``{store prefix}-{sequence}``; one store means one prefix, so the sequence alone is kept.
    """
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    base = f"gatewayd/{gw}"
    readings: set[int] = set()
    results: set[int] = set()
    st: dict[str, Any] = {
        "readings_msgs": 0, "results_msgs": 0, "anomalies": 0, "result_errors": 0, "last_result_t": None,
    }  # fmt: skip
    plugins: dict[str, dict[str, Any]] = {}
    lock = threading.Lock()
    subscribed = threading.Event()

    def on_connect(c: mqtt.Client, _u: Any, _f: Any, _rc: Any, _p: Any) -> None:
        c.subscribe([(f"{base}/readings/#", 1), (f"{base}/results/#", 1), (f"{base}/status/plugins/+", 1)])

    def on_subscribe(_c: mqtt.Client, _u: Any, _m: Any, _rc: Any, _p: Any) -> None:
        subscribed.set()

    def on_message(_c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        now = time.monotonic()  # system-wide clock: comparable with the parent's
        doc = json.loads(msg.payload)
        with lock:
            if msg.topic.startswith(f"{base}/status/plugins/"):
                p = plugins.setdefault(msg.topic.rsplit("/", 1)[1], {"ready_t": None})
                p.update(state=doc.get("state"), restarts=doc.get("restarts"))
                if p["state"] == "ready" and p["ready_t"] is None:
                    p["ready_t"] = now
            elif msg.topic.startswith(f"{base}/readings/"):
                st["readings_msgs"] += 1
                readings.add(int(doc["id"].rsplit("-", 1)[1]))
            else:
                st["results_msgs"] += 1
                seq = int(doc["reading_id"].rsplit("-", 1)[1])
                if seq not in results:
                    results.add(seq)
                    st["last_result_t"] = now
                st["anomalies"] += doc.get("anomaly") is True
                st["result_errors"] += "error" in doc

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-tally-{os.getpid()}")
    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
    client.max_inflight_messages_set(1000)
    client.connect("127.0.0.1", port)
    client.loop_start()
    if not subscribed.wait(10):
        print("no subscription", flush=True)
        return
    print("ready", flush=True)
    while sys.stdin.readline():  # one JSON line per line read; EOF ends the child
        with lock:
            doc = {**st, "readings": len(readings), "results": len(results),
                   "plugins": {k: dict(v) for k, v in plugins.items()}}  # fmt: skip
        print(json.dumps(doc), flush=True)
    client.loop_stop()
    client.disconnect()


# --- the benchmark -----------------------------------------------------------------------------------


@dataclass
class Row:
    server: str
    concurrency: int
    seconds: float
    stats: Stats
    server_cpu_s: float
    broker_cpu_s: float | None
    server_rss_kb: int
    gen_cpu_pct: float
    machine_busy_pct: float
    mqtt_lag_s: float | None = None

    @property
    def rps(self) -> float:
        return self.stats.ok / self.seconds


async def measure(
    server: Server,
    concurrency: int,
    warmup_s: float,
    seconds: float,
    broker_pid: int | None,
) -> tuple[Row, int]:
    """Warm up, then measure ``seconds`` of closed-loop load; returns the row and all 2.04s seen."""
    gen = await LoadGen(server.port, concurrency, prefix=f"c{concurrency}").open()
    try:
        gen.start()
        await asyncio.sleep(warmup_s)
        gen.take_stats()
        cpu0, bcpu0 = proc_cpu_s(server.pid), proc_cpu_s(broker_pid) if broker_pid else 0.0
        g0, t0, m0 = time.process_time(), time.perf_counter(), machine_jiffies()
        await asyncio.sleep(seconds)
        st = gen.take_stats()
        wall = time.perf_counter() - t0
        gen_cpu = time.process_time() - g0
        m1 = machine_jiffies()
        busy = 100 * (m1[0] - m0[0]) / max(1, m1[1] - m0[1])
        cpu = proc_cpu_s(server.pid) - cpu0
        bcpu = proc_cpu_s(broker_pid) - bcpu0 if broker_pid else None
        rss = proc_status_kb(server.pid)
        tail = await gen.stop()
        st.timeouts += tail.timeouts  # a request given up during the drain still counts against the run
        row = Row(server.name, concurrency, wall, st, cpu, bcpu, rss, 100 * gen_cpu / wall, busy)
        return row, gen.total_ok
    finally:
        gen.close()


def print_table(rows: list[Row]) -> None:
    head = (
        f"{'server':<16}{'C':>4}{'req/s':>8}{'p50 ms':>8}{'p99 ms':>8}{'2.04':>7}{'err':>4}{'retx':>5}"
        f"{'tmo':>4}{'sep':>5}{'srv CPU s':>10}{'µs/req':>7}{'broker s':>9}{'RSS MB':>7}{'gen CPU':>8}"
        f"{'all CPU':>8}{'mqtt lag':>9}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        st = r.stats
        broker = "-" if r.broker_cpu_s is None else f"{r.broker_cpu_s:.1f}"
        lag = "-" if r.mqtt_lag_s is None else f"{r.mqtt_lag_s:.1f}s"
        print(
            f"{r.server:<16}{r.concurrency:>4}{r.rps:>8.0f}{st.pct_ms(0.5):>8.2f}{st.pct_ms(0.99):>8.2f}"
            f"{st.ok:>7}{st.errors:>4}{st.retransmits:>5}{st.timeouts:>4}{st.separate:>5}"
            f"{r.server_cpu_s:>10.1f}{1e6 * r.server_cpu_s / max(1, st.ok):>7.0f}{broker:>9}"
            f"{r.server_rss_kb / 1024:>7.1f}{r.gen_cpu_pct:>7.0f}%{r.machine_busy_pct:>7.0f}%{lag:>9}"
        )


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="gatewayd-bench-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


async def bench(args: argparse.Namespace) -> int:
    rows: list[Row] = []
    notes: list[str] = []
    with workdir() as wd, Mosquitto() as broker:
        assert broker.proc is not None
        for name in args.servers:
            counter: MqttTally | None = None
            if name == "bare-aiocoap":
                server = bare_server(wd)
            else:
                sync = name.removeprefix("gatewayd-")
                gw = f"bench-{sync.lower()}"
                server = gatewayd_server(wd, name, gw, broker.port, synchronous=sync)
                # Subscribed before gatewayd starts, so every reading it publishes is counted.
                counter = MqttTally(broker.port, gw)
            total_ok = 0
            try:
                with server:
                    # A server that burns CPU with no load pays for it under load too: show it.
                    cpu0 = proc_cpu_s(server.pid)
                    await asyncio.sleep(IDLE_S)
                    idle_pct = 100 * (proc_cpu_s(server.pid) - cpu0) / IDLE_S
                    notes.append(f"{server.name}: {idle_pct:.0f}% of a core busy while idle ({IDLE_S:g} s)")
                    for c in args.concurrency:
                        row, ok = await measure(
                            server, c, args.warmup, args.seconds, broker.proc.pid if counter else None
                        )
                        total_ok += ok
                        if counter is not None:
                            # Let the outbox drain before the next run, and see that nothing was dropped.
                            counts, row.mqtt_lag_s = await counter.wait_for(total_ok, 0, 60.0)
                            if counts["readings"] < total_ok:
                                notes.append(
                                    f"{server.name} C={c}: only {counts['readings']} of {total_ok}"
                                    " acknowledged readings reached MQTT within 60 s"
                                )
                        rows.append(row)
                        print_progress(row)
            finally:
                if counter is not None:
                    counts = counter.poll()
                    counter.close()
                    notes.append(
                        f"{server.name}: {total_ok} POSTs answered 2.04 in all (warm-up included); the MQTT"
                        f" subscriber saw {counts['readings_msgs']} readings messages,"
                        f" {counts['readings']} distinct reading ids"
                    )
            if server.returncode not in (0, None):
                notes.append(f"{server.name} exited with {server.returncode}: {server.log_tail(500)}")
            if counter is not None:
                problems = log_problems(server)
                if problems:
                    notes.append(f"{server.name} logged {len(problems)} warning+ lines, e.g. {problems[:3]}")

    print()
    print(
        f"POST /s/{{node}} CBOR map of {len(PAYLOAD)} bytes (CF 60), closed loop over C nodes (one CON in"
        f" flight each), {args.warmup:g} s warm-up + {args.seconds:g} s measured per row."
    )
    print(
        "gatewayd: durable store (SQLite WAL, default group commit), MQTT QoS 1 to a local Mosquitto,"
        " NO plugins, log level warning."
    )
    print(
        f"Python {sys.version.split()[0]}, aiocoap {importlib.metadata.version('aiocoap')},"
        f" {os.cpu_count()} CPUs shared by server, broker, MQTT subscriber and load generator."
    )
    print()
    print_table(rows)
    print(
        "req/s, p50/p99: 2.04 answers in the measured window and their latency from first send; err: other"
        " codes; retx: retransmits; tmo: requests given up; sep: empty ACKs (answer took >0.1 s, sent"
        " separately); srv CPU s: server process user+sys in the window (all threads), µs/req = that / 2.04s;"
        " broker s: Mosquitto's CPU; RSS: server VmRSS at the end; gen CPU: this load generator, % of one"
        " core; all CPU: the whole machine, % of all cores; mqtt lag: wait after the load stopped until"
        " every acknowledged reading (warm-up included) was seen on MQTT."
    )
    print()
    bare = {r.concurrency: r.rps for r in rows if r.server == "bare-aiocoap"}
    for r in rows:
        if r.server != "bare-aiocoap" and bare.get(r.concurrency):
            print(f"{r.server} / bare-aiocoap at C={r.concurrency}: {r.rps / bare[r.concurrency]:.2f}")
    for n in notes:
        print(f"note: {n}")
    busy = [r for r in rows if r.gen_cpu_pct > 80]
    if busy:
        print("WARNING: the load generator used >80% of a core in some rows: it may be the bottleneck.")
    return 0


def print_progress(row: Row) -> None:
    print(
        f"  {row.server} C={row.concurrency}: {row.rps:.0f} req/s, p99 {row.stats.pct_ms(0.99):.1f} ms",
        file=sys.stderr,
        flush=True,
    )


SERVERS = ["gatewayd-FULL", "gatewayd-NORMAL", "bare-aiocoap"]
#: Seconds each server is watched with no load, after it answers a ping and before the first row.
IDLE_S = 3.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0, help="measured seconds per row")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds of load before each measurement")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[16, 64], help="requests in flight")
    ap.add_argument("--servers", nargs="+", choices=SERVERS, default=SERVERS)
    ap.add_argument("--bare-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    ap.add_argument("--mqtt-tally", nargs=2, metavar=("PORT", "GW"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.bare_server is not None:
        logging.basicConfig(level=logging.WARNING)
        asyncio.run(_bare_server_main(args.bare_server))
        return 0
    if args.mqtt_tally is not None:
        _mqtt_tally_main(int(args.mqtt_tally[0]), args.mqtt_tally[1])
        return 0
    if not 1 <= args.seconds <= 600 or not all(1 <= c <= 1024 for c in args.concurrency):
        ap.error("--seconds must be 1..600 and --concurrency 1..1024")
    return asyncio.run(bench(args))


if __name__ == "__main__":
    sys.exit(main())
