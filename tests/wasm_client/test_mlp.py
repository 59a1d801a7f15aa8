"""The MLP trainer (wasm-client/src/mlp.zig, trainer contract v2) run in the proplet's sandbox,
checked against an independent numpy implementation of the documented algorithm."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from proplet import safetensors
from tests.wasm_client import mlp_reference as ref
from tests.wasm_client.mlp_reference import MlpRunner

TOL = 1e-9


@pytest.fixture(scope="module")
def mlp(mlp_wasm: Path) -> MlpRunner:
    return MlpRunner(mlp_wasm)


def assert_params_close(got: dict[str, Any], want: dict[str, Any], tol: float) -> None:
    assert list(got) == list(want)
    for name in want:
        assert got[name].shape == want[name].shape, name
        diff = float(np.max(np.abs(np.asarray(got[name], dtype=np.float64) - want[name])))
        assert diff <= tol, f"{name}: max abs diff {diff} > {tol}"


@pytest.mark.parametrize(
    ("sizes", "batch_size", "mu", "momentum", "epochs"),
    [
        ([5, 7, 3], 1, 0.0, 0.0, 2),
        ([5, 7, 3], 4, 0.0, 0.0, 3),
        ([5, 7, 3], 1000, 0.0, 0.0, 3),  # full batch
        ([6, 9, 8, 4], 5, 0.0, 0.9, 3),
        ([6, 9, 8, 4], 5, 0.3, 0.0, 3),
        ([6, 9, 8, 4], 3, 0.1, 0.5, 2),
        ([4, 10], 2, 0.0, 0.0, 2),  # no hidden layer: softmax regression
        # Odd sizes through every kernel path: 8-column blocks, 2-column vectors, single
        # columns, rows in pairs and one left over, sums of 4 terms and a remainder.
        ([13, 19, 11], 5, 0.0, 0.0, 2),
    ],
    ids=lambda v: str(v).replace(" ", ""),
)
def test_training_matches_numpy(
    mlp: MlpRunner,
    sizes: list[int],
    batch_size: int,
    mu: float,
    momentum: float,
    epochs: int,
) -> None:
    params = ref.make_mlp(sizes, seed=3)
    x, y = ref.make_data(23, sizes[0], sizes[-1], seed=4)
    hyper = {"epochs": epochs, "lr": 0.2, "batch_size": batch_size, "mu": mu}
    hyper["momentum"] = momentum
    got = mlp.run(params, x, y, hyper)
    want = ref.train(
        params, x, y, epochs=epochs, lr=0.2, batch_size=batch_size, mu=mu, momentum=momentum
    )
    assert_params_close(got.tensors, want, TOL)
    # The run changed the model (so the comparison above compares training, not copies).
    assert any(np.max(np.abs(want[k] - params[k])) > 1e-3 for k in params)


def test_long_sums_with_zero_inputs_match_numpy(mlp: MlpRunner) -> None:
    """Sums longer than one kernel loop iteration (32 terms) in both kernels: 70 inputs and 45
    hidden units (32 + whole groups of 4 + single terms), mini-batches of 40 (a full chunk of
    32 samples and 8 more); the first 12 features blank in every sample (groups the kernels
    skip) and the hidden layer's ReLU zeros."""
    params = ref.make_mlp([70, 45, 10], seed=9)
    x, y = ref.make_data(77, 70, 10, seed=10)
    x[:, :12] = 0.0
    hyper = {"epochs": 2, "lr": 0.1, "batch_size": 40}
    got = mlp.run(params, x, y, hyper)
    want = ref.train(params, x, y, epochs=2, lr=0.1, batch_size=40)
    assert_params_close(got.tensors, want, TOL)
    assert any(np.max(np.abs(want[k] - params[k])) > 1e-3 for k in params)


