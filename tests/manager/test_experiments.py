"""What a round's tasks are made of (the experiment's checks: tests/test_round_spec.py)."""

from __future__ import annotations

import json

import pytest

from server.config import Endpoints
from server.errors import FailedPrecondition
from server.manager.experiments import quorum, round_task_env, round_task_name
from server.manager.proplets import Skipped
from server.round_spec import Hyperparams, RoundSpec

P3 = ("p1", "p2", "p3")
DEAD = [Skipped("p3", "not alive (last seen 40.0 s ago)")]


@pytest.mark.parametrize(
    ("k_of_n", "min_k_of_n", "alive", "expected"),
    [(0, 0, 3, 3), (2, 0, 3, 2), (3, 0, 3, 3), (2, 0, 2, 2), (3, 2, 2, 2), (0, 1, 2, 2)],
)
def test_quorum_is_k_of_n_or_the_alive_ones_the_request_allows(
    k_of_n: int, min_k_of_n: int, alive: int, expected: int
) -> None:
    spec = RoundSpec("r", P3, k_of_n=k_of_n, min_k_of_n=min_k_of_n)
    assert quorum(spec, alive, DEAD[: 3 - alive]) == expected


@pytest.mark.parametrize(
    ("k_of_n", "min_k_of_n", "allowance"),
    [
        (3, 0, "set min_k_of_n to run with fewer"),
        (0, 0, "set min_k_of_n"),
        (3, 3, "min_k_of_n is 3"),
    ],
)
def test_fewer_alive_than_k_of_n_is_refused_naming_the_missing(
    k_of_n: int, min_k_of_n: int, allowance: str
) -> None:
    spec = RoundSpec("r", P3, k_of_n=k_of_n, min_k_of_n=min_k_of_n)
    with pytest.raises(FailedPrecondition) as exc:
        quorum(spec, 2, DEAD)
    message = str(exc.value)
    assert message.startswith("participants: k_of_n 3 needs 3 live participants, 2 of 3 are alive")
    assert allowance in message
    assert "missing: p3: not alive (last seen 40.0 s ago)" in message


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
