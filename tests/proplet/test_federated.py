"""Round tasks: a task with ROUND_ID fetches the model and its dataset over gRPC, hands them to
the module as MODEL_DATA / DATASET_DATA, checks the printed update and streams it to the
coordinator. The services are in-test fakes on real gRPC; the module is the real trainer."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from proplet import Proplet, PropletConfig
from proplet.errors import TaskFailed
from proplet.federated import FederatedClient, FlTask, is_federated, service_address
from proplet.runner import DEFAULT_FUEL
from server.config import Endpoints
from server.datastore.datasets import split_indices
from server.messages import COMPLETED, FAILED
from server.pki import load_certificate
from server.provenance import Claim, module_digest, signature_verifies
from server.tensors import sha256_of
from tests.proplet import wat
from tests.proplet.conftest import ManagerProbe
from tests.proplet.fake_services import RoundWorld, round_services
from tests.support.ports import free_port

MODEL_URI = "fl/models/global_model_v4"
BASE_W = np.array([0.1, -0.2, 0.3])
BASE_B = 0.05


def make_dataset(n: int, seed: int = 1) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3))
    y = (x @ np.array([1.0, -2.0, 0.5]) > 0).astype(np.float64)
    return x, y


@pytest.fixture
def proplet_config(proplet_config: PropletConfig) -> PropletConfig:
    # The Zig trainer asks for 257 pages (16.06 MiB) of initial memory.
    return replace(proplet_config, memory_limit_bytes=64 << 20)


@pytest.fixture(scope="session")
def trainer_bytes(trainer_wasm: Path) -> bytes:
    return trainer_wasm.read_bytes()


@pytest.fixture
async def world(proplet_config: PropletConfig) -> AsyncIterator[RoundWorld]:
    w = RoundWorld()
    w.models[MODEL_URI] = {"w": BASE_W.copy(), "b": np.array(BASE_B)}
    w.datasets[proplet_config.proplet_id] = make_dataset(16)
    async with round_services(w):
        yield w


def round_env(world: RoundWorld, round_id: str = "r1", **extra: str) -> dict[str, str]:
    env = {
        "ROUND_ID": round_id,
        "MODEL_URI": MODEL_URI,
        "HYPERPARAMS": json.dumps({"epochs": 1, "lr": 0.5, "batch_size": 1000}),
        "COORDINATOR_URL": f"grpc://{world.address}",
        "MODEL_REGISTRY_URL": f"http://{world.address}/",
        "DATA_STORE_URL": world.address,
    }
    env.update(extra)
    return env


async def round_failure(
    probe: ManagerProbe,
    world: RoundWorld,
    module: bytes | None,
    *,
    image_url: str = "",
    **extra: str,
) -> str:
    """The reason a round task of `module` (or `image_url`), `extra` in its environment, FAILED."""
    result = await probe.run(module, image_url=image_url, env=round_env(world, **extra))
    assert result.state == FAILED, (result.state, result.error)
    return result.error


def full_batch_step(
    x: np.ndarray[Any, Any], y: np.ndarray[Any, Any], w: np.ndarray[Any, Any], b: float, lr: float
) -> tuple[np.ndarray[Any, Any], float]:
    """One epoch of full-batch gradient descent on the seed's logistic regression."""
    p = 1.0 / (1.0 + np.exp(-np.clip(x @ w + b, -20.0, 20.0)))
    err = p - y
    return w - lr * (err @ x) / len(y), b - lr * float(err.sum()) / len(y)


def printed_update(proplet_id: str, changes: dict[str, Any] | None = None) -> dict[str, Any]:
    update: dict[str, Any] = {
        "round_id": "r1",
        "proplet_id": proplet_id,
        "base_model_uri": MODEL_URI,
        "num_samples": 5,
        "metrics": {"loss": 0.25, "accuracy": 1},
        "update": {"w": [0.5, -1.25, 3.0], "b": 0.125},
    }
    update.update(changes or {})
    return update


