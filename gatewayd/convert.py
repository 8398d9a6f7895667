"""Offline conversion of a GLM checkpoint to an onnxruntime-genai model folder (``gatewayd models convert``).

Input: a Hugging Face checkpoint folder whose ``config.json`` names ``GlmForCausalLM`` (``model_type``
``glm``), with its weights and a ``tokenizer.json``. Output: ``model.onnx`` (+ ``model.onnx.data``),
``genai_config.json`` and the tokenizer files, made by onnxruntime-genai's model builder for the CPU
execution provider in FP32, INT8 or INT4 (weight-only ``MatMulNBits``).

The builder rejects ``GlmForCausalLM`` by name, but its ChatGLM exporter builds the same network
(GLM v1: partial interleaved rotary embeddings on half of each head, fused QKV with bias, SwiGLU
MLP) when the config says ``"architectures": ["ChatGLMModel"]`` (DESIGN §6). So the checkpoint is
copied to a temporary folder with that one change; the source is never modified. Because a wrong
mapping would still produce a model that runs and answers garbage, :func:`convert` then checks the
converted model's logits against the torch model's on a few prefill and decode steps
(:func:`compare_logits`) and raises when they differ.

torch, transformers and onnxruntime-genai come with the ``models`` extra and are imported only
inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

Precision = Literal["fp32", "int8", "int4"]
PRECISIONS: tuple[Precision, ...] = get_args(Precision)
SUPPORTED_ARCHITECTURES = ("GlmForCausalLM",)
#: The builder's ChatGLM exporter hard-codes rotary embeddings on half of each head.
ROTARY_FRACTION = 0.5
#: Weight-only quantization options (builder ``extra_options``) used unless the caller overrides
#: them: blocks of 128 weights per scale, int8 activations (accuracy level 4: the CPU's integer
#: kernels); the LM head is quantized with the rest (the builder's default). On the GLM intent
#: model, block 128 vs 32 gave the same answers, a 6% smaller folder and ~20% faster decoding.
#: The token embedding (a Gather) stays float: the builder quantizes Gathers to 4 bits only.
QUANT_OPTIONS: Mapping[str, str] = {"block_size": "128", "accuracy_level": "4"}
#: Smallest cosine similarity of converted vs torch logits that passes, per precision. FP32 must
#: match to rounding (see also FP32_ATOL); quantized weights shift logits a little, not their shape.
MIN_COSINE: Mapping[str, float] = {"fp32": 0.99999, "int8": 0.98, "int4": 0.8}
#: FP32: |converted - torch| <= FP32_ATOL * max(1, max |torch logit|).
FP32_ATOL = 1e-3


@dataclass(frozen=True)
class LogitCheck:
    """Converted vs torch logits over one prefill and some greedy decode steps."""

    positions: int  # logit vectors compared (prefill's last position + decode steps)
    max_abs_diff: float
    max_abs_logit: float  # scale of the torch logits
    min_cosine: float
    same_argmax: float  # fraction of positions with the same top token

    def passes(self, precision: Precision) -> bool:
        if self.min_cosine < MIN_COSINE[precision]:
            return False
        return precision != "fp32" or self.max_abs_diff <= FP32_ATOL * max(1.0, self.max_abs_logit)


def read_config(checkpoint: Path) -> dict[str, Any]:
    """The checkpoint's config.json, checked for what the converter supports; ValueError says what is not."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise ValueError(f"checkpoint {checkpoint}: not a directory")
    path = checkpoint / "config.json"
    if not path.is_file():
        raise ValueError(f"checkpoint {checkpoint}: no config.json")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not readable JSON: {e}") from e
    if not isinstance(config, dict):
        raise ValueError(f"{path}: not a JSON object")
    archs = config.get("architectures") or []
    if not isinstance(archs, list) or not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise ValueError(
            f"{path}: unsupported architecture {archs!r}; this converter supports "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (model_type glm)"
        )
    if config.get("model_type") != "glm":
        raise ValueError(f"{path}: model_type {config.get('model_type')!r}, expected 'glm'")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    fraction = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", ROTARY_FRACTION))
    if not isinstance(fraction, int | float) or not math.isclose(fraction, ROTARY_FRACTION):
        raise ValueError(
            f"{path}: partial_rotary_factor {fraction}; the onnxruntime-genai GLM exporter supports only "
            f"{ROTARY_FRACTION}"
        )
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"{path}: rope_type {rope.get('rope_type')!r} is not supported (only 'default')")
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{path}: hidden_act {config.get('hidden_act')!r} is not supported (only 'silu')")
    _check_shapes(path, config)
    if not any((checkpoint / w).is_file() for w in ("model.safetensors", "model.safetensors.index.json",
                                                      "pytorch_model.bin")):  # fmt: skip
        raise ValueError(f"checkpoint {checkpoint}: no weights (model.safetensors or pytorch_model.bin)")
    if not (checkpoint / "tokenizer.json").is_file():
        raise ValueError(f"checkpoint {checkpoint}: no tokenizer.json (onnxruntime-genai needs one)")
    return config


