"""Build ``gatewayd_anomaly/anomaly.onnx``: a tiny autoencoder for a pump sensor node.

Needs numpy and onnx only (``pip install numpy onnx``); deterministic (fixed seed) and runs in a
few seconds::

    python plugins/anomaly/make_model.py            # writes gatewayd_anomaly/anomaly.onnx, prints a report
    python plugins/anomaly/make_model.py -o m.onnx  # somewhere else

What it does:

1. Draws synthetic *normal* readings of a pump node from one latent "load" factor (see
   :func:`normal_readings`): temperature rises with load, vibration rises faster than linearly
   with load, and relative humidity near the hot casing falls with load; each field has its own
   sensor/ambient noise.
2. Trains a 3 -> 8 (tanh) -> 1 -> 8 (tanh) -> 3 autoencoder on the standardised readings with
   full-batch gradient descent (Adam) written in plain numpy. The one-unit bottleneck forces the
   network to learn the curve the normal readings lie on, so a reading off that curve (or past its
   ends) reconstructs badly.
3. Writes the network as an ONNX graph (opset 17, IR version 8): input ``x`` float32 [N, 3] in raw
   units, standardisation inside the graph, output ``score`` float32 [N] = mean squared
   reconstruction error of the standardised feature vector.
4. Scores a held-out *calibration* set of normal readings with the ONNX reference evaluator and
   stores its 99.5th percentile as the threshold in the model's metadata, together with the
   feature names, the model name and a few warm-up rows.
5. Prints the score distribution on a third, independent *test* set of normal readings (the
   false-positive rate) and on sets of injected anomalies (the detection rate).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

FEATURES = ["temperature", "humidity", "vibration"]
MODEL_NAME = "anomaly-ae-v1"
SEED = 20240611
HIDDEN = 8
OPSET = 17
IR_VERSION = 8  # the IR version that goes with opset 17; loads in any onnxruntime >= 1.12
THRESHOLD_PERCENTILE = 99.5
N_TRAIN, N_CALIB, N_TEST, N_ANOMALY = 4000, 4000, 20000, 2000
STEPS, LR = 4000, 0.01

Array = NDArray[np.float64]
DEFAULT_OUT = Path(__file__).resolve().parent / "gatewayd_anomaly" / "anomaly.onnx"


# --- synthetic data --------------------------------------------------------------------------


def pump_curve(load: Array) -> Array:
    """Noise-free (temperature °C, humidity %RH, vibration mm/s) of a pump at load 0..1, shape [N, 3]."""
    temperature = 42.0 + 26.0 * load
    humidity = 58.0 - 22.0 * load
    vibration = 1.1 + 0.6 * load + 2.0 * load**2
    return np.stack([temperature, humidity, vibration], axis=1)


def normal_readings(rng: np.random.Generator, n: int) -> Array:
    """Normal readings: a load drawn from Beta(2, 2), the pump curve, then per-field noise.

    Ranges come out at about 40-70 °C, 30-62 %RH and 1-4 mm/s RMS.
    """
    load = rng.beta(2.0, 2.0, size=n)
    noise = rng.normal(0.0, 1.0, size=(n, 3)) * np.array([1.2, 2.5, 0.15])
    readings: Array = pump_curve(load) + noise
    readings[:, 2] = np.maximum(readings[:, 2], 0.2)  # an RMS value is never negative
    return readings


def anomaly_sets(rng: np.random.Generator, n: int) -> dict[str, Array]:
    """Injected anomalies, each made from fresh normal readings with one fault applied."""
    sets: dict[str, Array] = {}

    x = normal_readings(rng, n)
    x[:, 2] *= rng.uniform(2.5, 5.0, size=n)  # bearing wear / misalignment: 3-18 mm/s
    sets["vibration x2.5-5"] = x

    x = normal_readings(rng, n)
    x[:, 0] += rng.uniform(15.0, 35.0, size=n)  # overheating (cooling lost), no extra load
    sets["temperature +15-35 C"] = x

    x = normal_readings(rng, n)
    x[:, 1] = np.where(rng.random(n) < 0.5, rng.uniform(0.0, 12.0, n), rng.uniform(80.0, 100.0, n))
    sets["humidity 0-12 or 80-100 %"] = x  # leak, condensation or a failed humidity sensor

    x = normal_readings(rng, 4 * n)
    x = x[x[:, 0] > 60.0][:n]  # hot (high load) ...
    x[:, 2] = rng.uniform(0.1, 0.5, size=len(x))  # ... but barely vibrating: seized, or a dead sensor
    sets["vibration 0.1-0.5 mm/s at > 60 C"] = x

    x = normal_readings(rng, n)
    x[:, 0] += rng.uniform(6.0, 10.0, size=n)  # subtle: mild overheating
    sets["temperature +6-10 C (subtle)"] = x
    return sets


#: Readings named in the README, scored one by one.
NAMED_POINTS: dict[str, tuple[float, float, float]] = {
    "normal, low load (45 C)": (45.0, 55.5, 1.2),
    "normal, mid load (55 C)": (55.0, 47.0, 1.9),
    "normal, high load (65 C)": (65.0, 38.5, 3.2),
    "vibration 12 mm/s at 45 C": (45.0, 55.5, 12.0),
    "temperature 95 C": (95.0, 45.0, 2.5),
    "humidity 5 % at 55 C": (55.0, 5.0, 1.9),
}


# --- the autoencoder, trained in numpy -------------------------------------------------------

Params = dict[str, Array]


def init_params(rng: np.random.Generator) -> Params:
    def glorot(fan_in: int, fan_out: int) -> Array:
        return rng.normal(0.0, np.sqrt(2.0 / (fan_in + fan_out)), size=(fan_in, fan_out))

    return {
        "W1": glorot(3, HIDDEN), "b1": np.zeros(HIDDEN),
        "W2": glorot(HIDDEN, 1), "b2": np.zeros(1),
        "W3": glorot(1, HIDDEN), "b3": np.zeros(HIDDEN),
        "W4": glorot(HIDDEN, 3), "b4": np.zeros(3),
    }  # fmt: skip


def loss_and_grads(p: Params, z: Array) -> tuple[float, Params]:
    """Mean squared reconstruction error over all entries of ``z`` [N, 3], and its gradients."""
    h1 = np.tanh(z @ p["W1"] + p["b1"])
    code = h1 @ p["W2"] + p["b2"]
    h2 = np.tanh(code @ p["W3"] + p["b3"])
    recon = h2 @ p["W4"] + p["b4"]
    diff = recon - z
    loss = float(np.mean(diff**2))

    d_recon = 2.0 * diff / diff.size
    d_h2 = d_recon @ p["W4"].T
    d_a2 = d_h2 * (1.0 - h2**2)
    d_code = d_a2 @ p["W3"].T
    d_h1 = d_code @ p["W2"].T
    d_a1 = d_h1 * (1.0 - h1**2)
    grads = {
        "W4": h2.T @ d_recon, "b4": d_recon.sum(axis=0),
        "W3": code.T @ d_a2, "b3": d_a2.sum(axis=0),
        "W2": h1.T @ d_code, "b2": d_code.sum(axis=0),
        "W1": z.T @ d_a1, "b1": d_a1.sum(axis=0),
    }  # fmt: skip
    return loss, grads


def train(z: Array, rng: np.random.Generator, steps: int = STEPS, lr: float = LR) -> tuple[Params, float]:
    """Full-batch Adam; returns the parameters and the final training loss."""
    p = init_params(rng)
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(v) for k, v in p.items()}
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    loss = float("nan")
    for t in range(1, steps + 1):
        loss, grads = loss_and_grads(p, z)
        step_lr = lr * (0.1 ** (t / steps))  # decay to lr/10 by the end
        for k in p:
            m[k] = beta1 * m[k] + (1 - beta1) * grads[k]
            v[k] = beta2 * v[k] + (1 - beta2) * grads[k] ** 2
            m_hat = m[k] / (1 - beta1**t)
            v_hat = v[k] / (1 - beta2**t)
            p[k] = p[k] - step_lr * m_hat / (np.sqrt(v_hat) + eps)
    return p, loss


# --- ONNX -------------------------------------------------------------------------------------


def build_graph(p: Params, mean: Array, std: Array) -> onnx.ModelProto:
    def init(name: str, value: Array) -> TensorProto:
        return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)

    initializers = [
        init("mean", mean), init("std", std),
        init("W1", p["W1"]), init("b1", p["b1"]),
        init("W2", p["W2"]), init("b2", p["b2"]),
        init("W3", p["W3"]), init("b3", p["b3"]),
        init("W4", p["W4"]), init("b4", p["b4"]),
    ]  # fmt: skip
    mk = helper.make_node
    nodes = [
        mk("Sub", ["x", "mean"], ["centred"], name="standardise_sub"),
        mk("Div", ["centred", "std"], ["z"], name="standardise_div"),
        mk("MatMul", ["z", "W1"], ["a1_mm"], name="enc1_matmul"),
        mk("Add", ["a1_mm", "b1"], ["a1"], name="enc1_add"),
        mk("Tanh", ["a1"], ["h1"], name="enc1_tanh"),
        mk("MatMul", ["h1", "W2"], ["code_mm"], name="code_matmul"),
        mk("Add", ["code_mm", "b2"], ["code"], name="code_add"),
        mk("MatMul", ["code", "W3"], ["a2_mm"], name="dec1_matmul"),
        mk("Add", ["a2_mm", "b3"], ["a2"], name="dec1_add"),
        mk("Tanh", ["a2"], ["h2"], name="dec1_tanh"),
        mk("MatMul", ["h2", "W4"], ["recon_mm"], name="dec2_matmul"),
        mk("Add", ["recon_mm", "b4"], ["recon"], name="dec2_add"),
        mk("Sub", ["recon", "z"], ["err"], name="err_sub"),
        mk("Mul", ["err", "err"], ["err2"], name="err_square"),
        mk("ReduceMean", ["err2"], ["score"], axes=[1], keepdims=0, name="score_mean"),
    ]
    graph = helper.make_graph(
        nodes,
        "pump_autoencoder",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N"])],
        initializers,
    )
    graph.doc_string = (
        "x: [N, 3] float32 raw readings (" + ", ".join(FEATURES) + "); "
        "score: [N] mean squared reconstruction error of the standardised feature vector"
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="gatewayd-anomaly make_model.py",
        producer_version="1",
        doc_string="Pump-node anomaly autoencoder (3-8-1-8-3, tanh) for the gatewayd anomaly plugin.",
    )
    model.ir_version = IR_VERSION
    model.model_version = 1
    onnx.checker.check_model(model, full_check=True)
    return model


def scorer(model: onnx.ModelProto) -> Callable[[Array], Array]:
    """Score with onnx's reference evaluator, i.e. with the graph exactly as written."""
    evaluator = ReferenceEvaluator(model)

    def score(x: Array) -> Array:
        (out,) = evaluator.run(None, {"x": np.asarray(x, dtype=np.float32)})
        return np.asarray(out, dtype=np.float64)

    return score


