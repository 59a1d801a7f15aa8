"""Experiment validation and what a round's tasks are made of."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from typing import Any

import pytest

from server.config import Endpoints
from server.errors import InvalidArgument
from server.manager.experiments import (
    ExperimentConfig,
    Hyperparams,
    effective_k_of_n,
    round_task_env,
    round_task_name,
    validate,
)

VALID = ExperimentConfig(
    experiment_id="exp-1",
    round_id="r-1",
    model_ref="fl/models/global_model_v0",
    participants=["p1", "p2", "p3"],
    hyperparams=Hyperparams(epochs=1, lr=0.01, batch_size=16),
    k_of_n=3,
    timeout_s=60,
    task_wasm_image="local-registry:5000/fl-client-wasm:latest",
)


def test_valid_config_passes_unchanged() -> None:
    assert validate(VALID) == VALID


def test_experiment_id_derived_from_round_id() -> None:
    assert validate(replace(VALID, experiment_id="")).experiment_id == "exp-r-1"


def test_hyperparam_defaults_filled() -> None:
    out = validate(replace(VALID, hyperparams=Hyperparams()))
    assert out.hyperparams == Hyperparams(epochs=1, lr=0.01, batch_size=1)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"round_id": ""}, "round_id"),
        ({"round_id": "r 1"}, "round_id"),
        ({"participants": []}, "participants"),
        ({"participants": ["p1", "p2", "p1"]}, "participants"),
        ({"participants": ["p1", ""]}, "participants"),
        ({"model_ref": ""}, "model_ref"),
        ({"model_ref": "models/v0"}, "model_ref"),
        ({"task_wasm_image": ""}, "task_wasm_image"),
        ({"k_of_n": -1}, "k_of_n"),
        ({"k_of_n": 4}, "k_of_n"),
        ({"timeout_s": -1.0}, "timeout_s"),
        ({"timeout_s": math.nan}, "timeout_s"),
        ({"timeout_s": math.inf}, "timeout_s"),
        ({"hyperparams": Hyperparams(epochs=-1)}, "hyperparams.epochs"),
        ({"hyperparams": Hyperparams(lr=-0.1)}, "hyperparams.lr"),
        ({"hyperparams": Hyperparams(lr=math.nan)}, "hyperparams.lr"),
        ({"hyperparams": Hyperparams(batch_size=-2)}, "hyperparams.batch_size"),
    ],
)
def test_invalid_field_is_named(change: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArgument, match=f"^{field}:"):
        validate(replace(VALID, **change))


@pytest.mark.parametrize(
    ("requested", "scheduled", "expected"),
    [(0, 3, 3), (2, 3, 2), (3, 3, 3), (3, 2, 2), (0, 1, 1)],
)
def test_effective_k_of_n(requested: int, scheduled: int, expected: int) -> None:
    assert effective_k_of_n(requested, scheduled) == expected


def test_round_task_name_and_env() -> None:
    endpoints = Endpoints(coordinator="coord:8086", registry="reg:8084", datastore="ds:8083")
    assert round_task_name("r-1", "p1") == "fl-round-r-1-p1"
    env = round_task_env(
        round_id="r-1",
        model_uri="fl/models/global_model_v0",
        hyperparams=Hyperparams(epochs=2, lr=0.05, batch_size=0),
        proplet_id="p1",
        endpoints=endpoints,
    )
    assert env == {
        "ROUND_ID": "r-1",
        "MODEL_URI": "fl/models/global_model_v0",
        "HYPERPARAMS": '{"epochs": 2, "lr": 0.05, "batch_size": 1}',
        "PROPLET_ID": "p1",
        "COORDINATOR_URL": "coord:8086",
        "MODEL_REGISTRY_URL": "reg:8084",
        "DATA_STORE_URL": "ds:8083",
    }
    assert json.loads(env["HYPERPARAMS"]) == {"epochs": 2, "lr": 0.05, "batch_size": 1}
