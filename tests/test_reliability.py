"""The delivery guarantee, proven by killing things: SIGKILL at random moments, a full disk."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import aiocoap
import cbor2
import pytest
from aiocoap.numbers import codes
from conftest import collect, logged, make_config, post, running, udp_port

from gatewayd.coapguard import READ_BURST
from gatewayd.testing import Mosquitto

KILLS = 22


def write_config(tmp_path: Path, coap_port: int, mqtt_port: int, store: Path, plugin: bool = True) -> Path:
    conf = tmp_path / "gw.toml"
    text = (
        f'[coap]\nbind = "127.0.0.1"\nport = {coap_port}\n'
        f'[store]\npath = "{store}"\n'
        f"[mqtt]\nport = {mqtt_port}\nbackoff_initial_s = 0.1\nbackoff_max_s = 0.5\n"
        '[limits]\nrate_per_s = 0\n[metrics]\nenabled = false\n[log]\nlevel = "warning"\n'
        '[security]\nunauthenticated = "allow"\n'
    )
    if plugin:
        text += '[[plugins]]\nname = "echo"\nplugin = "fake_plugins:Echo"\nmax_wait_ms = 5\n'
    conf.write_text(text)
    return conf


async def node_loop(name: str, port: int, acked: dict[str, list[int]], stop: asyncio.Event) -> None:
    """Post readings numbered 1, 2, ... one after another; remember which were answered 2.04."""
    ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
    seq = 0
    try:
        while not stop.is_set():
            seq += 1
            msg = aiocoap.Message(
                code=aiocoap.POST,
                uri=f"coap://127.0.0.1:{port}/s/{name}",
                payload=cbor2.dumps({"seq": seq}),
                content_format=60,
            )
            try:
                resp = await asyncio.wait_for(ctx.request(msg).response, 1.5)
            except (TimeoutError, aiocoap.error.Error, OSError):
                await asyncio.sleep(0.05)  # gatewayd is down: a real node would back off too
                continue
            if resp.code == codes.CHANGED:
                acked[name].append(seq)
            await asyncio.sleep(0.005)
    finally:
        await ctx.shutdown()


async def test_sigkill_at_random_moments_loses_no_acknowledged_reading(tmp_path: Path) -> None:
    """gatewayd SIGKILLed 22 times under load and restarted: every reading answered 2.04 reaches the
    broker (a subscriber with a persistent session), in order per node, and gets its plugin result."""
    rng = random.Random(7)
    coap_port = udp_port()
    broker = Mosquitto(persistence=True).start()
    conf = write_config(tmp_path, coap_port, broker.port, tmp_path / "store.db")
    cmd = [sys.executable, "-m", "gatewayd.cli", "run", "--config", str(conf)]
    acked: dict[str, list[int]] = defaultdict(list)
    stop = asyncio.Event()
    try:
        async with collect(broker.port, "gatewayd/gw1/#", clean=False) as got:
            nodes = [asyncio.create_task(node_loop(f"n{k}", coap_port, acked, stop)) for k in range(3)]
            for _ in range(KILLS):
                proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env=os.environ.copy())
                await asyncio.sleep(rng.uniform(0.5, 1.6))  # sometimes before it serves, mostly while busy
                proc.kill()
                await asyncio.to_thread(proc.wait, 10)
            final = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env=os.environ.copy())
            await asyncio.sleep(2.0)
            stop.set()
            await asyncio.gather(*nodes)
            total = sum(len(v) for v in acked.values())

            def acked_ids(g: Any) -> tuple[set[str], set[str]]:
                wanted = {(n, s) for n, seqs in acked.items() for s in seqs}
                ids = {m["id"] for m in g.json("readings/") if (m["node"], m["fields"]["seq"]) in wanted}
                return ids, {m["reading_id"] for m in g.json("results/echo/")}

            def all_there(g: Any) -> bool:
                ids, results = acked_ids(g)
                return len(ids) >= total and ids <= results

            await got.wait(all_there, timeout=60)
            final.terminate()
            assert await asyncio.to_thread(final.wait, 30) == 0
    finally:
        broker.stop()
    assert total > 100, f"only {total} readings acknowledged: the load did not run"
    seen: dict[str, list[int]] = defaultdict(list)
    for m in got.json("readings/"):
        seen[m["node"]].append(m["fields"]["seq"])
    for name, sent in acked.items():
        first_seen = [s for s in dict.fromkeys(seen[name]) if s in set(sent)]
        assert first_seen == sent, f"{name}: order or loss: {first_seen[:20]} vs {sent[:20]}"


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    mount = shutil.which("mount")
    if os.geteuid() != 0 or mount is None:
        return False
    return (
        subprocess.run(
            [mount, "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, timeout=30
        ).returncode
        == 0
    )


async def test_full_disk_answers_503_and_recovers(tmp_path: Path, coap_client: aiocoap.Context) -> None:
    """The store on a full filesystem: POSTs get 5.03 with Max-Age, gatewayd stays up, nothing stored is
    lost, and once space is freed new readings are accepted and everything is published."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "3m"):
        pytest.skip("needs root to mount a small tmpfs for the store")
    broker = Mosquitto()  # down at first, so the outbox is not drained while the disk fills
    try:
        cfg = make_config(tmp_path, broker.port, store={"path": str(disk / "store.db"), "retry_after_s": 9})
        async with running(cfg):
            filler = disk / "filler"
            free = shutil.disk_usage(disk).free
            filler.write_bytes(b"\0" * max(0, free - 256 * 1024))  # leave 256 KiB for the store to grow into
            blob = b"x" * 1000
            answers = []
            for i in range(2000):
                resp = await post(coap_client, cfg.coap.port, "n", cbor2.dumps({"i": i, "pad": blob}))
                answers.append(resp)
                if resp.code != codes.CHANGED:
                    break
            stored = sum(a.code == codes.CHANGED for a in answers)
            full = answers[-1]
            assert full.code == codes.SERVICE_UNAVAILABLE and full.opt.max_age == 9, full
            assert b"full" in full.payload
            again = await post(coap_client, cfg.coap.port, "n", cbor2.dumps({"i": -1}))
            assert again.code == codes.SERVICE_UNAVAILABLE  # still full, still up
            filler.unlink()
            after = await post(coap_client, cfg.coap.port, "n", cbor2.dumps({"i": 10_000}))
            assert after.code == codes.CHANGED
            broker.start()
            async with collect(broker.port, "gatewayd/gw1/readings/#") as got:
                await got.wait(
                    lambda g: len({m["id"] for m in g.json("readings/")}) >= stored + 1, timeout=60
                )
            values = {m["fields"]["i"] for m in got.json("readings/")}
        assert stored > 10 and values == set(range(stored)) | {10_000}
    finally:
        broker.stop()
        with contextlib.suppress(Exception):
            subprocess.run(["umount", "-l", str(disk)], capture_output=True, timeout=30)