async def test_round_task_trains_with_the_real_trainer_and_submits(
    proplet: Proplet, probe: ManagerProbe, world: RoundWorld, trainer_bytes: bytes
) -> None:
    result = await probe.run(trainer_bytes, env=round_env(world), name="fl-round-r1")
    assert result.state == COMPLETED, result.error
    summary = json.loads(result.results)
    assert summary["round_id"] == "r1"
    assert summary["num_samples"] == 16
    assert summary["duplicate"] is False
    assert summary["num_updates"] == 1
    assert set(summary["metrics"]) >= {"loss", "accuracy"}

    assert world.model_requests == [MODEL_URI]
    assert world.dataset_requests == [proplet.proplet_id]
    assert world.split_requests == [""]  # the whole dataset, as the seed trains
    [got] = world.updates
    assert got.header.round_id == "r1"
    assert got.header.proplet_id == proplet.proplet_id
    assert got.header.base_model_uri == MODEL_URI
    assert got.header.num_samples == 16
    x, y = world.datasets[proplet.proplet_id]
    w, b = full_batch_step(x, y, BASE_W, BASE_B, lr=0.5)
    np.testing.assert_allclose(got.tensors["w"], w, rtol=0, atol=1e-12)
    assert abs(float(got.tensors["b"]) - b) < 1e-12
    assert got.tensors["w"].dtype == np.float64
    assert math.isfinite(got.header.metrics["loss"])


async def test_the_update_reaches_the_coordinator_exactly_as_printed(
    proplet: Proplet, probe: ManagerProbe, world: RoundWorld
) -> None:
    printed = printed_update(proplet.proplet_id)
    result = await probe.run(wat.json_printer(printed), env=round_env(world))
    assert result.state == COMPLETED, result.error
    [got] = world.updates
    assert got.header.num_samples == 5
    assert got.header.base_model_uri == MODEL_URI
    assert dict(got.header.metrics) == {"loss": 0.25, "accuracy": 1.0}
    assert got.tensors["w"].tolist() == [0.5, -1.25, 3.0]
    assert float(got.tensors["b"]) == 0.125
    assert got.tensors["b"].shape == ()


async def test_the_update_is_signed_and_names_its_module_and_base_model(
    proplet: Proplet, probe: ManagerProbe, world: RoundWorld, proplet_config: PropletConfig
) -> None:
    module = wat.json_printer(printed_update(proplet.proplet_id))
    digest = module_digest(module)
    result = await probe.run(module, env=round_env(world, MODULE_DIGEST=digest))
    assert result.state == COMPLETED, result.error
    [got] = world.updates
    header = got.header
    assert header.module_digest == digest
    assert header.base_model_sha256 == sha256_of(world.models[MODEL_URI])
    # Signed with the proplet's own key (its TLS bundle), over the documented claim.
    claim = Claim(
        round_id="r1",
        proplet_id=proplet.proplet_id,
        base_model_sha256=header.base_model_sha256,
        module_digest=digest,
        update_sha256=sha256_of(got.tensors),
        num_samples=5,
        metrics=dict(header.metrics),
        fuel_consumed=header.fuel_consumed,
    )
    # The fuel the module's run consumed (its receipt) is in the header and signed (v2).
    assert header.fuel_consumed > 0
    assert claim.canonical().startswith(b"propeller-fl/update-signature/v2\n")
    assert proplet_config.tls is not None
    cert = load_certificate(proplet_config.tls.cert.read_bytes())
    assert signature_verifies(cert, header.signature, claim)
    assert not signature_verifies(cert, header.signature, replace(claim, num_samples=6))
    for fuel in (header.fuel_consumed + 1, header.fuel_consumed * 10, 0):
        assert not signature_verifies(cert, header.signature, replace(claim, fuel_consumed=fuel))


