"""Helpers for the wasm training-client tests: a wasmtime runner and a numpy reference
implementation of the documented training algorithm (see wasm-client/README.md)."""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import wasmtime

FloatArray = npt.NDArray[np.float64]

MASK64 = (1 << 64) - 1
FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3


# ------------------------------------------------------------------------------- running


@dataclass(frozen=True)
class RunResult:
    code: int
    stdout: str
    stderr: str
    seconds: float

    def json(self) -> dict[str, Any]:
        assert self.code == 0, f"module exited {self.code}: {self.stderr}"
        assert self.stdout.endswith("\n"), repr(self.stdout)
        assert self.stdout.count("\n") == 1, "exactly one line of JSON expected"
        parsed = json.loads(self.stdout)
        assert isinstance(parsed, dict)
        return parsed


class WasmRunner:
    """Runs one compiled WASI module, a fresh Store per run (as a proplet does)."""

    def __init__(self, engine: wasmtime.Engine, wasm: Path) -> None:
        self.engine = engine
        self.module = wasmtime.Module.from_file(engine, str(wasm))
        self.linker = wasmtime.Linker(engine)
        self.linker.define_wasi()

    def run(self, env: Mapping[str, str]) -> RunResult:
        with tempfile.TemporaryDirectory(prefix="flwasm-") as tmp:
            out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
            wasi = wasmtime.WasiConfig()
            wasi.env = list(env.items())
            wasi.stdout_file = str(out)
            wasi.stderr_file = str(err)
            store = wasmtime.Store(self.engine)
            store.set_wasi(wasi)
            started = time.perf_counter()
            instance = self.linker.instantiate(store, self.module)
            start = instance.exports(store)["_start"]
            assert isinstance(start, wasmtime.Func)
            code = 0
            try:
                start(store)
            except wasmtime.ExitTrap as exc:  # raised even for exit status 0
                code = exc.code
            seconds = time.perf_counter() - started
            return RunResult(code, out.read_text(), err.read_text(), seconds)


# ------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Problem:
    x: FloatArray
    y: FloatArray
    w: FloatArray
    b: float

    @property
    def dim(self) -> int:
        return int(self.x.shape[1])

    def model_json(self) -> str:
        return json.dumps({"w": [float(v) for v in self.w], "b": self.b})

    def dataset_json(self, proplet_id: str = "p") -> str:
        data = [
            {"x": [float(v) for v in row], "y": int(label)}
            for row, label in zip(self.x, self.y, strict=True)
        ]
        return json.dumps(
            {
                "schema": "fl-demo-dataset-v1",
                "proplet_id": proplet_id,
                "data": data,
                "size": len(data),
            }
        )


def make_problem(n: int, dim: int, seed: int = 0, zero_model: bool = True) -> Problem:
    """Linearly separable data with strictly 0/1 labels and both classes present."""
    rng = np.random.default_rng(seed)
    w_true = rng.normal(size=dim)
    x = rng.normal(size=(n, dim))
    margin = x @ w_true
    y = (margin > 0).astype(np.float64)
    y[0], y[1] = 1.0, 0.0
    x[0] = np.abs(w_true) * np.sign(w_true)  # w_true . x0 > 0
    x[1] = -x[0]
    if zero_model:
        w, b = np.zeros(dim), 0.0
    else:
        w, b = rng.normal(scale=0.1, size=dim), float(rng.normal(scale=0.1))
    return Problem(x=x, y=y, w=w, b=b)


def env_for(
    problem: Problem,
    *,
    round_id: str = "round-1",
    proplet_id: str = "proplet-a",
    model_uri: str = "fl/models/global_model_v0",
    hyperparams: Mapping[str, Any] | str | None = None,
) -> dict[str, str]:
    env = {
        "ROUND_ID": round_id,
        "PROPLET_ID": proplet_id,
        "MODEL_URI": model_uri,
        "MODEL_DATA": problem.model_json(),
        "DATASET_DATA": problem.dataset_json(proplet_id),
    }
    if hyperparams is not None:
        env["HYPERPARAMS"] = (
            hyperparams if isinstance(hyperparams, str) else json.dumps(dict(hyperparams))
        )
    return env


# ------------------------------------------------------------------------------- reference


def fnv1a64(data: bytes, h: int = FNV_OFFSET) -> int:
    for byte in data:
        h = ((h ^ byte) * FNV_PRIME) & MASK64
    return h


