"""Bad input: fuzzed CBOR / SenML bodies through the codec, fuzzed CoAP datagrams at a live gatewayd.

The codec tests run well over 100k decode cases in all (each hypothesis example is decoded whole,
cut short and mutated, as CBOR and as SenML-CBOR). The datagram test sends a few thousand cases
(``tests/coapfuzz.py``) at a real gatewayd on loopback UDP; ``tests/benchmarks/fuzz_long.py`` runs
100k+ against a ``gatewayd run`` process. Set GATEWAYD_FUZZ_SEED to replay a datagram run.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import math
import os
import random
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiocoap
import cbor2
import pytest
from aiocoap.numbers import codes
from aiocoap.optiontypes import OpaqueOption
from coapfuzz import Fuzzer, encode
from conftest import make_config, post, running, send_datagram
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gatewayd import codec, log
from gatewayd.coapguard import check_options
from gatewayd.errors import BadPayload, UnsupportedFormat
from gatewayd.testing import Mosquitto

NOW = 1_700_000_000.0

# --- the codec: every input either decodes to sane drafts or raises a typed 4.xx error ------------


def _decode_one(cf: int | None, body: bytes) -> None:
    try:
        drafts = codec.decode(cf, body, now=NOW)
    except (BadPayload, UnsupportedFormat) as e:
        assert e.diagnostic and e.to_message().code.class_ == 4
        return
    assert drafts, "decode returned no drafts without raising"
    for d in drafts:
        assert isinstance(d.ts, float) and math.isfinite(d.ts), d.ts
        assert 0 < len(d.fields) <= codec.MAX_FIELDS
        for name, value in d.fields.items():
            assert isinstance(name, str) and 0 < len(name) <= codec.MAX_NAME_LEN
            assert isinstance(value, bool | int | float | str | bytes)
            assert not isinstance(value, float) or math.isfinite(value)
        assert all(isinstance(u, str) for u in d.units.values())


def _variants(body: bytes, rnd: random.Random) -> Iterator[bytes]:
    """The body, 6 prefixes of it, and 6 mutations (a byte set, flipped, inserted or deleted)."""
    yield body
    for i in range(1, 7):
        yield body[: len(body) * i // 7]
    for _ in range(6):
        b = bytearray(body or b"\x00")
        i = rnd.randrange(len(b))
        op = rnd.randrange(4)
        if op == 0:
            b[i] = rnd.randrange(256)
        elif op == 1:
            b[i] ^= 1 << rnd.randrange(8)
        elif op == 2:
            b.insert(i, rnd.choice([0x00, 0x18, 0x1B, 0x5F, 0x7F, 0x9F, 0xBF, 0xC6, 0xD8, 0xF9, 0xFF]))
        else:
            del b[i]
        yield bytes(b)


def _explode(body: bytes, rnd: random.Random) -> int:
    """Decode every variant of ``body`` as CBOR and as SenML-CBOR; returns the number of cases."""
    n = 0
    for v in _variants(body, rnd):
        for cf in (codec.CF_CBOR, codec.CF_SENML_CBOR):
            _decode_one(cf, v)
            n += 1
    _decode_one(rnd.choice([None, 0, 50, 61, 111, 65535]), body)
    return n + 1


def _fuzz(strategy: st.SearchStrategy[Any], examples: int) -> int:
    """Run ``examples`` hypothesis examples of ``strategy`` through :func:`_explode`; returns the cases."""
    cases = 0

    # No example database (no .hypothesis/ in the checkout); big nested examples are the point here.
    slow = [HealthCheck.too_slow, HealthCheck.data_too_large]

    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=slow)
    @given(strategy, st.randoms(use_true_random=False))
    def run(value: Any, rnd: random.Random) -> None:
        nonlocal cases
        body = value if isinstance(value, bytes) else cbor2.dumps(value)
        cases += _explode(body, rnd)

    run()
    return cases


_num = st.one_of(
    st.integers(-(2**65), 2**65), st.floats(), st.sampled_from([0, -1, 2**28, 2**63, 1.7976931348623157e308])
)
_leaf = st.one_of(st.none(), st.booleans(), _num, st.text(max_size=12), st.binary(max_size=8))
_key = st.one_of(st.text(max_size=10), st.just("t"), st.text(min_size=127, max_size=130), st.integers(-9, 9))
_maps = st.one_of(
    st.dictionaries(_key, _leaf, max_size=8),
    st.lists(st.dictionaries(_key, _leaf, max_size=5), max_size=5),
    st.dictionaries(
        st.text(max_size=4), st.lists(_leaf, max_size=3) | st.dictionaries(_key, _leaf, max_size=2)
    ),
)
_text = st.text(max_size=8)
_senml_record = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            -2: _text,
            -3: _num,
            -4: _text,
            0: _text,
            1: _text,
            2: _num,
            3: _text,
            4: st.booleans(),
            8: st.binary(max_size=4),
            6: _num,
            -1: _num,
            -5: _num,
            -6: _num,
            5: _num,
            7: _num,
        },
    ),
    st.dictionaries(st.integers(-8, 12) | st.text(max_size=2), _leaf, max_size=6),
)
_senml = st.one_of(st.lists(_senml_record, max_size=6), _senml_record, _leaf)
_tags = [0, 1, 2, 3, 4, 5, 21, 22, 23, 24, 25, 28, 29, 30, 32, 35, 36, 37, 256, 258, 260, 261, 55799, 999]
_any_cbor = st.recursive(
    _leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(_key, inner, max_size=4),
        st.builds(cbor2.CBORTag, st.sampled_from(_tags), inner),
    ),
    max_leaves=12,
)


def test_codec_fuzz_raw_bytes() -> None:
    """Random bytes (and their cuts and mutations) decode or raise BadPayload / UnsupportedFormat."""
    assert _fuzz(st.binary(max_size=64), 2000) >= 50_000


def test_senml_integer_times_give_a_float_timestamp() -> None:
    """Integer bt and t (absolute: t >= 2**28) were summed into an int ts (found by this file)."""
    (draft,) = codec.decode(112, cbor2.dumps([{-2: "0"}, {3: "", -3: 0, 6: 2**28}]), now=NOW)
    assert isinstance(draft.ts, float) and draft.ts == 2**28


def test_codec_fuzz_cbor_maps() -> None:
    """Maps and arrays of maps with odd keys and values of every CBOR type decode or raise 4.00."""
    assert _fuzz(_maps, 1000) >= 25_000


def test_codec_fuzz_senml_packs() -> None:
    """SenML packs with every label, wrong types and unknown labels decode or raise 4.00."""
    assert _fuzz(_senml, 1000) >= 25_000


def test_senml_time_overflow_is_4_00() -> None:
    """Base time + time beyond a float's range was a reading at ts=inf; it is 4.00 (found by this file)."""
    for big in (1.7e308, -1.7e308):
        with pytest.raises(BadPayload, match="time out of range"):
            codec.decode(112, cbor2.dumps([{-3: big, 0: "x", 2: 1, 6: big}]), now=NOW)


