"""Trainer contract v2 in the proplet: a module that exports `propeller_contract_v2` gets the
model and its dataset as safetensors on stdin (no MODEL_DATA / DATASET_DATA) and answers one
safetensors container on stdout, checked against the base model before it is submitted. The
services are in-test fakes on real gRPC; the modules are the real MLP trainer and WAT modules
with fixed answers."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from proplet import Proplet, PropletConfig, safetensors
from proplet.federated import CONTRACT_V1, CONTRACT_V2, FlInputs
from proplet.runner import Invocation, Limits, WasmRuntime
from server.datastore.datasets import split_indices
from server.messages import COMPLETED, FAILED
from tests.conftest import load_wasm_build
from tests.proplet import wat
from tests.proplet.conftest import ManagerProbe
from tests.proplet.fake_services import RoundWorld, round_services
from tests.wasm_client import mlp_reference as ref

MODEL_URI = "fl/models/mlp_v3"
SIZES = [4, 8, 3]
HYPER = {"epochs": 2, "lr": 0.2, "batch_size": 4, "momentum": 0.5}


@pytest.fixture
def proplet_config(proplet_config: PropletConfig) -> PropletConfig:
    return replace(proplet_config, memory_limit_bytes=64 << 20, task_timeout_s=10.0)


@pytest.fixture
async def world(proplet_config: PropletConfig) -> AsyncIterator[RoundWorld]:
    w = RoundWorld()
    w.models[MODEL_URI] = ref.make_mlp(SIZES, seed=21)
    w.datasets[proplet_config.proplet_id] = ref.make_data(24, SIZES[0], SIZES[-1], seed=22)
    async with round_services(w):
        yield w


@pytest.fixture(scope="module")
def mlp_bytes(mlp_wasm: Path) -> bytes:
    return mlp_wasm.read_bytes()


def round_env(world: RoundWorld, **extra: str) -> dict[str, str]:
    return {
        "ROUND_ID": "r1",
        "MODEL_URI": MODEL_URI,
        "HYPERPARAMS": json.dumps(HYPER),
        "COORDINATOR_URL": world.address,
        "MODEL_REGISTRY_URL": world.address,
        "DATA_STORE_URL": world.address,
        **extra,
    }


# ------------------------------------------------------------------------- the declaration


def test_the_contract_is_read_from_the_modules_exports(trainer_wasm: Path, mlp_wasm: Path) -> None:
    runtime = WasmRuntime()
    minimal = load_wasm_build().build_minimal()
    as_global = wat.build("", extra='(global (export "propeller_contract_v2") i32 (i32.const 2))')
    modules = {
        "zig linear trainer": (trainer_wasm.read_bytes(), CONTRACT_V1),
        "C example": (minimal.read_bytes(), CONTRACT_V1),
        "MLP trainer": (mlp_wasm.read_bytes(), CONTRACT_V2),
        "WAT, marker function": (wat.contract_v2_printer(b"x"), CONTRACT_V2),
        "WAT, marker global": (as_global, CONTRACT_V2),
        "WAT, no marker": (wat.hello(), CONTRACT_V1),
    }
    for what, (data, contract) in modules.items():
        assert runtime.compile(data, what).contract == contract, what


def test_stdin_reaches_the_module_from_memory() -> None:
    runtime = WasmRuntime()
    echo = runtime.compile(wat.stdin_echo(4 << 20), "echo")
    data = os.urandom(3 << 20)
    limits = Limits(output_bytes=4 << 20)
    out = runtime.run_sync(echo, Invocation(["echo"], {}, limits, data))
    assert out.stdout == data
    empty = runtime.run_sync(echo, Invocation(["echo"], {}, limits))
    assert empty.stdout == b""


async def test_v2_inputs_are_two_containers_on_stdin_and_no_json() -> None:
    model = ref.make_mlp(SIZES, seed=1)
    x, y = ref.make_data(10, SIZES[0], SIZES[-1])
    inputs = FlInputs(model, x.astype(np.float32), y)
    task_env = {"ROUND_ID": "r1", "MODEL_DATA": "stale", "DATASET_DATA": "stale", "OTHER": "o"}
    env, stdin = await inputs.invocation_inputs(CONTRACT_V2, task_env, "p9")
    assert env == {"ROUND_ID": "r1", "OTHER": "o", "PROPLET_ID": "p9"}
    first = safetensors.decode(stdin, "model")
    second = safetensors.decode(stdin[first.size :], "dataset")
    assert first.size + second.size == len(stdin)
    assert list(first.tensors) == list(model)
    for name, arr in model.items():
        np.testing.assert_array_equal(first.tensors[name], arr)
    assert second.tensors["x"].dtype == np.float32
    np.testing.assert_array_equal(second.tensors["x"], x.astype(np.float32))
    np.testing.assert_array_equal(second.tensors["y"], y)

    v1_env, v1_stdin = await inputs.invocation_inputs(CONTRACT_V1, task_env, "p9")
    assert v1_stdin == b""
    assert json.loads(v1_env["MODEL_DATA"])["l1.b"] == model["l1.b"].tolist()


# ------------------------------------------------------------------------- round tasks


async def test_a_v2_round_task_trains_the_mlp_and_submits(
    proplet: Proplet, probe: ManagerProbe, world: RoundWorld, mlp_bytes: bytes
) -> None:
    result = await probe.run(mlp_bytes, env=round_env(world))
    assert result.state == COMPLETED, result.error
    [got] = world.updates
    assert got.header.num_samples == 24
    x, y = world.datasets[proplet.proplet_id]
    base = world.models[MODEL_URI]
    want = ref.train(base, x, y, **HYPER, proplet_id=proplet.proplet_id)  # type: ignore[arg-type]
    assert list(got.tensors) == list(base)
    for name in base:
        assert got.tensors[name].dtype == base[name].dtype
        np.testing.assert_allclose(got.tensors[name], want[name], rtol=0, atol=1e-9)
    loss, accuracy = ref.metrics(want, x, y)
    assert got.header.metrics["loss"] == pytest.approx(loss, abs=1e-9)
    assert got.header.metrics["accuracy"] == accuracy


async def test_a_v2_evaluation_reports_the_test_split_metrics(
    proplet: Proplet, probe: ManagerProbe, world: RoundWorld, mlp_bytes: bytes
) -> None:
    result = await probe.run(mlp_bytes, env=round_env(world, FL_TASK="evaluate"))
    assert result.state == COMPLETED, result.error
    assert world.updates == []
    reported = json.loads(result.results)
    _, test = split_indices(proplet.proplet_id, 24)
    x, y = world.datasets[proplet.proplet_id]
    loss, accuracy = ref.metrics(world.models[MODEL_URI], x[test], y[test])
    assert reported["num_samples"] == len(test)
    assert reported["metrics"]["loss"] == pytest.approx(loss, abs=1e-9)
    assert reported["metrics"]["accuracy"] == accuracy


def _good_update(proplet_id: str) -> tuple[dict[str, Any], dict[str, str]]:
    tensors = {k: v + 0.5 for k, v in ref.make_mlp(SIZES, seed=21).items()}
    metadata = {
        "round_id": "r1",
        "proplet_id": proplet_id,
        "base_model_uri": MODEL_URI,
        "num_samples": "24",
        "metrics": json.dumps({"loss": 0.5, "accuracy": 0.75}),
    }
    return tensors, metadata


def _raw(header: dict[str, Any], data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def _bad_answers(pid: str) -> list[tuple[str, bytes, str]]:
    tensors, meta = _good_update(pid)
    good = safetensors.encode(tensors, meta)

    def changed(**kw: Any) -> bytes:
        return safetensors.encode({**tensors, **kw}, meta)

    def without(name: str) -> bytes:
        return safetensors.encode({k: v for k, v in tensors.items() if k != name}, meta)

    def meta_changed(**kw: str) -> bytes:
        return safetensors.encode(tensors, {**meta, **kw})

    l0w = tensors["l0.w"]
    holey = {
        "l0.w": {"dtype": "F64", "shape": [4, 8], "data_offsets": [8, 8 + l0w.nbytes]},
    }
    return [
        ("nothing", b"", "the module printed nothing on stdout"),
        ("json", b'{"round_id": "r1"}\n', "stdout: header length"),
        ("prose", b"hello", "stdout: 5 bytes, too short for the 8-byte header length"),
        (
            "truncated header",
            struct.pack("<Q", 100) + b'{"l0.w": {"dtype"',
            "stdout: header length 100 exceeds the 17 bytes after it",
        ),
        ("header not json", struct.pack("<Q", 4) + b"{{{{", "stdout: header is not JSON"),
        ("header a list", _raw([], b""), "header is JSON list, not an object"),  # type: ignore[arg-type]
        (
            "f32",
            changed(**{"l0.w": l0w.astype(np.float32)}),
            "update.l0.w: dtype F32, base model has F64",
        ),
        (
            "dtype name",
            _raw({"l0.w": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8),
            "dtype 'I64' is not one of F32, F64",
        ),
        (
            "transposed",
            changed(**{"l0.w": l0w.T.copy()}),
            "update.l0.w: shape [8, 4], base model has [4, 8]",
        ),
        ("missing", without("l1.b"), "update: missing tensors ['l1.b']"),
        ("extra", changed(**{"l2.w": np.zeros(2)}), "update: unexpected tensors ['l2.w']"),
        ("short data", good[:-8], "tensor 'l1.b': data ends at"),
        ("trailing", good + b"\0" * 8, "stdout: 8 bytes follow the safetensors container"),
        (
            "hole",
            _raw(holey, b"\0" * (8 + l0w.nbytes)),
            "tensor 'l0.w': data at [8, 264] leaves a hole",
        ),
        (
            "offsets",
            _raw({"l0.w": {"dtype": "F64", "shape": [4, 8], "data_offsets": [0, 8]}}, b"\0" * 8),
            "hold 8 bytes, its dtype and shape need 256",
        ),
        (
            "num_samples",
            meta_changed(num_samples="many"),
            "num_samples 'many' is not a positive integer",
        ),
        ("too many", meta_changed(num_samples="25"), "num_samples 25 exceeds the 24 samples"),
        ("metrics", meta_changed(metrics="{loss"), "__metadata__.metrics is not JSON"),
        ("metric value", meta_changed(metrics='{"loss": "low"}'), "metrics {'loss': 'low'}"),
        ("round", meta_changed(round_id="r2"), "round_id 'r2', the task is for 'r1'"),
        (
            "nan",
            changed(**{"l1.b": np.array([0.0, np.nan, 1.0])}),
            "update.l1.b: contains NaN or Inf",
        ),
    ]


@pytest.mark.parametrize("case", [c for c, _, _ in _bad_answers("p")])
async def test_a_malformed_v2_answer_fails_the_task_with_its_reason(
    proplet: Proplet, probe: ManagerProbe, world: RoundWorld, case: str
) -> None:
    [(_, stdout, reason)] = [a for a in _bad_answers(proplet.proplet_id) if a[0] == case]
    result = await probe.run(wat.contract_v2_printer(stdout), env=round_env(world))
    assert result.state == FAILED
    assert result.error.startswith("invalid update: "), result.error
    assert reason in result.error, result.error
    assert world.updates == []


async def test_after_a_malformed_answer_the_proplet_goes_on(
    proplet: Proplet, probe: ManagerProbe, world: RoundWorld, mlp_bytes: bytes
) -> None:
    tensors, meta = _good_update(proplet.proplet_id)
    bad = await probe.run(wat.contract_v2_printer(b"\xff" * 40), env=round_env(world))
    assert bad.state == FAILED
    good = await probe.run(
        wat.contract_v2_printer(safetensors.encode(tensors, meta)),
        env=round_env(world, ROUND_ID="r1"),
    )
    assert good.state == COMPLETED, good.error
    [got] = world.updates
    for name, arr in tensors.items():
        np.testing.assert_array_equal(got.tensors[name], arr)
    assert got.header.metrics == {"loss": 0.5, "accuracy": 0.75}


async def test_a_malformed_v2_evaluation_fails_with_its_reason(
    proplet: Proplet, probe: ManagerProbe, world: RoundWorld
) -> None:
    result = await probe.run(
        wat.contract_v2_printer(b"not a container"), env=round_env(world, FL_TASK="evaluate")
    )
    assert result.state == FAILED
    assert result.error.startswith("invalid evaluation: stdout: header length"), result.error
    answer = safetensors.encode({}, {"num_samples": "2", "metrics": '{"loss": 0.5}'})
    ok = await probe.run(wat.contract_v2_printer(answer), env=round_env(world, FL_TASK="evaluate"))
    assert ok.state == COMPLETED, ok.error
    assert json.loads(ok.results) == {"num_samples": 2, "metrics": {"loss": 0.5}}
