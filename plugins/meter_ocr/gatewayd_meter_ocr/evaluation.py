"""Scores a :class:`MeterReader` on rendered frames with known values.

Each frame is recognised once; the extraction is then scored two ways from the same regions:

``configured``  the meter's ``digits`` and ``decimals`` are given, as a deployed camera's config
                would (one camera watches one meter): the intended way to run the reader.
``open``        nothing is known but the default pattern: how far the rule alone gets.

A read counts as ``correct`` when the value string equals the rendered one exactly (leading zeros
and decimals included), ``uncertain`` when the reader declined (value None), and ``wrong`` when it
answered confidently with another value: the outcome that must not happen.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from gatewayd_meter_ocr.frames import Frame, dataset
from gatewayd_meter_ocr.reader import MeterReader, ReaderOptions

MODES = ("configured", "open")
STAGES = ("decode", "det", "rec", "reread", "verify", "extract")


@dataclass
class Tally:
    n: int = 0
    correct: int = 0
    uncertain: int = 0
    wrong: int = 0
    latencies_ms: list[float] = field(default_factory=list)

    def add(self, got: str | None, truth: str, ms: float) -> None:
        """Count one read: correct, uncertain (no value) or wrong (a confident other value)."""
        self.n += 1
        self.latencies_ms.append(ms)
        if got == truth:
            self.correct += 1
        elif got is None:
            self.uncertain += 1
        else:
            self.wrong += 1

    def line(self, name: str) -> str:
        lat = np.asarray(self.latencies_ms) if self.latencies_ms else np.zeros(1)
        return (
            f"{name:<10} n={self.n:<4} exact={self.correct / max(self.n, 1):6.1%} "
            f"uncertain={self.uncertain:<3} wrong={self.wrong:<3} "
            f"p50={np.percentile(lat, 50):6.0f} ms  p95={np.percentile(lat, 95):6.0f} ms"
        )


@dataclass
class Report:
    tallies: dict[str, dict[str, Tally]]  # mode -> style (and "all") -> tally
    failures: list[str]  # one line per wrong (and, verbose, uncertain) read
    stage_ms: dict[str, dict[str, float]]  # mode -> stage -> mean ms per frame

    def text(self) -> str:
        out = []
        for mode, per_style in self.tallies.items():
            mean = ", ".join(f"{k} {v:.0f}" for k, v in self.stage_ms[mode].items())
            out.append(f"[{mode}]  mean ms per frame: {mean}")
            out.extend(per_style[s].line(s) for s in sorted(per_style, key=lambda s: (s == "all", s)))
        return "\n".join(out + self.failures)


def evaluate(
    frames: Sequence[Frame],
    options: ReaderOptions | None = None,
    *,
    verbose: bool = False,
    reader: MeterReader | None = None,
) -> Report:
    base = options or ReaderOptions()
    reader = reader or MeterReader(base)
    reader.read(frames[0].image)  # warm-up: the first run allocates; not a frame's latency
    tallies: dict[str, dict[str, Tally]] = {m: {} for m in MODES}
    failures: list[str] = []
    stages = {m: dict.fromkeys(STAGES, 0.0) for m in MODES}
    for fr in frames:
        scan = reader.scan(fr.image)
        per_mode = {
            "configured": dataclasses.replace(base, digits=fr.digits, decimals=fr.decimals),
            "open": base,
        }
        for mode, opts in per_mode.items():
            out = reader.finish(scan, opts)
            # Latency of one read: the shared scan plus this mode's own extraction, re-read, verify.
            ms = out.timings["total"]
            for stage in STAGES:
                stages[mode][stage] += out.timings.get(stage, 0.0) / len(frames)
            for key in (fr.style, "all"):
                tallies[mode].setdefault(key, Tally()).add(out.value, fr.value, ms)
            # Open-mode misses are expected (a missed point cannot be noticed): listed only if verbose.
            wrong = out.value is not None and out.value != fr.value
            if (wrong and (mode == "configured" or verbose)) or (verbose and out.value is None):
                kind = "WRONG" if out.value is not None else "uncertain"
                failures.append(
                    f"{kind:<9} {mode:<10} seed={fr.seed} {fr.style:<8} truth={fr.value} "
                    f"read={out.value} reason={out.reason} conf={out.confidence:.2f} text={out.text!r}"
                )
    return Report(tallies, failures, stages)


Seen = tuple[Tally, list[str | None]]  # a reader's tally, and the value it gave for each frame


def compare(frames: Sequence[Frame], readers: Mapping[str, MeterReader]) -> dict[str, Seen]:
    """Each frame read by every reader in one run (digits and decimals configured, as deployed),
    alternating which goes first; per reader its tally and the value it gave for each frame."""
    for r in readers.values():
        r.read(frames[0].image)  # warm-up
    out: dict[str, Seen] = {name: (Tally(), []) for name in readers}
    names = list(readers)
    for i, fr in enumerate(frames):
        for name in names if i % 2 == 0 else reversed(names):
            reader = readers[name]
            opts = dataclasses.replace(reader.options, digits=fr.digits, decimals=fr.decimals)
            t0 = time.perf_counter()
            value = reader.read(fr.image, opts).value
            out[name][0].add(value, fr.value, (time.perf_counter() - t0) * 1e3)
            out[name][1].append(value)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Exact-match accuracy and latency of the meter reader.")
    p.add_argument("--split", choices=("eval", "calibration"), default="eval")
    p.add_argument("--n", type=int, default=201)
    p.add_argument("--det-model")
    p.add_argument("--rec-model")
    p.add_argument("--limit-side-len", type=int, default=ReaderOptions.limit_side_len)
    p.add_argument("--threads", type=int, default=ReaderOptions.threads)
    p.add_argument("--min-confidence", type=float, default=ReaderOptions.min_confidence)
    p.add_argument("--tailed-sevens", action="store_true", help="the stress set: 7-segment 7s with a tail")
    p.add_argument("-v", "--verbose", action="store_true", help="also list uncertain and open-mode reads")
    args = p.parse_args(argv)
    opts = ReaderOptions(
        det_model=args.det_model,
        rec_model=args.rec_model,
        limit_side_len=args.limit_side_len,
        threads=args.threads,
        min_confidence=args.min_confidence,
    )
    t0 = time.perf_counter()
    frames = dataset(args.split, args.n, tailed_sevens=args.tailed_sevens)
    t1 = time.perf_counter()
    report = evaluate(frames, opts, verbose=args.verbose)
    t2 = time.perf_counter()
    print(report.text())
    print(
        f"render {t1 - t0:.1f} s, read {t2 - t1:.1f} s for {len(frames)} frames "
        f"(limit_side_len={opts.limit_side_len}, threads={opts.threads})",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
