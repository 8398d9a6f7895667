"""Offline INT8 quantization of ONNX models, measured: ``gatewayd models quantize`` and a library.

Dynamic INT8 (weights quantized, activations at run time) suits transformer/MLP models; static
INT8 (activation ranges calibrated on sample inputs, QOperator or QDQ) suits CNNs. Either way the
tool measures, in the same run, what the quantization bought and what it cost: file size and
median per-sample latency FP32 vs INT8 (same thread count), and how many evaluation samples give
agreeing outputs under a metric (:class:`Close`, :class:`SameArgmax`, :class:`MaskIoU` or any
callable of that shape). Always measure: on these CPUs dynamic INT8 made the OCR CNNs slower
(DESIGN §6). The quantized file is written even when agreement falls short, but then carries
``"passed": false`` in its ``gatewayd.quantize`` metadata and the report says FAIL.

Sets of inputs (calibration and evaluation). As a library: any iterable of ``{input name: array}``
dicts. On disk, one of:

* a ``.npz`` file with one array per model input, named after it, whose first axis indexes the
  samples (so all samples share one shape);
* a directory whose files, in sorted name order, are one sample each: ``*.npy`` (single-input
  models) or ``*.npz`` with one array per input name. Samples may differ in shape, as models with
  dynamic axes (e.g. the PP-OCR detector's [N,3,H,W]) need; calibration runs sample by sample.

A sample array has the input's shape, with or without its leading batch axis of 1; floats are cast
to the input's float type.

onnx and tqdm come with the ``models`` extra and are imported only when the tool runs, so the
daemon does not need them.
"""

from __future__ import annotations

import itertools
import json
import statistics
import tempfile
import time
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence, Sized
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[Any]
Feeds = Mapping[str, Array]
Method = Literal["dynamic", "static"]
Format = Literal["qoperator", "qdq"]
METADATA_KEY = "gatewayd.quantize"
# Per-channel weight scales need DequantizeLinear's axis attribute, which arrived in opset 13.
MIN_OPSET = 13

_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


class SetError(ValueError):
    """A calibration or evaluation set that does not fit the model; the message says where and why."""


class Metric(Protocol):
    """Compares one sample's outputs: (do they agree, an error figure where larger is worse)."""

    @property
    def name(self) -> str: ...

    def __call__(self, ref: Sequence[Array], got: Sequence[Array]) -> tuple[bool, float]: ...


@dataclass(frozen=True)
class Close:
    """Generic: every element of every output has |got - ref| <= atol + rtol*|ref|; error: max |got - ref|."""

    atol: float = 1e-2
    rtol: float = 1e-2

    @property
    def name(self) -> str:
        return f"|got-ref| <= {self.atol:g} + {self.rtol:g}*|ref|, error max |got-ref|"

    def __call__(self, ref: Sequence[Array], got: Sequence[Array]) -> tuple[bool, float]:
        ok, err = True, 0.0
        for r, g in zip(ref, got, strict=True):
            if r.shape != g.shape:
                return False, float("inf")
            r64 = r.astype(np.float64)
            d = np.abs(g.astype(np.float64) - r64)
            if d.size:
                ok = ok and bool(np.all(d <= self.atol + self.rtol * np.abs(r64)))  # NaN never agrees
                m = float(d.max())
                err = max(err, m if np.isfinite(m) else float("inf"))
        return ok, err


@dataclass(frozen=True)
class SameArgmax:
    """Classifiers: output ``output``'s argmax along ``axis`` equal everywhere; error: fraction differing."""

    axis: int = -1
    output: int = 0

    @property
    def name(self) -> str:
        return f"same argmax of output {self.output}, error fraction differing"

    def __call__(self, ref: Sequence[Array], got: Sequence[Array]) -> tuple[bool, float]:
        r, g = ref[self.output], got[self.output]
        if r.shape != g.shape:
            return False, 1.0
        differ = float(np.mean(np.argmax(r, axis=self.axis) != np.argmax(g, axis=self.axis)))
        return differ == 0.0, differ


