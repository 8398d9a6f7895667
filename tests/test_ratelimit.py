"""Per-node fairness: a node over its rate gets 4.29 with Max-Age; the others are served."""

from __future__ import annotations

from pathlib import Path

import aiocoap
import cbor2
import pytest
from aiocoap.numbers import codes
from conftest import make_config, post, running

from gatewayd.errors import TooManyRequests
from gatewayd.ratelimit import NodeLimiter
from gatewayd.testing import Mosquitto


def test_bucket_allows_burst_then_rate() -> None:
    """A full bucket allows `burst` at once, then one request per 1/rate seconds, with Max-Age to wait."""
    lim = NodeLimiter(rate_per_s=2.0, burst=3, max_nodes=10)
    for _ in range(3):
        lim.check("a", now=100.0)
    with pytest.raises(TooManyRequests) as err:
        lim.check("a", now=100.0)
    assert err.value.retry_after_s == 1 and err.value.to_message().opt.max_age == 1
    lim.check("b", now=100.0)  # another node has its own bucket
    lim.check("a", now=100.5)  # half a second at 2/s refills one token
    with pytest.raises(TooManyRequests):
        lim.check("a", now=100.6)


def test_memory_is_bounded_by_max_nodes() -> None:
    """Only max_nodes buckets are kept; the least recently seen node is forgotten."""
    lim = NodeLimiter(rate_per_s=1.0, burst=1, max_nodes=2)
    lim.check("a", now=0.0)
    lim.check("b", now=0.0)
    lim.check("c", now=0.0)  # forgets "a", whose bucket was empty
    lim.check("a", now=0.0)  # so "a" starts full again
    assert len(lim._buckets) == 2


def test_zero_rate_turns_the_limit_off() -> None:
    """rate_per_s = 0 admits everything."""
    lim = NodeLimiter(rate_per_s=0, burst=1, max_nodes=1)
    for _ in range(100):
        lim.check("a", now=0.0)


async def test_chatty_node_gets_429_others_get_204(
    tmp_path: Path, broker: Mosquitto, coap_client: aiocoap.Context
) -> None:
    """Over the wire: past its burst a node is answered 4.29 Too Many Requests with Max-Age."""
    cfg = make_config(tmp_path, broker.port, limits={"rate_per_s": 0.5, "burst": 3})
    async with running(cfg):
        chatty = [await post(coap_client, cfg.coap.port, "chatty", cbor2.dumps({"i": i})) for i in range(5)]
        quiet = await post(coap_client, cfg.coap.port, "quiet", cbor2.dumps({"i": 0}))
    assert [a.code for a in chatty[:3]] == [codes.CHANGED] * 3
    assert all(a.code == codes.TOO_MANY_REQUESTS and a.opt.max_age == 2 for a in chatty[3:])
    assert quiet.code == codes.CHANGED
