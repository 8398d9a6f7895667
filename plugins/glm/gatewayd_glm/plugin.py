"""The ``glm`` plugin: short text from a node becomes a JSON intent, locally, with a GLM-family model.

A node POSTs a CBOR map with the text in its ``text`` field (the field is configurable), e.g.
``{"text": "两杯大杯冰拿铁，少糖"}``. Each such reading gets one result::

    {"intent": {"intent": "order", "item": "latte", ...}, "text": "两杯大杯冰拿铁，少糖",
     "tokens_in": 14, "tokens_out": 52, "ttft_ms": 3.1, "decode_tokens_per_s": 900.0,
     "total_ms": 61.0, "attempts": 1, "model": {"name": ..., "version": ..., "quantization": "int8"}}

The model runs on onnxruntime-genai. Its fixed instructions (the system prompt) are prefilled once
per worker, and every request rewinds the KV cache to the end of them (``rewind_to``), so a request
pays only for its own tokens. The output must parse as JSON and match the intent schema; output that
does not is retried once under the stricter prompt, then published as an ``error`` result with the
raw text. Text that is empty, not a string or longer than ``max_input_tokens`` gets an ``error``
result without running the model; so does a request that passes its ``deadline_ms``.

The model comes as a bundle (a folder with a ``manifest.json`` listing each file's sha256): a bundle
whose files do not match its manifest is refused at load.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

import jsonschema
import onnxruntime_genai as og
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gatewayd.bundle import BundleError, Manifest, verify_for_gateway
from gatewayd.plugin_api import Plugin, PluginNotReady, Reading, Result
from gatewayd_glm import intents

#: The shipped bundle, made by make_model.py (package data).
PACKAGED = {"int8": "glm-intent-int8"}


class GlmOptions(BaseModel):
    """The ``options`` table of a ``glm`` plugin entry; see the package README."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: "int8" (the shipped bundle) or the path of a bundle folder.
    bundle: str = "int8"
    #: The reading field that holds the text.
    field: str = "text"
    max_input_tokens: int = Field(64, ge=1, le=4096)
    max_output_tokens: int = Field(96, ge=1, le=4096)
    #: Per request, prefill to the last token; a request past it gets an error result.
    deadline_ms: float = Field(2000.0, gt=0)
    #: A JSON Schema file the intent must match; default: the shipped model's intent schema.
    schema_path: str | None = Field(None, alias="schema")
    #: The instructions the model was trained with; change them only with a model trained for them.
    system_prompt: str = intents.SYSTEM_PROMPT
    strict_prompt: str = intents.STRICT_PROMPT
    #: Retry invalid output once under ``strict_prompt`` before publishing an error result.
    retry_invalid: bool = True


class InvalidOutput(Exception):
    """The model's text is not a valid intent; ``str()`` says why."""


@dataclass(frozen=True, slots=True)
class Generation:
    """One request's decode: the text and the figures published with it."""

    text: str
    tokens_out: int
    ttft_ms: float
    #: Decode steps after the first (the end token's included) per second; None for a one-step answer.
    decode_tokens_per_s: float | None
    finished: bool  # reached the end-of-sequence token (not the output limit)


class PrefixCachedGenerator:
    """One generator whose KV cache holds the prefilled system prompt; each request rewinds to it."""

    def __init__(self, model: og.Model, prefix: Sequence[int], max_length: int, eos: set[int]) -> None:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=max_length, do_sample=False)
        self._gen = og.Generator(model, params)
        self._gen.append_tokens(list(prefix))
        self.prefix_len = len(prefix)
        self._eos = eos

    def run(self, tokens: Sequence[int], max_new: int, deadline: float) -> tuple[list[int], float, bool]:
        """(new tokens, seconds to the first one, finished) for ``tokens`` after the prefix.

        ``finished``: the end-of-sequence token came (it is not in the tokens, but is a decode step:
        the steps are ``len(tokens) + finished``).
        Raises TimeoutError when ``deadline`` (a perf_counter time) passes first."""
        gen = self._gen
        start = time.perf_counter()
        gen.rewind_to(self.prefix_len)
        gen.append_tokens(list(tokens))
        out: list[int] = []
        ttft = 0.0
        while not gen.is_done() and len(out) < max_new:
            if time.perf_counter() > deadline:
                raise TimeoutError(f"deadline passed after {len(out)} output tokens")
            gen.generate_next_token()
            if not out:
                ttft = time.perf_counter() - start
            token = int(gen.get_next_tokens()[0])
            if token in self._eos:
                return out, ttft, True
            out.append(token)
        return out, ttft, False  # cut at max_new (or max_length): not a whole answer


