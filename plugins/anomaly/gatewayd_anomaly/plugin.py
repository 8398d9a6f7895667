"""The ``anomaly`` plugin: scores pump-node readings with a tiny ONNX autoencoder.

The model (``anomaly.onnx``, built by ``make_model.py``) takes the raw readings as float32
``[N, F]`` and returns ``score`` float32 ``[N]``: the mean squared reconstruction error of the
standardised feature vector. A reading whose score is above the threshold is flagged as an
anomaly. Everything the plugin needs to know about the model (feature names and order, threshold,
model name, warm-up rows) is read from the model's ``metadata_props``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnxruntime as ort

from gatewayd.plugin_api import FieldValue, Plugin, PluginError, PluginNotReady, Reading, Result, numeric

PACKAGED_MODEL = "anomaly.onnx"
_KNOWN_OPTIONS = ("model_path", "threshold")
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _finite(value: FieldValue | None) -> float | None:
    """:func:`numeric`, also None for an int too large for a float (instead of OverflowError)."""
    try:
        return numeric(value)
    except OverflowError:
        return None


def _model_input(value: FieldValue | None) -> float | None:
    """``value`` as a float the float32 model can take: a finite number (not a bool) within float32 range."""
    f = _finite(value)
    return f if f is not None and abs(f) <= _FLOAT32_MAX else None


class AnomalyPlugin(Plugin):
    """Flags readings that lie off the learned temperature/humidity/vibration curve of a pump.

    Options (the ``options`` table of the plugin's config entry):

    ``model_path`` (str): an ONNX model to use instead of the packaged ``anomaly.onnx``.
    ``threshold`` (float >= 0): overrides the threshold stored in the model's metadata.

    Threads are not an option: the gateway sets ``self.threads`` (its ``[[plugins]] threads``, or
    the runtime's threads per slot) before ``load``, and the session uses that many intra-op
    threads, one inter-op thread, sequential execution.
    """

    name: ClassVar[str] = "anomaly"
    version: ClassVar[str] = "0.1.0"

    def __init__(self, options: Mapping[str, Any]) -> None:
        super().__init__(options)
        unknown = sorted(repr(key) for key in self.options if key not in _KNOWN_OPTIONS)
        if unknown:
            hint = (
                " ('threads' moved out of options: set threads in the [[plugins]] entry)"
                if "threads" in self.options
                else ""
            )
            raise ValueError(
                f"anomaly plugin: unknown option(s) {', '.join(unknown)}; "
                f"known options: {', '.join(_KNOWN_OPTIONS)}{hint}"
            )

        model_path = self.options.get("model_path")
        if model_path is not None and not isinstance(model_path, str | os.PathLike):
            raise ValueError(
                f"anomaly plugin: option 'model_path' must be a string path, got {type(model_path).__name__}"
            )
        if model_path is not None and not os.fspath(model_path):
            raise ValueError("anomaly plugin: option 'model_path' must not be empty")
        self.model_path: Path | None = None if model_path is None else Path(os.fspath(model_path))

        threshold = self.options.get("threshold")
        self._threshold_option: float | None = None
        if threshold is not None:
            if isinstance(threshold, bool) or not isinstance(threshold, int | float):
                raise ValueError(
                    f"anomaly plugin: option 'threshold' must be a number, got {type(threshold).__name__}"
                )
            self._threshold_option = _finite(threshold)
            if self._threshold_option is None or self._threshold_option < 0:
                raise ValueError(
                    f"anomaly plugin: option 'threshold' must be finite and >= 0, got {threshold}"
                )

        self._session: Any = None  # onnxruntime.InferenceSession once loaded
        self._input_name = ""
        self._output_name = ""
        self.features: tuple[str, ...] = ()
        self.threshold: float = math.nan
        self.model_name = ""
        self._units: dict[str, str] = {}
        self._sample_rows: list[list[float]] = []

    # --- lifecycle -------------------------------------------------------------------------

    def load(self) -> None:
        """Create the onnxruntime session (CPU, ``self.threads`` intra-op threads) and read the metadata."""
        model: str | bytes
        if self.model_path is not None:
            if not self.model_path.is_file():
                raise PluginNotReady(f"anomaly plugin: model file not found: {self.model_path}")
            model = str(self.model_path)
        else:
            resource = resources.files("gatewayd_anomaly") / PACKAGED_MODEL
            if not resource.is_file():
                raise PluginNotReady(f"anomaly plugin: packaged model {PACKAGED_MODEL} is missing")
            model = resource.read_bytes()

        sess_options = ort.SessionOptions()
        sess_options.intra_op_num_threads = self.threads
        sess_options.inter_op_num_threads = 1
        sess_options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        session = ort.InferenceSession(model, sess_options=sess_options, providers=["CPUExecutionProvider"])
        self._read_metadata(session)
        self._session = session

    def _read_metadata(self, session: Any) -> None:
        where = f"anomaly plugin: model {self.model_path or PACKAGED_MODEL}"
        meta: dict[str, str] = dict(session.get_modelmeta().custom_metadata_map)
        inputs, outputs = session.get_inputs(), session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise PluginError(f"{where}: expected one input and one output")
        self._input_name = str(inputs[0].name)
        self._output_name = str(outputs[0].name)

        try:
            features = json.loads(meta["features"])
        except (KeyError, json.JSONDecodeError) as exc:
            raise PluginError(f"{where}: metadata 'features' missing or not JSON") from exc
        if not isinstance(features, list) or not features or not all(isinstance(f, str) for f in features):
            raise PluginError(f"{where}: metadata 'features' must be a non-empty JSON list of strings")
        self.features = tuple(features)
        width = inputs[0].shape[-1] if inputs[0].shape else None
        if isinstance(width, int) and width != len(self.features):
            raise PluginError(f"{where}: input has {width} columns but metadata names {len(self.features)}")

        if self._threshold_option is not None:
            self.threshold = self._threshold_option
        else:
            try:
                self.threshold = float(meta["threshold"])
            except (KeyError, ValueError) as exc:
                raise PluginError(f"{where}: metadata 'threshold' missing or not a number") from exc
            if not math.isfinite(self.threshold):
                raise PluginError(f"{where}: metadata 'threshold' is not finite")

        self.model_name = meta.get("model", "") or self.name
        units = json.loads(meta.get("units", "{}"))
        self._units = {str(k): str(v) for k, v in units.items()} if isinstance(units, dict) else {}

        sample = json.loads(meta.get("sample", "[]"))
        rows = [row for row in sample if isinstance(row, list) and len(row) == len(self.features)]
        if not rows or not all(_model_input(v) is not None for row in rows for v in row):
            raise PluginError(
                f"{where}: metadata 'sample' must hold warm-up rows of {len(self.features)} numbers"
            )
        self._sample_rows = [[float(v) for v in row] for row in rows]

    def sample(self) -> Sequence[Reading]:
        """A few normal readings (stored in the model's metadata) for the warm-up inference."""
        self._require_loaded("sample")
        return [
            Reading(
                id=f"warmup-{i}",
                node="warmup",
                ts=0.0,
                fields=dict(zip(self.features, row, strict=True)),
                units={f: u for f, u in self._units.items() if f in self.features},
            )
            for i, row in enumerate(self._sample_rows)
        ]

    def process(self, batch: Sequence[Reading]) -> Sequence[Result]:
        """Score every reading that has all features as numbers in one ``session.run``.

        Returns one result per reading, in batch order; a reading that cannot be scored gets a
        result with an ``error`` key.
        """
        self._require_loaded("process")
        results: list[Result | None] = [None] * len(batch)
        rows: list[list[float]] = []
        positions: list[int] = []
        for i, reading in enumerate(batch):
            values = [_model_input(reading.fields.get(f)) for f in self.features]
            row = [v for v in values if v is not None]
            if len(row) < len(values):
                bad = [f for f, v in zip(self.features, values, strict=True) if v is None]
                results[i] = Result(
                    reading.id, {"error": f"missing or non-numeric field(s): {', '.join(bad)}"}
                )
            else:
                rows.append(row)
                positions.append(i)

        if rows:
            x = np.asarray(rows, dtype=np.float32)
            (scores,) = self._session.run([self._output_name], {self._input_name: x})
            for i, raw in zip(positions, np.asarray(scores, dtype=np.float64).tolist(), strict=True):
                score = float(raw)
                # Readings so extreme that the float32 arithmetic overflows: certainly anomalous,
                # reported with a finite score so the result stays valid JSON.
                anomaly = (score > self.threshold) or not math.isfinite(score)
                if not math.isfinite(score):
                    score = _FLOAT32_MAX
                results[i] = Result(
                    batch[i].id,
                    {
                        "score": score,
                        "anomaly": anomaly,
                        "threshold": self.threshold,
                        "model": self.model_name,
                    },
                )
        return [r for r in results if r is not None]

    def _require_loaded(self, what: str) -> None:
        if self._session is None:
            raise RuntimeError(f"anomaly plugin: load() must be called before {what}()")
