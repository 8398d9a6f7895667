"""Tests of the reference ``anomaly`` plugin (plugins/anomaly), run against a real onnxruntime session."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from collections.abc import Iterator, Mapping, Sequence
from importlib import resources
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from gatewayd_anomaly.plugin import AnomalyPlugin

from gatewayd.plugin_api import ENTRY_POINT_GROUP, FieldValue, Plugin, PluginNotReady, Reading, Result

MAKE_MODEL = Path(__file__).resolve().parents[1] / "plugins" / "anomaly" / "make_model.py"


def reading(rid: str, fields: Mapping[str, FieldValue]) -> Reading:
    return Reading(id=rid, node="pump-7", ts=1_700_000_000.0, fields=dict(fields))


def pump(rid: str, temperature: float, humidity: float, vibration: float) -> Reading:
    return reading(rid, {"temperature": temperature, "humidity": humidity, "vibration": vibration})


@pytest.fixture(scope="module")
def plugin() -> AnomalyPlugin:
    p = AnomalyPlugin({})
    p.load()
    return p


@pytest.fixture(scope="module")
def make_model() -> ModuleType:
    pytest.importorskip("onnx")
    spec = importlib.util.spec_from_file_location("anomaly_make_model", MAKE_MODEL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def by_id(results: Sequence[Result]) -> dict[str, Mapping[str, Any]]:
    return {r.reading_id: r.data for r in results}


class CountingSession:
    """Wraps an InferenceSession and counts ``run`` calls and the rows fed to them."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: list[int] = []

    def run(self, output_names: Any, feeds: dict[str, np.ndarray]) -> Any:
        self.calls.append(len(next(iter(feeds.values()))))
        return self.inner.run(output_names, feeds)


@pytest.fixture
def counting(plugin: AnomalyPlugin) -> Iterator[CountingSession]:
    original = plugin._session
    wrapper = CountingSession(original)
    plugin._session = wrapper
    try:
        yield wrapper
    finally:
        plugin._session = original


def test_entry_point_resolves_to_the_plugin_class() -> None:
    """The installed distribution registers ``anomaly`` in the gatewayd.plugins entry-point group."""
    (ep,) = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == "anomaly"]
    assert ep.value == "gatewayd_anomaly.plugin:AnomalyPlugin"
    cls = ep.load()
    assert cls is AnomalyPlugin
    assert issubclass(cls, Plugin) and cls.name == "anomaly"


def test_packaged_model_metadata_is_read_on_load(plugin: AnomalyPlugin) -> None:
    """``load`` takes the feature order, threshold and model name from the packaged model's metadata."""
    assert resources.files("gatewayd_anomaly").joinpath("anomaly.onnx").is_file()
    assert plugin.features == ("temperature", "humidity", "vibration")
    assert plugin.model_name == "anomaly-ae-v1"
    assert 0.1 < plugin.threshold < 2.0


def test_packaged_model_is_opset17_with_dynamic_batch() -> None:
    """The packaged ONNX file is opset 17 / IR 8 with input x [N, 3] and output score [N]."""
    onnx = pytest.importorskip("onnx")
    model = onnx.load_from_string(resources.files("gatewayd_anomaly").joinpath("anomaly.onnx").read_bytes())
    assert model.ir_version == 8
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    (x,) = model.graph.input
    (score,) = model.graph.output
    assert x.name == "x" and [d.dim_param or d.dim_value for d in x.type.tensor_type.shape.dim] == ["N", 3]
    assert score.name == "score" and [d.dim_param for d in score.type.tensor_type.shape.dim] == ["N"]
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["features"]) == ["temperature", "humidity", "vibration"]
    assert float(meta["threshold"]) > 0


def test_warmup_sample_scores_as_normal(plugin: AnomalyPlugin) -> None:
    """``sample`` returns warm-up readings with ids warmup-N that all score below the threshold."""
    sample = plugin.sample()
    assert len(sample) >= 3
    assert [r.id for r in sample] == [f"warmup-{i}" for i in range(len(sample))]
    results = plugin.process(sample)
    assert [r.reading_id for r in results] == [r.id for r in sample]
    for r in results:
        assert r.data["anomaly"] is False and r.data["score"] < plugin.threshold


