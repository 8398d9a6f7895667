"""Build ``gatewayd_plugin_template/model.onnx``: a tiny MLP that predicts the dew point.

Needs numpy and onnx only (``pip install numpy onnx``); deterministic (fixed seed) and runs in
under a second::

    python make_model.py              # writes gatewayd_plugin_template/model.onnx, prints a report
    python make_model.py -o m.onnx    # somewhere else

What it does:

1. Draws (temperature °C, relative humidity %) pairs over the range the model is meant for
   (``DOMAIN``) and computes their dew point with the Magnus approximation (:func:`magnus_dew_point`,
   Sonntag 1990 constants). That formula is the "ground truth" here, so the plugin's tests can
   check every number the model gives.
2. Fits a 2 -> 8 (tanh) -> 1 MLP to it with Levenberg-Marquardt written in plain numpy. The graph
   takes ``ln(humidity / 100)`` instead of the raw humidity (the dew point is nearly linear in
   it) and standardises its inputs, so a small network is accurate to about a hundredth of a °C.
3. Writes the network as an ONNX graph (opset 17, IR version 8): input ``x`` float32 [N, 2]
   (temperature °C, humidity %RH) in raw units, output ``dew_point`` float32 [N] in °C. The
   feature transform and standardisation are inside the graph, so the plugin feeds raw readings.
4. Stores what the plugin needs in the model's ``metadata_props`` (name, version, feature order,
   units, the domain) and measures the model's error against the formula on a fine grid with
   the ONNX reference evaluator (stored as ``max_abs_error_c``).

To fit your own model, replace :func:`training_data` and the network; keep the input/output
names and the metadata keys the plugin reads, or change the plugin with them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

MODEL_NAME = "dewpoint-mlp"
MODEL_VERSION = "1"
FEATURES = ["temperature", "humidity"]
UNITS = {"temperature": "Cel", "humidity": "%RH"}
#: The inputs the model was fitted on, inclusive; the plugin answers an error outside them.
DOMAIN = {"temperature": (-30.0, 60.0), "humidity": (1.0, 100.0)}
SEED = 20260611
HIDDEN = 8
OPSET = 17
IR_VERSION = 8  # the IR version that goes with opset 17; loads in any onnxruntime >= 1.12
N_TRAIN = 3000
LM_STEPS = 300

#: Magnus coefficients over water (Sonntag 1990), valid for about -45..60 °C.
MAGNUS_B, MAGNUS_C = 17.62, 243.12

Array = NDArray[np.float64]
DEFAULT_OUT = Path(__file__).resolve().parent / "gatewayd_plugin_template" / "model.onnx"


def magnus_dew_point(temperature: Array, humidity: Array) -> Array:
    """Dew point (°C) of air at ``temperature`` (°C) and relative ``humidity`` (%), Magnus formula."""
    gamma = np.log(humidity / 100.0) + MAGNUS_B * temperature / (MAGNUS_C + temperature)
    result: Array = MAGNUS_C * gamma / (MAGNUS_B - gamma)
    return result


def training_data(rng: np.random.Generator, n: int) -> tuple[Array, Array]:
    """``n`` inputs [n, 2] over ``DOMAIN`` and their dew points [n].

    Humidity is drawn half uniformly and half log-uniformly, so the dry end (where ln(RH)
    moves fast) is as well covered as the common humid range.
    """
    (t_lo, t_hi), (h_lo, h_hi) = DOMAIN["temperature"], DOMAIN["humidity"]
    temperature = rng.uniform(t_lo, t_hi, n)
    uniform = rng.uniform(h_lo, h_hi, n)
    log_uniform = np.exp(rng.uniform(np.log(h_lo), np.log(h_hi), n))
    humidity = np.where(rng.random(n) < 0.5, uniform, log_uniform)
    # The corners and edges of the domain, so the fit does not have to extrapolate to them.
    edge_t, edge_h = np.meshgrid(np.linspace(t_lo, t_hi, 10), np.array([h_lo, h_hi]))
    temperature = np.concatenate([temperature, edge_t.ravel()])
    humidity = np.concatenate([humidity, edge_h.ravel()])
    x = np.stack([temperature, humidity], axis=1)
    return x, magnus_dew_point(temperature, humidity)


def features(x: Array) -> Array:
    """What the graph computes before the MLP: (temperature, ln(humidity / 100))."""
    return np.stack([x[:, 0], np.log(x[:, 1] / 100.0)], axis=1)


# --- the MLP, fitted in numpy ------------------------------------------------------------------

Params = dict[str, Array]


def unpack(theta: Array) -> Params:
    """The flat parameter vector as the MLP's weights: W1 [2, H], b1 [H], W2 [H, 1], b2 [1]."""
    h = HIDDEN
    return {
        "W1": theta[: 2 * h].reshape(2, h),
        "b1": theta[2 * h : 3 * h],
        "W2": theta[3 * h : 4 * h].reshape(h, 1),
        "b2": theta[4 * h :],
    }