def test_codec_fuzz_any_cbor_with_tags() -> None:
    """Nested CBOR with tags (dates, bignums, decimals, shared refs, sets, ...) decodes or raises 4.00."""
    assert _fuzz(_any_cbor, 600) >= 15_000


# --- CoAP: unknown critical options, bad UTF-8, block-wise gaps --------------------------------------


def _answer(data: bytes) -> tuple[str, bytes]:
    msg = aiocoap.Message.decode(data)
    return str(msg.code), msg.payload


POST_OPTS = [(11, b"s"), (11, b"n1"), (12, b"\x3c")]
BODY = cbor2.dumps({"x": 1})


async def test_unknown_critical_option_is_4_02(
    tmp_path: Path, broker: Mosquitto, coap_client: aiocoap.Context
) -> None:
    """An unknown critical option (2049; OSCORE, not enabled) is 4.02 naming it; elective ones are ignored."""
    cfg = make_config(tmp_path, broker.port)
    async with running(cfg):
        port = cfg.coap.port
        req = aiocoap.Message(code=aiocoap.POST, uri=f"coap://127.0.0.1:{port}/s/n1", payload=BODY)
        req.opt.content_format = 60
        req.opt.add_option(OpaqueOption(2049, b"x"))
        resp = await asyncio.wait_for(coap_client.request(req).response, 30)
        assert resp.code == codes.BAD_OPTION and resp.payload == b"critical option 2049 not supported"
        wkc = aiocoap.Message(code=aiocoap.GET, uri=f"coap://127.0.0.1:{port}/.well-known/core")
        wkc.opt.add_option(OpaqueOption(9, b""))
        resp = await asyncio.wait_for(coap_client.request(wkc).response, 30)
        assert resp.code == codes.BAD_OPTION and b"OSCORE (9)" in resp.payload
        elective = aiocoap.Message(code=aiocoap.POST, uri=f"coap://127.0.0.1:{port}/s/n1", payload=BODY)
        elective.opt.content_format = 60
        elective.opt.add_option(OpaqueOption(2048, b"x"))
        assert (await asyncio.wait_for(coap_client.request(elective).response, 30)).code == codes.CHANGED
        # Raw: a NON request gets a NON 4.02; If-None-Match (no conditional requests here) too.
        non = await send_datagram(port, encode(1, 2, 7, b"tk", [*POST_OPTS, (65001, b"")], BODY))
        assert non[0] >> 4 & 3 == 1 and _answer(non) == (
            "4.02 Bad Option",
            b"critical option 65001 not supported",
        )
        cond = await send_datagram(port, encode(0, 2, 8, b"tk", [(5, b""), *POST_OPTS], BODY))
        assert _answer(cond) == ("4.02 Bad Option", b"critical option If-None-Match (5) not supported")
        proxy = await send_datagram(port, encode(0, 1, 9, b"tk", [(35, b"coap://example.org/x")]))
        assert _answer(proxy)[0] == "5.05 Proxying Not Supported"