def describe(scores: Array) -> str:
    q = np.percentile(scores, [50, 90, 99, 99.9])
    return (
        f"median {q[0]:.4f}  p90 {q[1]:.4f}  p99 {q[2]:.4f}  p99.9 {q[3]:.4f}  "
        f"min {scores.min():.4f}  max {scores.max():.4f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("-o", "--output", type=Path, default=DEFAULT_OUT, help="where to write the .onnx")
    args = parser.parse_args()

    rng = np.random.default_rng(SEED)
    x_train = normal_readings(rng, N_TRAIN)
    x_calib = normal_readings(rng, N_CALIB)
    x_test = normal_readings(rng, N_TEST)
    anomalies = anomaly_sets(rng, N_ANOMALY)

    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    params, train_loss = train((x_train - mean) / std, rng)

    model = build_graph(params, mean, std)
    score = scorer(model)
    threshold = float(np.percentile(score(x_calib), THRESHOLD_PERCENTILE))
    threshold = float(f"{threshold:.6g}")

    warmup = pump_curve(np.array([0.15, 0.4, 0.6, 0.85]))
    metadata = {
        "model": MODEL_NAME,
        "features": json.dumps(FEATURES),
        "units": json.dumps({"temperature": "Cel", "humidity": "%RH", "vibration": "mm/s"}),
        "threshold": repr(threshold),
        "threshold_rule": f"p{THRESHOLD_PERCENTILE} of score on {N_CALIB} held-out normal readings",
        "score": "mean squared reconstruction error of the standardised feature vector",
        "sample": json.dumps([[round(float(v), 2) for v in row] for row in warmup]),
        "seed": str(SEED),
    }
    onnx.helper.set_model_props(model, metadata)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(args.output))

    print(f"wrote {args.output} ({args.output.stat().st_size} bytes), training loss {train_loss:.4f}")
    print(f"standardisation mean {np.round(mean, 3).tolist()}  std {np.round(std, 3).tolist()}")
    print(f"threshold (p{THRESHOLD_PERCENTILE} of {N_CALIB} calibration normals): {threshold}")
    s_train = score(x_train)
    s_test = score(x_test)
    print(f"\nnormal, train  n={len(s_train):5d}  {describe(s_train)}")
    print(f"normal, test   n={len(s_test):5d}  {describe(s_test)}")
    print(f"false-positive rate on the test normals: {np.mean(s_test > threshold):.2%}")
    print("\ninjected anomalies: detection rate (score > threshold), score distribution")
    all_scores = []
    for name, xs in anomalies.items():
        s = score(xs)
        all_scores.append(s)
        print(f"  {name:34s} n={len(s):4d}  detected {np.mean(s > threshold):7.2%}  {describe(s)}")
    pooled = np.concatenate(all_scores[:4])
    print(f"  {'all but the subtle set':34s} n={len(pooled):4d}  detected {np.mean(pooled > threshold):7.2%}")
    print("\nnamed readings (temperature, humidity, vibration) -> score")
    named = score(np.array(list(NAMED_POINTS.values())))
    for (name, point), s in zip(NAMED_POINTS.items(), named, strict=True):
        flag = "ANOMALY" if s > threshold else "normal"
        print(f"  {name:28s} {point!s:20s} {s:10.4f}  {flag}")


if __name__ == "__main__":
    main()
