"""Model updates over the air: a command on MQTT, a verified bundle loaded beside the serving one,
compared in shadow on live readings, switched between batches, rolled back on probation failure.

The refusals and the rollback use ``fake_plugins:Versioned`` (a "model" whose answer, speed and
failures its bundle sets); the swap under load is also run with the shipped GLM model."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiocoap
import aiomqtt
import cbor2
import pytest
from aiocoap.numbers import codes
from conftest import Collected, collect, make_config, post, running

from gatewayd.bundle import generate_keypair, read_manifest, sign_bundle, write_manifest
from gatewayd.config import Config
from gatewayd.testing import Mosquitto
from gatewayd.updates import ModelStore, UpdateCommand, UpdateError, Updater, parse_command

UPDATE = "gatewayd/gw1/cmd/models/update"
TERMINAL = {"refused", "active", "rolled_back"}
POLICY = {"shadow_readings": 6, "shadow_timeout_s": 30, "probation_readings": 10, "probation_timeout_s": 30}
#: An explicit budget where latency is not what a test is about: the default, twice the serving
#: model's p95, is noise for the test plugin's ~0.1 ms answers.
BUDGET = {"latency_budget_ms": 200}


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return generate_keypair(tmp_path / "keys")


def versioned(folder: Path, version: str, key: Path | None, **spec: Any) -> Path:
    """A signed (unless ``key`` is None) bundle for fake_plugins:Versioned."""
    folder.mkdir(parents=True)
    (folder / "model.json").write_text(json.dumps({"answer": "a", **spec}))
    write_manifest(folder, name="versioned", version=version, kind="test", quantization="none")
    if key is not None:
        sign_bundle(folder, key)
    return folder


def versioned_config(
    tmp_path: Path, broker: Mosquitto, pub: Path, v1: Path, policy: dict[str, Any], **more: Any
) -> Config:
    plugin = {
        "name": "v", "plugin": "fake_plugins:Versioned", "match": {"nodes": ["n"]}, "max_wait_ms": 5,
        "max_batch": 2, "backoff_initial_s": 0.1, "backoff_max_s": 0.4, "max_attempts": 10,
        "update": policy, "options": {"model": str(v1)},
    }  # fmt: skip
    return make_config(
        tmp_path, broker.port, models={"trusted_keys": [str(pub)], "store": str(tmp_path / "models")},
        plugins=[plugin, *more.get("plugins", [])],
    )  # fmt: skip


def update(cid: str, plugin: str, bundle: Path) -> dict[str, Any]:
    return {"id": cid, "plugin": plugin, "bundle": str(bundle)}


async def command(port: int, doc: dict[str, Any] | bytes) -> None:
    async with aiomqtt.Client("127.0.0.1", port) as c:
        await c.publish(UPDATE, doc if isinstance(doc, bytes) else json.dumps(doc).encode(), qos=1)


async def outcome(got: Collected, cid: str | None, timeout: float = 60) -> list[dict[str, Any]]:
    """The steps reported for command ``cid``, once it has reached a terminal one."""

    def steps(g: Collected) -> list[dict[str, Any]]:
        return [d for d in g.json("cmd/models/response") if d["id"] == cid]

    await got.wait(lambda g: any(d["step"] in TERMINAL for d in steps(g)), timeout)
    return steps(got)


@contextlib.asynccontextmanager
async def steady_load(
    got: Collected, ctx: aiocoap.Context, port: int, node: str, payload: Any, period_s: float = 0.02
) -> AsyncIterator[list[int]]:
    """POST ``payload`` from ``node`` every ``period_s`` until the block ends; yields the 2.04 count."""
    answered = [0]
    results = len(got.json("results/"))

    async def loop() -> None:
        for _ in range(100_000):
            resp = await post(ctx, port, node, cbor2.dumps(payload))
            assert resp.code == codes.CHANGED, resp
            answered[0] += 1
            await asyncio.sleep(period_s)

    task = asyncio.create_task(loop())
    # Results flowing: the gateway is on MQTT and subscribed (a command sent before that is lost).
    await got.wait(lambda g: len(g.json("results/")) > results, 60)
    try:
        yield answered
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def each_reading_once(got: Collected, plugin: str, answered: int) -> list[dict[str, Any]]:
    """The results of every reading stored, one each (none lost, none processed twice), in reading order.

    A POST cancelled when the load stopped may have been stored without its 2.04 reaching the
    client: there may be more readings than 2.04s, never fewer."""

    def ids(g: Collected, part: str, key: str) -> list[str]:
        return [d[key] for d in g.json(part)]

    def settled(g: Collected) -> bool:
        readings = ids(g, "readings/", "id")
        return len(readings) >= answered and set(readings) <= set(ids(g, f"results/{plugin}/", "reading_id"))

    await got.wait(settled, 60)  # times out if a reading answered 2.04 is missing or has no result
    readings = ids(got, "readings/", "id")
    results = got.json(f"results/{plugin}/")
    assert sorted(r["reading_id"] for r in results) == sorted(readings)  # once each
    return sorted(results, key=lambda r: readings.index(r["reading_id"]))


async def test_refused_updates_leave_the_serving_model_alone(
    tmp_path: Path, broker: Mosquitto, coap_client: aiocoap.Context, keys: tuple[Path, Path]
) -> None:
    """Malformed, unsigned, unloadable, disagreeing, too slow, and for a plugin that takes no bundle:
    each refused at its stage, with the reason on the response topic; v1 answers every reading."""
    priv, pub = keys
    v1 = versioned(tmp_path / "in/v1", "1.0.0", priv)
    echo = {"name": "e", "plugin": "fake_plugins:Echo", "match": {"nodes": ["x"]}}
    cfg = versioned_config(tmp_path, broker, pub, v1, POLICY, plugins=[echo])  # the default budget
    cases = [
        (b"{not json", "command", "not JSON"),
        (update("u1", "v", versioned(tmp_path / "in/u", "2.0.0", None)),
         "verify", "not signed"),
        (update("u2", "v", versioned(tmp_path / "in/f", "2.0.0", priv, fail_load=True)),
         "load", "model 2.0.0 does not load"),
        (update("u3", "v", versioned(tmp_path / "in/d", "2.0.0", priv, answer="b")),
         "shadow", "agreement 0.0% < min_agreement 90.0%"),
        (update("u4", "v", versioned(tmp_path / "in/s", "2.0.0", priv, sleep_ms=40)),
         "shadow", "ms per reading > budget"),
        (update("u5", "e", versioned(tmp_path / "in/e", "2.0.0", priv)),
         "load", "plugin 'echo' takes no model bundle"),
    ]  # fmt: skip
    async with collect(broker.port) as got, running(cfg):
        async with steady_load(got, coap_client, cfg.coap.port, "n", {"x": 1}) as answered:
            for doc, stage, error in cases:
                await command(broker.port, doc)
                steps = await outcome(got, None if isinstance(doc, bytes) else doc["id"])
                assert steps[-1]["step"] == "refused", steps
                assert (steps[-1]["stage"], error in steps[-1]["error"]) == (stage, True), steps[-1]
        results = await each_reading_once(got, "v", answered[0])
    assert {r["version"] for r in results} == {"1.0.0"}
    assert answered[0] > 20
    shadow = next(d for d in got.json("cmd/models/response") if d["step"] == "shadow" and d["id"] == "u4")
    assert shadow["p95_ms"]["new"] > shadow["budget_ms"] > 0
    # Nothing refused stays installed: the store holds no version of either plugin.
    assert not any(p.name[0].isdigit() for p in (tmp_path / "models").glob("*/*"))


async def test_swap_under_load_then_a_failing_update_is_rolled_back(
    tmp_path: Path, broker: Mosquitto, coap_client: aiocoap.Context, keys: tuple[Path, Path]
) -> None:
    """v2 goes through shadow and probation to active under steady load: every reading has one
    result, v1's before v2's; v2 again is a refused rollback; v3 fails on probation and v2 comes
    back; after a restart v2 (the model store's current) serves, not the configured v1."""
    priv, pub = keys
    v1 = versioned(tmp_path / "in/v1", "1.0.0", priv)
    cfg = versioned_config(tmp_path, broker, pub, v1, POLICY | BUDGET)
    fails_on_probation = POLICY["shadow_readings"] + 4
    async with collect(broker.port) as got:
        async with running(cfg):
            async with steady_load(got, coap_client, cfg.coap.port, "n", {"x": 1}) as answered:
                await command(
                    broker.port,
                    update("u1", "v", versioned(tmp_path / "in/v2", "2.0.0", priv)),
                )
                assert [d["step"] for d in await outcome(got, "u1")] == [
                "received", "verified", "installed", "loaded", "shadow", "switched", "active"
            ]  # fmt: skip
                await command(
                    broker.port,
                    update("u2", "v", versioned(tmp_path / "in/v2b", "2.0.0", priv)),
                )
                assert "rollback refused" in (await outcome(got, "u2"))[-1]["error"]
                v3 = versioned(tmp_path / "in/v3", "3.0.0", priv, fail_after=fails_on_probation)
                await command(broker.port, update("u3", "v", v3))
                steps = await outcome(got, "u3")
                await got.wait(lambda g: g.json("results/v/")[-1]["version"] == "2.0.0")
            results = await each_reading_once(got, "v", answered[0])
        assert [d["step"] for d in steps][-3:] == ["shadow", "switched", "rolled_back"]
        assert "model 3.0.0 fails" in steps[-1]["reason"] and steps[-1]["to"] == "2.0.0"
        versions = [r["version"] for r in results]
        first_v2 = versions.index("2.0.0")
        assert set(versions[:first_v2]) == {"1.0.0"} and "1.0.0" not in versions[first_v2:]
        assert versions.count("3.0.0") >= 1 and versions[-1] == "2.0.0"
        store = ModelStore(tmp_path / "models")
        assert (store.current("v"), store.previous("v")) == (tmp_path / "models/v/2.0.0", None)

        async with running(cfg):  # the update outlives a restart
            resp = await post(coap_client, cfg.coap.port, "n", cbor2.dumps({"x": 2}))
            assert resp.code == codes.CHANGED
            await got.wait(lambda g: g.json("results/v/")[-1]["reading_id"] == g.json("readings/")[-1]["id"])
        assert got.json("readings/")[-1]["fields"] == {"x": 2}
        assert got.json("results/v/")[-1]["version"] == "2.0.0"


def glm_version(src: Path, folder: Path, version: str, key: Path) -> Path:
    """The shipped GLM bundle as version ``version``, signed."""
    shutil.copytree(src, folder)
    for f in ("manifest.json", "manifest.sig"):
        (folder / f).unlink(missing_ok=True)
    m = read_manifest(src)
    write_manifest(folder, name=m.name, version=version, kind=m.kind, quantization=m.quantization,
                   input_schema=m.input_schema, extra=m.extra)  # fmt: skip
    sign_bundle(folder, key)
    return folder


async def test_glm_model_swapped_under_load(
    tmp_path: Path, broker: Mosquitto, coap_client: aiocoap.Context, keys: tuple[Path, Path]
) -> None:
    """The real GLM plugin: 1.1.0 replaces 1.0.0 while orders keep coming; each order has one
    intent, the right one, from 1.0.0 until the switch and from 1.1.0 after it."""
    from gatewayd_glm.plugin import GlmPlugin

    priv, pub = keys
    shipped = GlmPlugin({}).bundle
    v1 = glm_version(shipped, tmp_path / "in/v1", "1.0.0", priv)
    v2 = glm_version(shipped, tmp_path / "in/v2", "1.1.0", priv)
    plugin = {"name": "intent", "plugin": "glm", "max_wait_ms": 5, "max_batch": 4, "update": POLICY | BUDGET,
              "options": {"bundle": str(v1)}}  # fmt: skip
    cfg = make_config(
        tmp_path, broker.port, models={"trusted_keys": [str(pub)], "store": str(tmp_path / "models")},
        plugins=[plugin],
    )  # fmt: skip
    order = {"text": "a large americano, no sugar"}
    async with collect(broker.port) as got:
        async with running(cfg):
            async with steady_load(got, coap_client, cfg.coap.port, "kiosk", order) as answered:
                await command(broker.port, update("g1", "intent", v2))
                steps = await outcome(got, "g1")
                switched = answered[0]
                await got.wait(lambda g: len(g.json("results/intent/")) >= switched + 5, 60)
            results = await each_reading_once(got, "intent", answered[0])
        assert [d["step"] for d in steps][-3:] == ["shadow", "switched", "active"], steps
        shadow = next(d for d in steps if d["step"] == "shadow")
        assert shadow["agreement"] == 1.0 and shadow["readings"] >= POLICY["shadow_readings"]
    versions = [r["model"]["version"] for r in results]
    first = versions.index("1.1.0")
    assert set(versions[:first]) == {"1.0.0"} and set(versions[first:]) == {"1.1.0"}
    assert all(r["intent"]["item"] == "americano" and r["intent"]["size"] == "large" for r in results)


def test_parse_command_names_what_is_wrong() -> None:
    ok = parse_command(json.dumps({"id": "a", "plugin": "glm", "bundle": "/srv/b"}).encode(), ["glm"])
    assert ok == UpdateCommand("glm", Path("/srv/b"), "a")
    for payload, message in [
        (b"{", "not JSON"),
        (b'{"plugin": "x", "bundle": "/b"}', "plugin 'x' is not configured (configured: glm)"),
        (b'{"plugin": "glm", "bundle": "rel/b"}', "bundle must be an absolute path"),
        (b'{"plugin": "glm", "bundle": "/b", "url": "http://x"}', "unknown key(s): url"),
    ]:
        with pytest.raises(UpdateError) as e:
            parse_command(payload, ["glm"])
        assert e.value.step == "command" and e.value.reason.startswith(message), e.value.reason


def test_rollback_without_a_previous_bundle_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(UpdateError, match="no previous bundle"):
        ModelStore(tmp_path).rollback("glm")


def test_model_store_keeps_current_and_previous_and_prunes_the_rest(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    priv, pub = keys
    store = ModelStore(tmp_path / "models")
    for i, v in enumerate(("1.0.0", "1.1.0", "1.2.0")):
        store.install("v", versioned(tmp_path / f"in/{i}", v, priv), [pub], require_signature=True)
        store.activate("v", v)
    assert store.prune("v") == ["1.0.0"]
    assert (store.current("v"), store.previous("v")) == (
        tmp_path / "models/v/1.2.0",
        tmp_path / "models/v/1.1.0",
    )
    with pytest.raises(Exception, match="rollback refused"):
        store.install("v", versioned(tmp_path / "in/old", "1.1.0", priv), [pub], require_signature=True)
    assert store.rollback("v") == tmp_path / "models/v/1.1.0" and store.previous("v") is None


def test_commands_are_refused_without_trusted_keys(tmp_path: Path) -> None:
    """Unsigned bundles cannot be pushed: with no [models] trusted_keys every command is refused."""
    reports: list[dict[str, Any]] = []
    runners: dict[str, Any] = {"v": object()}  # never reached: the refusal comes first
    updater = Updater(ModelStore(tmp_path), runners, reports.append, trusted_keys=[], require_signature=False)
    updater.submit(json.dumps(update("u1", "v", tmp_path / "b")).encode())
    assert [(r["step"], r["stage"]) for r in reports] == [("refused", "command")]
    assert "need signed bundles" in reports[0]["error"]