@dataclass(frozen=True)
class MaskIoU:
    """Detectors/segmenters: IoU of output ``output`` thresholded at ``threshold`` >= min_iou; error: 1 - IoU.

    Whole-map element counts would hide a broken detector, as text or objects cover little of it."""

    threshold: float = 0.3
    min_iou: float = 0.9
    output: int = 0

    @property
    def name(self) -> str:
        return f"IoU of output {self.output} > {self.threshold:g} >= {self.min_iou:g}, error 1 - IoU"

    def __call__(self, ref: Sequence[Array], got: Sequence[Array]) -> tuple[bool, float]:
        r, g = ref[self.output] > self.threshold, got[self.output] > self.threshold
        if r.shape != g.shape:
            return False, 1.0
        union = int(np.count_nonzero(r | g))
        iou = 1.0 if union == 0 else int(np.count_nonzero(r & g)) / union
        return iou >= self.min_iou, 1.0 - iou


@dataclass(frozen=True)
class QuantizeReport:
    """What one quantization run measured; latencies are medians over the evaluation set, in ms."""

    model: Path
    output: Path
    mode: str
    fp32_bytes: int
    int8_bytes: int
    fp32_ms: float
    int8_ms: float
    threads: int
    samples: int
    agreeing: int
    metric: str
    worst_error: float
    worst_sample: int
    min_agreement: float

    @property
    def size_ratio(self) -> float:
        return self.int8_bytes / self.fp32_bytes

    @property
    def latency_ratio(self) -> float:
        return self.int8_ms / self.fp32_ms

    @property
    def agreement(self) -> float:
        return self.agreeing / self.samples

    @property
    def passed(self) -> bool:
        return self.agreement >= self.min_agreement

    def lines(self) -> list[str]:
        return [
            f"model      {self.model} -> {self.output} ({self.mode})",
            f"size       {_size(self.fp32_bytes)} -> {_size(self.int8_bytes)} ({self.size_ratio:.2f}x)",
            f"latency    {self.fp32_ms:.2f} ms -> {self.int8_ms:.2f} ms per sample "
            f"({self.latency_ratio:.2f}x; median of {self.samples}, {self.threads} thread(s))",
            f"agreement  {self.agreeing}/{self.samples} samples ({self.agreement:.1%}) with {self.metric}; "
            f"worst error {self.worst_error:.4g} (sample {self.worst_sample})",
            f"result     {'PASS' if self.passed else 'FAIL'}: agreement {self.agreement:.1%} "
            f"{'>=' if self.passed else '<'} required {self.min_agreement:.1%}",
        ]


def quantize(
    model: str | Path,
    output: str | Path,
    *,
    evaluation: Iterable[Feeds],
    method: Method = "static",
    calibration: Iterable[Feeds] | None = None,
    quant_format: Format = "qoperator",
    per_channel: bool = False,
    activations: Literal["uint8", "int8"] = "uint8",
    reduce_range: bool = False,
    op_types: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    metric: Metric | None = None,
    min_agreement: float = 0.99,
    threads: int = 1,
    progress: bool = True,
) -> QuantizeReport:
    """Quantize ``model`` to ``output``, then measure it against the FP32 model on ``evaluation``.

    ``calibration`` (static only) and ``evaluation`` are each iterated once. ``activations`` (static
    only): uint8 with int8 weights suits x86 with VNNI, int8 suits ARM; ``reduce_range`` (7-bit
    weights) helps x86 without VNNI. ``op_types`` limits
    quantization to those operator types; ``exclude`` keeps the named nodes in float (the input
    layer is the usual suspect when agreement is poor). Raises SetError when a set does not fit the
    model; a quantization that disagrees too often is reported, not raised.
    """
    import onnx
    import onnx.version_converter
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model, output = Path(model), Path(output)
    if (method == "static") != (calibration is not None):
        raise ValueError("static quantization needs a calibration set; dynamic quantization takes none")
    metric = metric or Close()
    fp32 = _session(model, threads)
    inputs = fp32.get_inputs()
    mode = "dynamic" if method == "dynamic" else f"static {'QDQ' if quant_format == 'qdq' else 'QOperator'}"
    mode += ", per-channel" if per_channel else ""
    mode += f", only {'/'.join(op_types)}" if op_types else ""
    mode += f", {len(exclude)} node(s) kept in float" if exclude else ""
    with tempfile.TemporaryDirectory(prefix="gatewayd-quantize.") as tmp:
        proto = onnx.load(str(model))
        opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), MIN_OPSET)
        if opset < MIN_OPSET:
            proto = onnx.version_converter.convert_version(proto, MIN_OPSET)
            mode += f", opset {opset}->{MIN_OPSET}"
        upgraded, prepared = Path(tmp, "upgraded.onnx"), Path(tmp, "prepared.onnx")
        onnx.save(proto, str(upgraded))
        del proto
        # Symbolic shape inference needs sympy and targets transformers; ONNX shape inference suffices.
        quant_pre_process(str(upgraded), str(prepared), skip_symbolic_shape=True)
        # onnxruntime ignores unknown names silently, which would pass off a quantized node as excluded.
        # (Checked only when asked: it loads the prepared model once more.)
        if exclude and (unknown := set(exclude) - {n.name for n in onnx.load(str(prepared)).graph.node}):
            raise ValueError(f"exclude: no node named {sorted(unknown)} in the model")
        output.parent.mkdir(parents=True, exist_ok=True)
        common = {
            "per_channel": per_channel,
            "reduce_range": reduce_range,
            "weight_type": QuantType.QInt8,
            "op_types_to_quantize": op_types,
            "nodes_to_exclude": list(exclude),
        }
        if calibration is None:
            quantize_dynamic(prepared, output, **common)
        else:
            reader = _Reader(calibration, inputs, "calibration", progress)
            # MinMax calibration (the default): onnxruntime's histogram methods stack all samples'
            # activations, which fails for samples of different shapes.
            try:
                quantize_static(
                    prepared,
                    output,
                    reader,
                    quant_format=QuantFormat.QOperator if quant_format == "qoperator" else QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8 if activations == "uint8" else QuantType.QInt8,
                    **common,
                )
            finally:
                reader.close()

    agree, errors, t32, t8 = _evaluate(fp32, _session(output, threads), evaluation, inputs, metric, progress)
    worst = int(np.argmax(errors))
    report = QuantizeReport(
        model=model,
        output=output,
        mode=mode,
        fp32_bytes=model.stat().st_size,
        int8_bytes=0,
        fp32_ms=statistics.median(t32) * 1000,
        int8_ms=statistics.median(t8) * 1000,
        threads=threads,
        samples=len(agree),
        agreeing=sum(agree),
        metric=metric.name,
        worst_error=errors[worst],
        worst_sample=worst,
        min_agreement=min_agreement,
    )
    _mark(output, report)
    return replace(report, int8_bytes=output.stat().st_size)  # measured after the mark went in


