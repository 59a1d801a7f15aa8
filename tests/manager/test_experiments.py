"""What a round's tasks are made of (the experiment's checks: tests/test_round_spec.py)."""

from __future__ import annotations

import json

import pytest

from server.config import Endpoints
from server.manager.experiments import effective_k_of_n, round_task_env, round_task_name
from server.round_spec import Hyperparams


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