async def test_a_round_task_runs_its_rounds_module_and_no_other(
    proplet: Proplet, probe: ManagerProbe, world: RoundWorld
) -> None:
    module = wat.json_printer(printed_update(proplet.proplet_id))
    pinned = module_digest(b"the module the round pinned")
    error = await round_failure(probe, world, module, MODULE_DIGEST=pinned)
    assert error == (
        f"module digest mismatch: the task's module is {module_digest(module)}, round 'r1' "
        f"pinned {pinned}; not run"
    )
    assert world.updates == []
    bad = await round_failure(probe, world, module, MODULE_DIGEST="sha256:nope")
    assert bad.startswith("MODULE_DIGEST: 'sha256:nope' is not")


async def test_a_repeated_round_task_is_reported_as_duplicate(
    proplet: Proplet, probe: ManagerProbe, world: RoundWorld
) -> None:
    module = wat.json_printer(printed_update(proplet.proplet_id))
    first = await probe.run(module, env=round_env(world))
    second = await probe.run(module, env=round_env(world))
    assert json.loads(first.results)["duplicate"] is False
    assert json.loads(second.results)["duplicate"] is True
    assert len(world.updates) == 1


async def test_services_default_to_the_configured_endpoints(
    proplet_config: PropletConfig, probe: ManagerProbe, world: RoundWorld
) -> None:
    config = replace(
        proplet_config,
        endpoints=Endpoints(
            coordinator=world.address, registry=world.address, datastore=world.address
        ),
    )
    env = {"ROUND_ID": "r1", "MODEL_URI": MODEL_URI}
    async with Proplet(config) as p:
        result = await probe.run(wat.json_printer(printed_update(p.proplet_id)), env=env)
    assert result.state == COMPLETED, result.error
    assert len(world.updates) == 1


@pytest.mark.parametrize(
    ("stdout", "reason"),
    [
        (b"training went fine\n", "invalid update: stdout is not one JSON object"),
        (b"", "invalid update: the module printed nothing"),
        (b'{"round_id": "r1"} {"round_id": "r1"}', "invalid update: stdout is not one JSON"),
        (b"[1, 2]", "invalid update: stdout is JSON list, not an object"),
    ],
    ids=["prose", "empty", "two-objects", "list"],
)
async def test_output_that_is_not_one_json_object_fails(
    proplet: Proplet, probe: ManagerProbe, world: RoundWorld, stdout: bytes, reason: str
) -> None:
    error = await round_failure(probe, world, wat.printing(stdout, exit_code=0))
    assert error.startswith(reason), error
    assert world.updates == []


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"round_id": "r2"}, "round_id 'r2', the task is for 'r1'"),
        ({"proplet_id": "someone-else"}, "proplet_id 'someone-else'"),
        ({"base_model_uri": "fl/models/global_model_v1"}, "base_model_uri"),
        ({"num_samples": 0}, "num_samples 0 is not a positive integer"),
        ({"num_samples": "5"}, "num_samples '5' is not a positive integer"),
        ({"num_samples": True}, "num_samples True is not a positive integer"),
        ({"num_samples": 17}, "num_samples 17 exceeds the 16 samples"),
        ({"metrics": {"loss": "low"}}, "metrics"),
        ({"update": {"w": [1.0, 2.0], "b": 0.0}}, "update.w: shape [2], base model has [3]"),
        ({"update": {"w": [1.0, 2.0, 3.0]}}, "update.b: missing"),
        ({"update": {"w": [1, 2, 3], "b": 0, "c": 1}}, "update: unexpected tensors ['c']"),
        ({"update": {"w": [1, "x", 3], "b": 0}}, "update.w: not numeric"),
        ({"update": [1, 2, 3]}, "update: expected a JSON object"),
        ({"update": None}, "update: expected a JSON object"),
    ],
    ids=lambda v: str(v)[:40],
)
async def test_updates_that_do_not_fit_the_round_or_model_fail(
    proplet: Proplet,
    probe: ManagerProbe,
    world: RoundWorld,
    changes: dict[str, Any],
    reason: str,
) -> None:
    printed = printed_update(proplet.proplet_id, changes)
    error = await round_failure(probe, world, wat.json_printer(printed))
    assert error.startswith("invalid update: "), error
    assert reason in error, error
    assert world.updates == []


