"""The MLP trainer's documented algorithm (wasm-client/README.md, "The MLP trainer"), written
independently in numpy: whole batches as matrices (the module goes sample by sample), the
softmax through log-sum-exp, backpropagation by matrix products. Also the runner that feeds
the module its safetensors stdin through the proplet's real sandbox."""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from proplet import safetensors
from proplet.errors import TaskFailed
from proplet.runner import CompiledModule, Invocation, Limits, WasmRuntime
from server.tensors import Array
from tests.wasm_client.harness import epoch_seed, shuffled_order

FloatArray = npt.NDArray[np.float64]
Params = dict[str, Array]


def layer_count(params: Mapping[str, Any]) -> int:
    return sum(1 for name in params if name.endswith(".w"))


def make_mlp(sizes: list[int], seed: int = 0, dtype: str = "<f8") -> Params:
    """Layers l0..l{L-1} with He-scaled normal weights and small biases."""
    rng = np.random.default_rng(seed)
    params: Params = {}
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        params[f"l{i}.w"] = (rng.normal(size=(n_in, n_out)) * np.sqrt(2.0 / n_in)).astype(dtype)
        params[f"l{i}.b"] = (rng.normal(size=n_out) * 0.1).astype(dtype)
    return params


def make_data(n: int, d: int, k: int, seed: int = 1) -> tuple[FloatArray, FloatArray]:
    """Features and class labels (as floats, as the data store keeps them) that a small MLP
    can learn: the label is the argmax of a fixed random projection."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = np.argmax(x @ rng.normal(size=(d, k)), axis=1).astype(np.float64)
    return x, y


def forward(
    params: Mapping[str, Array], x: FloatArray
) -> tuple[list[FloatArray], list[FloatArray]]:
    """(inputs of each layer, pre-activations of each layer) for the batch `x`."""
    inputs, zs = [x], []
    count = layer_count(params)
    for i in range(count):
        z = inputs[-1] @ params[f"l{i}.w"] + params[f"l{i}.b"]
        zs.append(z)
        if i < count - 1:
            inputs.append(np.maximum(z, 0.0))
    return inputs, zs


def log_softmax(z: FloatArray) -> FloatArray:
    shifted = z - z.max(axis=1, keepdims=True)
    out: FloatArray = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return out


def metrics(params: Mapping[str, Array], x: FloatArray, y: FloatArray) -> tuple[float, float]:
    """(mean cross-entropy, accuracy with the first of tied maxima as the prediction)."""
    _, zs = forward(params, x)
    labels = y.astype(np.int64)
    logp = log_softmax(zs[-1])
    loss = float(-logp[np.arange(len(labels)), labels].mean())
    accuracy = float((np.argmax(zs[-1], axis=1) == labels).mean())
    return loss, accuracy


def gradients(params: Mapping[str, Array], x: FloatArray, y: FloatArray) -> Params:
    """The batch's summed (not averaged) gradient of the cross-entropy."""
    inputs, zs = forward(params, x)
    labels = y.astype(np.int64)
    dz = np.exp(log_softmax(zs[-1]))
    dz[np.arange(len(labels)), labels] -= 1.0
    grads: Params = {}
    for i in reversed(range(layer_count(params))):
        grads[f"l{i}.w"] = inputs[i].T @ dz
        grads[f"l{i}.b"] = dz.sum(axis=0)
        if i:
            dz = (dz @ params[f"l{i}.w"].T) * (zs[i - 1] > 0)
    return grads


def train(
    params: Mapping[str, Array],
    x: FloatArray,
    y: FloatArray,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    mu: float = 0.0,
    momentum: float = 0.0,
    shuffle: bool = True,
    round_id: str = "r1",
    proplet_id: str = "p1",
) -> Params:
    theta: Params = {k: np.asarray(v, dtype=np.float64).copy() for k, v in params.items()}
    centre = {k: v.copy() for k, v in theta.items()}
    velocity = {k: np.zeros_like(v) for k, v in theta.items()}
    n = len(y)
    for epoch in range(epochs):
        order = shuffled_order(n, epoch_seed(round_id, proplet_id, epoch)) if shuffle else range(n)
        order = list(order)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            grads = gradients(theta, x[idx], y[idx])
            for name in theta:
                step: Array = grads[name] / len(idx) + mu * (theta[name] - centre[name])
                if momentum:
                    velocity[name] = momentum * velocity[name] + step
                    step = velocity[name]
                theta[name] = theta[name] - lr * step
    return theta


# ------------------------------------------------------------------------------- running


@dataclass(frozen=True)
class MlpRun:
    """What the module answered: its tensors and metadata (metrics parsed), or its failure."""

    tensors: dict[str, Any]
    metadata: dict[str, str]
    stderr: str

    @property
    def metrics(self) -> dict[str, float]:
        value: dict[str, float] = json.loads(self.metadata["metrics"])
        return value


class MlpRunner:
    """Runs a contract-v2 module in the proplet's own sandbox (proplet.runner)."""

    def __init__(self, wasm: Path) -> None:
        self.runtime = WasmRuntime()
        data = wasm.read_bytes()
        self.compiled: CompiledModule = self.runtime.compile(data, f"test-{wasm.name}")

    def run_raw(
        self, stdin: bytes, hyperparams: Mapping[str, Any] | None = None, **env: str
    ) -> bytes:
        full_env = {"ROUND_ID": "r1", "PROPLET_ID": "p1", "MODEL_URI": "fl/models/mlp_v0", **env}
        if hyperparams is not None:
            full_env["HYPERPARAMS"] = json.dumps(dict(hyperparams))
        invocation = Invocation(["fl-mlp"], full_env, Limits(timeout_s=120.0), stdin)
        return self.runtime.run_sync(self.compiled, invocation).stdout

    def run(
        self,
        params: Mapping[str, Any],
        x: FloatArray,
        y: FloatArray,
        hyperparams: Mapping[str, Any] | None = None,
        **env: str,
    ) -> MlpRun:
        stdin = safetensors.encode(params) + safetensors.encode({"x": x, "y": y})
        stdout = self.run_raw(stdin, hyperparams, **env)
        container = safetensors.decode(stdout, "stdout")
        assert container.size == len(stdout)
        return MlpRun(container.tensors, container.metadata, "")

    def failure(
        self, stdin: bytes, hyperparams: Mapping[str, Any] | None = None, **env: str
    ) -> str:
        """The reason the run failed (it must fail)."""
        try:
            self.run_raw(stdin, hyperparams, **env)
        except TaskFailed as exc:
            return exc.reason
        raise AssertionError("the module did not fail")