def mlp(p: Params, z: Array) -> tuple[Array, Array]:
    """The network's output [N] and hidden activations [N, H] for standardised features ``z``."""
    hidden = np.tanh(z @ p["W1"] + p["b1"])
    out: Array = (hidden @ p["W2"] + p["b2"])[:, 0]
    return out, hidden


def train(z: Array, y: Array, rng: np.random.Generator) -> tuple[Params, float]:
    """Fit y ≈ tanh(z W1 + b1) W2 + b2 by Levenberg-Marquardt; returns the weights and the mean
    squared error.

    With so few parameters (4H + 1) the exact Jacobian is cheap, and Levenberg-Marquardt reaches
    an error about a hundred times smaller than Adam does in the same time.
    """
    h = HIDDEN
    theta = np.concatenate(
        [
            rng.normal(0.0, np.sqrt(2.0 / (2 + h)), 2 * h),  # W1 (Glorot)
            np.zeros(h),  # b1
            rng.normal(0.0, np.sqrt(2.0 / (h + 1)), h),  # W2 (Glorot)
            np.zeros(1),  # b2
        ]
    )
    out, hidden = mlp(unpack(theta), z)
    residual = out - y
    loss = float(residual @ residual)
    damping = 1e-2
    for _ in range(LM_STEPS):
        w2 = unpack(theta)["W2"][:, 0]
        d_hidden = (1.0 - hidden**2) * w2  # d out / d (pre-activation), [N, H]
        jacobian = np.concatenate(
            [
                (z[:, :, None] * d_hidden[:, None, :]).reshape(len(z), 2 * h),  # d out / d W1
                d_hidden,  # d out / d b1
                hidden,  # d out / d W2
                np.ones((len(z), 1)),  # d out / d b2
            ],
            axis=1,
        )
        jtj, jtr = jacobian.T @ jacobian, jacobian.T @ residual
        while damping < 1e10:
            step = np.linalg.solve(jtj + damping * np.diag(np.diag(jtj)), -jtr)
            new_out, new_hidden = mlp(unpack(theta + step), z)
            new_residual = new_out - y
            new_loss = float(new_residual @ new_residual)
            if new_loss < loss:  # accept, and trust the quadratic model more next time
                theta, hidden, residual, loss = theta + step, new_hidden, new_residual, new_loss
                damping = max(damping / 3.0, 1e-12)
                break
            damping *= 4.0  # reject, and take a shorter, more gradient-like step
    return unpack(theta), loss / len(z)


# --- ONNX ----------------------------------------------------------------------------------------