def _check_shapes(path: Path, config: dict[str, Any]) -> None:
    """Shapes the builder or onnxruntime's kernels get wrong or refuse, found by trying them."""
    try:
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or hidden // heads)
        vocab, inter = int(config["vocab_size"]), int(config["intermediate_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: missing or non-integer model size field: {e}") from e
    # GroupQueryAttention wants the rotary cos/sin cache width (head_dim * 0.5 / 2) a multiple of 8.
    if head_dim % 32:
        raise ValueError(f"{path}: head_dim {head_dim} is not a multiple of 32 (onnxruntime's attention "
                         "needs the rotary half of a head to be a multiple of 16)")  # fmt: skip
    # The builder takes any Linear whose output width equals the vocabulary for the LM head; the GLM
    # exporter splits the MLP into gate/up Linears of intermediate_size outputs, so a vocabulary of
    # that size (or of another projection's width) wires the logits to the wrong layer.
    widths = {"intermediate_size": inter, "2 * intermediate_size": 2 * inter, "hidden_size": hidden,
              "num_attention_heads * head_dim": heads * head_dim,
              "num_key_value_heads * head_dim": kv_heads * head_dim}  # fmt: skip
    for name, width in widths.items():
        if vocab == width:
            raise ValueError(f"{path}: vocab_size {vocab} equals {name}; the onnxruntime-genai builder would "
                             "mistake that projection for the LM head (pad the vocabulary)")  # fmt: skip


def convert(
    checkpoint: Path,
    out: Path,
    precision: Precision,
    *,
    extra_options: Mapping[str, str] | None = None,
    verify: bool = True,
    quiet: bool = True,
) -> Path:
    """Build the onnxruntime-genai model folder ``out`` from the GLM ``checkpoint``; returns ``out``.

    ``extra_options`` are the builder's KEY=VALUE options, over :data:`QUANT_OPTIONS` for int8/int4.
    With ``verify`` the converted model's logits are compared with torch's (:func:`compare_logits`)
    and a mismatch removes ``out`` and raises ValueError. ``quiet`` keeps the builder's printing and
    progress bars off stdout and stderr (their tail is part of the error if the builder fails).
    """
    checkpoint, out = Path(checkpoint), Path(out)
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    config = read_config(checkpoint)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        raise ValueError(f"output {out}: not empty (remove it first)")

    from onnxruntime_genai.models.builder import create_model, parse_extra_options

    options = dict(QUANT_OPTIONS) if precision != "fp32" else {}
    options.update(extra_options or {})
    options.setdefault("hf_token", "false")  # offline: never ask a hub for credentials
    log = io.StringIO()
    with tempfile.TemporaryDirectory(prefix="gatewayd-convert-") as tmp:
        src = Path(tmp) / "checkpoint"
        shutil.copytree(checkpoint, src)
        # The builder knows GLM v1 only under this name (module docstring).
        config["architectures"] = ["ChatGLMModel"]
        (src / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        cache = Path(tmp) / "cache"
        pairs = [f"{k}={v}" for k, v in options.items()]
        try:
            with _quiet(log) if quiet else contextlib.nullcontext():
                parsed = parse_extra_options(None, str(src), str(out), precision, "cpu", str(cache), pairs)
                create_model(None, str(src), str(out), precision, "cpu", str(cache), **parsed)
        except Exception as e:
            tail = log.getvalue()[-2000:]
            msg = f"onnxruntime-genai builder failed on {checkpoint} ({precision}): {e}"
            raise ValueError(f"{msg}\n{tail}" if tail else msg) from e
    if verify:
        check = compare_logits(checkpoint, out)
        if not check.passes(precision):
            shutil.rmtree(out)  # out was empty before: leave nothing that could be shipped by mistake
            raise ValueError(
                f"converted model does not match the torch model ({precision}), removed {out}: {check}"
            )
    return out


@contextlib.contextmanager
def _quiet(log: io.StringIO) -> Iterator[None]:
    """The builder's prints and progress bars into ``log``; its quantizer's per-MatMul INFO lines off."""
    quantizer = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = quantizer.level
    quantizer.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            yield
    finally:
        quantizer.setLevel(level)


def compare_logits(
    checkpoint: Path, model_dir: Path, ids: Sequence[int] | None = None, steps: int = 4
) -> LogitCheck:
    """Prefill ``ids`` (default: a fixed spread of token ids) in the converted model, decode ``steps``
    greedy tokens, and compare each logit vector with the torch model's on the same tokens."""
    import numpy as np
    import onnxruntime_genai as og
    import torch
    from transformers import AutoModelForCausalLM

    torch_model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()  # type: ignore[no-untyped-call]
    vocab = int(torch_model.config.vocab_size)
    prompt = list(ids) if ids is not None else [(7 + 97 * i) % vocab for i in range(12)]
    model = og.Model(str(model_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + steps)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    got = [np.asarray(gen.get_logits(), dtype=np.float32).reshape(-1, vocab)[-1].copy()]
    tokens: list[int] = []
    while len(got) <= steps and not gen.is_done():
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
        if not gen.is_done():
            got.append(np.asarray(gen.get_logits(), dtype=np.float32).reshape(-1, vocab)[-1].copy())
    del gen, model
    with torch.no_grad():
        full = torch_model(torch.tensor([prompt + tokens])).logits[0].numpy()
    want = full[len(prompt) - 1 : len(prompt) - 1 + len(got)]
    g = np.stack(got)
    cos = (g * want).sum(-1) / (np.linalg.norm(g, axis=-1) * np.linalg.norm(want, axis=-1) + 1e-12)
    return LogitCheck(
        positions=len(got),
        max_abs_diff=float(np.abs(g - want).max()),
        max_abs_logit=float(np.abs(want).max()),
        min_cosine=float(cos.min()),
        same_argmax=float((g.argmax(-1) == want.argmax(-1)).mean()),
    )