async def test_non_finite_update_fails(
    proplet: Proplet, probe: ManagerProbe, world: RoundWorld
) -> None:
    text = json.dumps(printed_update(proplet.proplet_id)).replace("3.0", "NaN")
    error = await round_failure(probe, world, wat.printing(text.encode(), exit_code=0))
    assert "update.w: contains NaN or Inf" in error


async def test_a_missing_update_field_fails(
    proplet: Proplet, probe: ManagerProbe, world: RoundWorld
) -> None:
    printed = printed_update(proplet.proplet_id)
    del printed["update"]
    result = await probe.run(wat.json_printer(printed), env=round_env(world))
    assert result.error == "invalid update: no 'update' object"


async def test_coordinator_rejection_is_the_reason(
    proplet: Proplet, probe: ManagerProbe, world: RoundWorld
) -> None:
    world.reject = (grpc.StatusCode.FAILED_PRECONDITION, "round r1 is not open")
    error = await round_failure(probe, world, wat.json_printer(printed_update(proplet.proplet_id)))
    assert error == "coordinator rejected update: FAILED_PRECONDITION: round r1 is not open"


async def test_unknown_model_or_dataset_fails_before_running(
    proplet: Proplet, probe: ManagerProbe, world: RoundWorld
) -> None:
    module = wat.json_printer(printed_update(proplet.proplet_id))
    no_model = await round_failure(probe, world, module, MODEL_URI="fl/models/global_model_v99")
    assert "GetModel fl/models/global_model_v99: NOT_FOUND" in no_model
    del world.datasets[proplet.proplet_id]
    no_data = await round_failure(probe, world, module)
    assert f"GetDataset {proplet.proplet_id}: NOT_FOUND" in no_data
    assert world.updates == []


async def test_unreachable_coordinator_fails_within_the_rpc_timeout(
    proplet_config: PropletConfig, probe: ManagerProbe, world: RoundWorld
) -> None:
    config = replace(proplet_config, rpc_timeout_s=0.5)
    env = round_env(world, COORDINATOR_URL=f"127.0.0.1:{free_port()}")
    async with Proplet(config) as p:
        result = await probe.run(wat.json_printer(printed_update(p.proplet_id)), env=env)
    assert result.state == FAILED
    assert "unreachable" in result.error
    assert "DEADLINE_EXCEEDED" in result.error or "UNAVAILABLE" in result.error


async def test_a_failing_module_in_a_round_submits_nothing(
    proplet: Proplet, probe: ManagerProbe, world: RoundWorld
) -> None:
    result = await probe.run(wat.exit_with(1, b"DATASET_DATA is empty\n"), env=round_env(world))
    assert result.error == "exit status 1: DATASET_DATA is empty"
    assert world.updates == []
    after = await probe.run(
        wat.json_printer(printed_update(proplet.proplet_id)), env=round_env(world)
    )
    assert after.state == COMPLETED


@pytest.mark.parametrize(
    ("env", "reason"),
    [
        ({"ROUND_ID": "r1"}, "MODEL_URI: required for a federated task"),
        ({"ROUND_ID": "r1", "MODEL_URI": MODEL_URI, "HYPERPARAMS": "lr=1"}, "HYPERPARAMS"),
    ],
)
async def test_incomplete_round_env_fails_with_the_field(
    proplet: Proplet, probe: ManagerProbe, env: dict[str, str], reason: str
) -> None:
    result = await probe.run(wat.hello(), env=env)
    assert result.state == FAILED
    assert result.error.startswith(reason)


