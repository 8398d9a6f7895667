"""The GLM plugin end to end: text over real CoAP -> the shipped INT8 bundle on onnxruntime-genai -> MQTT."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import aiocoap
import cbor2
import pytest
from aiocoap.numbers import codes
from conftest import collect, make_config, post, running
from gatewayd_glm.plugin import GlmPlugin

from gatewayd.bundle import generate_keypair, sign_bundle
from gatewayd.testing import Mosquitto, reading, run_plugin

#: Orders and commands the shipped model must get right (none of them in its training set).
KNOWN: dict[str, tuple[str, dict[str, Any]]] = {
    "kiosk-zh": (
        "我要一杯美式咖啡",
        {"intent": "order", "item": "americano", "size": "medium", "quantity": 1, "sugar": "normal",
         "milk": "none", "temperature": "hot"},
    ),
    "kiosk-en": (
        "a large americano, no sugar",
        {"intent": "order", "item": "americano", "size": "large", "quantity": 1, "sugar": "none",
         "milk": "none", "temperature": "hot"},
    ),
    "terminal-zh": (
        "关闭3区的水泵",
        {"intent": "device", "device": "pump", "action": "off", "zone": 3},
    ),
}  # fmt: skip


# The shipped bundle comes from plugins/glm/make_model.py; these tests fail (not skip) without it.


def bundle_copy(tmp_path: Path, name: str = "bundle") -> Path:
    return Path(shutil.copytree(GlmPlugin({}).bundle, tmp_path / name))


async def test_orders_become_intents_and_bad_text_gets_clear_results(
    tmp_path: Path, broker: Mosquitto, coap_client: aiocoap.Context
) -> None:
    """A Chinese and an English order and a device command give their intents; text that is not a
    string, empty, or over max_input_tokens gives an error result saying so; a body over the CoAP
    limit is 4.13; the plugin keeps answering afterwards."""
    cfg = make_config(
        tmp_path,
        broker.port,
        coap={"max_body_bytes": 2048},
        plugins=[{"name": "intent", "plugin": "glm", "match": {"fields": ["text"]}, "max_wait_ms": 5,
                  "options": {"max_input_tokens": 48}}],
    )  # fmt: skip
    bad = {
        "bad-type": {"text": 42},
        "bad-bytes": {"text": "咖啡".encode()},
        "bad-empty": {"text": "  "},
        "bad-long": {"text": "please bring me a coffee " * 20},
    }
    async with collect(broker.port, "gatewayd/gw1/results/#") as got, running(cfg):
        port = cfg.coap.port
        for node, (text, _) in KNOWN.items():
            resp = await post(coap_client, port, node, cbor2.dumps({"text": text}))
            assert resp.code == codes.CHANGED, resp
        for node, body in bad.items():
            assert (await post(coap_client, port, node, cbor2.dumps(body))).code == codes.CHANGED
        huge = await post(coap_client, port, "bad-huge", cbor2.dumps({"text": "咖啡" * 2000}))
        assert huge.code == codes.REQUEST_ENTITY_TOO_LARGE and huge.opt.size1 == 2048
        again = await post(coap_client, port, "kiosk-again", cbor2.dumps({"text": KNOWN["kiosk-en"][0]}))
        assert again.code == codes.CHANGED

        def by_node(g: object) -> dict[str, dict[str, Any]]:
            return {m["node"]: m for m in got.json("results/intent/")}

        await got.wait(lambda g: len(by_node(g)) == len(KNOWN) + len(bad) + 1, timeout=120)

    results = by_node(got)
    for node, (text, intent) in [*KNOWN.items(), ("kiosk-again", KNOWN["kiosk-en"])]:
        r = results[node]
        assert r["intent"] == intent and r["text"] == text, (node, r)
        assert r["model"]["quantization"] == "int8" and r["attempts"] == 1
        assert r["tokens_in"] > 0 and r["tokens_out"] > 0 and r["ttft_ms"] > 0
        assert r["decode_tokens_per_s"] > 0
    assert results["bad-type"]["error"] == "field 'text' is a int, not a text string"
    assert results["bad-bytes"]["error"] == "field 'text' is a bytes, not a text string"
    assert results["bad-empty"]["error"] == "empty text"
    too_long = results["bad-long"]["error"]
    assert too_long.startswith("text too long:") and "> max_input_tokens 48" in too_long
    assert all("intent" not in results[n] for n in bad)


async def test_tampered_bundle_is_refused_at_load_with_a_clear_log_line(
    tmp_path: Path, broker: Mosquitto, coap_client: aiocoap.Context, caplog: pytest.LogCaptureFixture
) -> None:
    """One flipped byte in the model's weights: the worker refuses the bundle (naming the file), the
    plugin stays out of service, and readings are still stored and published."""
    bundle = bundle_copy(tmp_path)
    weights = max((p for p in bundle.iterdir() if p.name != "manifest.json"), key=lambda p: p.stat().st_size)
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(data)
    cfg = make_config(
        tmp_path,
        broker.port,
        plugins=[{"name": "intent", "plugin": "glm", "options": {"bundle": str(bundle)},
                  "backoff_initial_s": 0.2}],
    )  # fmt: skip
    with caplog.at_level(logging.WARNING):
        async with collect(broker.port) as got, running(cfg):
            await got.wait(lambda g: any(m["state"] == "backoff" for m in g.json("status/plugins/intent")))
            resp = await post(coap_client, cfg.coap.port, "kiosk", cbor2.dumps({"text": "一杯拿铁"}))
            await got.wait(lambda g: g.json("readings/kiosk"))
            detail = " ".join(m["detail"] for m in got.json("status/plugins/intent"))
    assert resp.code == codes.CHANGED
    assert "model bundle refused" in detail and weights.name in detail and "sha256 mismatch" in detail
    refusals = [r for r in caplog.records if "model bundle refused" in r.getMessage()]
    assert refusals and weights.name in refusals[0].getMessage()


async def test_the_gateways_signature_policy_reaches_the_plugin_workers(
    tmp_path: Path, broker: Mosquitto, coap_client: aiocoap.Context
) -> None:
    """With a trusted key in [models], the daemon's worker refuses the unsigned bundle; the same
    bundle signed with that key loads and answers."""
    unsigned, signed = bundle_copy(tmp_path), bundle_copy(tmp_path, "signed")
    private, public = generate_keypair(tmp_path / "keys", "vendor")
    sign_bundle(signed, private)
    plugins = [
        {"name": name, "plugin": "glm", "options": {"bundle": str(folder)}, "match": {"nodes": [f"{name}-*"]},
         "backoff_initial_s": 0.2}
        for name, folder in (("unsigned", unsigned), ("signed", signed))
    ]  # fmt: skip
    cfg = make_config(tmp_path, broker.port, models={"trusted_keys": [str(public)]}, plugins=plugins)
    async with collect(broker.port) as got, running(cfg):
        await got.wait(lambda g: any(m["state"] == "backoff" for m in g.json("status/plugins/unsigned")))
        resp = await post(coap_client, cfg.coap.port, "signed-1", cbor2.dumps({"text": KNOWN["kiosk-zh"][0]}))
        await got.wait(lambda g: g.json("results/signed/"), timeout=60)
        detail = " ".join(m["detail"] for m in got.json("status/plugins/unsigned"))
    assert resp.code == codes.CHANGED
    assert "not signed and this gateway requires a signature" in detail
    assert got.json("results/signed/")[0]["intent"] == KNOWN["kiosk-zh"][1]


def test_plugin_options_are_checked_with_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="temperature"):
        GlmPlugin({"temperature": 0.7})
    with pytest.raises(ValueError, match="max_output_tokens"):
        GlmPlugin({"max_output_tokens": 0})
    bad_schema = tmp_path / "schema.json"
    bad_schema.write_text('{"type": "no-such-type"}')
    with pytest.raises(ValueError, match="schema"):
        GlmPlugin({"schema": str(bad_schema)})


def test_invalid_output_is_retried_then_an_error_result_with_the_raw_text(tmp_path: Path) -> None:
    """A schema the model's answers can never match: each request is tried under both prompts, then
    published as an error with what the model said."""
    schema = tmp_path / "schema.json"
    schema.write_text('{"type": "object", "required": ["never"]}')
    results = run_plugin(GlmPlugin, [reading(id="r-1", text=KNOWN["kiosk-en"][0])], {"schema": str(schema)})
    r = results[0].data
    assert r["attempts"] == 2 and r["error"].startswith("invalid intent: schema") and "never" in r["error"]
    assert r["raw"].startswith('{"') and "intent" not in r


def test_deadline_gives_an_error_result() -> None:
    results = run_plugin(GlmPlugin, [reading(id="r-1", text=KNOWN["kiosk-zh"][0])], {"deadline_ms": 0.001})
    assert results[0].data["error"].startswith("deadline_ms 0.001 exceeded")


def test_prefix_reuse_gives_the_same_answers_as_a_fresh_generator() -> None:
    """The KV cache rewound to the system prompt answers exactly as a cold prefill does."""
    plugin = GlmPlugin({})
    plugin.load()
    texts = [t for t, _ in KNOWN.values()]
    warm = [plugin._answer(reading(id=str(i), text=t))["intent"] for i, t in enumerate(texts)]
    cold = []
    for i, t in enumerate(texts):
        plugin._generators.clear()  # a fresh generator and a full prefill for each request
        plugin._generators["normal"] = plugin._generator(plugin.settings.system_prompt)
        cold.append(plugin._answer(reading(id=str(i), text=t))["intent"])
    assert warm == cold == [intent for _, intent in KNOWN.values()]
