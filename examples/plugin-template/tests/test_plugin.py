"""Tests of the template plugin, on a real onnxruntime session: keep them when you copy the template.

Run with ``python -m pytest tests -q`` from the plugin's directory (the distribution must be
installed, ``pip install -e '.[test]'``, for the entry point and the packaged model).
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import shutil
import tomllib
from collections.abc import Mapping, Sequence
from importlib import resources
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gatewayd.plugin_api import ENTRY_POINT_GROUP, Plugin, PluginNotReady, Reading, Result
from gatewayd.testing import reading, run_plugin, run_plugin_in_worker

from gatewayd_plugin_template.plugin import TemplatePlugin

HERE = Path(__file__).resolve().parents[1]
ENTRY_POINT = "template"
TARGET = "gatewayd_plugin_template.plugin:TemplatePlugin"
#: How close the model must be to the formula (°C); make_model.py measures about 0.015 °C.
TOLERANCE_C = 0.05


def magnus_dew_point(temperature: float, humidity: float) -> float:
    """The reference: Magnus formula with the Sonntag (1990) constants, written out independently."""
    b, c = 17.62, 243.12
    gamma = math.log(humidity / 100.0) + b * temperature / (c + temperature)
    return c * gamma / (b - gamma)


def by_id(results: Sequence[Result]) -> dict[str, Mapping[str, Any]]:
    return {r.reading_id: r.data for r in results}


def air(rid: str, temperature: float, humidity: float) -> Reading:
    return reading(node="room-1", id=rid, temperature=temperature, humidity=humidity)


def with_units(rid: str, temperature: float, humidity: float, units: dict[str, str]) -> Reading:
    """A reading with SenML units (``gatewayd.testing.reading`` makes none)."""
    fields = {"temperature": temperature, "humidity": humidity}
    return Reading(id=rid, node="room-1", ts=1_767_225_600.0, fields=fields, units=units)


@pytest.fixture(scope="module")
def plugin() -> TemplatePlugin:
    p = TemplatePlugin({})
    p.load()
    return p


def test_dew_point_matches_the_magnus_formula() -> None:
    """Across the model's range the dew point is within TOLERANCE_C of the formula, and the spread and
    condensation risk follow from it."""
    points = [(-30.0, 100.0), (-20.0, 5.0), (0.0, 50.0), (20.0, 50.0), (25.0, 80.0), (35.0, 25.0)]
    points += [(60.0, 1.0), (60.0, 100.0), (-5.0, 85.0), (12.5, 99.0), (41.0, 12.0)]
    batch = [air(f"r{i}", t, h) for i, (t, h) in enumerate(points)]
    results = by_id(run_plugin(TemplatePlugin, batch))
    assert set(results) == {r.id for r in batch}
    for i, (t, h) in enumerate(points):
        data = results[f"r{i}"]
        expected = magnus_dew_point(t, h)
        assert data["dew_point"] == pytest.approx(expected, abs=TOLERANCE_C), (t, h)
        assert data["spread"] == pytest.approx(t - expected, abs=TOLERANCE_C), (t, h)
        assert data["condensation_risk"] is (data["spread"] <= 2.0)
        assert data["model"] == {"name": "dewpoint-mlp", "version": "1"}
    # A textbook value: air at 20 °C and 50 % RH condenses below about 9.3 °C.
    assert results["r3"]["dew_point"] == pytest.approx(9.26, abs=0.05)


def test_dew_point_on_a_dense_grid(plugin: TemplatePlugin) -> None:
    """Over 2,000 random points of the fitted range the largest error stays within TOLERANCE_C."""
    rng = np.random.default_rng(1)
    t = rng.uniform(-30.0, 60.0, 2000)
    h = rng.uniform(1.0, 100.0, 2000)
    results = by_id(plugin.process([air(f"g{i}", t[i], h[i]) for i in range(len(t))]))
    errors = [abs(results[f"g{i}"]["dew_point"] - magnus_dew_point(t[i], h[i])) for i in range(len(t))]
    assert max(errors) < TOLERANCE_C


def test_results_are_strict_json(plugin: TemplatePlugin) -> None:
    """Result data holds plain Python numbers and bools, so the gateway can publish it as JSON."""
    results = plugin.process([air("a", 21.0, 40.0), air("b", 3.0, 98.0)])
    payload = json.loads(json.dumps([r.data for r in results], allow_nan=False))
    assert {type(v) for d in payload for k, v in d.items() if k != "model"} <= {float, bool}
    assert by_id(results)["b"]["condensation_risk"] is True  # 3 °C at 98 %: fog


def test_readings_the_model_cannot_judge_get_an_error_result(plugin: TemplatePlugin) -> None:
    """Missing or non-numeric fields, other units and values out of range give error results;
    the good readings of the same batch are still answered."""
    batch = [
        air("ok", 20.0, 50.0),
        reading(id="no-humidity", temperature=20.0),
        reading(id="text", temperature="warm", humidity=50.0),
        reading(id="bool", temperature=20.0, humidity=True),
        reading(id="nan", temperature=20.0, humidity=math.nan),
        with_units("kelvin", 293.15, 50.0, {"temperature": "K"}),
        with_units("units-ok", 20.0, 50.0, {"temperature": "Cel", "humidity": "%RH"}),
        air("too-hot", 75.0, 50.0),
        air("dry", 20.0, 0.0),
        air("ok-2", -10.0, 70.0),
    ]
    data = by_id(plugin.process(batch))
    assert set(data) == {r.id for r in batch}
    assert data["no-humidity"] == {"error": "missing or non-numeric field: humidity"}
    assert data["text"] == {"error": "missing or non-numeric field: temperature"}
    assert data["bool"] == {"error": "missing or non-numeric field: humidity"}
    assert data["nan"] == {"error": "missing or non-numeric field: humidity"}
    assert data["kelvin"] == {"error": "temperature is in 'K', the model takes 'Cel'"}
    assert data["too-hot"] == {"error": "temperature 75 is outside the model's range -30..60"}
    assert data["dry"] == {"error": "humidity 0 is outside the model's range 1..100"}
    for rid in ("ok", "units-ok", "ok-2"):
        assert "error" not in data[rid] and "dew_point" in data[rid]


def test_one_session_run_per_batch(plugin: TemplatePlugin, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch is one ``session.run`` over its good readings; a batch without any runs nothing."""
    calls: list[int] = []
    session = plugin._session

    class Counting:
        def run(self, names: Any, feeds: dict[str, np.ndarray]) -> Any:
            calls.append(len(next(iter(feeds.values()))))
            return session.run(names, feeds)

    monkeypatch.setattr(plugin, "_session", Counting())
    batch = [air(f"r{i}", 10.0 + i % 30, 20.0 + i % 70) for i in range(100)]
    batch[7] = reading(id="r7", temperature=10.0)
    assert len(plugin.process(batch)) == 100
    assert calls == [99]
    assert plugin.process([]) == [] and plugin.process([reading(id="x")]) != []
    assert calls == [99]