async def test_model_and_dataset_follow_the_seed_json_contract(
    proplet_config: PropletConfig, world: RoundWorld
) -> None:
    client = FederatedClient(proplet_config.proplet_id, rpc_timeout_s=5.0, tls=proplet_config.tls)
    try:
        fl = FlTask.from_env(round_env(world), Endpoints())
        inputs = await client.fetch_inputs(fl)
    finally:
        await client.close()
    env = inputs.env({"ROUND_ID": "r1", "OTHER": "kept"}, proplet_config.proplet_id)
    assert env["OTHER"] == "kept"
    assert env["PROPLET_ID"] == proplet_config.proplet_id
    model = json.loads(env["MODEL_DATA"])
    assert model == {"w": BASE_W.tolist(), "b": BASE_B}
    dataset = json.loads(env["DATASET_DATA"])
    assert set(dataset) == {"schema", "proplet_id", "data", "size"}
    assert dataset["schema"] == "fl-demo-dataset-v1"
    assert dataset["proplet_id"] == proplet_config.proplet_id
    assert dataset["size"] == len(dataset["data"]) == 16
    x, y = world.datasets[proplet_config.proplet_id]
    for row, xi, yi in zip(dataset["data"], x, y, strict=True):
        assert set(row) == {"x", "y"}
        assert row["x"] == xi.tolist()
        assert row["y"] == int(yi) and isinstance(row["y"], int)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("", "default:1"),
        ("coordinator:8086", "coordinator:8086"),
        ("grpc://coordinator:8086", "coordinator:8086"),
        ("http://model-registry:8081/", "model-registry:8081"),
        ("http://local-data-store:8083/datasets", "local-data-store:8083"),
        ("  127.0.0.1:9  ", "127.0.0.1:9"),
    ],
)
def test_service_addresses_from_task_env(raw: str, expected: str) -> None:
    assert service_address(raw, "default:1") == expected


def test_round_id_makes_a_task_federated() -> None:
    assert is_federated({"ROUND_ID": "r1"})
    assert not is_federated({"ROUND_ID": "  "})
    assert not is_federated({"MODEL_URI": MODEL_URI})


def test_round_task_env_names_round_model_and_default_services() -> None:
    fl = FlTask.from_env({"ROUND_ID": "r9", "MODEL_URI": MODEL_URI, "HYPERPARAMS": ""}, Endpoints())
    assert (fl.round_id, fl.model_uri) == ("r9", MODEL_URI)
    assert (fl.coordinator, fl.registry, fl.datastore) == (
        "127.0.0.1:8086",
        "127.0.0.1:8084",
        "127.0.0.1:8083",
    )


async def test_a_missing_module_fails_a_round_task_with_its_reason(
    proplet: Proplet, probe: ManagerProbe, world: RoundWorld, tmp_path: Path
) -> None:
    error = await round_failure(probe, world, None, image_url=f"file://{tmp_path / 'gone.wasm'}")
    assert error.startswith("image_url: cannot read")
    assert world.updates == []


async def test_a_stopped_round_task_submits_nothing(
    proplet_config: PropletConfig, probe: ManagerProbe, world: RoundWorld
) -> None:
    async with Proplet(replace(proplet_config, task_timeout_s=30.0)):
        task = await probe.start(wat.infinite_loop(), env=round_env(world))
        await probe.wait_until(lambda: "Running" in probe.states(task))
        await probe.stop(task)
        result = await probe.result(task)
    assert result.state == "Interrupted"
    assert world.updates == []


# ---- federated evaluation and the train split (issue 11) -----------------------------------


def logistic_metrics(
    x: np.ndarray[Any, Any], y: np.ndarray[Any, Any], w: np.ndarray[Any, Any], b: float
) -> tuple[float, float]:
    """Mean log-loss (p clipped to [1e-12, 1 - 1e-12]) and accuracy at p >= 0.5."""
    p = 1.0 / (1.0 + np.exp(-np.clip(x @ w + b, -20.0, 20.0)))
    pc = np.clip(p, 1e-12, 1 - 1e-12)
    loss = float(np.mean(-(y * np.log(pc) + (1 - y) * np.log(1 - pc))))
    return loss, float(np.mean((p >= 0.5) == (y == 1.0)))