def load_set(path: str | Path, input_names: Sequence[str]) -> ArraySet:
    """A set on disk (layout in the module docstring); ``input_names`` name a .npy sample's input."""
    return ArraySet(Path(path), input_names)


def model_inputs(model: str | Path) -> list[str]:
    """The names a sample must feed (not initializers that older models also list as inputs)."""
    import onnx

    graph = onnx.load(str(model), load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    return [i.name for i in graph.input if i.name not in weights]


class ArraySet:
    """Samples from a .npz file or a directory of .npy/.npz files, checked as far as the files allow
    when opened (so a malformed set fails before quantization starts) and loaded one at a time."""

    def __init__(self, path: Path, input_names: Sequence[str]) -> None:
        self.path, self.names = path, list(input_names)
        self._stacked: dict[str, Array] | None = None
        self._files: list[Path] = []
        if not path.exists():
            raise SetError(f"{path}: no such file or directory")
        if path.is_dir():
            self._files = sorted(p for p in path.iterdir() if p.suffix in (".npy", ".npz"))
            if not self._files:
                raise SetError(f"{path}: no .npy or .npz files")
            if any(p.suffix == ".npy" for p in self._files) and len(self.names) != 1:
                raise SetError(f"{path}: a .npy sample fits a single-input model; this one has {self.names}")
            return
        arrays = _load_npz(path)
        missing = [n for n in self.names if n not in arrays]
        if missing:
            raise SetError(f"{path}: no array for input(s) {missing}; it has {sorted(arrays)}")
        counts = {n: arrays[n].shape[0] if arrays[n].ndim else 0 for n in self.names}
        if len(set(counts.values())) != 1:
            raise SetError(f"{path}: inputs disagree on the number of samples (first axis): {counts}")
        self._stacked = {n: arrays[n] for n in self.names}

    def __len__(self) -> int:
        if self._stacked is None:
            return len(self._files)
        return len(next(iter(self._stacked.values())))

    def __iter__(self) -> Iterator[dict[str, Array]]:
        if self._stacked is not None:
            for i in range(len(self)):
                yield {n: a[i] for n, a in self._stacked.items()}
            return
        for p in self._files:
            if p.suffix == ".npy":
                try:
                    yield {self.names[0]: np.load(p, allow_pickle=False)}
                except (OSError, ValueError) as e:
                    raise SetError(f"{p}: not a readable .npy file ({e})") from e
            else:
                yield _load_npz(p)


def _load_npz(path: Path) -> dict[str, Array]:
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise ValueError("it holds a single array, not named ones")
        with z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise SetError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from e


def _session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _feeds(sample: Feeds, inputs: Sequence[Any], where: str) -> dict[str, Array]:
    """The sample checked against the model's inputs, with batch axis and float type made to fit."""
    names = [i.name for i in inputs]
    if sorted(sample) != sorted(names):
        raise SetError(f"{where}: has inputs {sorted(sample)}, the model takes {names}")
    feeds = {}
    for i in inputs:
        a = np.asarray(sample[i.name])
        want = _DTYPES.get(i.type)
        if a.ndim == len(i.shape) - 1:
            a = a[None]
        fixed = [(k, d) for k, d in enumerate(i.shape) if isinstance(d, int)]
        if a.ndim != len(i.shape) or any(a.shape[k] != d for k, d in fixed):
            raise SetError(f"{where}: input {i.name!r} has shape {a.shape}, the model takes {i.shape}")
        if want is not None and a.dtype != want:
            if not (a.dtype.kind == "f" and np.dtype(want).kind == "f"):
                raise SetError(f"{where}: input {i.name!r} is {a.dtype}, the model takes {np.dtype(want)}")
            a = a.astype(want)
        feeds[i.name] = a
    return feeds


class _Reader:
    """onnxruntime's calibration data reader protocol (get_next) over a set, one sample per run so
    that samples of different shapes calibrate a model with dynamic axes."""

    def __init__(self, samples: Iterable[Feeds], inputs: Sequence[Any], what: str, progress: bool) -> None:
        from tqdm import tqdm

        total = len(samples) if isinstance(samples, Sized) else None
        it = iter(samples)
        first = next(it, None)
        if first is None:  # said here: onnxruntime's own complaint would not name the set
            raise SetError(f"{what} set is empty")
        self._it, self._inputs, self._what = itertools.chain([first], it), inputs, what
        self._bar = tqdm(total=total, desc=what, unit="sample", disable=not progress)
        self.count = 0

    def get_next(self) -> dict[str, Array] | None:
        sample = next(self._it, None)
        if sample is None:
            return None
        feeds = _feeds(sample, self._inputs, f"{self._what} sample {self.count}")
        self.count += 1
        self._bar.update()
        return feeds

    def close(self) -> None:
        self._bar.close()


def _evaluate(
    fp32: Any, int8: Any, samples: Iterable[Feeds], inputs: Sequence[Any], metric: Metric, progress: bool
) -> tuple[list[bool], list[float], list[float], list[float]]:
    """Per sample: agreement, error, FP32 and INT8 seconds. Both sessions run each sample, in
    alternating order, after one untimed warm-up run, so neither gets the warmer caches."""
    agree: list[bool] = []
    errors: list[float] = []
    times: dict[Any, list[float]] = {fp32: [], int8: []}
    reader = _Reader(samples, inputs, "evaluation", progress)
    try:
        while (feeds := reader.get_next()) is not None:
            outs: dict[Any, list[Array]] = {}
            for sess in (fp32, int8) if len(agree) % 2 == 0 else (int8, fp32):
                if not agree:
                    sess.run(None, feeds)
                t0 = time.perf_counter()
                raw = sess.run(None, feeds)
                times[sess].append(time.perf_counter() - t0)
                outs[sess] = [np.asarray(o) for o in raw]
            ok, err = metric(outs[fp32], outs[int8])
            agree.append(bool(ok))  # a metric may hand back numpy scalars; the report is plain JSON
            errors.append(float(err))
    finally:
        reader.close()
    return agree, errors, times[fp32], times[int8]


def _mark(output: Path, report: QuantizeReport) -> None:
    """Record the outcome in the model's metadata, so a model that failed cannot pass for one that passed."""
    import onnx

    proto = onnx.load(str(output))
    fields = {k: v for k, v in asdict(report).items() if k not in ("fp32_bytes", "int8_bytes", "output")}
    fields |= {"model": report.model.name, "agreement": report.agreement, "passed": report.passed}
    kept = [p for p in proto.metadata_props if p.key != METADATA_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    proto.metadata_props.add(key=METADATA_KEY, value=json.dumps(fields))
    onnx.save(proto, str(output))


def _size(n: int) -> str:
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"