def test_risk_spread_option() -> None:
    """``risk_spread_c`` sets how close to its dew point a reading must be to flag condensation risk."""
    batch = [air("r", 20.0, 70.0)]  # dew point about 14.4 °C: spread about 5.6 °C
    (default,) = run_plugin(TemplatePlugin, batch)
    (wide,) = run_plugin(TemplatePlugin, batch, {"risk_spread_c": 6})
    assert default.data["condensation_risk"] is False and wide.data["condensation_risk"] is True


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"model": "x.onnx"}, "unknown option"),
        ({"threads": 2}, "unknown option"),  # threads come from the gateway, not from options
        ({"model_path": 3}, "'model_path' must be a string"),
        ({"model_path": ""}, "must not be empty"),
        ({"risk_spread_c": "2"}, "'risk_spread_c' must be a finite number >= 0"),
        ({"risk_spread_c": True}, "'risk_spread_c' must be a finite number >= 0"),
        ({"risk_spread_c": -1}, "'risk_spread_c' must be a finite number >= 0"),
        ({"risk_spread_c": math.inf}, "'risk_spread_c' must be a finite number >= 0"),
    ],
)
def test_bad_options_raise_value_error(options: dict[str, Any], message: str) -> None:
    """Wrong options fail in ``__init__`` with a ValueError that says what is wrong."""
    with pytest.raises(ValueError, match=re.escape(message)):
        TemplatePlugin(options)


