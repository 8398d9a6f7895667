"""What the CoAP front refuses before a resource sees a request, and a receive path that never raises.

aiocoap 0.4.17 accepts requests with critical options it does not act on (an
unknown one, or OSCORE without OSCORE) and answers them 2.04; RFC 7252 §5.4.1
wants 4.02 Bad Option. A string option that is not UTF-8 (e.g. a Uri-Path) makes
its decoder raise out of the socket callback: no answer, and a full traceback in
the journal per datagram. Here:

* :func:`check_options` (run by the root site for every request and every block):
  an unrecognised critical option, or a critical option whose value could not be
  decoded, is 4.02 naming the option; Proxy-Uri / Proxy-Scheme is 5.05.
* :func:`harden_udp` wraps the UDP transport's receive callback: a datagram that
  aiocoap's decoder raises on is decoded again leniently (an undecodable critical
  option is remembered for :func:`check_options`, an undecodable elective one is
  ignored, as RFC 7252 §5.4.1 says), and nothing escapes into asyncio's handler.
  It also reads the socket in bursts and, behind a backlog, answers requests that
  waited too long 5.03 unparsed (the shedding: see ``READ_BURST``).

Block1 reassembly (4.08 for a gap, bounded memory) is in :mod:`gatewayd.uploads`.
"""

from __future__ import annotations

import socket
import struct
import time
from typing import Any, Protocol

import aiocoap
from aiocoap.error import UnparsableMessage
from aiocoap.message import Direction
from aiocoap.numbers.optionnumbers import OptionNumber
from aiocoap.numbers.types import Type
from aiocoap.transports.udp6 import UDP6EndpointAddress

from gatewayd.errors import BadOption, NotAProxy

#: Critical (odd) options that gatewayd or aiocoap act on. Uri-Host and Uri-Port name this
#: server whatever their value; Uri-Path-Abbrev is resolved by aiocoap's Site; Accept is
#: honoured by /.well-known/core. Everything else odd, including If-Match / If-None-Match
#: (no conditional requests here), EDHOC (not enabled) and Q-Block, is 4.02; so is OSCORE unless
#: nodes have OSCORE contexts, in which case the root site unprotects the request first
#: (gatewayd.access) and the inner request comes here.
RECOGNISED_CRITICAL = frozenset(
    int(n)
    for n in (
        OptionNumber.URI_HOST,
        OptionNumber.URI_PORT,
        OptionNumber.URI_PATH,
        OptionNumber.URI_PATH_ABBREV,
        OptionNumber.URI_QUERY,
        OptionNumber.ACCEPT,
        OptionNumber.BLOCK2,
        OptionNumber.BLOCK1,
    )
)
PROXY_OPTIONS = frozenset((int(OptionNumber.PROXY_URI), int(OptionNumber.PROXY_SCHEME)))

#: Message attribute set by the lenient decoder: the critical options whose value was unreadable.
UNDECODABLE = "_gatewayd_undecodable_options"


_ACRONYMS = {int(OptionNumber.OSCORE): "OSCORE", int(OptionNumber.EDHOC): "EDHOC"}


def option_name(number: int) -> str:
    """``Uri-Path (11)`` for a registered option, ``2049`` for another."""
    number = int(number)
    option = OptionNumber(number)
    if not hasattr(option, "name"):
        return str(number)
    return f"{_ACRONYMS.get(number) or option.name_printable} ({number})"


def check_options(request: aiocoap.Message) -> None:
    """Raise 4.02 for an unrecognised or unreadable critical option, 5.05 for a proxy request."""
    undecodable = getattr(request, UNDECODABLE, None)
    if undecodable:
        raise BadOption(f"critical option {option_name(undecodable[0])}: value is not valid UTF-8")
    # Options keeps one dict keyed by option number; iterating its keys is the cheapest look.
    for number in request.opt._options:
        if number & 1 and number not in RECOGNISED_CRITICAL:
            if number in PROXY_OPTIONS:
                raise NotAProxy("gatewayd is not a proxy")
            raise BadOption(f"critical option {option_name(number)} not supported")


