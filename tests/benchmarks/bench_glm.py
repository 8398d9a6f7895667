#!/usr/bin/env python3
"""GLM plugin benchmark: prefix reuse, INT8 vs FP32, and the gateway end to end vs direct.

    .venv/bin/python plugins/glm/make_model.py --work /tmp/glm   # once: keeps the FP32 bundle there
    .venv/bin/python tests/benchmarks/bench_glm.py --fp32 /tmp/glm/fp32 [--requests 200] [--e2e 100]

1. Time to first token for a request of ~20 tokens after the ~200-token system prompt: with the
   prompt's KV cache kept and rewound to (what the plugin does) vs a cold prefill of prompt and
   request in a fresh generator. Shipped INT8 bundle; the same requests, interleaved.
2. INT8 vs FP32: bundle size, and decode tokens/s (the tokens after the first, greedy, on the
   held-out requests; one request each in turn), with exact match and agreement of the intents.
3. Gateway end to end (``gatewayd run`` in its own process, CBOR ``{"text": ...}`` POSTs from 4
   clients, results from MQTT) vs the plugin's own answer called directly in this process on the
   same texts, one after another: requests/s, and whether both gave the same intents.

All parts use one intra-op thread (``--threads``). Not a pytest test.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cbor2
import onnxruntime_genai as og
from gatewayd_glm import intents
from gatewayd_glm.plugin import GlmPlugin
from plugin_e2e import run_plugin_e2e

from gatewayd.codec import CF_CBOR
from gatewayd.testing import reading


def loaded(bundle: str, threads: int) -> GlmPlugin:
    plugin = GlmPlugin({"bundle": bundle})
    plugin.threads = threads
    plugin.load()
    return plugin


def folder_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


def ttft(plugin: GlmPlugin, texts: list[str]) -> tuple[list[float], list[float], int, float]:
    """(warm ms, cold ms, prefix tokens, mean request tokens): first token after the request."""
    kept = plugin._generators["normal"]
    prefix = plugin._encode(intents.prefix_text(plugin.settings.system_prompt))
    requests = [plugin._encode(intents.request_text(t)) for t in texts]
    warm: list[float] = []
    cold: list[float] = []
    far = time.perf_counter() + 3600
    assert plugin._model is not None
    for i, req in enumerate(requests):
        for kind in ("warm", "cold") if i % 2 else ("cold", "warm"):
            t0 = time.perf_counter()
            if kind == "warm":
                kept.run(req, 1, far)
                warm.append((time.perf_counter() - t0) * 1000)
            else:
                params = og.GeneratorParams(plugin._model)
                params.set_search_options(max_length=len(prefix) + len(req) + 4, do_sample=False)
                fresh = og.Generator(plugin._model, params)
                fresh.append_tokens([*prefix, *req])
                fresh.generate_next_token()
                fresh.get_next_tokens()
                cold.append((time.perf_counter() - t0) * 1000)
    return warm, cold, len(prefix), statistics.fmean(len(r) for r in requests)


def decode(plugin: GlmPlugin, texts: list[str]) -> tuple[float, list[dict[str, Any]]]:
    """(decode tokens/s over all requests, the answers)."""
    tokens = 0
    seconds = 0.0
    answers = []
    for i, t in enumerate(texts):
        a = plugin._answer(reading(id=str(i), text=t))
        if a.get("tokens_out", 0) > 1:
            tokens += a["tokens_out"] - 1
            seconds += (a["tokens_out"] - 1) / a["decode_tokens_per_s"]
        answers.append(a)
    return tokens / seconds, answers


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fp32", help="the FP32 bundle made by make_model.py (--work DIR keeps it in DIR/fp32)")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--e2e", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    a = args
    print(f"# bench_glm: {a.requests} requests, {a.e2e} e2e, threads {a.threads}, {os.cpu_count()} CPUs")
    held = intents.examples("heldout", args.requests, seed=7)
    texts = [t for t, _ in held]
    int8 = loaded("int8", args.threads)

    warm, cold, n_prefix, n_req = ttft(int8, texts[:100])
    print(
        f"TTFT, INT8: {n_prefix}-token system prompt + {n_req:.0f}-token request (mean), {len(warm)} requests"
    )
    print(f"  prefix reused   p50 {statistics.median(warm):7.2f} ms  mean {statistics.fmean(warm):7.2f} ms")
    print(f"  cold prefill    p50 {statistics.median(cold):7.2f} ms  mean {statistics.fmean(cold):7.2f} ms")
    print(f"  speed-up p50 {statistics.median(cold) / statistics.median(warm):.2f}x")

    rate8, answers8 = decode(int8, texts)
    exact8 = sum(a.get("intent") == want for a, (_, want) in zip(answers8, held, strict=True))
    report = "{} bundle {:6.2f} MB  decode {:8.1f} tok/s  exact {:.1%}"
    print(report.format("INT8", folder_mb(int8.bundle), rate8, exact8 / len(held)))
    if args.fp32:
        fp32 = loaded(args.fp32, args.threads)
        rate32, answers32 = decode(fp32, texts)
        rate8b, _ = decode(int8, texts)  # again, after FP32: both measured in turn in this run
        exact32 = sum(a.get("intent") == want for a, (_, want) in zip(answers32, held, strict=True))
        same = sum(a.get("intent") == b.get("intent") for a, b in zip(answers8, answers32, strict=True))
        print(report.format("FP32", folder_mb(fp32.bundle), rate32, exact32 / len(held)))
        print(
            f"INT8 vs FP32: {folder_mb(fp32.bundle) / folder_mb(int8.bundle):.2f}x smaller, decode "
            f"{statistics.fmean([rate8, rate8b]) / rate32:.2f}x faster; {same}/{len(held)} identical intents"
        )

    if args.e2e:
        e2e_texts = texts[: args.e2e]
        t0 = time.perf_counter()
        direct = [int8._answer(reading(id=str(i), text=t)) for i, t in enumerate(e2e_texts)]
        d_rate = len(e2e_texts) / (time.perf_counter() - t0)
        payloads = [(cbor2.dumps({"text": t}), CF_CBOR) for t in e2e_texts]
        with tempfile.TemporaryDirectory(prefix="bench-glm-") as wd:
            run = asyncio.run(
                run_plugin_e2e("glm", {}, payloads, Path(wd), threads=args.threads, node_prefix="kiosk")
            )
        same = sum(a.get("intent") == b.get("intent") for a, b in zip(direct, run.results, strict=True))
        print(f"direct plugin answer      {d_rate:7.1f} requests/s")
        print(
            f"gateway CoAP->MQTT        {run.rate:7.1f} requests/s   (exit {run.exit_code}; "
            f"{same}/{len(e2e_texts)} same intents as direct)"
        )
        print(f"gateway / direct: {run.rate / d_rate:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