async def test_an_evaluation_task_reports_the_test_split_metrics_and_submits_nothing(
    proplet: Proplet, probe: ManagerProbe, world: RoundWorld, trainer_bytes: bytes
) -> None:
    world.datasets[proplet.proplet_id] = make_dataset(40, seed=7)
    result = await probe.run(trainer_bytes, env=round_env(world, FL_TASK="evaluate"))
    assert result.state == COMPLETED, result.error
    assert world.split_requests == ["test"]
    assert world.updates == []  # nothing reaches the coordinator
    reported = json.loads(result.results)
    assert set(reported) == {"num_samples", "metrics"}
    x, y = world.datasets[proplet.proplet_id]
    _, test = split_indices(proplet.proplet_id, 40)
    assert reported["num_samples"] == len(test) == 8
    loss, accuracy = logistic_metrics(x[test], y[test], BASE_W, BASE_B)
    assert reported["metrics"]["loss"] == pytest.approx(loss, abs=1e-12)
    assert reported["metrics"]["accuracy"] == accuracy


async def test_a_training_task_may_train_on_the_train_split(
    proplet: Proplet, probe: ManagerProbe, world: RoundWorld, trainer_bytes: bytes
) -> None:
    world.datasets[proplet.proplet_id] = make_dataset(40, seed=8)
    result = await probe.run(trainer_bytes, env=round_env(world, FL_SPLIT="train"))
    assert result.state == COMPLETED, result.error
    assert world.split_requests == ["train"]
    [got] = world.updates
    train, _ = split_indices(proplet.proplet_id, 40)
    assert got.header.num_samples == len(train) == 32
    x, y = world.datasets[proplet.proplet_id]
    w, b = full_batch_step(x[train], y[train], BASE_W, BASE_B, lr=0.5)
    np.testing.assert_allclose(got.tensors["w"], w, rtol=0, atol=1e-12)
    assert abs(float(got.tensors["b"]) - b) < 1e-12


async def test_an_evaluation_keeps_only_the_modules_count_and_metrics(
    proplet: Proplet, probe: ManagerProbe, world: RoundWorld
) -> None:
    printed = {"num_samples": 3, "metrics": {"loss": 0.5, "accuracy": 1}, "note": "x"}
    result = await probe.run(wat.json_printer(printed), env=round_env(world, FL_TASK="evaluate"))
    assert result.state == COMPLETED, result.error
    assert json.loads(result.results) == {
        "num_samples": 3,
        "metrics": {"loss": 0.5, "accuracy": 1.0},
    }
    # The test part of 16 samples is 3: a module claiming more is not believed.
    too_many = {"num_samples": 4, "metrics": {"loss": 0.5}}
    bad = await round_failure(probe, world, wat.json_printer(too_many), FL_TASK="evaluate")
    assert bad.startswith("invalid evaluation: num_samples 4 exceeds the 3 samples")
    no_metrics = await round_failure(
        probe, world, wat.json_printer({"num_samples": 2}), FL_TASK="evaluate"
    )
    assert no_metrics.startswith("invalid evaluation")
    assert world.updates == []


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"FL_TASK": "infer"}, "FL_TASK: 'infer' is not 'train' or 'evaluate'"),
        ({"FL_SPLIT": "test"}, "FL_SPLIT: 'test' is not allowed for FL_TASK=train"),
        ({"FL_SPLIT": "validation"}, "FL_SPLIT: 'validation' is not allowed for FL_TASK=train"),
        ({"FL_TASK": "evaluate", "FL_SPLIT": "train"}, "FL_SPLIT: 'train' is not allowed"),
        (
            {"FL_TASK": "evaluate", "HYPERPARAMS": '{"task": "train"}'},
            "HYPERPARAMS: its 'task' 'train' contradicts FL_TASK=evaluate",
        ),
        ({"HYPERPARAMS": '{"task": "evaluate"}'}, "HYPERPARAMS: its 'task' 'evaluate'"),
    ],
)
async def test_bad_task_kind_or_split_fails_naming_the_variable(
    proplet: Proplet, probe: ManagerProbe, world: RoundWorld, extra: dict[str, str], reason: str
) -> None:
    module = wat.json_printer(printed_update(proplet.proplet_id))
    error = await round_failure(probe, world, module, **extra)
    assert error.startswith(reason), error
    assert world.dataset_requests == [] and world.updates == []


