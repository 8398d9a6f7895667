#!/usr/bin/env python3
"""GLM plugin benchmark: prefix reuse, INT8 vs FP32, and the gateway end to end vs direct.

    .venv/bin/python plugins/glm/make_model.py --work /tmp/glm   # once: keeps the FP32 bundle there
    .venv/bin/python tests/benchmarks/bench_glm.py --fp32 /tmp/glm/fp32 [--requests 200] [--e2e 100]

1. Time to first token for a request of 18-22 tokens (held-out texts of that length) after the
   ~200-token system prompt: with the prompt's KV cache kept and rewound to (what the plugin does)
   vs a cold prefill of prompt and request in a fresh generator. Shipped INT8 bundle; the same
   requests, the two kinds interleaved.
2. INT8 vs FP32: bundle size, and decode tokens/s as the plugin publishes it (the tokens after the
   first, greedy, on the held-out requests; INT8, FP32, INT8 again), with exact match and agreement
   of the answers (:mod:`gatewayd_glm.evaluation`, as make_model.py scores them).
3. Gateway end to end (``gatewayd run`` in its own process, CBOR ``{"text": ...}`` POSTs from 8
   nodes, results from MQTT) vs the plugin's own answer called directly in this process on the
   same texts, one after another: requests/s, and whether both gave the same answers; ``--rounds``
   times, the two in turn, and the median ratio.

All parts use one intra-op thread (``--threads``). Not a pytest test.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cbor2
import onnxruntime_genai as og
from gatewayd_glm import intents
from gatewayd_glm.evaluation import HELDOUT_SEED, answer, evaluate, loaded
from gatewayd_glm.plugin import GlmPlugin
from plugin_e2e import run_plugin_e2e

from gatewayd.codec import CF_CBOR

#: The end-to-end part's nodes (one CON in flight each) and the plugin's batch: the GLM README's
#: recommended ``max_batch``; the plugin answers a batch one request after another, so a batch only
#: spares the worker round trips.
E2E_NODES = 8
E2E_MAX_BATCH = 16
#: The gateway's plugin worker gets the last CPU (``cpus``), everything else here (the nodes, the
#: broker, gatewayd's own process) the others: on a gateway the nodes are other devices, and a 2-CPU
#: test machine otherwise has them preempt the worker. The direct run uses the worker's CPU: the same
#: core does the model's work on both sides.
WORKER_CPU = (os.cpu_count() or 1) - 1

#: Request lengths (tokens, with the request framing) of the TTFT part: the issue's "20-token request".
TTFT_TOKENS = range(18, 23)


def folder_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


def ttft_requests(plugin: GlmPlugin, n: int) -> list[list[int]]:
    """The first ``n`` held-out requests whose encoding is 18-22 tokens long."""
    pool = intents.examples("heldout", 40 * n, seed=HELDOUT_SEED)
    encoded = (plugin._encode(intents.request_text(t)) for t, _ in pool)
    picked = list(itertools.islice((r for r in encoded if len(r) in TTFT_TOKENS), n))
    if len(picked) < n:
        raise SystemExit(f"only {len(picked)} held-out requests of {TTFT_TOKENS} tokens, not {n}")
    return picked


def ttft(plugin: GlmPlugin, requests: list[list[int]]) -> tuple[list[float], list[float], int]:
    """(warm ms, cold ms, prefix tokens): first token after the request, the two kinds interleaved."""
    kept = plugin._generators["normal"]
    prefix = plugin._encode(intents.prefix_text(plugin.settings.system_prompt))
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
    return warm, cold, len(prefix)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fp32", help="the FP32 bundle made by make_model.py (--work DIR keeps it in DIR/fp32)")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--ttft", type=int, default=100, help="requests of 18-22 tokens for the TTFT part")
    p.add_argument("--e2e", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3, help="direct and gateway e2e runs, in turn")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    print(
        f"# bench_glm: {args.requests} requests, {args.ttft} TTFT, {args.e2e} e2e, threads {args.threads}, "
        f"{os.cpu_count()} CPUs"
    )
    held = intents.examples("heldout", args.requests, seed=HELDOUT_SEED)
    int8 = loaded("int8", args.threads)

    requests = ttft_requests(int8, args.ttft)
    warm, cold, n_prefix = ttft(int8, requests)
    n_req = statistics.fmean(len(r) for r in requests)
    print(
        f"TTFT, INT8: {n_prefix}-token system prompt + request of {n_req:.1f} tokens "
        f"(mean; {min(map(len, requests))}-{max(map(len, requests))}), {len(warm)} requests"
    )
    print(f"  prefix reused   p50 {statistics.median(warm):7.2f} ms  mean {statistics.fmean(warm):7.2f} ms")
    print(f"  cold prefill    p50 {statistics.median(cold):7.2f} ms  mean {statistics.fmean(cold):7.2f} ms")
    print(f"  speed-up p50 {statistics.median(cold) / statistics.median(warm):.2f}x")

    s8 = evaluate(int8, held)
    report = "{} bundle {:6.2f} MB  decode {:8.1f} tok/s  exact {:.1%}"
    print(report.format("INT8", folder_mb(int8.bundle), s8.decode_tokens_per_s, s8.exact))
    if args.fp32:
        fp32 = loaded(args.fp32, args.threads)
        s32 = evaluate(fp32, held)
        s8b = evaluate(int8, held)  # again, after FP32: both measured in turn in this run
        rate8 = statistics.fmean([s8.decode_tokens_per_s, s8b.decode_tokens_per_s])
        same = sum(answer(a) == answer(b) for a, b in zip(s8.results, s32.results, strict=True))
        print(report.format("FP32", folder_mb(fp32.bundle), s32.decode_tokens_per_s, s32.exact))
        print(
            f"INT8 vs FP32: {folder_mb(fp32.bundle) / folder_mb(int8.bundle):.2f}x smaller, decode "
            f"{rate8 / s32.decode_tokens_per_s:.2f}x faster; {same}/{len(held)} identical answers"
        )

    if args.e2e:
        e2e = held[: args.e2e]
        payloads = [(cbor2.dumps({"text": t}), CF_CBOR) for t, _ in e2e]
        ratios = []
        for rnd in range(1, args.rounds + 1):  # direct and gateway in turn: the machine's drift hits both
            os.sched_setaffinity(0, {WORKER_CPU})
            t0 = time.perf_counter()
            direct = evaluate(int8, e2e).results
            d_rate = len(e2e) / (time.perf_counter() - t0)
            if WORKER_CPU > 0:
                os.sched_setaffinity(0, set(range(WORKER_CPU)))
            with tempfile.TemporaryDirectory(prefix="bench-glm-") as wd:
                run = asyncio.run(
                    run_plugin_e2e(
                        "glm", {}, payloads, Path(wd), threads=args.threads, node_prefix="kiosk",
                        clients=E2E_NODES, max_batch=E2E_MAX_BATCH, cpus=[WORKER_CPU],
                    )
                )  # fmt: skip
            same = sum(answer(a) == answer(b) for a, b in zip(direct, run.results, strict=True))
            ratios.append(run.rate / d_rate)
            print(
                f"round {rnd}: direct {d_rate:6.1f} req/s, gateway CoAP->MQTT {run.rate:6.1f} req/s "
                f"= {ratios[-1]:.2f}  (exit {run.exit_code}; {same}/{len(e2e)} same answers as direct)"
            )
        print(f"gateway / direct: median {statistics.median(ratios):.2f} of {len(ratios)} rounds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