def test_metrics_match_numpy_before_and_after(mlp: MlpRunner) -> None:
    params = ref.make_mlp([6, 16, 4], seed=5)
    x, y = ref.make_data(40, 6, 4, seed=6)
    got = mlp.run(params, x, y, {"epochs": 5, "lr": 0.1, "batch_size": 8})
    trained = ref.train(params, x, y, epochs=5, lr=0.1, batch_size=8)
    loss0, acc0 = ref.metrics(params, x, y)
    loss1, acc1 = ref.metrics(trained, x, y)
    m = got.metrics
    assert abs(m["loss_before"] - loss0) <= TOL and m["accuracy_before"] == acc0
    assert abs(m["loss"] - loss1) <= TOL and m["accuracy"] == acc1
    assert m["epochs"] == 5
    assert loss1 < loss0  # it learns
    assert got.metadata["num_samples"] == "40"
    assert got.metadata["round_id"] == "r1"
    assert got.metadata["proplet_id"] == "p1"
    assert got.metadata["base_model_uri"] == "fl/models/mlp_v0"


def test_it_learns_a_learnable_task(mlp: MlpRunner) -> None:
    params = ref.make_mlp([8, 32, 3], seed=7)
    x, y = ref.make_data(200, 8, 3, seed=8)
    got = mlp.run(params, x, y, {"epochs": 30, "lr": 0.1, "batch_size": 16, "momentum": 0.9})
    assert got.metrics["accuracy"] >= 0.9 > got.metrics["accuracy_before"] + 0.2


def test_evaluate_reports_metrics_and_no_tensors(mlp: MlpRunner) -> None:
    params = ref.make_mlp([5, 8, 3], seed=9)
    x, y = ref.make_data(17, 5, 3, seed=10)
    got = mlp.run(params, x, y, {"task": "evaluate", "epochs": 3})
    assert got.tensors == {}
    loss, accuracy = ref.metrics(params, x, y)
    assert set(got.metrics) == {"loss", "accuracy"}
    assert abs(got.metrics["loss"] - loss) <= TOL
    assert got.metrics["accuracy"] == accuracy
    assert got.metadata["num_samples"] == "17"


def test_shuffle_is_seeded_by_round_and_proplet(mlp: MlpRunner) -> None:
    params = ref.make_mlp([4, 6, 3], seed=11)
    x, y = ref.make_data(30, 4, 3, seed=12)
    hyper = {"epochs": 2, "lr": 0.3, "batch_size": 2}
    a = mlp.run(params, x, y, hyper).tensors
    again = mlp.run(params, x, y, hyper).tensors
    other = mlp.run(params, x, y, hyper, PROPLET_ID="p2").tensors
    for name in params:
        np.testing.assert_array_equal(a[name], again[name])
    assert any(not np.array_equal(a[n], other[n]) for n in params)
    want = ref.train(params, x, y, epochs=2, lr=0.3, batch_size=2, proplet_id="p2")
    assert_params_close(other, want, TOL)


def test_shuffle_off_trains_in_data_order(mlp: MlpRunner) -> None:
    params = ref.make_mlp([4, 6, 3], seed=13)
    x, y = ref.make_data(21, 4, 3, seed=14)
    got = mlp.run(params, x, y, {"epochs": 2, "lr": 0.3, "batch_size": 4, "shuffle": False})
    want = ref.train(params, x, y, epochs=2, lr=0.3, batch_size=4, shuffle=False)
    assert_params_close(got.tensors, want, TOL)


def test_f32_tensors_stay_f32(mlp: MlpRunner) -> None:
    """F32 inputs are widened to f64 for the arithmetic and the update is narrowed back."""
    params = ref.make_mlp([5, 8, 3], seed=15, dtype="<f4")
    x, y = ref.make_data(20, 5, 3, seed=16)
    got = mlp.run(params, x.astype(np.float32), y.astype(np.float32), {"lr": 0.1, "batch_size": 5})
    assert all(t.dtype == np.float32 for t in got.tensors.values())
    x32 = x.astype(np.float32).astype(np.float64)
    want = ref.train(params, x32, y, epochs=1, lr=0.1, batch_size=5)
    expected = {k: v.astype(np.float32) for k, v in want.items()}
    assert_params_close(got.tensors, {k: v.astype(np.float64) for k, v in expected.items()}, 0)