def test_an_evaluation_tells_the_module_to_evaluate() -> None:
    env = {"ROUND_ID": "r", "MODEL_URI": MODEL_URI, "FL_TASK": "evaluate"}
    fl = FlTask.from_env(env | {"HYPERPARAMS": '{"epochs": 2, "mu": 0.1}'}, Endpoints())
    assert (fl.kind, fl.split) == ("evaluate", "test")
    module_env = fl.module_env(env | {"HYPERPARAMS": '{"epochs": 2, "mu": 0.1}'})
    assert json.loads(module_env["HYPERPARAMS"]) == {"epochs": 2, "mu": 0.1, "task": "evaluate"}
    bare = FlTask.from_env(env, Endpoints())
    assert json.loads(bare.module_env(env)["HYPERPARAMS"]) == {"task": "evaluate"}
    train = FlTask.from_env(env | {"FL_TASK": "train", "FL_SPLIT": "all"}, Endpoints())
    assert (train.kind, train.split) == ("train", "all")
    assert train.module_env(env) == env


def test_a_rounds_fuel_budget_comes_from_fuel_budget() -> None:
    env = {"ROUND_ID": "r", "MODEL_URI": MODEL_URI}
    assert FlTask.from_env(env, Endpoints()).fuel_budget == 0
    assert FlTask.from_env(env | {"FUEL_BUDGET": " 0 "}, Endpoints()).fuel_budget == 0
    assert FlTask.from_env(env | {"FUEL_BUDGET": "123456"}, Endpoints()).fuel_budget == 123456
    for bad in ("-1", "1e9", "lots", str(2**63)):
        with pytest.raises(TaskFailed, match=r"^FUEL_BUDGET: .* is not a fuel count"):
            FlTask.from_env(env | {"FUEL_BUDGET": bad}, Endpoints())


async def test_the_lower_of_the_rounds_and_the_proplets_fuel_budget_ends_a_run(
    proplet: Proplet, probe: ManagerProbe, world: RoundWorld
) -> None:
    module = wat.counting(1_000_000)
    result = await probe.run(module, env=round_env(world, FUEL_BUDGET="100000"))
    assert result.state == FAILED
    assert result.error == "fuel budget of 100000 exhausted (the module ran out)"
    assert world.updates == []
    # A round budget above the proplet's own does not raise it.
    assert proplet.config.limits.fuel == DEFAULT_FUEL
    huge = str(DEFAULT_FUEL * 2)
    module = wat.json_printer(printed_update(proplet.proplet_id))
    result = await probe.run(module, env=round_env(world, FUEL_BUDGET=huge))
    assert result.state == COMPLETED, result.error
    [got] = world.updates
    assert 0 < got.header.fuel_consumed < 1_000_000


async def test_an_evaluation_task_is_metered_and_budgeted_like_training(
    proplet: Proplet, probe: ManagerProbe, world: RoundWorld, trainer_bytes: bytes
) -> None:
    world.datasets[proplet.proplet_id] = make_dataset(40, seed=7)
    env = round_env(world, FL_TASK="evaluate", FUEL_BUDGET="10000")
    result = await probe.run(trainer_bytes, env=env)
    assert result.state == FAILED
    assert result.error == "fuel budget of 10000 exhausted (the module ran out)"