async def test_overload_is_answered_503_and_recovers(tmp_path: Path, coap_client: aiocoap.Context) -> None:
    """Far more requests in flight than max_inflight_requests: the excess gets 5.03 + Max-Age at once,
    admitted requests are all stored and published, and the daemon serves normally afterwards."""
    with Mosquitto() as broker:
        cfg = make_config(
            tmp_path, broker.port, coap={"max_inflight_requests": 8, "overload_retry_after_s": 3}
        )
        async with collect(broker.port, "gatewayd/gw1/readings/#") as got, running(cfg) as app:
            ctxs = [await aiocoap.Context.create_client_context(transports=["udp6"]) for _ in range(40)]
            try:
                t0 = time.monotonic()
                answers = await asyncio.gather(
                    *(post(c, cfg.coap.port, f"n{i}", cbor2.dumps({"i": i})) for i, c in enumerate(ctxs))
                )
                elapsed = time.monotonic() - t0
            finally:
                for c in ctxs:
                    await c.shutdown()
            ok = [a for a in answers if a.code == codes.CHANGED]
            busy = [a for a in answers if a.code == codes.SERVICE_UNAVAILABLE]
            assert len(ok) + len(busy) == 40 and busy and all(a.opt.max_age == 3 for a in busy)
            assert b"overloaded" in busy[0].payload
            await got.wait(lambda g: len(g.json("readings/")) == len(ok))
            after = await post(coap_client, cfg.coap.port, "late", cbor2.dumps({"x": 1}))
            assert after.code == codes.CHANGED and app.intake is not None and app.intake.inflight == 0
        assert elapsed < 10


