#!/usr/bin/env python3
"""Meter OCR benchmark: the shipped pipeline (INT8 detector) vs all-FP32, and the gateway end to end
vs the same pipeline called directly.

    .venv/bin/python tests/benchmarks/bench_ocr.py [--frames 200] [--e2e-frames 60] [--threads 1]

1. Accuracy and latency: the evaluation set (``gatewayd_meter_ocr.frames.dataset("eval", N)``), each
   frame read by both pipelines (and the FP32 one without ``gatewayd.graphopt``) in one run,
   alternating which goes first; the reader is told the meter's digits and decimals, as a deployed
   camera's config does. Exact match = the value string equals the rendered one (leading zeros,
   decimals); "wrong" = a confident answer that is not it.
2. Throughput: M frames of one meter format (6 digits, 1 decimal, the three styles, JPEG 8-101 KB).
   Direct: ``MeterReader.read`` on each, one after another, in this process. Gateway: ``gatewayd
   run`` (its own process) with the ``meter_ocr`` plugin (one worker, the same threads); 4 camera
   clients POST the frames block-wise (aiocoap, Content-Format 22), the clock runs from the first
   POST to the last result on MQTT. Both must give the same values.

Both parts use the same intra-op thread count (``--threads``). Not a pytest test.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from gatewayd_meter_ocr.evaluation import compare
from gatewayd_meter_ocr.frames import STYLES, Frame, dataset, render
from gatewayd_meter_ocr.plugin import MeterOcrPlugin
from gatewayd_meter_ocr.reader import MeterReader
from plugin_e2e import run_plugin_e2e

from gatewayd.codec import CF_JPEG


def pipeline(options: dict[str, object], threads: int) -> MeterReader:
    """The reader the plugin builds from ``options``, with ``threads`` intra-op threads."""
    return MeterReader(replace(MeterOcrPlugin(options).reader_options, threads=threads))


def one_format(n: int) -> list[Frame]:
    rng = random.Random(4242)
    values = [f"{rng.randrange(10**5):05d}.{rng.randrange(10)}" for _ in range(n)]
    return [render(v, STYLES[i % len(STYLES)], seed=900_000 + i, fmt="jpeg") for i, v in enumerate(values)]


#: One meter format for the throughput part: the plugin is configured for it, the frames show it.
PLUGIN_OPTIONS: dict[str, object] = {"digits": 6, "decimals": 1}


def direct(frames: list[Frame], threads: int) -> tuple[float, list[str | None]]:
    reader = pipeline(PLUGIN_OPTIONS, threads)
    reader.read(frames[0].image)
    t0 = time.perf_counter()
    values = [reader.read(fr.image).value for fr in frames]
    return len(frames) / (time.perf_counter() - t0), values


async def gateway(frames: list[Frame], threads: int, wd: Path) -> tuple[float, list[str | None], int]:
    run = await run_plugin_e2e(
        "meter_ocr",
        PLUGIN_OPTIONS,
        [(fr.image, CF_JPEG) for fr in frames],
        wd,
        threads=threads,
        node_prefix="cam",
    )
    # A reading is its "text" when it has a value (when uncertain, "text" is what was seen).
    values = [str(r["text"]) if r.get("value") is not None else None for r in run.results]
    return run.rate, values, run.exit_code


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=200)
    p.add_argument("--e2e-frames", type=int, default=60)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    print(
        f"# bench_ocr: {args.frames} eval frames, {args.e2e_frames} e2e frames, threads={args.threads}, "
        f"{os.cpu_count()} CPUs"
    )

    if args.frames:
        frames = dataset("eval", args.frames)
        readers = {v: pipeline({"detector": v}, args.threads) for v in ("fp32", "int8")}
        # The same FP32 models without gatewayd.graphopt's rewrites: what those buy.
        published = MeterReader(replace(readers["fp32"].options, optimize_graphs=False))
        seen = compare(frames, {**readers, "published": published})
        (f, f_values), (q, _), (pub, pub_values) = seen["fp32"], seen["int8"], seen["published"]
        print(f"{'pipeline':<30} {'exact':>7} {'uncertain':>9} {'wrong':>5} {'p50 ms':>7} {'mean ms':>8}")
        for name, t in (("all-FP32", f), ("shipped (INT8 det)", q), ("all-FP32, graphs as published", pub)):
            print(
                f"{name:<30} {t.correct / len(frames):7.1%} {t.uncertain:9d} {t.wrong:5d} "
                f"{statistics.median(t.latencies_ms):7.1f} {statistics.fmean(t.latencies_ms):8.1f}"
            )
        same = sum(a == b for a, b in zip(f_values, pub_values, strict=True))
        rewritten = statistics.median(f.latencies_ms) / statistics.median(pub.latencies_ms)
        print(f"graph rewrites: p50 {rewritten:.2f}x of as published, {same}/{len(frames)} same values")
        print(
            f"latency INT8-det / FP32: "
            f"p50 {statistics.median(q.latencies_ms) / statistics.median(f.latencies_ms):.2f}, "
            f"mean {statistics.fmean(q.latencies_ms) / statistics.fmean(f.latencies_ms):.2f}"
        )

    if args.e2e_frames:
        frames = one_format(args.e2e_frames)
        sizes = [len(fr.image) for fr in frames]
        print(f"e2e frames: {len(frames)}, JPEG {min(sizes) // 1024}-{max(sizes) // 1024} KB")
        d_rate, d_values = direct(frames, args.threads)
        with tempfile.TemporaryDirectory(prefix="bench-ocr-") as wd:
            g_rate, g_values, code = asyncio.run(gateway(frames, args.threads, Path(wd)))
        same = sum(a == b for a, b in zip(d_values, g_values, strict=True))
        correct = sum(v == fr.value for v, fr in zip(g_values, frames, strict=True))
        print(f"direct MeterReader.read   {d_rate:6.2f} frames/s")
        print(
            f"gateway CoAP->MQTT        {g_rate:6.2f} frames/s   (exit {code}; {same}/{len(frames)} same "
            f"values as direct, {correct} exact)"
        )
        print(f"gateway / direct: {g_rate / d_rate:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