def _extended(value: int, data: bytes) -> tuple[int, bytes]:
    if value < 13:
        return value, data
    if value == 13 and len(data) >= 1:
        return data[0] + 13, data[1:]
    if value == 14 and len(data) >= 2:
        return int.from_bytes(data[:2], "big") + 269, data[2:]
    raise UnparsableMessage("malformed option header")


def decode_lenient(data: bytes, remote: Any) -> aiocoap.Message:
    """aiocoap's ``Message.decode``, except that an option whose value cannot be decoded does not
    lose the datagram: a critical one is listed in the message's :data:`UNDECODABLE` attribute
    (so :func:`check_options` answers 4.02), an elective one is left out.

    Raises UnparsableMessage for what aiocoap would not parse either.
    """
    if len(data) < 4 or data[0] >> 6 != 1:
        raise UnparsableMessage("not a CoAP version 1 message")
    tkl = data[0] & 0x0F
    msg = aiocoap.Message(code=data[1])
    msg.mid = int.from_bytes(data[2:4], "big")
    msg.mtype = Type((data[0] >> 4) & 0x03)
    msg.token = data[4 : 4 + tkl]
    rest = data[4 + tkl :]
    number = 0
    undecodable = []
    while rest:
        if rest[0] == 0xFF:
            msg.payload = rest[1:]
            break
        head = rest[0]
        delta, rest = _extended(head >> 4, rest[1:])
        length, rest = _extended(head & 0x0F, rest)
        number += delta
        if len(rest) < length:
            raise UnparsableMessage("option announced but absent")
        raw, rest = rest[:length], rest[length:]
        try:
            msg.opt.add_option(OptionNumber(number).create_option(decode=raw))
        except Exception:  # UnicodeDecodeError from a string option, so far the only one seen
            if number & 1:
                undecodable.append(number)
    msg.remote = remote
    msg.direction = Direction.INCOMING
    if undecodable:
        setattr(msg, UNDECODABLE, tuple(undecodable))
    return msg


class Shedder(Protocol):
    """Answers requests without aiocoap while the gateway is overloaded (see ``overload_answer``)."""

    #: A request that waited longer than this (seconds) in the socket's receive queue is shed.
    shed_after_s: float

    def active(self) -> bool: ...

    def answer(self, data: bytes, remote: UDP6EndpointAddress) -> bytes | None: ...