def build_graph(p: Params, f_mean: Array, f_std: Array, y_mean: float, y_std: float) -> onnx.ModelProto:
    """The ONNX graph: raw (temperature, humidity) -> features -> standardise -> MLP -> dew point."""

    def const(name: str, value: Array | float | list[int], dtype: type = np.float32) -> TensorProto:
        return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)

    initializers = [
        const("percent", 100.0),
        const("f_mean", f_mean), const("f_std", f_std),
        const("W1", p["W1"]), const("b1", p["b1"]),
        const("W2", p["W2"]), const("b2", p["b2"]),
        const("y_std", y_std), const("y_mean", y_mean),
        const("out_shape", [-1], np.int64),
    ]  # fmt: skip
    mk = helper.make_node
    nodes = [
        # Features: (temperature, ln(humidity / 100)).
        mk("Split", ["x"], ["t", "rh"], axis=1, name="split_fields"),  # two equal halves: [N, 1] each
        mk("Div", ["rh", "percent"], ["rh_frac"], name="rh_fraction"),
        mk("Log", ["rh_frac"], ["ln_rh"], name="ln_rh"),
        mk("Concat", ["t", "ln_rh"], ["f"], axis=1, name="features"),
        # Standardise with the training mean and standard deviation.
        mk("Sub", ["f", "f_mean"], ["f_centred"], name="standardise_sub"),
        mk("Div", ["f_centred", "f_std"], ["z"], name="standardise_div"),
        # The MLP: one tanh hidden layer, linear output.
        mk("Gemm", ["z", "W1", "b1"], ["a"], name="hidden_gemm"),
        mk("Tanh", ["a"], ["h"], name="hidden_tanh"),
        mk("Gemm", ["h", "W2", "b2"], ["y_z"], name="out_gemm"),
        # Back to °C, and [N, 1] -> [N].
        mk("Mul", ["y_z", "y_std"], ["y_scaled"], name="unstandardise_mul"),
        mk("Add", ["y_scaled", "y_mean"], ["y_col"], name="unstandardise_add"),
        mk("Reshape", ["y_col", "out_shape"], ["dew_point"], name="flatten"),
    ]
    graph = helper.make_graph(
        nodes,
        MODEL_NAME,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor_value_info("dew_point", TensorProto.FLOAT, ["N"])],
        initializer=initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="gatewayd-plugin-template/make_model.py",
        doc_string="Dew point (°C) from temperature (°C) and relative humidity (%): an MLP fit of the "
        "Magnus formula.",
    )
    model.ir_version = IR_VERSION
    model.model_version = int(MODEL_VERSION)
    onnx.checker.check_model(model, full_check=True)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", type=Path, default=DEFAULT_OUT, help=f"default: {DEFAULT_OUT}")
    args = parser.parse_args()

    rng = np.random.default_rng(SEED)
    x, y = training_data(rng, N_TRAIN)
    f = features(x)
    f_mean, f_std = f.mean(axis=0), f.std(axis=0)
    y_mean, y_std = float(y.mean()), float(y.std())
    params, loss = train((f - f_mean) / f_std, (y - y_mean) / y_std, rng)
    model = build_graph(params, f_mean, f_std, y_mean, y_std)

    # The error against the formula on a grid over the whole domain, as the float32 graph computes it.
    (t_lo, t_hi), (h_lo, h_hi) = DOMAIN["temperature"], DOMAIN["humidity"]
    grid_t, grid_h = np.meshgrid(np.linspace(t_lo, t_hi, 181), np.linspace(h_lo, h_hi, 199))
    grid = np.stack([grid_t.ravel(), grid_h.ravel()], axis=1)
    (predicted,) = ReferenceEvaluator(model).run(None, {"x": grid.astype(np.float32)})
    error = np.abs(np.asarray(predicted, dtype=np.float64) - magnus_dew_point(grid[:, 0], grid[:, 1]))
    max_error = float(f"{error.max():.3g}")

    helper.set_model_props(
        model,
        {
            "model_name": MODEL_NAME,
            "model_version": MODEL_VERSION,
            "features": json.dumps(FEATURES),
            "units": json.dumps(UNITS),
            "domain": json.dumps(DOMAIN),
            "output": "dew point, °C (Magnus formula, Sonntag 1990 constants b=17.62, c=243.12)",
            "max_abs_error_c": repr(max_error),
            "seed": str(SEED),
        },
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(args.output))

    size = args.output.stat().st_size
    print(f"wrote {args.output} ({size} bytes); mean squared error {loss:.3g} (standardised)")
    print(
        f"error vs the Magnus formula on a {grid_t.shape[1]}x{grid_t.shape[0]} grid over "
        f"{t_lo:g}..{t_hi:g} °C, {h_lo:g}..{h_hi:g} %RH: max {error.max():.4f} °C, "
        f"mean {error.mean():.4f} °C, p99 {np.percentile(error, 99):.4f} °C"
    )
    worst = grid[int(error.argmax())]
    print(f"worst at temperature {worst[0]:.1f} °C, humidity {worst[1]:.1f} %")


if __name__ == "__main__":
    main()