def test_typical_normal_readings_score_below_threshold(plugin: AnomalyPlugin) -> None:
    """Readings on the normal pump curve at low, mid and high load are not flagged."""
    results = by_id(
        plugin.process(
            [pump("low", 45.0, 55.5, 1.2), pump("mid", 55.0, 47.0, 1.9), pump("high", 65.0, 38.5, 3.2)]
        )
    )
    for data in results.values():
        assert data["anomaly"] is False
        assert data["score"] < plugin.threshold / 10
        assert data["threshold"] == plugin.threshold and data["model"] == "anomaly-ae-v1"


def test_clear_anomalies_score_above_threshold(plugin: AnomalyPlugin) -> None:
    """High vibration when cool, overheating and very dry air are each flagged as anomalies."""
    results = by_id(
        plugin.process(
            [
                pump("vibration", 45.0, 55.5, 12.0),
                pump("overheat", 95.0, 45.0, 2.5),
                pump("dry", 55.0, 5.0, 1.9),
                pump("still-while-hot", 66.0, 38.0, 0.3),
            ]
        )
    )
    for rid, data in results.items():
        assert data["anomaly"] is True, rid
        assert data["score"] > 5 * plugin.threshold, rid


def test_false_positive_and_detection_rates(plugin: AnomalyPlugin, make_model: ModuleType) -> None:
    """On fresh synthetic data the plugin flags < 1.5 % of normal readings and > 99 % of gross anomalies."""
    rng = np.random.default_rng(12345)
    normal = make_model.normal_readings(rng, 4000)
    flagged = [
        r.data["anomaly"] for r in plugin.process([pump(f"n{i}", *row) for i, row in enumerate(normal)])
    ]
    assert np.mean(flagged) < 0.015

    anomalous = np.concatenate(
        [xs for name, xs in make_model.anomaly_sets(rng, 500).items() if "subtle" not in name]
    )
    results = plugin.process([pump(f"a{i}", *row) for i, row in enumerate(anomalous)])
    assert np.mean([r.data["anomaly"] for r in results]) > 0.99


def test_missing_or_non_numeric_fields_give_an_error_result(plugin: AnomalyPlugin) -> None:
    """A reading lacking a field or holding a non-number (or one beyond float32 range) gets an error
    result; the rest are still scored."""
    batch = [
        pump("ok-1", 50.0, 51.0, 1.6),
        reading("no-humidity", {"temperature": 50.0, "vibration": 1.6}),
        reading("text", {"temperature": "hot", "humidity": 51.0, "vibration": 1.6}),
        reading("bool", {"temperature": 50.0, "humidity": True, "vibration": 1.6}),
        reading("nan", {"temperature": 50.0, "humidity": 51.0, "vibration": math.nan}),
        reading("bytes-and-empty", {"temperature": b"\x01", "humidity": 51.0}),
        reading("beyond-float32", {"temperature": 50.0, "humidity": 1e39, "vibration": -(2**200)}),
        pump("ok-2", 60.0, 42.0, 2.6),
    ]
    results = plugin.process(batch)
    assert [r.reading_id for r in results] == [r.id for r in batch]
    data = by_id(results)
    assert data["no-humidity"] == {"error": "missing or non-numeric field(s): humidity"}
    assert data["text"] == {"error": "missing or non-numeric field(s): temperature"}
    assert data["bool"] == {"error": "missing or non-numeric field(s): humidity"}
    assert data["nan"] == {"error": "missing or non-numeric field(s): vibration"}
    assert data["bytes-and-empty"] == {"error": "missing or non-numeric field(s): temperature, vibration"}
    assert data["beyond-float32"] == {"error": "missing or non-numeric field(s): humidity, vibration"}
    assert data["ok-1"]["anomaly"] is False and data["ok-2"]["anomaly"] is False


def test_integer_fields_and_extra_fields_are_accepted(plugin: AnomalyPlugin) -> None:
    """Integer values count as numbers and fields the model does not use are ignored."""
    (result,) = plugin.process(
        [reading("ints", {"temperature": 55, "humidity": 47, "vibration": 2, "battery": "ok", "rssi": -71})]
    )
    assert "error" not in result.data and result.data["anomaly"] is False


def test_batch_of_n_gives_n_results_from_one_session_run(
    plugin: AnomalyPlugin, counting: CountingSession
) -> None:
    """A batch of N readings (some unscorable) yields N results in batch order from a single run."""
    rng = np.random.default_rng(7)
    batch = [pump(f"r{i:03d}", 50 + 10 * rng.random(), 45 + 5 * rng.random(), 2.0) for i in range(97)]
    batch[10] = reading("r010", {"temperature": 50.0})
    results = plugin.process(batch)
    assert [r.reading_id for r in results] == [r.id for r in batch]
    assert counting.calls == [96]


