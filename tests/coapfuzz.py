"""A raw-UDP CoAP fuzzer for gatewayd: well-formed requests with odd options and bodies, and garbage.

Used by ``tests/test_fuzz.py`` (a few thousand cases against gatewayd in the test's event loop) and
``tests/benchmarks/fuzz_long.py`` (100k+ cases against a ``gatewayd run`` process).

Each case is one datagram. Requests are sent from "request" sockets with a fresh message id and
token each, and must be answered: 2.xx or 4.xx (5.03 when gatewayd is overloaded, 5.05 for a
proxy request), some with one exact code (4.02 for an unknown critical option or a path that is not
UTF-8). Garbage (truncated or mutated requests, random bytes, responses, reserved codes) goes out
from separate sockets, so its random message ids and tokens cannot collide with a request's; it
needs no answer. No answer to anything may be 5.00. Every ``barrier_every`` datagrams a CoAP ping
(an empty CON, answered by RST) on a control socket waits until gatewayd has read all before it:
the server's socket queue never overflows, so a missing answer is gatewayd's doing.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import random
import struct
import time
from dataclasses import dataclass, field
from typing import Any, cast

import cbor2

CON, NON, ACK, RST = 0, 1, 2, 3
GET, POST, PUT, DELETE = 1, 2, 3, 4
URI_HOST, URI_PATH, CONTENT_FORMAT, URI_QUERY, BLOCK1, NO_RESPONSE = 3, 11, 12, 15, 27, 258
PROXY_OPTIONS = {35, 39}
#: Critical options gatewayd acts on (see gatewayd.coapguard.RECOGNISED_CRITICAL).
RECOGNISED_CRITICAL = {3, 7, 11, 13, 15, 17, 23, 27}
#: Options aiocoap knows (RFC 7252, 7641, 7959, 7967, 8613, 8768, 9175, 9177, drafts).
KNOWN_OPTIONS = [1, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14, 15, 16, 17, 19, 20, 21, 23, 27, 28, 31, 35, 39]
KNOWN_OPTIONS += [60, 252, 258, 292, 548]
UNKNOWN_CRITICAL = [1, 5, 9, 19, 21, 31, 25, 33, 61, 2049, 3001, 65001, 65535]
UNKNOWN_ELECTIVE = [2, 10, 18, 24, 2048, 4000, 65000]
STRING_OPTIONS = [3, 8, 11, 15, 20, 35, 39]
INVALID_UTF8 = [b"\xff", b"\xc3\x28", b"\xe2\x82", b"ok\xfe", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"]
NODES = [f"fz-{i}" for i in range(8)]


def code_str(code: int) -> str:
    return f"{code >> 5}.{code & 31:02d}"


def _ext(n: int) -> tuple[int, bytes]:
    if n < 13:
        return n, b""
    if n < 269:
        return 13, bytes([n - 13])
    return 14, struct.pack("!H", n - 269)


def encode(
    mtype: int, code: int, mid: int, token: bytes, options: list[tuple[int, bytes]], payload: bytes = b""
) -> bytes:
    """A CoAP datagram (RFC 7252 §3); options in any order (they are sorted, stably)."""
    out = [struct.pack("!BBH", 0x40 | mtype << 4 | len(token), code, mid), token]
    last = 0
    for number, value in sorted(options, key=lambda o: o[0]):
        d, d_ext = _ext(number - last)
        n, n_ext = _ext(len(value))
        out += [bytes([d << 4 | n]), d_ext, n_ext, value]
        last = number
    if payload:
        out += [b"\xff", payload]
    return b"".join(out)


def _uint(v: int) -> bytes:
    return v.to_bytes((v.bit_length() + 7) // 8, "big")


@dataclass
class Case:
    """One datagram; ``expect`` is None for garbage, "any" for any 2.xx/4.xx, or one exact code."""

    kind: str
    data: bytes
    expect: str | None = None
    token: bytes = b""
    proxy: bool = False
    #: A No-Response option may suppress the answer.
    may_be_silent: bool = False


class Generator:
    """Makes cases from one seeded random source (reproducible by seed)."""

    KINDS = (
        ("valid_post", 8),
        ("bad_body", 12),
        ("critical_option", 10),
        ("bad_utf8", 8),
        ("random_options", 17),
        ("block1", 7),
        ("truncated", 10),
        ("mutated", 14),
        ("random_bytes", 9),
        ("not_a_request", 5),
    )

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.names = [k for k, _ in self.KINDS]
        self.weights = [w for _, w in self.KINDS]
        self._token = seed << 32

    def token(self) -> bytes:
        self._token += 1
        return (self._token & (2**64 - 1)).to_bytes(8, "big")

    def case(self, mid: int) -> Case:
        kind = self.rng.choices(self.names, self.weights)[0]
        return cast(Case, getattr(self, kind)(mid))

    # --- pieces ---------------------------------------------------------------------------------

    def _post_options(self, node: str | None = None, cf: int | None = 60) -> list[tuple[int, bytes]]:
        opts = [(URI_PATH, b"s"), (URI_PATH, (node or self.rng.choice(NODES)).encode())]
        if cf is not None:
            opts.append((CONTENT_FORMAT, _uint(cf)))
        return opts

    def _reading(self) -> bytes:
        r = self.rng
        fields: dict[str, Any] = {}
        for i in range(r.randint(1, 4)):
            fields[f"f{i}"] = r.choice(
                [r.uniform(-1e6, 1e6), r.randint(-(2**40), 2**40), "txt", True, b"\x00"]
            )
        return cbor2.dumps(fields)

    def _random_body(self) -> bytes:
        r = self.rng
        choice = r.randrange(5)
        if choice == 0:
            return r.randbytes(r.randint(0, 64))
        if choice == 1:  # valid CBOR of the wrong shape
            return cbor2.dumps(r.choice([[1, 2], {"": 1}, {1: 2}, "x", None, [{}], {"t": "x"}, {"a": [1]}]))
        if choice == 2:  # SenML-ish
            rec = {
                r.choice([-2, -3, 0, 1, 2, 3, 4, 6, 8, 99]): r.choice([1, "n", b"b", True, 1.5])
                for _ in range(3)
            }
            return cbor2.dumps([rec])
        if choice == 3:  # truncated valid CBOR
            body = self._reading()
            return body[: r.randrange(len(body))]
        return bytes([r.choice([0x9F, 0xBF, 0x5F, 0x7F, 0xFF, 0x1C, 0xF8])]) + r.randbytes(r.randint(0, 8))

    def _option_value(self, number: int) -> bytes:
        r = self.rng
        if number in STRING_OPTIONS and r.random() < 0.7:
            return r.choice([b"s", b"fz-1", b".well-known", b"core", "é".encode(), b""])
        return r.randbytes(r.choice([0, 0, 1, 1, 2, 4, 8, r.randint(0, 40)]))

    def _request(
        self, mid: int, kind: str, code: int, opts: list[tuple[int, bytes]], payload: bytes, **kw: Any
    ) -> Case:
        token = self.token()
        mtype = CON if self.rng.random() < 0.8 else NON
        data = encode(mtype, code, mid, token, opts, payload)
        return Case(kind, data, token=token, **kw)

    # --- requests: answered ---------------------------------------------------------------------

    def valid_post(self, mid: int) -> Case:
        return self._request(mid, "valid_post", POST, self._post_options(), self._reading(), expect="2.04")

    def bad_body(self, mid: int) -> Case:
        cf = self.rng.choice([60, 60, 112, 112, None, 0, 50, 65535, 2**32 - 1])
        return self._request(
            mid, "bad_body", POST, self._post_options(cf=cf), self._random_body(), expect="any"
        )

    def critical_option(self, mid: int) -> Case:
        number = self.rng.choice(UNKNOWN_CRITICAL)
        value = self.rng.randbytes(self.rng.randint(0, 6))
        if self.rng.random() < 0.7:
            opts, code, payload = self._post_options(), POST, self._reading()
        else:
            opts, code, payload = [(URI_PATH, b".well-known"), (URI_PATH, b"core")], GET, b""
        return self._request(mid, "critical_option", code, [*opts, (number, value)], payload, expect="4.02")

    def bad_utf8(self, mid: int) -> Case:
        bad = self.rng.choice(INVALID_UTF8)
        where = self.rng.choice([URI_PATH, URI_QUERY, URI_HOST])
        opts = self._post_options()
        if where == URI_PATH:
            opts = [(URI_PATH, b"s"), (URI_PATH, bad), (CONTENT_FORMAT, b"\x3c")]
        else:
            opts.append((where, bad))
        return self._request(mid, "bad_utf8", POST, opts, self._reading(), expect="4.02")

    def random_options(self, mid: int) -> Case:
        r = self.rng
        code = r.choice([GET, POST, PUT, DELETE, 5, 6, 7, r.randint(1, 31)])
        path = r.choice([[b"s", r.choice(NODES).encode()], [b".well-known", b"core"], [b"s"], [], [b"x"]])
        opts = [(URI_PATH, p) for p in path]
        pool = KNOWN_OPTIONS + UNKNOWN_ELECTIVE + UNKNOWN_CRITICAL
        for _ in range(r.randint(0, 6)):
            n = r.choice(pool)
            opts.append((n, self._option_value(n)))
        numbers = {n for n, _ in opts}
        critical = {n for n in numbers if n & 1 and n not in RECOGNISED_CRITICAL and n not in PROXY_OPTIONS}
        proxy = bool(numbers & PROXY_OPTIONS)
        bad_string = any(n in STRING_OPTIONS and n & 1 and not _is_utf8(v) for n, v in opts)
        expect = "4.02" if (critical or bad_string) and not proxy else "any"
        payload = r.choice([b"", self._reading(), self._random_body()])
        return self._request(
            mid, "random_options", code, opts, payload, expect=expect, proxy=proxy,
            may_be_silent=NO_RESPONSE in numbers,
        )  # fmt: skip

    def block1(self, mid: int) -> Case:
        r = self.rng
        szx = r.randint(0, 6)
        num, more = r.choice([0, 0, 1, 2, 3, 100, 2**19]), r.random() < 0.6
        size = 2 ** (szx + 4)
        payload = r.randbytes(size if r.random() < 0.7 else r.randint(1, size + 5))
        opts = [*self._post_options(node=NODES[0]), (BLOCK1, _uint(num << 4 | more << 3 | szx))]
        return self._request(mid, "block1", POST, opts, payload, expect="any")

    # --- garbage: needs no answer, but none may be 5.00 ------------------------------------------

    def _any_request(self, mid: int) -> bytes:
        kind = self.rng.choice(
            ["valid_post", "bad_body", "critical_option", "bad_utf8", "random_options", "block1"]
        )
        return cast(Case, getattr(self, kind)(mid)).data

    def truncated(self, mid: int) -> Case:
        data = self._any_request(mid)
        return Case("truncated", data[: self.rng.randrange(len(data))])

    def mutated(self, mid: int) -> Case:
        data = bytearray(self._any_request(mid))
        for _ in range(self.rng.randint(1, 4)):
            i = self.rng.randrange(len(data))
            if self.rng.random() < 0.5:
                data[i] ^= 1 << self.rng.randrange(8)
            else:
                data[i] = self.rng.randrange(256)
        return Case("mutated", bytes(data))

    def random_bytes(self, mid: int) -> Case:
        data = self.rng.randbytes(self.rng.randint(0, 80))
        if data and self.rng.random() < 0.6:
            data = bytes([0x40 | (data[0] & 0x3F)]) + data[1:]  # CoAP version 1, so it gets further
        return Case("random_bytes", data)

    def not_a_request(self, mid: int) -> Case:
        r = self.rng
        mtype = r.randrange(4)
        code = r.choice([0, 0x41, 0x44, 0x80, 0xA0, 0x20, 0x3F, 0xC0, 0xE0, 0xE1, r.randrange(32, 256)])
        token = r.randbytes(r.randint(0, 8))
        return Case("not_a_request", encode(mtype, code, r.randrange(0x10000), token, [], r.randbytes(3)))


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@dataclass
class Report:
    """What one or more bursts produced."""

    sent: collections.Counter[str] = field(default_factory=collections.Counter)
    #: Codes answered to requests, by code.
    answers: collections.Counter[str] = field(default_factory=collections.Counter)
    #: Every response code seen on any socket (requests and garbage alike), by code.
    all_codes: collections.Counter[str] = field(default_factory=collections.Counter)
    missing: int = 0
    silent_ok: int = 0
    failures: list[str] = field(default_factory=list)
    barrier_timeouts: int = 0
    seconds: float = 0.0

    @property
    def cases(self) -> int:
        return sum(self.sent.values())

    def fail(self, text: str) -> None:
        if len(self.failures) < 50:
            self.failures.append(text)

    def summary(self) -> str:
        return (
            f"{self.cases} cases in {self.seconds:.1f} s ({self.cases / max(self.seconds, 1e-9):.0f}/s); "
            f"sent {dict(sorted(self.sent.items()))}; answers {dict(sorted(self.answers.items()))}; "
            f"all response codes {dict(sorted(self.all_codes.items()))}; missing {self.missing}; "
            f"barrier timeouts {self.barrier_timeouts}; failures {len(self.failures)}"
        )


class _Sock(asyncio.DatagramProtocol):
    def __init__(self, fuzzer: Fuzzer, kind: str) -> None:
        self.fuzzer = fuzzer
        self.kind = kind
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.fuzzer._received(self, data)

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.sendto(data)


@dataclass
class _Pending:
    case: Case
    sock: _Sock
    sent_at: float
    tries: int = 0
    acked: bool = False


class Fuzzer:
    """Sends cases to ``host:port`` and checks the answers; use as ``async with``."""

    def __init__(
        self, host: str, port: int, *, seed: int = 0, request_sockets: int = 8, barrier_every: int = 64
    ) -> None:
        self.addr = (host, port)
        self.gen = Generator(seed)
        self.n_request_sockets = request_sockets
        self.barrier_every = barrier_every
        self.report = Report()
        self._pending: dict[bytes, _Pending] = {}
        self._mids: dict[int, int] = {}
        self._ping: dict[int, asyncio.Future[None]] = {}
        self._socks: list[_Sock] = []

    async def __aenter__(self) -> Fuzzer:
        loop = asyncio.get_running_loop()
        kinds = ["control", "garbage", "garbage"] + ["request"] * self.n_request_sockets
        for kind in kinds:
            _, proto = await loop.create_datagram_endpoint(
                functools.partial(_Sock, self, kind), remote_addr=self.addr
            )
            self._socks.append(proto)
        self.control, self.garbage, self.requests = self._socks[0], self._socks[1:3], self._socks[3:]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for s in self._socks:
            if s.transport is not None:
                s.transport.close()

    def _mid(self, sock: _Sock) -> int:
        mid = self._mids.get(id(sock), random.randrange(0x10000))
        self._mids[id(sock)] = (mid + 1) & 0xFFFF
        return mid

    async def run(self, n: int, *, settle_s: float = 10.0) -> Report:
        """Send ``n`` cases, then wait up to ``settle_s`` for the answers still due."""
        t0 = time.perf_counter()
        for i in range(n):
            req_sock = self.requests[i % len(self.requests)]
            case = self.gen.case(self._mid(req_sock))
            self.report.sent[case.kind] += 1
            if case.expect is None:
                self.garbage[i % 2].send(case.data)
            else:
                self._pending[case.token] = _Pending(case, req_sock, time.monotonic())
                req_sock.send(case.data)
            if (i + 1) % self.barrier_every == 0:
                await self.barrier()
                self._retransmit()
        await self.barrier()
        deadline = time.monotonic() + settle_s
        while any(not p.case.may_be_silent for p in self._pending.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            self._retransmit()
        if self._pending:
            await asyncio.sleep(0.2)  # what No-Response may have silenced
        for p in self._pending.values():
            if p.case.may_be_silent:
                self.report.silent_ok += 1
            else:
                self.report.missing += 1
                self.report.fail(f"no answer to {p.case.kind} {p.case.data.hex()}")
        self._pending.clear()
        self.report.seconds += time.perf_counter() - t0
        return self.report

    async def barrier(self, timeout: float = 5.0) -> None:
        """A CoAP ping; its RST comes once gatewayd has read every datagram sent before it."""
        mid = self._mid(self.control)
        fut = asyncio.get_running_loop().create_future()
        self._ping[mid] = fut
        self.control.send(struct.pack("!BBH", 0x40 | CON << 4, 0, mid))
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            self.report.barrier_timeouts += 1
        finally:
            self._ping.pop(mid, None)

    def _retransmit(self) -> None:
        """Resend a CON request unanswered for 2 s (RFC 7252 §4.2; the same message id)."""
        now = time.monotonic()
        for p in self._pending.values():
            if not p.acked and p.tries < 4 and now - p.sent_at > 2.0 * 2**p.tries:
                p.tries += 1
                p.sock.send(p.case.data)

    def _received(self, sock: _Sock, data: bytes) -> None:
        if len(data) < 4 or data[0] >> 6 != 1:
            self.report.fail(f"not CoAP from gatewayd: {data.hex()}")
            return
        mtype, tkl, code, mid = (data[0] >> 4) & 3, data[0] & 15, data[1], data[2] << 8 | data[3]
        token = data[4 : 4 + tkl]
        if sock is self.control:
            fut = self._ping.get(mid)
            if fut is not None and not fut.done():
                fut.set_result(None)
            return
        if code == 0:
            if mtype == ACK and sock.kind == "request":  # empty ACK: a separate response follows
                for p in self._pending.values():
                    if p.sock is sock and (p.case.data[2] << 8 | p.case.data[3]) == mid:
                        p.acked = True
            return
        text = code_str(code)
        self.report.all_codes[text] += 1
        if mtype == CON:  # a separate response: acknowledge it
            sock.send(struct.pack("!BBH", 0x40 | ACK << 4, 0, mid))
        if code == 0xA0:
            self.report.fail(f"5.00 on a {sock.kind} socket: {data.hex()}")
        if sock.kind != "request":
            return
        pending = self._pending.pop(token, None)
        if pending is None:
            return  # an answer to a retransmission, already counted
        case = pending.case
        self.report.answers[text] += 1
        # 5.03: overloaded (Max-Age); 5.05: a Proxy-Uri / Proxy-Scheme request (RFC 7252 §5.7.2).
        ok = code >> 5 in (2, 4) or code == 0xA3 or (code == 0xA5 and case.proxy)
        if case.expect == "2.04":
            ok = text in ("2.04", "5.03")
        elif case.expect != "any":
            ok = text == case.expect or (case.proxy and text == "5.05")
        if not ok:
            self.report.fail(
                f"{case.kind} answered {text} (expected {case.expect}): {case.data.hex()} -> {data.hex()}"
            )