def overload_answer(data: bytes, max_age: int, mid: int, diagnostic: bytes = b"overloaded") -> bytes | None:
    """A 5.03 with Max-Age for a CON or NON request datagram, built from its header alone.

    A fraction of what aiocoap spends parsing and answering, so that under overload
    the excess is answered rather than dropped by the kernel. CON gets a piggy-backed
    ACK with the request's message id, NON a NON with ``mid`` (RFC 7252 §4.2, §5.2).
    None for anything that is not a request.
    """
    if len(data) < 4:
        return None
    b0, code = data[0], data[1]
    kind, tkl = (b0 >> 4) & 3, b0 & 0x0F
    if b0 >> 6 != 1 or kind > 1 or tkl > 8 or len(data) < 4 + tkl or code == 0 or code >> 5 != 0:
        return None
    if kind == 0:
        head = bytes([0x60 | tkl, 0xA3]) + data[2:4]
    else:
        head = bytes([0x50 | tkl, 0xA3]) + (mid & 0xFFFF).to_bytes(2, "big")
    value = max_age.to_bytes((max_age.bit_length() + 7) // 8, "big")
    max_age_option = bytes([0xD0 | len(value), 14 - 13]) + value  # option 14, delta in an extended byte
    return head + data[4 : 4 + tkl] + max_age_option + b"\xff" + diagnostic


#: Datagrams handed to aiocoap per wakeup of the event loop, so that parsing them cannot starve the
#: rest of the loop. More waiting than that is a backlog: from there on, a request that waited over
#: ``shed_after_s`` is answered unparsed (a few µs) and reading goes on until a younger one.
#: (Fewer waiting is a pause of the loop, e.g. a garbage collection, not overload: all are parsed.)
READ_BURST = 64
#: Datagrams read per wakeup at most, shed ones included: a bound on one callback's time.
READ_MAX = 4096

#: Linux's SO_TIMESTAMP (asm-generic; x86 and ARM alike): each datagram carries its arrival time.
SO_TIMESTAMP = 29
_TIMEVAL = struct.Struct("@ll")  # struct timeval, native longs as the kernel writes it


def harden_udp(interface: Any, shedder: Shedder | None = None) -> None:
    """Wrap an aiocoap UDP6 message interface's receive callback (see the module docstring), and
    read its socket in bursts; with a ``shedder``, requests that waited too long are answered 5.03."""
    received = interface.datagram_msg_received
    log = interface.log
    parsed = [0]
    behind = [False]  # READ_BURST datagrams parsed in this wakeup, and more are waiting
    young = [True]  # the last datagram waited less than shed_after_s
    sock = interface.transport.get_extra_info("socket")
    if shedder is not None:
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMP, 1)

    def datagram_msg_received(data: bytes, ancdata: Any, flags: int, address: Any) -> None:
        if shedder is not None:
            pktinfo, waited, ancdata = _ancillary(ancdata)
            young[0] = waited <= shedder.shed_after_s
            if (behind[0] and not young[0]) or shedder.active():
                answer = shedder.answer(data, UDP6EndpointAddress(address, interface, pktinfo=pktinfo))
                if answer is not None:
                    anc = [] if pktinfo is None else [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, pktinfo)]
                    interface.transport.sendmsg(answer, anc, 0, address)
                    return
        parsed[0] += 1
        try:
            received(data, ancdata, flags, address)
            return
        except Exception as e:  # aiocoap lets these escape into asyncio's handler (a traceback)
            try:
                aiocoap.Message.decode(data)
            except UnparsableMessage:
                return
            except Exception:
                pass  # aiocoap's decoder failed on an option value: decode leniently below
            else:
                # The decoder was fine, dispatching raised; aiocoap has already logged it.
                log.debug("exception from dispatch_message swallowed: %r", e)
                return
        try:
            pktinfo = _ancillary(ancdata)[0]
            message = decode_lenient(data, UDP6EndpointAddress(address, interface, pktinfo=pktinfo))
        except UnparsableMessage:
            log.warning("Ignoring unparsable message from %s", address)
            return
        try:
            interface._ctx.dispatch_message(message)
        except Exception as e:
            log.error("Exception raised through dispatch_message: %r", e)

    interface.datagram_msg_received = datagram_msg_received

    # aiocoap's transport reads one datagram per wakeup of the event loop: under load the kernel's
    # receive buffer overflowed (datagrams dropped unanswered) while the loop was not even busy.
    # Read until the socket is empty, in bounded bursts. (Its reader callback looks ``_read_ready``
    # up on the instance each time.)
    transport = interface.transport
    read_one = transport._read_ready
    max_size = transport.max_size

    def read_burst() -> None:
        start = parsed[0]
        read_one()  # aiocoap's own: the error queue (ICMP errors for its CONs), then one datagram
        try:
            for _ in range(READ_MAX):
                try:
                    data, ancdata, flags, address = sock.recvmsg(max_size, 1024)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as e:  # as aiocoap's reader does
                    interface.error_received(e)
                    return
                before = parsed[0]
                behind[0] = before - start >= READ_BURST
                datagram_msg_received(data, ancdata, flags, address)
                if behind[0] and parsed[0] > before and young[0]:
                    return  # past the burst, a young one parsed: the rest waits for the next wakeup
        finally:
            behind[0] = False

    transport._read_ready = read_burst


def _ancillary(ancdata: Any) -> tuple[bytes | None, float, list[Any]]:
    """The datagram's IPV6_PKTINFO, how long it waited since it arrived (0 if not stamped), and the
    ancillary data without the stamp (aiocoap logs every kind it does not know, per datagram)."""
    pktinfo = None
    waited = 0.0
    rest = []
    for item in ancdata:
        level, kind, cdata = item
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMP and len(cdata) >= _TIMEVAL.size:
            sec, usec = _TIMEVAL.unpack_from(cdata)
            waited = time.time() - sec - usec / 1e6
            continue
        if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO:
            pktinfo = bytes(cdata)
        rest.append(item)
    return pktinfo, waited, rest
