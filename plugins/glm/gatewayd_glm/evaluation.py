"""Scores the GLM plugin on (text, intent) examples through its own request path (``process``).

``make_model.py`` (after conversion) and ``tests/benchmarks/bench_glm.py`` both measure with this,
so the figures they print are those of what ships: the plugin's prefix-cached generator, its
encoding, limits and schema validation, and the figures it publishes with each result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gatewayd.plugin_api import Reading
from gatewayd_glm import intents
from gatewayd_glm.plugin import GlmPlugin

#: The seed of the held-out split (``intents.examples("heldout", n, HELDOUT_SEED)``) figures use.
HELDOUT_SEED = 7


def loaded(bundle: str, threads: int, **options: Any) -> GlmPlugin:
    """A loaded plugin on ``bundle`` ("int8" or a bundle folder with its manifest)."""
    plugin = GlmPlugin({"bundle": bundle, **options})
    plugin.threads = threads
    plugin.load()
    return plugin


def answer(result: dict[str, Any]) -> Any:
    """What the model said in ``result``: the intent, else its invalid text (None if it never ran)."""
    return result.get("intent", result.get("raw"))


@dataclass(frozen=True)
class Scores:
    results: list[dict[str, Any]]  # the plugin's result for each example, in order
    exact: float  # fraction whose intent is the expected one
    valid: float  # fraction with an intent at all (JSON matching the schema)
    decode_tokens_per_s: float  # over all results: their decode steps after the first / the time they took


def evaluate(plugin: GlmPlugin, examples: Sequence[tuple[str, intents.Intent]]) -> Scores:
    """Each text as one reading through ``plugin.process``, scored against its intent."""
    field = plugin.settings.field
    readings = [
        Reading(id=str(i), node="eval", ts=0.0, fields={field: t}) for i, (t, _) in enumerate(examples)
    ]
    results = [dict(r.data) for r in plugin.process(readings)]
    tokens = 0
    seconds = 0.0
    for r in results:
        if r.get("decode_tokens_per_s"):
            # Steps after the first = tokens_out when the answer ended with its end token, as a
            # complete one does (an output cut at max_output_tokens counts one step too many).
            tokens += r["tokens_out"]
            seconds += r["tokens_out"] / r["decode_tokens_per_s"]
    n = len(examples)
    return Scores(
        results=results,
        exact=sum(r.get("intent") == want for r, (_, want) in zip(results, examples, strict=True)) / n,
        valid=sum("intent" in r for r in results) / n,
        decode_tokens_per_s=tokens / seconds if seconds else 0.0,
    )
