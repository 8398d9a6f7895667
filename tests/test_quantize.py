"""gatewayd.quantize and `gatewayd models quantize` on small real models built here with onnx.helper."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from gatewayd import cli
from gatewayd import quantize as qz

RNG_SEED = 7


def _save(
    path: Path,
    nodes: list[onnx.NodeProto],
    weights: dict[str, np.ndarray],
    io: tuple[onnx.ValueInfoProto, onnx.ValueInfoProto],
    opset: int,
) -> Path:
    inits = [numpy_helper.from_array(w.astype(np.float32), name) for name, w in weights.items()]
    graph = helper.make_graph(nodes, path.stem, [io[0]], [io[1]], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7  # what opset 12/13 models carry, and what older onnxruntimes read
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def conv_net(path: Path) -> Path:
    """An opset-12 CNN classifier with fixed random weights and dynamic H, W: 3 convs, pool, Gemm."""
    rng = np.random.default_rng(RNG_SEED)
    chans = [3, 32, 64, 64]
    weights: dict[str, np.ndarray] = {}
    nodes, x = [], "x"
    for i, (cin, cout) in enumerate(itertools.pairwise(chans)):
        weights[f"w{i}"] = rng.normal(0, np.sqrt(2 / (cin * 9)), (cout, cin, 3, 3))
        weights[f"b{i}"] = rng.normal(0, 0.1, cout)
        nodes += [
            helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", [f"c{i}"], [f"r{i}"]),
        ]
        x = f"r{i}"
    weights["fc"] = rng.normal(0, np.sqrt(1 / chans[-1]), (chans[-1], 10))
    weights["fcb"] = np.zeros(10)
    nodes += [
        helper.make_node("GlobalAveragePool", [x], ["pool"]),
        helper.make_node("Flatten", ["pool"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc", "fcb"], ["logits"]),
    ]
    io = (
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, "H", "W"]),
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10]),
    )
    return _save(path, nodes, weights, io, opset=12)


def mlp(path: Path) -> Path:
    """A 3-layer MLP (MatMul/Add/Relu), the kind dynamic INT8 is meant for."""
    rng = np.random.default_rng(RNG_SEED)
    sizes = [64, 256, 256, 10]
    weights: dict[str, np.ndarray] = {}
    nodes, x = [], "x"
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        weights[f"w{i}"] = rng.normal(0, np.sqrt(2 / n_in), (n_in, n_out))
        weights[f"b{i}"] = rng.normal(0, 0.1, n_out)
        nodes += [
            helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"]),
            helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}" if i < 2 else "y"]),
        ]
        if i < 2:
            nodes.append(helper.make_node("Relu", [f"a{i}"], [f"r{i}"]))
            x = f"r{i}"
    io = (
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64]),
        helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10]),
    )
    return _save(path, nodes, weights, io, opset=13)


def images(n: int, seed: int = 1) -> list[dict[str, np.ndarray]]:
    """Samples of different sizes, without batch axis (the tool adds it), as a dynamic-shape CNN gets."""
    rng = np.random.default_rng(seed)
    return [{"x": rng.uniform(-1, 1, (3, 16 + 8 * (i % 3), 24)).astype(np.float32)} for i in range(n)]


def test_static_per_channel_qoperator_on_opset12_cnn(tmp_path: Path) -> None:
    model = conv_net(tmp_path / "cnn.onnx")
    out = tmp_path / "cnn.int8.onnx"
    report = qz.quantize(
        model,
        out,
        calibration=images(16),
        evaluation=images(12, seed=2),
        per_channel=True,
        metric=qz.Close(atol=0.05, rtol=0.05),
        progress=False,
    )
    assert report.passed, report.lines()
    assert report.samples == 12 and report.agreement == 1.0
    assert report.int8_bytes < 0.4 * report.fp32_bytes
    assert report.fp32_ms > 0 and report.int8_ms > 0
    q = onnx.load(str(out))
    assert q.opset_import[0].version >= 13  # upgraded from 12, as per-channel needs
    assert sum(n.op_type == "QLinearConv" for n in q.graph.node) == 3
    mark = json.loads({p.key: p.value for p in q.metadata_props}[qz.METADATA_KEY])
    assert mark["passed"] is True and mark["samples"] == 12


def test_dynamic_on_mlp(tmp_path: Path) -> None:
    model = mlp(tmp_path / "mlp.onnx")
    rng = np.random.default_rng(3)
    samples = [{"x": rng.normal(0, 1, (4, 64)).astype(np.float32)} for _ in range(10)]
    report = qz.quantize(
        model,
        tmp_path / "mlp.int8.onnx",
        method="dynamic",
        evaluation=samples,
        metric=qz.Close(atol=0.25, rtol=0.05),  # worst seen: 0.085
        progress=False,
    )
    assert report.passed, report.lines()
    assert report.int8_bytes < 0.35 * report.fp32_bytes
    ops = {n.op_type for n in onnx.load(str(tmp_path / "mlp.int8.onnx")).graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeMatMul"}


def test_op_types_and_exclude_keep_nodes_in_float(tmp_path: Path) -> None:
    model = conv_net(tmp_path / "cnn.onnx")
    out = tmp_path / "q.onnx"

    def run(**kw: Any) -> qz.QuantizeReport:
        return qz.quantize(model, out, calibration=images(4), evaluation=images(2), progress=False, **kw)

    report = run(op_types=["Conv"], exclude=["conv0"])
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert ops.count("QLinearConv") == 2 and ops.count("Conv") == 1 and "QGemm" not in ops
    assert "only Conv, 1 node(s) kept in float" in report.mode
    with pytest.raises(ValueError, match=r"exclude: no node named \['nope'\]"):
        run(exclude=["nope"])


def _npz(path: Path, samples: list[dict[str, np.ndarray]]) -> Path:
    np.savez(path, x=np.stack([s["x"] for s in samples]))
    return path


def test_cli_prints_figures_and_accepts_a_directory_set(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = conv_net(tmp_path / "cnn.onnx")
    cal = tmp_path / "cal"
    cal.mkdir()
    for i, s in enumerate(images(8)):  # different H per sample: only a directory can hold them
        np.save(cal / f"{i:03d}.npy", s["x"])
    fixed = [{"x": s["x"][:, :16, :]} for s in images(6, seed=2)]
    evals = _npz(tmp_path / "eval.npz", fixed)
    rc = cli.main(
        ["models", "quantize", str(model), "--calibration", str(cal), "--eval", str(evals),
         "--per-channel", "--format", "qdq", "--atol", "0.05", "--rtol", "0.05"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0, out
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert "kB ->" in lines["size"] and "x)" in lines["size"]
    assert "ms ->" in lines["latency"] and "median of 6" in lines["latency"]
    assert "6/6 samples (100.0%)" in lines["agreement"]
    assert lines["result"].startswith("result     PASS")
    assert (tmp_path / "cnn.int8.onnx").exists()


def test_cli_fails_clearly_when_agreement_is_too_low(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = conv_net(tmp_path / "cnn.onnx")
    cal = _npz(tmp_path / "cal.npz", [{"x": s["x"][:, :16, :]} for s in images(6)])
    out_model = tmp_path / "q.onnx"
    rc = cli.main(
        ["models", "quantize", str(model), "-o", str(out_model), "--calibration", str(cal),
         "--atol", "0", "--rtol", "0"]
    )  # fmt: skip
    got = capsys.readouterr()
    assert rc == 1
    assert "result     FAIL: agreement 0.0% < required 99.0%" in got.out
    assert "FAIL: only 0.0% of samples agree" in got.err and "marked as not passing" in got.err
    mark = json.loads({p.key: p.value for p in onnx.load(str(out_model)).metadata_props}[qz.METADATA_KEY])
    assert mark["passed"] is False


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"this is not a zip file", "not a readable .npz file"),
        ("wrong-key", "no array for input(s) ['x']; it has ['image']"),
    ],
)
def test_cli_rejects_a_malformed_calibration_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes | str, message: str
) -> None:
    model = conv_net(tmp_path / "cnn.onnx")
    cal = tmp_path / "cal.npz"
    if isinstance(content, bytes):
        cal.write_bytes(content)
    else:
        np.savez(cal, image=np.zeros((2, 3, 16, 16), np.float32))
    rc = cli.main(["models", "quantize", str(model), "--calibration", str(cal)])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"gatewayd models quantize: {cal}: {message}" in err
    assert not (tmp_path / "cnn.int8.onnx").exists()


def test_a_wrong_sample_or_an_empty_set_is_named(tmp_path: Path) -> None:
    model = conv_net(tmp_path / "cnn.onnx")
    bad = [*images(2), {"x": np.zeros((1, 4, 16, 16), np.float32)}]
    with pytest.raises(qz.SetError, match=r"calibration sample 2: input 'x' has shape \(1, 4, 16, 16\)"):
        qz.quantize(model, tmp_path / "q.onnx", calibration=bad, evaluation=images(1), progress=False)
    with pytest.raises(qz.SetError, match="evaluation set is empty"):
        qz.quantize(model, tmp_path / "q.onnx", calibration=images(2), evaluation=[], progress=False)