def epoch_seed(round_id: str, proplet_id: str, epoch: int) -> int:
    payload = (
        round_id.encode() + b"\x00" + proplet_id.encode() + b"\x00" + epoch.to_bytes(8, "little")
    )
    return fnv1a64(payload)


def splitmix64(state: int) -> tuple[int, int]:
    state = (state + 0x9E3779B97F4A7C15) & MASK64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return state, z ^ (z >> 31)


def shuffled_order(n: int, seed: int) -> list[int]:
    order = list(range(n))
    state = seed
    for i in range(n - 1, 0, -1):
        state, r = splitmix64(state)
        j = r % (i + 1)
        order[i], order[j] = order[j], order[i]
    return order


def sigmoid_clamped(z: FloatArray) -> FloatArray:
    out: FloatArray = 1.0 / (1.0 + np.exp(-np.clip(z, -20.0, 20.0)))
    return out


def reference_train(
    problem: Problem,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    round_id: str,
    proplet_id: str,
    shuffle: bool = True,
    mu: float = 0.0,
) -> tuple[FloatArray, float]:
    """The documented algorithm, in numpy. ``shuffle=False`` uses data order (for the
    order-independent full-batch case and for the minimal C client); ``mu`` > 0 adds
    FedProx's proximal gradient mu * (theta - theta_global) to every step, for w and b."""
    w = problem.w.astype(np.float64).copy()
    b = float(problem.b)
    w_global, b_global = w.copy(), b
    n = problem.x.shape[0]
    for epoch in range(epochs):
        order = (
            shuffled_order(n, epoch_seed(round_id, proplet_id, epoch))
            if shuffle
            else list(range(n))
        )
        if batch_size == 1:
            for i in order:
                xi = problem.x[i]
                err = float(sigmoid_clamped(np.asarray(float(np.dot(w, xi)) + b))) - problem.y[i]
                w -= lr * (err * xi + mu * (w - w_global))
                b -= lr * (err + mu * (b - b_global))
        else:
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                xb, yb = problem.x[idx], problem.y[idx]
                err_b = sigmoid_clamped(xb @ w + b) - yb
                w = w - lr * ((err_b @ xb) / len(idx) + mu * (w - w_global))
                b = b - lr * (float(err_b.sum()) / len(idx) + mu * (b - b_global))
    return w, b


def seed_reference_run(
    features: Sequence[Sequence[float]],
    labels: Sequence[float],
    w0: Sequence[float],
    b0: float,
    *,
    lr: float,
    epochs: int,
) -> tuple[list[float], float]:
    """The original demo's training loop, written out in plain Python floats with no numpy
    (so independent of the vectorised reference above): samples in data order, one SGD step
    each, z summed in feature order and clamped to [-20, 20]. What the trainer's literal mode
    must reproduce."""
    w = [float(v) for v in w0]
    b = float(b0)
    for _ in range(epochs):
        for x, y in zip(features, labels, strict=True):
            z = 0.0
            for wj, xj in zip(w, x, strict=True):
                z += wj * xj
            z += b
            z = min(max(z, -20.0), 20.0)
            err = 1.0 / (1.0 + math.exp(-z)) - y
            w = [wj - lr * err * xj for wj, xj in zip(w, x, strict=True)]
            b -= lr * err
    return w, b


def reference_metrics(
    x: FloatArray, y: FloatArray, w: Sequence[float] | FloatArray, b: float
) -> tuple[float, float]:
    """(log-loss with p clipped to [1e-12, 1-1e-12], accuracy at threshold p >= 0.5)."""
    p = sigmoid_clamped(x @ np.asarray(w, dtype=np.float64) + b)
    pc = np.clip(p, 1e-12, 1.0 - 1e-12)
    loss = float(np.mean(-(y * np.log(pc) + (1.0 - y) * np.log(1.0 - pc))))
    accuracy = float(np.mean((p >= 0.5).astype(np.float64) == y))
    return loss, accuracy


def assert_close(
    actual: Sequence[float], expected: FloatArray | Sequence[float], tol: float
) -> None:
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, (a.shape, e.shape)
    diff = float(np.max(np.abs(a - e))) if a.size else 0.0
    assert diff <= tol, f"max abs diff {diff} > {tol}"


def is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