async def test_path_not_utf8_is_4_02_without_traceback(
    tmp_path: Path, broker: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    """Invalid UTF-8 in Uri-Path / Uri-Query is answered 4.02 (it was: no answer and a traceback)."""
    cfg = make_config(tmp_path, broker.port)
    async with running(cfg):
        port = cfg.coap.port
        with caplog.at_level(logging.DEBUG):
            path = await send_datagram(
                port, encode(0, 2, 1, b"t1", [(11, b"s"), (11, b"\xff\xfe"), (12, b"\x3c")], BODY)
            )
            query = await send_datagram(port, encode(1, 2, 2, b"t2", [*POST_OPTS, (15, b"a=\xc3\x28")], BODY))
            # Elective Location-Path (not UTF-8) is ignored, as an unrecognised elective option is.
            loc = await send_datagram(port, encode(0, 2, 3, b"t3", [(8, b"\xff"), *POST_OPTS], BODY))
    assert _answer(path) == ("4.02 Bad Option", b"critical option Uri-Path (11): value is not valid UTF-8")
    assert _answer(query)[0] == "4.02 Bad Option" and b"Uri-Query (15)" in _answer(query)[1]
    assert _answer(loc)[0] == "2.04 Changed"
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


async def test_blockwise_gap_is_4_08(tmp_path: Path, broker: Mosquitto) -> None:
    """Block1 block 2 after block 0, or block 1 with no block 0, is 4.08 (a gap was 5.00); a restart works."""
    cfg = make_config(tmp_path, broker.port)
    body = cbor2.dumps({"blob": b"z" * 100})  # 108 bytes: blocks of 32 (SZX 1)
    opts = POST_OPTS

    def block(mid: int, num: int, more: bool) -> bytes:
        part = body[num * 32 : (num + 1) * 32]
        return encode(0, 2, mid, b"bk", [*opts, (27, bytes([num << 4 | more << 3 | 1]))], part)

    async with running(cfg):
        port = cfg.coap.port
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            assert (
                _answer(await send_datagram(port, block(1, 1, True), s))[0]
                == "4.08 Request Entity Incomplete"
            )
            assert _answer(await send_datagram(port, block(2, 0, True), s))[0] == "2.31 Continue"
            gap = _answer(await send_datagram(port, block(3, 2, True), s))
            assert gap[0] == "4.08 Request Entity Incomplete"
            assert gap[1] == b"block 2 (byte 64) does not continue the upload; start again at block 0"
            for mid, num in enumerate(range(4), start=4):  # the client starts again from block 0
                code, _ = _answer(await send_datagram(port, block(mid, num, num < 3), s))
            assert code == "2.04 Changed"


async def test_well_known_core_is_the_same_every_time(
    tmp_path: Path, broker: Mosquitto, coap_client: aiocoap.Context
) -> None:
    """A filtered GET /.well-known/core leaves later answers alone (it dropped </s> for good; found here)."""
    cfg = make_config(tmp_path, broker.port)
    uri = f"coap://127.0.0.1:{cfg.coap.port}/.well-known/core"
    async with running(cfg):
        answers = []
        for query in ("", "?rt=nothing", "?href=/x", ""):
            req = aiocoap.Message(code=aiocoap.GET, uri=uri + query)
            answers.append(await asyncio.wait_for(coap_client.request(req).response, 30))
    assert answers[1].payload == answers[2].payload == b""
    assert answers[0].payload == answers[3].payload and b"</s>" in answers[3].payload
    assert answers[3].payload.count(b"impl-info") == 1


# --- the log rate limit --------------------------------------------------------------------------


def _records(
    limit: log.RateLimit, name: str, n: int, msg: str = "Ignoring unparsable message from %s"
) -> list[str]:
    """Log ``n`` records through a handler with ``limit``; returns the lines written."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(limit)
    logger = logging.getLogger(name)
    old = logger.handlers[:], logger.propagate, logger.level
    logger.handlers[:], logger.propagate = [handler], False
    logger.setLevel(logging.DEBUG)
    try:
        for i in range(n):
            try:
                raise ValueError(f"bad byte {i}")
            except ValueError as e:
                logger.error(msg, ("::1", i), exc_info=e)
    finally:
        logger.handlers[:], logger.propagate = old[0], old[1]
        logger.setLevel(old[2])
    return out.getvalue().splitlines()


def test_log_rate_limit_per_kind_with_summary() -> None:
    """10 records per kind per interval pass, one line per traceback; then one 'suppressed K' line."""
    now = [0.0]
    limit = log.RateLimit(burst=10, interval_s=60, clock=lambda: now[0])
    lines = _records(limit, "coap-server", 1000)
    assert len(lines) == 10 and not any("Traceback" in ln for ln in lines)
    assert lines[0] == "Ignoring unparsable message from ('::1', 0) [ValueError: bad byte 0]"
    assert limit.suppressed == 990
    other = _records(limit, "coap-server", 3, "Received a message with code %s")  # another kind
    assert len(other) == 3
    now[0] = 61.0
    later = _records(limit, "coap-server", 1)
    assert later[0] == "suppressed 990 similar messages in 61 s: Ignoring unparsable message from %s"
    assert later[1].startswith("Ignoring unparsable message from ('::1', 0)")
    assert _records(limit, "coap-server.blockwise-requester", 20)[10:] == []  # children are limited too
    assert len(_records(limit, "gatewayd.store", 50)) > 50  # others untouched, tracebacks kept


def test_log_rate_limit_memory_is_bounded() -> None:
    """Distinct message kinds beyond max_kinds push out the oldest: the state never grows past it."""
    limit = log.RateLimit(burst=1, max_kinds=16)
    for i in range(1000):
        _records(limit, "coap", 2, f"kind {i} %s")
    assert len(limit._kinds) <= 16
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    logging.getLogger("coap").addHandler(handler)
    try:
        limit.flush()
    finally:
        logging.getLogger("coap").removeHandler(handler)
    assert out.getvalue().count("suppressed 1 similar messages") == 16


def test_check_options_cost() -> None:
    """The per-request option check stays far below a microsecond's share of a ~500 µs request."""
    msgs = []
    for i in range(100_000):
        m = aiocoap.Message(code=aiocoap.POST, payload=BODY)
        m.opt.uri_path = ("s", f"n{i % 64}")
        m.opt.content_format = 60
        msgs.append(m)
    t0 = time.perf_counter()
    for m in msgs:
        check_options(m)
    per_request_us = (time.perf_counter() - t0) / len(msgs) * 1e6
    assert per_request_us < 5, per_request_us


# --- datagrams at a live gatewayd ----------------------------------------------------------------


@contextlib.contextmanager
def journal() -> Iterator[io.StringIO]:
    """What gatewayd's log handler writes at level info (the default), with a fresh rate limit.

    At the end the rate limit writes its pending "suppressed K" lines (as it does at exit).
    """
    root = logging.getLogger()
    handler = root.handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    filters, level = handler.filters[:], root.level
    limit = log.RateLimit()
    out = io.StringIO()
    old = handler.setStream(out)
    handler.filters[:] = [f for f in filters if not isinstance(f, log.RateLimit)] + [limit]
    root.setLevel(logging.INFO)
    try:
        yield out
    finally:
        limit.flush()
        root.setLevel(level)
        handler.filters[:] = filters
        if old is not None:
            handler.setStream(old)


SEED = int(os.environ.get("GATEWAYD_FUZZ_SEED", random.randrange(1 << 30)))


async def test_datagram_fuzz_answers_4xx_and_logs_little(
    tmp_path: Path, broker: Mosquitto, coap_client: aiocoap.Context
) -> None:
    """3,000 fuzzed datagrams: requests get 2.xx/4.xx, never 5.00; gatewayd serves on; the log stays short."""
    # Every datagram parsed: a request shed unparsed (5.03, it waited in the socket behind the fuzzer
    # sharing this event loop) would hide what is being fuzzed.
    cfg = make_config(tmp_path, broker.port, coap={"shed_after_ms": 10_000})
    async with running(cfg) as app:
        with journal() as out:
            async with Fuzzer("127.0.0.1", cfg.coap.port, seed=SEED) as fz:
                for _ in range(4):
                    report = await fz.run(750)
                    ok = await post(coap_client, cfg.coap.port, "after-burst", cbor2.dumps({"x": 1}))
                    assert ok.code == codes.CHANGED, f"seed {SEED}"
        assert app.store is not None
        deadline = time.monotonic() + 20
        while app.store.outbox_count and time.monotonic() < deadline:  # nothing poisons the outbox
            await asyncio.sleep(0.1)
        assert app.store.outbox_count == 0, f"seed {SEED}: outbox stuck at {app.store.outbox_count}"
    written = out.getvalue().splitlines()
    summary = f"seed {SEED}: {report.summary()}"
    assert report.cases == 3000 and not report.failures, f"{summary}\n" + "\n".join(report.failures)
    assert report.missing == 0 and report.barrier_timeouts == 0, summary
    assert report.all_codes["5.00"] == 0 and report.answers["4.02"] > 100, summary
    during = [ln for ln in written if "suppressed" not in ln]
    assert len(during) < 50, f"{len(during)} log lines:\n" + "\n".join(during)
    text = "\n".join(written)
    assert "Traceback" not in text and "Exception in callback" not in text, text
    assert "suppressed" in text  # the held-back records were counted