def test_zero_epochs_returns_the_model(mlp: MlpRunner) -> None:
    params = ref.make_mlp([3, 4, 2], seed=17)
    x, y = ref.make_data(5, 3, 2)
    got = mlp.run(params, x, y, {"epochs": 0})
    for name in params:
        np.testing.assert_array_equal(got.tensors[name], params[name])


def _stdin(params: dict[str, Any], x: Any, y: Any) -> bytes:
    return safetensors.encode(params) + safetensors.encode({"x": x, "y": y})


def _bad_inputs() -> list[tuple[str, bytes, dict[str, Any] | None, str]]:
    params = ref.make_mlp([3, 4, 2], seed=1)
    x, y = ref.make_data(6, 3, 2)
    no_bias = {k: v for k, v in params.items() if k != "l1.b"}
    stray = {**params, "l7.w": np.zeros((2, 2))}
    wide = {**params, "l1.w": np.zeros((5, 2))}
    header = b'{"l0.w": {"dtype": "F64", "shape": [3, 4], "data_offsets": [0, 96]}}'
    return [
        ("empty stdin", b"", None, "model: stdin ends before the safetensors header length"),
        ("garbage", b"\xff" * 64, None, "model: header length"),
        (
            "truncated data",
            struct.pack("<Q", len(header)) + header + b"\0" * 10,
            None,
            "model: tensor l0.w: data ends at 96, past the 10 bytes",
        ),
        (
            "not json",
            struct.pack("<Q", 4) + b"{{{{",
            None,
            "model: safetensors header is not valid JSON",
        ),
        ("no bias", _stdin(no_bias, x, y), None, "layer l1 has a weight but no l1.b"),
        ("stray tensor", _stdin(stray, x, y), None, "only l0..l1 (.w and .b) are layers"),
        (
            "shape chain",
            _stdin(wide, x, y),
            None,
            "tensor l1.w has 5 inputs, the layer below gives 4",
        ),
        ("label", _stdin(params, x, np.full(6, 2.0)), None, "y[0] = 2 is not a class in 0..1"),
        ("fractional label", _stdin(params, x, np.full(6, 0.5)), None, "is not a class"),
        (
            "features",
            _stdin(params, x[:, :2], y),
            None,
            "tensor l0.w has 3 inputs, the layer below gives 2",
        ),
        (
            "no x",
            safetensors.encode(params) + safetensors.encode({"y": y}),
            None,
            "dataset: no tensor x",
        ),
        ("literal", _stdin(params, x, y), {"mode": "literal"}, "HYPERPARAMS.mode"),
        ("momentum", _stdin(params, x, y), {"momentum": 1}, "HYPERPARAMS.momentum"),
        ("batch", _stdin(params, x, y), {"batch_size": 0}, "HYPERPARAMS.batch_size"),
        ("diverges", _stdin(params, x * 1e300, y), {"lr": 1e300}, "training diverged"),
    ]


@pytest.mark.parametrize(
    ("case", "stdin", "hyper", "reason"),
    _bad_inputs(),
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_bad_inputs_fail_with_a_reason(
    mlp: MlpRunner, case: str, stdin: bytes, hyper: dict[str, Any] | None, reason: str
) -> None:
    failure = mlp.failure(stdin, hyper)
    assert failure.startswith("exit status 1: fl-mlp: "), failure
    assert reason in failure, failure


def test_round_id_is_required(mlp: MlpRunner) -> None:
    params = ref.make_mlp([3, 4, 2])
    x, y = ref.make_data(6, 3, 2)
    failure = mlp.failure(_stdin(params, x, y), ROUND_ID=" ")
    assert failure.startswith("exit status 2: fl-mlp: ROUND_ID"), failure


def test_the_module_declares_contract_v2(mlp: MlpRunner) -> None:
    assert mlp.compiled.contract == 2
    assert (
        json.dumps(sorted(e.name for e in mlp.compiled.module.exports)).count(
            "propeller_contract_v2"
        )
        == 1
    )
