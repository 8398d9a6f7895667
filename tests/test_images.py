"""Camera frames: JPEG/PNG bodies, block-wise uploads (RFC 7959) with bounded memory, over real UDP."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiocoap
import cbor2
import pytest
from aiocoap.numbers import codes
from coapfuzz import encode
from conftest import collect, make_config, post, running, send_datagram, udp_port
from PIL import Image
from test_e2e import coap_client_exe

from gatewayd.codec import CF_JPEG, CF_PNG, decode
from gatewayd.errors import BadPayload
from gatewayd.testing import Mosquitto

BLOCK = 1024  # SZX 6


def image(fmt: str, side: int = 160, seed: int = 0) -> bytes:
    """A noisy picture: noise keeps JPEG from compressing it to a few hundred bytes."""
    rng = random.Random(seed)
    img = Image.frombytes("RGB", (side, side), rng.randbytes(side * side * 3))
    out = io.BytesIO()
    img.save(out, format=fmt, quality=90)
    return out.getvalue()


def _block1(num: int, more: bool) -> bytes:
    value = num << 4 | more << 3 | 6
    return value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big")


def block(mid: int, node: str, body: bytes, num: int, size1: int | None = None) -> bytes:
    """Block ``num`` of a POST of ``body`` to /s/{node} as a CON datagram, blocks of 1024 bytes."""
    more = (num + 1) * BLOCK < len(body)
    opts = [(11, b"s"), (11, node.encode()), (12, bytes([CF_JPEG])), (27, _block1(num, more))]
    if size1 is not None:
        opts.append((60, size1.to_bytes(4, "big")))
    return encode(0, 2, mid, b"up", opts, body[num * BLOCK : (num + 1) * BLOCK])


async def exchange(sock: socket.socket, port: int, datagram: bytes) -> aiocoap.Message:
    return aiocoap.Message.decode(await send_datagram(port, datagram, sock))


def udp_socket() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setblocking(False)
    return s


@pytest.mark.parametrize("fmt,cf", [("JPEG", CF_JPEG), ("PNG", CF_PNG)])
def test_image_body_is_one_reading_and_broken_images_are_4_00(fmt: str, cf: int) -> None:
    """A whole JPEG/PNG is a reading {image, format}; a truncated one or another body is 4.00 saying why."""
    data = image(fmt, 32)
    (draft,) = decode(cf, data, now=5.0)
    assert draft.fields == {"image": data, "format": fmt.lower()} and draft.ts == 5.0
    with pytest.raises(BadPayload, match="truncated"):
        decode(cf, data[: len(data) // 2])
    with pytest.raises(BadPayload, match="starts with 7b2278223a"):
        decode(cf, b'{"x": 1}')
    if fmt == "JPEG":  # zeros after the end marker are camera padding, not damage
        assert decode(cf, data + b"\x00" * 7)[0].fields["image"] == data + b"\x00" * 7


def test_image_field_in_a_cbor_map_is_checked_like_a_bare_image() -> None:
    """A CBOR map may carry the frame as ``image`` next to metadata; ``format`` is filled in or checked."""
    png = image("PNG", 24)
    (draft,) = decode(60, cbor2.dumps({"image": png, "battery": 3.1, "t": 1_700_000_000}))
    assert draft.fields == {"image": png, "battery": 3.1, "format": "png"} and draft.ts == 1_700_000_000
    with pytest.raises(BadPayload, match="field 'format' says 'jpeg' but the image is png"):
        decode(60, cbor2.dumps({"image": png, "format": "jpeg"}))
    with pytest.raises(BadPayload, match="field 'image' must be a byte string"):
        decode(60, cbor2.dumps({"image": "not bytes"}))
    with pytest.raises(BadPayload, match="item 1: field 'image' is not a complete JPEG or PNG"):
        decode(60, cbor2.dumps([{"image": png}, {"image": png[:-20]}]))


async def test_frames_arrive_blockwise_from_aiocoap_and_coap_client_and_reach_mqtt(
    tmp_path: Path, broker: Mosquitto, coap_client: aiocoap.Context
) -> None:
    """A 20-60 KB JPEG (aiocoap), a PNG (libcoap's coap-client, -b 1024) and a CBOR map with an image
    are stored and published with the same bytes; no upload stays open afterwards."""
    cfg = make_config(tmp_path, broker.port, coap={"max_body_bytes": 256 * 1024})
    jpeg, png = image("JPEG", 200, 1), image("PNG", 100, 2)
    assert len(jpeg) > 20 * BLOCK and len(png) > 20 * BLOCK
    framed = cbor2.dumps({"image": jpeg, "seq": 7})
    (tmp_path / "frame.png").write_bytes(png)
    async with collect(broker.port, "gatewayd/gw1/readings/#") as got, running(cfg) as app:
        port = cfg.coap.port
        assert (await post(coap_client, port, "cam-1", jpeg, cf=CF_JPEG)).code == codes.CHANGED
        assert (await post(coap_client, port, "cam-3", framed, cf=60)).code == codes.CHANGED
        out = await asyncio.to_thread(
            subprocess.run,
            [coap_client_exe(), "-m", "post", "-b", "1024", "-t", "23", "-f", str(tmp_path / "frame.png"),
             f"coap://127.0.0.1:{port}/s/cam-2"],
            capture_output=True, timeout=30,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        await got.wait(lambda g: len(g.json("readings/")) == 3)
        assert app.uploads is not None and len(app.uploads) == 0
    by_node = {m["node"]: m["fields"] for m in got.json("readings/")}
    assert base64.b64decode(by_node["cam-1"]["image"]) == jpeg and by_node["cam-1"]["format"] == "jpeg"
    assert base64.b64decode(by_node["cam-2"]["image"]) == png and by_node["cam-2"]["format"] == "png"
    assert base64.b64decode(by_node["cam-3"]["image"]) == jpeg and by_node["cam-3"]["seq"] == 7


async def test_oversized_upload_is_refused_at_the_block_that_crosses_the_limit(
    tmp_path: Path, broker: Mosquitto
) -> None:
    """4.13 with Size1 as soon as a block (or the announced Size1) passes max_body_bytes; the partial
    upload is freed at once, and nothing was stored."""
    cfg = make_config(tmp_path, broker.port, coap={"max_body_bytes": 4096})
    body = image("JPEG", 120)
    assert len(body) > 8 * BLOCK
    async with running(cfg) as app:
        port = cfg.coap.port
        assert app.uploads is not None and app.store is not None
        with udp_socket() as s:
            for num in range(4):  # 4 KiB: still within the limit
                assert (await exchange(s, port, block(num + 1, "cam", body, num))).code == codes.CONTINUE
            assert len(app.uploads) == 1 and app.uploads.buffered_bytes() == 4096
            refused = await exchange(s, port, block(5, "cam", body, 4))
            assert refused.code == codes.REQUEST_ENTITY_TOO_LARGE and refused.opt.size1 == 4096
            assert len(app.uploads) == 0
            announced = await exchange(s, port, block(6, "cam", body, 0, size1=len(body)))
            assert announced.code == codes.REQUEST_ENTITY_TOO_LARGE and announced.opt.size1 == 4096
        assert app.store.readings_count == 0


async def test_interrupted_upload_times_out_frees_its_memory_and_the_daemon_goes_on(
    tmp_path: Path, broker: Mosquitto, coap_client: aiocoap.Context
) -> None:
    """A node that stops mid-upload: after upload_timeout_s its blocks are dropped (counted), a late
    block is 4.08, and a new whole upload is stored."""
    cfg = make_config(tmp_path, broker.port, coap={"max_body_bytes": 65536, "upload_timeout_s": 0.4})
    body = image("JPEG", 120, 3)
    async with running(cfg) as app:
        port = cfg.coap.port
        assert app.uploads is not None
        with udp_socket() as s:
            for num in range(3):
                assert (await exchange(s, port, block(num + 1, "cam", body, num))).code == codes.CONTINUE
            assert app.uploads.buffered_bytes() == 3 * BLOCK
            deadline = time.monotonic() + 5
            while len(app.uploads) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert len(app.uploads) == 0 and app.uploads.expired == 1
            late = await exchange(s, port, block(4, "cam", body, 3))
            assert late.code == codes.REQUEST_ENTITY_INCOMPLETE and b"no upload in progress" in late.payload
        assert (await post(coap_client, port, "cam", body, cf=CF_JPEG)).code == codes.CHANGED


async def test_uploads_beyond_max_uploads_get_503_with_max_age(tmp_path: Path, broker: Mosquitto) -> None:
    """With max_uploads open, a new upload is 5.03 + Max-Age; blocks of the open ones still go on."""
    cfg = make_config(tmp_path, broker.port, coap={"max_body_bytes": 65536, "max_uploads": 2})
    body = image("JPEG", 60, 4)
    blocks = -(-len(body) // BLOCK)
    assert blocks >= 3
    async with running(cfg) as app:
        port = cfg.coap.port
        with udp_socket() as s:
            for mid, node in enumerate(("a", "b"), start=1):
                assert (await exchange(s, port, block(mid, node, body, 0))).code == codes.CONTINUE
            busy = await exchange(s, port, block(3, "c", body, 0))
            assert busy.code == codes.SERVICE_UNAVAILABLE
            assert busy.opt.max_age == cfg.coap.overload_retry_after_s
            assert b"2 block-wise uploads already open" in busy.payload
            for num in range(1, blocks):
                answer = await exchange(s, port, block(10 + num, "a", body, num))
            assert answer.code == codes.CHANGED
            assert (await exchange(s, port, block(30, "c", body, 0))).code == codes.CONTINUE  # a slot is free
        assert app.store is not None and app.store.readings_count == 1


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_memory_returns_to_baseline_after_many_large_transfers(tmp_path: Path) -> None:
    """gatewayd (its own process) takes 150 frames of ~100 KB block-wise and 30 abandoned uploads:
    once the uploads time out and the blocks leave the duplicate window, its RSS is within a few MB
    of where it stood after warm-up, far below the 16 MB it was sent."""
    frames = [image("JPEG", 330, seed) for seed in range(3)]
    assert all(90_000 < len(f) < 256 * 1024 for f in frames)
    port = udp_port()
    with Mosquitto() as broker:
        conf = tmp_path / "gw.toml"
        conf.write_text(
            f'[coap]\nbind = "127.0.0.1"\nport = {port}\nmax_body_bytes = 262144\n'
            "upload_timeout_s = 0.5\nmax_uploads = 64\n"
            "dedup_lifetime_s = 1.0\n"  # each block is a CON remembered this long, then freed
            f'[store]\npath = "{tmp_path / "store.db"}"\n[mqtt]\nport = {broker.port}\n'
            '[limits]\nrate_per_s = 0\n[metrics]\nenabled = false\n[log]\nlevel = "warning"\n'
            '[security]\nunauthenticated = "allow"\n'
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "gatewayd.cli", "run", "--config", str(conf)],
            stdout=subprocess.DEVNULL, env=os.environ.copy(),
        )  # fmt: skip
        ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
        try:
            for _ in range(100):  # until it serves
                try:
                    if (await post(ctx, port, "warm", frames[0], cf=CF_JPEG)).code == codes.CHANGED:
                        break
                except (TimeoutError, aiocoap.error.Error, OSError):
                    await asyncio.sleep(0.1)

            async def transfers(n: int, abandoned: int) -> int:
                sent = 0
                for i in range(n):
                    frame = frames[i % len(frames)]
                    assert (await post(ctx, port, f"cam-{i % 5}", frame, cf=CF_JPEG)).code == codes.CHANGED
                    sent += len(frame)
                with udp_socket() as s:
                    for i in range(abandoned):  # half an upload each, then silence
                        for num in range(len(frames[0]) // BLOCK // 2):
                            datagram = block(i * 100 + num, f"gone-{i}", frames[0], num)
                            answer = await exchange(s, port, datagram)
                            assert answer.code == codes.CONTINUE
                        sent += num * BLOCK
                await asyncio.sleep(1.5)  # the abandoned uploads expire; the outbox drains
                # The next message expires the duplicate entries of all those blocks.
                assert (await post(ctx, port, "tick", cbor2.dumps({"x": 1}))).code == codes.CHANGED
                return sent

            await transfers(30, 10)
            baseline = _rss_kb(proc.pid)
            sent = await transfers(150, 30)
            after = _rss_kb(proc.pid)
        finally:
            await ctx.shutdown()
            proc.terminate()
            code = await asyncio.to_thread(proc.wait, 30)
    assert code == 0
    assert sent > 15_000_000
    assert after - baseline < 6 * 1024, f"RSS {baseline} kB after warm-up, {after} kB after {sent} bytes"
