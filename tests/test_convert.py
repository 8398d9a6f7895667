"""gatewayd.convert: a tiny random-weight GlmForCausalLM (made here, with a tokenizer trained here) to
onnxruntime-genai FP32 and INT8 folders, generating what torch generates; clear errors for bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
og = pytest.importorskip("onnxruntime_genai")
tokenizers = pytest.importorskip("tokenizers")

from gatewayd import convert as conv  # noqa: E402

LINES = ["我要一杯美式咖啡", "a large americano, no sugar", "turn off the pump in zone 3", "关闭3区的水泵",
         "two iced lattes with oat milk", "open valve 7"]  # fmt: skip
SPECIAL = ["<|pad|>", "<|user|>", "<|assistant|>", "<|end|>"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer GLM with random weights (init range wide enough that greedy choices are not near-ties)."""
    folder = tmp_path_factory.mktemp("glm-checkpoint")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(LINES * 5, trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|end|>"
    )
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    config = transformers.GlmConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=128,
        pad_token_id=0, eos_token_id=3, bos_token_id=None, tie_word_embeddings=False, initializer_range=0.2,
    )  # fmt: skip
    transformers.GlmForCausalLM(config).eval().save_pretrained(folder)
    return folder


def prompt_ids(checkpoint: Path) -> list[int]:
    tok = tokenizers.Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    return list(tok.encode("turn off the pump in zone 3", add_special_tokens=False).ids)


def torch_greedy(checkpoint: Path, ids: list[int], n: int) -> list[int]:
    model = transformers.GlmForCausalLM.from_pretrained(checkpoint).eval()
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids) :]


def og_greedy(folder: Path, ids: list[int], n: int) -> list[int]:
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + n)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    out: list[int] = []
    while not gen.is_done():
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return out


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_converted_model_generates_what_torch_generates(
    checkpoint: Path, tmp_path: Path, precision: Any
) -> None:
    before = (checkpoint / "config.json").read_text()
    out = conv.convert(checkpoint, tmp_path / precision, precision)  # verifies logits itself
    assert (checkpoint / "config.json").read_text() == before  # the source is never modified
    names = {p.name for p in out.iterdir()}
    assert {"model.onnx", "genai_config.json", "tokenizer.json"} <= names
    genai = json.loads((out / "genai_config.json").read_text())
    assert genai["model"]["type"] == "chatglm" and genai["model"]["eos_token_id"] == 3

    ids = prompt_ids(checkpoint)
    check = conv.compare_logits(checkpoint, out, ids, steps=6)
    want = torch_greedy(checkpoint, ids, 6)
    got = og_greedy(out, ids, 6)
    if precision == "fp32":
        assert check.max_abs_diff < 1e-3 and check.same_argmax == 1.0, check
        assert got == want[: len(got)] and len(got) >= 1
    else:
        assert check.min_cosine > 0.99, check  # stricter than convert's own int8 bar (MIN_COSINE)
        assert got[0] == want[0]  # later tokens may part ways once a near-tie flips
        weights = sum(p.stat().st_size for p in out.iterdir())
        fp32 = conv.convert(checkpoint, tmp_path / "fp32-ref", "fp32", verify=False)
        assert weights < sum(p.stat().st_size for p in fp32.iterdir())


def test_unsupported_architecture_is_named(checkpoint: Path, tmp_path: Path) -> None:
    bad = Path(shutil.copytree(checkpoint, tmp_path / "llama"))
    config = json.loads((bad / "config.json").read_text())
    config["architectures"] = ["LlamaForCausalLM"]
    config["model_type"] = "llama"
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"unsupported architecture.*LlamaForCausalLM"):
        conv.convert(bad, tmp_path / "out", "fp32")
    assert not (tmp_path / "out").exists()


def test_bad_inputs_give_clear_errors(checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no config\.json"):
        conv.convert(tmp_path, tmp_path / "out", "fp32")
    with pytest.raises(ValueError, match="not a directory"):
        conv.convert(tmp_path / "missing", tmp_path / "out", "fp32")
    with pytest.raises(ValueError, match="precision 'fp16'"):
        conv.convert(checkpoint, tmp_path / "out", "fp16")  # type: ignore[arg-type]
    nontok = Path(shutil.copytree(checkpoint, tmp_path / "no-tokenizer"))
    (nontok / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match=r"no tokenizer\.json"):
        conv.convert(nontok, tmp_path / "out", "int8")
    clash = Path(shutil.copytree(checkpoint, tmp_path / "clash"))
    config = json.loads((clash / "config.json").read_text())
    config["vocab_size"] = config["intermediate_size"]  # the builder would wire the LM head wrongly
    (clash / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="vocab_size 128 equals intermediate_size"):
        conv.convert(clash, tmp_path / "out", "fp32")
    config["vocab_size"] += 1
    config["head_dim"] = 16  # onnxruntime's attention would refuse it at the first prefill
    (clash / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="head_dim 16 is not a multiple of 32"):
        conv.convert(clash, tmp_path / "out", "fp32")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        conv.convert(checkpoint, tmp_path / "full", "fp32")
