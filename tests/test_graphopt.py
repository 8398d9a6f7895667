"""gatewayd.graphopt: exact rewrites, on small graphs built here and on the PP-OCRv4 models themselves."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from gatewayd_meter_ocr.reader import DEFAULT_DET_MODEL, DEFAULT_REC_MODEL, packaged_model
from onnx import TensorProto, helper, numpy_helper

from gatewayd import graphopt


def _run(model: onnx.ModelProto | str, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    data = model if isinstance(model, str) else model.SerializeToString()
    s = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    out: np.ndarray = s.run(None, {s.get_inputs()[0].name: x})[0]
    return out


def _block(clip_max: float, conv_also_read: bool) -> onnx.ModelProto:
    """x -> Conv -> Mul 0.5 -> Add 0.25 -> Add 3 -> Clip(0, clip_max) -> Mul -> Div 6 (paddle2onnx's
    hard-swish); with ``conv_also_read`` the Conv's output is a second graph output too."""
    rng = np.random.default_rng(3)
    scalars = {"half": 0.5, "quarter": 0.25, "three": 3.0, "zero": 0.0, "top": clip_max, "six": 6.0}
    inits = [numpy_helper.from_array(rng.normal(size=(8, 3, 3, 3)).astype(np.float32), "w")]
    inits += [numpy_helper.from_array(np.array(v, np.float32), k) for k, v in scalars.items()]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["half", "c"], ["m"], name="lab_mul"),
        helper.make_node("Add", ["m", "quarter"], ["a"], name="lab_add"),
        helper.make_node("Add", ["a", "three"], ["a3"], name="hs_add"),
        helper.make_node("Clip", ["a3", "zero", "top"], ["cl"], name="hs_clip"),
        helper.make_node("Mul", ["a", "cl"], ["mu"], name="hs_mul"),
        helper.make_node("Div", ["mu", "six"], ["y"], name="hs_div"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 16, 16])]
    if conv_also_read:
        outs.append(helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 8, 16, 16]))
    model = helper.make_model(
        helper.make_graph(nodes, "block", [x], outs, inits), opset_imports=[helper.make_opsetid("", 12)]
    )
    model.ir_version = 7
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize(
    ("clip_max", "conv_also_read", "expected", "ops"),
    [
        (6.0, False, graphopt.Rewrites(2, 1), ["Conv", "HardSwish"]),
        # Not a hard-swish: left alone (the affine is still folded).
        (5.0, False, graphopt.Rewrites(2, 0), ["Conv", "Add", "Clip", "Mul", "Div"]),
        # The Conv's own output is read elsewhere: folding would change it.
        (6.0, True, graphopt.Rewrites(0, 1), ["Conv", "Mul", "Add", "HardSwish"]),
    ],
)
def test_rewrites_only_what_they_can_keep_exact(
    clip_max: float, conv_also_read: bool, expected: graphopt.Rewrites, ops: list[str]
) -> None:
    model = _block(clip_max, conv_also_read)
    x = np.random.default_rng(0).normal(size=(1, 3, 16, 16)).astype(np.float32) * 3
    before = _run(model, x)
    optimized, done = graphopt.optimize(onnx.ModelProto.FromString(model.SerializeToString()))
    assert done == expected
    assert [n.op_type for n in optimized.graph.node] == ops
    onnx.checker.check_model(optimized)
    np.testing.assert_allclose(_run(optimized, x), before, rtol=1e-5, atol=1e-5)
    # Nothing left over for onnxruntime to warn about (the scalars the rewrites consumed).
    used = {i for n in optimized.graph.node for i in n.input}
    assert {i.name for i in optimized.graph.initializer} <= used


@pytest.mark.parametrize(
    ("name", "shape"), [(DEFAULT_DET_MODEL, (1, 3, 224, 320)), (DEFAULT_REC_MODEL, (1, 3, 48, 320))]
)
def test_pp_ocrv4_models_give_the_same_outputs_with_fewer_nodes(name: str, shape: tuple[int, ...]) -> None:
    path = packaged_model(name)
    original = onnx.load(path)
    optimized, done = graphopt.optimize(onnx.load(path))
    # One fold per LAB scalar pair, one HardSwish per hard-swish: 56 and 24/28 in the published models.
    assert done.folded >= 50 and done.hardswish >= 20
    assert len(optimized.graph.node) < 0.7 * len(original.graph.node)
    # The recogniser's character list lives in the metadata; rapidocr reads it from there.
    assert {p.key: p.value for p in optimized.metadata_props} == {
        p.key: p.value for p in original.metadata_props
    }
    x = np.random.default_rng(1).uniform(-1, 1, size=shape).astype(np.float32)
    np.testing.assert_allclose(_run(optimized, x), _run(path, x), atol=1e-4)