def test_missing_model_file_is_not_ready(tmp_path: Path) -> None:
    """A model_path that does not exist (yet) makes ``load`` raise PluginNotReady: retried after a backoff."""
    with pytest.raises(PluginNotReady, match="not found"):
        TemplatePlugin({"model_path": str(tmp_path / "later.onnx")}).load()


def test_threads_reach_the_session(tmp_path: Path) -> None:
    """``threads`` is 1 by default and what the gateway sets before ``load`` goes to onnxruntime;
    a model given by ``model_path`` gives the same numbers as the packaged one."""
    copy = tmp_path / "model.onnx"
    with resources.as_file(resources.files("gatewayd_plugin_template") / "model.onnx") as packaged:
        shutil.copyfile(packaged, copy)
    p = TemplatePlugin({"model_path": str(copy)})
    assert p.threads == 1
    p.threads = 3  # as the worker does, between construction and load()
    p.load()
    assert p._session.get_session_options().intra_op_num_threads == 3
    batch = [air("a", 20.0, 50.0)]
    assert p.process(batch) == run_plugin(TemplatePlugin, batch)


def test_process_before_load_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="load"):
        TemplatePlugin({}).process([air("r", 20.0, 50.0)])


def test_entry_point_resolves() -> None:
    """The installed distribution registers the plugin in the gatewayd.plugins group."""
    (ep,) = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == ENTRY_POINT]
    assert ep.value == TARGET
    cls = ep.load()
    assert cls is TemplatePlugin and issubclass(cls, Plugin)


@pytest.mark.parametrize("target", [ENTRY_POINT, TARGET])
def test_runs_in_a_real_worker_process(target: str) -> None:
    """In a worker process, as the gateway runs it (by entry point or by module:Class, with 2
    threads), the plugin gives the same results as in-process."""
    batch = [air("a", 20.0, 50.0), air("b", 3.0, 98.0), reading(id="c", temperature=20.0)]
    in_worker = by_id(run_plugin_in_worker(target, batch, {"risk_spread_c": 1.5}, threads=2))
    in_process = by_id(run_plugin(TemplatePlugin, batch, {"risk_spread_c": 1.5}))
    assert in_worker == in_process
    assert in_worker["c"] == {"error": "missing or non-numeric field: humidity"}


def test_packaged_model_is_small_opset17_with_metadata() -> None:
    """The packaged model is opset 17 / IR 8, a few KB, with the metadata the plugin reads."""
    onnx = pytest.importorskip("onnx")
    blob = (resources.files("gatewayd_plugin_template") / "model.onnx").read_bytes()
    assert len(blob) < 8 * 1024
    model = onnx.load_from_string(blob)
    assert model.ir_version == 8
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["features"]) == ["temperature", "humidity"]
    assert float(meta["max_abs_error_c"]) < TOLERANCE_C


def test_make_model_rebuilds_the_model(tmp_path: Path) -> None:
    """``make_model.py`` builds a model (numpy and onnx only) that the plugin loads and that
    agrees with the formula."""
    pytest.importorskip("onnx")
    spec = importlib.util.spec_from_file_location("template_make_model", HERE / "make_model.py")
    assert spec is not None and spec.loader is not None
    make_model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_model)
    out = tmp_path / "rebuilt.onnx"
    monkey_argv = ["make_model.py", "-o", str(out)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sys.argv", monkey_argv)
        make_model.main()
    (result,) = run_plugin(TemplatePlugin, [air("r", 25.0, 60.0)], {"model_path": str(out)})
    assert result.data["dew_point"] == pytest.approx(magnus_dew_point(25.0, 60.0), abs=TOLERANCE_C)


def test_readme_config_block_is_valid() -> None:
    """The ``[[plugins]]`` example in README.md is accepted by the gateway's config schema."""
    from gatewayd.config import parse

    text = (HERE / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```toml\n(.*?)```", text, flags=re.S)
    (block,) = [b for b in blocks if "[[plugins]]" in b]
    tomllib.loads(block)
    (cfg,) = parse(block, "README.md").plugins
    assert cfg.plugin == ENTRY_POINT
    TemplatePlugin(cfg.options)  # its options are valid too
