"""The ``template`` plugin: the dew point of the air a node measures, from an ONNX model.

This is the file to copy when you write a plugin (see the README next to ``pyproject.toml``).
It shows the whole contract of :mod:`gatewayd.plugin_api` on a small real model:

* ``__init__`` validates the options and raises ``ValueError`` with a clear message;
* ``load`` opens the model with ``self.threads`` intra-op threads, raises ``PluginNotReady`` while
  the model file is missing, and checks the model's metadata;
* ``sample`` gives the warm-up batch;
* ``process`` answers a batch with one ``session.run``, and gives a reading it cannot judge a
  result with an ``error`` key instead of failing the whole batch.

The model (``model.onnx``, built by ``make_model.py``) takes float32 ``x [N, 2]`` = (temperature
°C, relative humidity %) and returns ``dew_point [N]`` in °C: a small MLP fitted to the Magnus
formula. Its ``metadata_props`` carry its name and version, the fields it needs, their units and
the range it was fitted on.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnxruntime as ort

# The contract: the only gatewayd module a plugin imports.
from gatewayd.plugin_api import Plugin, PluginError, PluginNotReady, Reading, Result, numeric

#: This package's name, for the packaged model: nothing to edit here when you rename the package.
PACKAGE = __name__.rpartition(".")[0]
PACKAGED_MODEL = "model.onnx"
#: The reading fields the model takes, in the column order of its input (checked on load).
FIELDS = ("temperature", "humidity")
KNOWN_OPTIONS = ("model_path", "risk_spread_c")
DEFAULT_RISK_SPREAD_C = 2.0


class TemplatePlugin(Plugin):
    """Dew point, spread (temperature minus dew point) and condensation risk of a reading.

    Options (the ``options`` table of the plugin's ``[[plugins]]`` entry):

    ``model_path`` (str): an ONNX model to use instead of the packaged ``model.onnx``.
    ``risk_spread_c`` (number >= 0, default 2.0): a reading whose temperature is at most this many
    °C above its dew point is flagged ``condensation_risk``.

    Each reading needs ``temperature`` (°C) and ``humidity`` (% RH) as numbers within the range
    the model was fitted on; SenML units, where the node sends them, must be ``Cel`` and ``%RH``.
    """

    #: The plugin's name in logs; the entry point name (pyproject.toml) is what configs use.
    name: ClassVar[str] = "template"
    #: Reported by the gateway when a worker is ready; bump it with every release.
    version: ClassVar[str] = "0.1.0"

    def __init__(self, options: Mapping[str, Any]) -> None:
        # Keeps ``self.options`` and sets ``self.threads = 1``; the gateway overwrites ``threads``
        # after construction and before ``load()``. Do not open files or models here: the
        # constructor should only check the options, so a wrong config fails fast and clearly.
        super().__init__(options)

        unknown = sorted(repr(key) for key in self.options if key not in KNOWN_OPTIONS)
        if unknown:
            raise ValueError(
                f"{self.name} plugin: unknown option(s) {', '.join(unknown)}; "
                f"known options: {', '.join(KNOWN_OPTIONS)}"
            )

        model_path = self.options.get("model_path")
        if model_path is not None and not isinstance(model_path, str):
            raise ValueError(
                f"{self.name} plugin: option 'model_path' must be a string, got {type(model_path).__name__}"
            )
        if model_path == "":
            raise ValueError(f"{self.name} plugin: option 'model_path' must not be empty")
        self.model_path: Path | None = None if model_path is None else Path(model_path)

        spread = self.options.get("risk_spread_c", DEFAULT_RISK_SPREAD_C)
        risk_spread_c = numeric(spread)  # None for text, booleans, NaN, infinities, tables...
        if risk_spread_c is None or risk_spread_c < 0:
            raise ValueError(
                f"{self.name} plugin: option 'risk_spread_c' must be a finite number >= 0, got {spread!r}"
            )
        self.risk_spread_c = risk_spread_c

        # Filled in by load().
        self._session: Any = None  # an onnxruntime.InferenceSession (untyped)
        self._input_name = ""
        self._output_name = ""
        self.model_info: dict[str, str] = {}
        self.units: dict[str, str] = {}
        self.domain: dict[str, tuple[float, float]] = {}

    # --- lifecycle: load, sample, process ----------------------------------------------------------

    def load(self) -> None:
        """Open the model and read its metadata. Called once per worker process."""
        model: str | bytes
        if self.model_path is not None:
            if not self.model_path.is_file():
                # Not there *yet* (still being copied, a volume not mounted): the gateway retries
                # the load after a backoff instead of counting it as a broken plugin.
                raise PluginNotReady(f"{self.name} plugin: model file not found: {self.model_path}")
            model = os.fspath(self.model_path)
        else:
            packaged = resources.files(PACKAGE) / PACKAGED_MODEL
            if not packaged.is_file():
                raise PluginNotReady(f"{self.name} plugin: packaged model {PACKAGED_MODEL} is missing")
            model = packaged.read_bytes()

        opts = ort.SessionOptions()
        # The gateway shares the machine's cores between all plugin workers: use exactly the
        # intra-op threads it gave this worker, and no inter-op parallelism of your own.
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Any exception from here on (a corrupt file, a model without the metadata below) fails
        # the load: the gateway logs it, backs off and tries again, then cools down.
        session = ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])
        self._read_metadata(session)
        self._session = session

    def _read_metadata(self, session: Any) -> None:
        """Check that the model is one this code can drive, and take what it needs from its metadata."""
        where = f"{self.name} plugin: model {self.model_path or PACKAGED_MODEL}"
        meta: dict[str, str] = dict(session.get_modelmeta().custom_metadata_map)
        inputs, outputs = session.get_inputs(), session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise PluginError(f"{where}: expected one input and one output")
        self._input_name, self._output_name = str(inputs[0].name), str(outputs[0].name)
        try:
            features = json.loads(meta["features"])
            units = json.loads(meta["units"])
            domain = json.loads(meta["domain"])
            self.model_info = {"name": meta["model_name"], "version": meta["model_version"]}
            self.units = {f: str(units[f]) for f in FIELDS}
            self.domain = {f: (float(domain[f][0]), float(domain[f][1])) for f in FIELDS}
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise PluginError(f"{where}: metadata incomplete or malformed ({type(e).__name__}: {e})") from e
        if features != list(FIELDS):
            raise PluginError(f"{where}: takes features {features}, this plugin feeds {list(FIELDS)}")

    def sample(self) -> Sequence[Reading]:
        """The warm-up batch: a few ordinary readings, run once after ``load``.

        The first ``session.run`` is slower (memory arenas, kernel choice); the gateway reports the
        worker ready only once ``process`` has succeeded on this batch.
        """
        rows = [(20.0, 50.0), (-5.0, 85.0), (35.0, 25.0), (12.5, 99.0)]
        return [
            Reading(id=f"warmup-{i}", node="warmup", ts=0.0, fields=dict(zip(FIELDS, row, strict=True)))
            for i, row in enumerate(rows)
        ]

    def process(self, batch: Sequence[Reading]) -> Sequence[Result]:
        """One result per reading: the good ones go through a single ``session.run``.

        A reading the model cannot judge (a field missing, not a number, in other units, out of
        range) gets ``{"error": ...}``. Raising here would fail the whole batch instead: the gateway
        would retry it and, after ``max_attempts``, give every reading in it an error result.
        """
        if self._session is None:
            raise RuntimeError(f"{self.name} plugin: load() must be called before process()")
        results: list[Result] = []
        rows: list[list[float]] = []
        accepted: list[Reading] = []
        for reading in batch:
            row, problem = self._row(reading)
            if problem is not None:
                results.append(Result(reading.id, {"error": problem}))
            else:
                rows.append(row)
                accepted.append(reading)
        if not rows:
            return results  # nothing to run (an empty batch, or only bad readings)

        x = np.asarray(rows, dtype=np.float32)
        (dew_points,) = self._session.run([self._output_name], {self._input_name: x})
        for reading, row, dew_point in zip(accepted, rows, dew_points.tolist(), strict=True):
            spread = row[0] - dew_point
            # Plain Python floats and bools: result data must serialise as JSON.
            results.append(
                Result(
                    reading.id,
                    {
                        "dew_point": round(dew_point, 2),
                        "spread": round(spread, 2),
                        "condensation_risk": spread <= self.risk_spread_c,
                        "model": dict(self.model_info),
                    },
                )
            )
        return results

    def _row(self, reading: Reading) -> tuple[list[float], str | None]:
        """The model's input row for ``reading``, or why there is none."""
        row: list[float] = []
        for field in FIELDS:
            value = numeric(reading.fields.get(field))
            if value is None:
                return [], f"missing or non-numeric field: {field}"
            unit = reading.units.get(field)
            if unit is not None and unit != self.units[field]:
                return [], f"{field} is in {unit!r}, the model takes {self.units[field]!r}"
            low, high = self.domain[field]
            if not low <= value <= high:
                return [], f"{field} {value:g} is outside the model's range {low:g}..{high:g}"
            row.append(value)
        return row, None
