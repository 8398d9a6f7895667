"""Exact FP32 graph rewrites that onnxruntime does not do itself, for models exported by paddle2onnx.

PP-LCNetV3 (the backbone of the PP-OCRv4 detector and recogniser) follows every convolution with a
"learnable affine block" (a scalar Mul and a scalar Add) and a hard-swish that paddle2onnx spells
as four ops (``Add 3 -> Clip 0..6 -> Mul x -> Div 6``). onnxruntime fuses neither, so each block
runs six elementwise passes over the activation, each leaving and re-entering its NCHWc layout.
:func:`optimize` folds the scalars into the convolution's weights and bias and writes one
``HardSwish`` (opset 14): the same function up to float rounding, measured on the PP-OCRv4 models
(``tests/test_graphopt.py``) as 0.83x (recogniser) and 0.86x (detector) of the time per run.

Needs ``onnx`` (a dependency of the meter_ocr plugin and of gatewayd's ``models`` extra).
"""

from __future__ import annotations

import tempfile
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import onnx

HARDSWISH_OPSET = 14


@dataclass(frozen=True)
class Rewrites:
    folded: int  # scalar Mul/Add nodes folded into a preceding Conv
    hardswish: int  # four-op hard-swishes replaced by one HardSwish

    def __bool__(self) -> bool:
        return bool(self.folded or self.hardswish)


class _Graph:
    """The graph's constants and consumers, kept current as nodes are removed."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        from onnx import numpy_helper

        self.g = graph
        self.consts: dict[str, np.ndarray[Any, Any]] = {
            i.name: numpy_helper.to_array(i) for i in graph.initializer
        }
        for n in graph.node:
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
                self.consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
        self.users: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for n in graph.node:
            for i in n.input:
                self.users[i].append(n)
        self.outputs = {o.name for o in graph.output}

    def scalar(self, name: str) -> float | None:
        v = self.consts.get(name)
        return float(v.reshape(-1)[0]) if v is not None and v.size == 1 else None

    def only_user(self, name: str, op_type: str) -> onnx.NodeProto | None:
        """The one node reading ``name``, if it is of ``op_type`` and ``name`` is not a graph output."""
        users = self.users.get(name, [])
        if len(users) != 1 or users[0].op_type != op_type or name in self.outputs:
            return None
        return users[0]

    def remove(self, node: onnx.NodeProto) -> None:
        for i in node.input:
            self.users[i] = [u for u in self.users[i] if u is not node]
        self.g.node.remove(node)


def optimize(model: onnx.ModelProto) -> tuple[onnx.ModelProto, Rewrites]:
    """``model`` with the rewrites of the module docstring applied (upgraded to opset 14 when it has
    a hard-swish to fuse), and how many were made. A model without the patterns comes back as is."""
    import onnx.version_converter

    if _count_hardswish(model) and _opset(model) < HARDSWISH_OPSET:
        model = onnx.version_converter.convert_version(model, HARDSWISH_OPSET)
    g = _Graph(model.graph)
    folded = sum(_fold_affine(g, conv) for conv in list(model.graph.node) if conv.op_type == "Conv")
    hardswish = sum(_fuse_hardswish(g, add) for add in list(model.graph.node) if add.op_type == "Add")
    _drop_unused(g)
    return model, Rewrites(folded, hardswish)


@contextmanager
def optimized_file(path: str) -> Iterator[tuple[str, Rewrites]]:
    """(a file holding :func:`optimize` of the ONNX file at ``path``, the rewrites made), for a tool
    that takes a path (rapidocr, the quantizer); ``path`` itself when there was nothing to rewrite.
    The file is temporary: onnxruntime reads it once, when the session is created."""
    import onnx

    model, done = optimize(onnx.load(path))
    if not done:
        yield path, done
        return
    with tempfile.NamedTemporaryFile(suffix=".onnx") as f:
        f.write(model.SerializeToString())
        f.flush()
        yield f.name, done


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _count_hardswish(model: onnx.ModelProto) -> int:
    g = _Graph(model.graph)
    return sum(_hardswish_nodes(g, n) is not None for n in model.graph.node if n.op_type == "Add")


def _fold_affine(g: _Graph, conv: onnx.NodeProto) -> int:
    """Conv -> Mul(scalar) / Add(scalar) ... -> one Conv with the scalars in its weights and bias."""
    from onnx import numpy_helper

    done = 0
    while True:
        nxt = g.only_user(conv.output[0], "Mul") or g.only_user(conv.output[0], "Add")
        if nxt is None or len(nxt.input) != 2:
            return done
        other = nxt.input[1] if nxt.input[0] == conv.output[0] else nxt.input[0]
        v = g.scalar(other)
        w = g.consts.get(conv.input[1])
        if v is None or w is None:
            return done
        b = g.consts.get(conv.input[2]) if len(conv.input) > 2 else np.zeros(w.shape[0], w.dtype)
        if b is None:
            return done
        if nxt.op_type == "Mul":
            w, b = w * np.float32(v), b * np.float32(v)
        else:
            b = b + np.float32(v)
        names = (f"{conv.name}.w.{done}", f"{conv.name}.b.{done}")
        for name, arr in zip(names, (w, b), strict=True):
            g.consts[name] = arr.astype(np.float32)
            g.g.initializer.append(numpy_helper.from_array(g.consts[name], name))
        for i in conv.input[1:]:
            g.users[i] = [u for u in g.users[i] if u is not conv]
        del conv.input[1:]
        conv.input.extend(names)
        for name in names:
            g.users[name].append(conv)
        conv.output[0] = nxt.output[0]
        g.remove(nxt)
        done += 1


def _hardswish_nodes(g: _Graph, add: onnx.NodeProto) -> tuple[str, list[onnx.NodeProto]] | None:
    """(x, the four nodes) if ``add`` starts ``Div(Mul(x, Clip(Add(x, 3), 0, 6)), 6)``."""
    if len(add.input) != 2:
        return None
    three = [i for i, name in enumerate(add.input) if g.scalar(name) == 3.0]
    if not three:
        return None
    x = add.input[1 - three[0]]
    clip = g.only_user(add.output[0], "Clip")
    if clip is None or len(clip.input) != 3:
        return None
    if (g.scalar(clip.input[1]), g.scalar(clip.input[2])) != (0.0, 6.0):
        return None
    mul = g.only_user(clip.output[0], "Mul")
    if mul is None or x not in mul.input:
        return None
    div = g.only_user(mul.output[0], "Div")
    if div is None or div.input[0] != mul.output[0] or g.scalar(div.input[1]) != 6.0:
        return None
    return x, [add, clip, mul, div]


def _fuse_hardswish(g: _Graph, add: onnx.NodeProto) -> int:
    from onnx import helper

    found = _hardswish_nodes(g, add)
    if found is None:
        return 0
    x, nodes = found
    at = list(g.g.node).index(add)
    for n in nodes:
        g.remove(n)
    node = helper.make_node("HardSwish", [x], [nodes[-1].output[0]], name=f"{nodes[-1].name}.hardswish")
    g.g.node.insert(at, node)
    g.users[x].append(node)
    return 1


def _drop_unused(g: _Graph) -> None:
    """Initializers and Constant nodes the rewrites left without readers."""
    graph = g.g
    inputs = {i.name for i in graph.input}
    for n in [n for n in graph.node if n.op_type == "Constant" and not g.users.get(n.output[0])]:
        if n.output[0] not in g.outputs:
            graph.node.remove(n)
    keep = [i for i in graph.initializer if g.users.get(i.name) or i.name in g.outputs or i.name in inputs]
    del graph.initializer[:]
    graph.initializer.extend(keep)