async def test_a_capped_receive_buffer_is_logged_with_the_sysctl(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The kernel caps SO_RCVBUF at net.core.rmem_max without a word; gatewayd says so, and how to lift it."""
    with open("/proc/sys/net/core/rmem_max") as f:  # noqa: ASYNC230 - a procfs read, never blocks
        rmem_max = int(f.read())
    with Mosquitto() as broker:
        cfg = make_config(tmp_path, broker.port, coap={"receive_buffer_bytes": rmem_max + 4096})
        async with running(cfg):
            pass
    (capped,) = logged(caplog, "coap_receive_buffer_capped")
    assert (capped["wanted_bytes"], capped["got_bytes"]) == (rmem_max + 4096, rmem_max)
    assert f"net.core.rmem_max={rmem_max + 4096}" in capped["hint"]


def con(mid: int, i: int) -> bytes:
    """A CON POST of ``{"i": i}`` to /s/n as a node's raw datagram; its token is its message id."""
    head = bytes([0x42, 0x02]) + mid.to_bytes(2, "big") * 2
    path_and_format = bytes([0xB1]) + b"s" + bytes([0x01]) + b"n" + bytes([0x11, 60])
    return head + path_and_format + b"\xff" + cbor2.dumps({"i": i})


async def test_a_pause_of_the_event_loop_is_not_overload(tmp_path: Path) -> None:
    """Requests that waited in the socket through a pause of the event loop (a garbage collection, a
    slow moment) longer than shed_after_ms, but fewer than a burst, are all parsed and stored."""
    with Mosquitto() as broker:
        cfg = make_config(tmp_path, broker.port, coap={"shed_after_ms": 100})
        async with running(cfg) as app:
            assert app.intake is not None
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.settimeout(5)
                for i in range(8):
                    sock.sendto(con(0x0300 + i, i), ("127.0.0.1", cfg.coap.port))
                time.sleep(0.3)  # the event loop stands still
                answers = [await asyncio.to_thread(sock.recv, 2048) for _ in range(8)]
            shed_early = app.intake.shed_early
    assert [a[1] for a in answers] == [0x44] * 8 and shed_early == 0


@pytest.mark.parametrize("cause", ["inflight", "waited"])
async def test_overload_sheds_new_requests_but_answers_retransmissions(tmp_path: Path, cause: str) -> None:
    """At the in-flight limit, or behind a backlog (more than a burst waiting) after waiting in the
    socket longer than shed_after_ms, a new CON is answered 5.03 + Max-Age before aiocoap parses it,
    while a retransmission of a request already taken still gets that request's own 2.04; once caught
    up, 2.04 again."""
    with Mosquitto() as broker:
        cfg = make_config(tmp_path, broker.port, coap={"overload_retry_after_s": 4, "shed_after_ms": 100})
        async with running(cfg) as app:
            assert app.intake is not None
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.settimeout(5)
            other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            gateway = ("127.0.0.1", cfg.coap.port)
            try:
                sock.sendto(con(0x0101, 1), gateway)
                first = await asyncio.to_thread(sock.recv, 2048)
                if cause == "inflight":
                    app.intake.inflight = app.intake.max_inflight  # as if that many were being stored
                else:  # a backlog: a burst's worth of other requests ahead of ours
                    for i in range(READ_BURST):
                        other.sendto(con(0x1000 + i, i), gateway)
                sock.sendto(con(0x0101, 1), gateway)  # the first CON again
                sock.sendto(con(0x0202, 2), gateway)  # a new one
                if cause == "waited":
                    time.sleep(0.3)  # the event loop stands still: all of them wait in the socket
                again = await asyncio.to_thread(sock.recv, 2048)
                shed = aiocoap.Message.decode(await asyncio.to_thread(sock.recv, 2048))
                shed_early = app.intake.shed_early
                app.intake.inflight = 0
                sock.sendto(con(0x0303, 3), gateway)
                fresh = await asyncio.to_thread(sock.recv, 2048)
            finally:
                app.intake.inflight = 0
                sock.close()
                other.close()
    assert first[1] == 0x44 and again == first  # 2.04, answered from the duplicate cache
    assert (shed.mtype, shed.code, shed.mid, shed.token) == (
        aiocoap.ACK,
        codes.SERVICE_UNAVAILABLE,
        0x0202,
        b"\x02\x02",
    )
    assert shed.opt.max_age == 4 and shed.payload == b"overloaded"
    assert shed_early == 1  # answered by the front, not by intake after aiocoap parsed it
    assert fresh[1] == 0x44 and fresh[2:4] == b"\x03\x03"