def test_empty_or_all_bad_batch_runs_no_inference(plugin: AnomalyPlugin, counting: CountingSession) -> None:
    """An empty batch gives no results and a batch with nothing scorable gives errors without a run."""
    assert list(plugin.process([])) == []
    results = plugin.process([reading("x", {})])
    assert results[0].data == {"error": "missing or non-numeric field(s): temperature, humidity, vibration"}
    assert counting.calls == []


def test_results_are_json_serialisable_even_for_absurd_values(plugin: AnomalyPlugin) -> None:
    """Scores are plain finite floats (overflowing inputs are clamped and flagged) so results dump as JSON."""
    results = plugin.process([pump("sane", 55.0, 47.0, 1.9), pump("absurd", 3e38, -3e38, 3e38)])
    text = json.dumps([r.data for r in results], allow_nan=False)
    absurd = by_id(results)["absurd"]
    assert absurd["anomaly"] is True and math.isfinite(absurd["score"])
    assert isinstance(by_id(results)["sane"]["score"], float)
    assert json.loads(text)[0]["model"] == "anomaly-ae-v1"


def test_threshold_option_overrides_metadata() -> None:
    """A ``threshold`` option replaces the metadata threshold in the decision and in the result."""
    strict = AnomalyPlugin({"threshold": 0})
    strict.load()
    (result,) = strict.process([pump("r", 60.0, 43.0, 2.6)])
    assert result.data["threshold"] == 0.0 and result.data["anomaly"] is True


def test_model_path_option_and_gateway_threads(tmp_path: Path, plugin: AnomalyPlugin) -> None:
    """An explicit model_path with ``threads`` set to 2 by the gateway loads the same model, runs the
    session with 2 intra-op threads and gives the same scores."""
    copy = tmp_path / "copy.onnx"
    with resources.as_file(resources.files("gatewayd_anomaly").joinpath("anomaly.onnx")) as packaged:
        shutil.copyfile(packaged, copy)
    other = AnomalyPlugin({"model_path": str(copy)})
    assert other.threads == 1  # the base class default, for a plugin run by hand
    other.threads = 2  # what the worker does between construction and load()
    other.load()
    assert other._session.get_session_options().intra_op_num_threads == 2
    assert plugin._session.get_session_options().intra_op_num_threads == 1
    batch = [pump("a", 45.0, 55.5, 12.0), pump("b", 55.0, 47.0, 1.9)]
    assert [r.data["score"] for r in other.process(batch)] == pytest.approx(
        [r.data["score"] for r in plugin.process(batch)], rel=1e-5
    )


def test_missing_model_file_is_not_ready(tmp_path: Path) -> None:
    """A model_path that does not exist makes ``load`` raise PluginNotReady (retry with backoff)."""
    p = AnomalyPlugin({"model_path": str(tmp_path / "nope.onnx")})
    with pytest.raises(PluginNotReady, match="not found"):
        p.load()


def test_process_before_load_is_an_error() -> None:
    """Calling ``process`` or ``sample`` before ``load`` raises instead of failing obscurely."""
    p = AnomalyPlugin({})
    with pytest.raises(RuntimeError, match="load"):
        p.process([pump("r", 55.0, 47.0, 1.9)])
    with pytest.raises(RuntimeError, match="load"):
        p.sample()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"treshold": 0.5}, "unknown option"),
        ({"model": "x.onnx"}, "unknown option"),
        ({"threshold": "0.5"}, "'threshold' must be a number"),
        ({"threshold": True}, "'threshold' must be a number"),
        ({"threshold": -1.0}, "finite and >= 0"),
        ({"threshold": math.inf}, "finite and >= 0"),
        ({"threshold": 10**400}, "finite and >= 0"),
        ({"threads": 2}, r"unknown option.*set threads in the \[\[plugins\]\] entry"),
        ({"model_path": 3}, "'model_path' must be a string"),
        ({"model_path": ""}, "must not be empty"),
    ],
)
def test_bad_options_raise_value_error(options: dict[str, Any], message: str) -> None:
    """Unknown option names and options of the wrong type or range raise ValueError in ``__init__``."""
    with pytest.raises(ValueError, match=message):
        AnomalyPlugin(options)