class GlmPlugin(Plugin):
    """Text to JSON intent with a GLM-architecture model on onnxruntime-genai."""

    name: ClassVar[str] = "glm"
    version: ClassVar[str] = "0.1.0"
    bundle_option: ClassVar[str | None] = "bundle"
    answer_keys: ClassVar[tuple[str, ...] | None] = ("intent",)

    def __init__(self, options: Mapping[str, Any]) -> None:
        super().__init__(options)
        try:
            self.settings = GlmOptions.model_validate(self.options)
        except ValidationError as e:
            raise ValueError(f"glm plugin: {e}") from None
        s = self.settings
        packaged = PACKAGED.get(s.bundle)
        self.bundle = (
            Path(str(resources.files("gatewayd_glm") / "models" / packaged)) if packaged else Path(s.bundle)
        )
        schema: dict[str, Any] = intents.INTENT_SCHEMA
        if s.schema_path is not None:
            try:
                schema = json.loads(Path(s.schema_path).read_text(encoding="utf-8"))
                jsonschema.Draft202012Validator.check_schema(schema)
            except (OSError, ValueError, jsonschema.SchemaError) as e:
                raise ValueError(f"glm plugin: schema {s.schema_path}: {e}") from None
        self._validator = jsonschema.Draft202012Validator(schema)
        self.manifest: Manifest | None = None
        self._model: og.Model | None = None
        self._tokenizer: og.Tokenizer | None = None
        self._generators: dict[str, PrefixCachedGenerator] = {}

    @property
    def model_info(self) -> dict[str, str]:
        m = self.manifest
        return {"name": m.name, "version": m.version, "quantization": m.quantization} if m else {}

    def load(self) -> None:
        """Verify the bundle against its manifest, open the model, prefill the system prompt."""
        if not (self.bundle / "manifest.json").exists():
            raise PluginNotReady(f"glm plugin: no model bundle at {self.bundle} (manifest.json missing)")
        try:
            self.manifest = verify_for_gateway(self.bundle)  # signature too, when [models] asks for one
        except BundleError as e:
            # Not PluginNotReady: a tampered bundle stays tampered; the supervisor backs off and logs it.
            raise RuntimeError(f"glm plugin: model bundle refused: {e}") from None
        config = og.Config(str(self.bundle))
        config.clear_providers()  # CPU: gatewayd's thread budget, not whatever the bundle asks
        session = {"intra_op_num_threads": self.threads, "inter_op_num_threads": 1}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": session}}}))
        self._model = og.Model(config)
        self._tokenizer = og.Tokenizer(self._model)
        self._generators = {"normal": self._generator(self.settings.system_prompt)}

    def _generator(self, system_prompt: str) -> PrefixCachedGenerator:
        assert self._model is not None and self._tokenizer is not None
        prefix = self._encode(intents.prefix_text(system_prompt))
        s = self.settings
        # The request (framing included) is at most max_input_tokens and the output, its end token
        # included, at most max_output_tokens; + 8 is slack so that this length never stops a request.
        max_length = len(prefix) + s.max_input_tokens + s.max_output_tokens + 8
        eos = {int(t) for t in self._tokenizer.eos_token_ids}
        return PrefixCachedGenerator(self._model, prefix, max_length, eos)

    def _encode(self, text: str) -> list[int]:
        assert self._tokenizer is not None
        return [int(t) for t in self._tokenizer.encode(text)]

    def sample(self) -> Sequence[Reading]:
        """One English and one Chinese order for the warm-up."""
        texts = ["a large americano, no sugar", "我要一杯美式咖啡"]
        return [
            Reading(id=f"warmup-{i}", node="warmup", ts=0.0, fields={"text": t}) for i, t in enumerate(texts)
        ]

    def process(self, batch: Sequence[Reading]) -> Sequence[Result]:
        """One request at a time: a generation is sequential, and the prefix cache is per generator."""
        if self._model is None:
            raise RuntimeError("glm plugin: load() must be called before process()")
        return [Result(r.id, self._answer(r)) for r in batch]

    def _answer(self, reading: Reading) -> dict[str, Any]:
        s = self.settings
        start = time.perf_counter()
        text = reading.fields.get(s.field)
        base: dict[str, Any] = {"model": self.model_info}
        if not isinstance(text, str):
            missing = "missing" if text is None else f"a {type(text).__name__}, not a text string"
            return base | {"error": f"field '{s.field}' is {missing}"}
        base["text"] = text
        if not text.strip():
            return base | {"error": "empty text"}
        request = self._encode(intents.request_text(text))
        base["tokens_in"] = len(request)
        if len(request) > s.max_input_tokens:
            return base | {
                "error": f"text too long: {len(request)} tokens > max_input_tokens {s.max_input_tokens}"
            }
        deadline = start + s.deadline_ms / 1000
        prompts = ["normal", "strict"] if s.retry_invalid else ["normal"]
        failure = ""
        for attempt, prompt in enumerate(prompts, 1):
            try:
                gen = self._generate(prompt, request, deadline)
            except TimeoutError as e:
                return base | {"error": f"deadline_ms {s.deadline_ms:g} exceeded: {e}", "attempts": attempt}
            figures = {
                "tokens_out": gen.tokens_out,
                "ttft_ms": round(gen.ttft_ms, 3),
                "decode_tokens_per_s": gen.decode_tokens_per_s,
                "total_ms": round((time.perf_counter() - start) * 1000, 3),
                "attempts": attempt,
            }
            try:
                return base | {"intent": self._validate(gen)} | figures
            except InvalidOutput as e:
                failure = str(e)
                base |= {"raw": gen.text}
        return base | {"error": f"invalid intent: {failure}"} | figures

    def _generate(self, prompt: str, request: Sequence[int], deadline: float) -> Generation:
        gen = self._generators.get(prompt)
        if gen is None:  # the strict prompt's cache is made on its first use: most workers never need it
            gen = self._generators[prompt] = self._generator(self.settings.strict_prompt)
        assert self._tokenizer is not None
        start = time.perf_counter()
        tokens, ttft, finished = gen.run(request, self.settings.max_output_tokens, deadline)
        steps = len(tokens) + finished
        decode_s = time.perf_counter() - start - ttft  # the steps after the first: the prefill is in ttft
        return Generation(
            text=self._tokenizer.decode(tokens) if tokens else "",
            tokens_out=len(tokens),
            ttft_ms=ttft * 1000,
            decode_tokens_per_s=round((steps - 1) / decode_s, 1) if steps > 1 and decode_s > 0 else None,
            finished=finished,
        )

    def _validate(self, gen: Generation) -> dict[str, Any]:
        if not gen.finished:
            raise InvalidOutput(f"output cut at max_output_tokens {self.settings.max_output_tokens}")
        try:
            intent = json.loads(gen.text)
        except ValueError as e:
            raise InvalidOutput(f"not JSON: {e}") from None
        error = jsonschema.exceptions.best_match(self._validator.iter_errors(intent))
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "(root)"
            raise InvalidOutput(f"schema: {where}: {error.message}")
        if not isinstance(intent, dict):
            raise InvalidOutput("not a JSON object")
        return intent
