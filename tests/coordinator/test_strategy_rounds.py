"""A round's strategy through the real services (registry, aggregator and coordinator in this
process, real Mosquitto): checked when the round is configured, stored with it, and two rounds
of one experiment with FedAdam give what the paper's formula gives, the Adam moments carried
from the first round to the second by the coordinator (docs/strategies.md)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest

from propeller.v1 import coordinator_pb2
from server.config import MqttConfig
from server.coordinator.rounds import Update
from server.tensors import Tensors
from tests.coordinator.helpers import FedAdamReference, make_update
from tests.support.clients import Clients
from tests.support.cluster import round_clients

S = coordinator_pb2
V0 = "fl/models/global_model_v0"
V1 = "fl/models/global_model_v1"
ADAM = {"eta": 0.05, "beta_1": 0.8, "beta_2": 0.95, "tau": 0.001}
ROUND1 = [
    make_update("a", [1.0, 2.0, 3.0], 1.0, 10),
    make_update("b", [0.0, -1.0, 4.0], -2.0, 30),
    make_update("c", [5.0, 5.0, 5.0], 0.5, 60),
]
# Round 2's updates as steps from round 1's model (what the proplets train from).
STEPS = [
    ("a", [0.3, -0.2, 0.1], 0.05, 20),
    ("b", [-0.1, 0.4, 0.2], -0.3, 20),
    ("c", [0.2, 0.0, -0.4], 0.1, 60),
]


@pytest.fixture
async def fl(mqtt: MqttConfig) -> AsyncIterator[Clients]:
    async with round_clients(mqtt) as c:
        yield c


def round2(model: Tensors) -> list[Update]:
    return [
        make_update(p, list(model["w"] + np.array(w)), float(model["b"] + b), n, base=V1)
        for p, w, b, n in STEPS
    ]


async def run_round(
    c: Clients, round_id: str, updates: list[Update], model_ref: str, **fields: str
) -> coordinator_pb2.RoundStatus:
    await c.configure(round_id, model_ref=model_ref, **fields)
    for u in updates:
        await c.submit(round_id, u)
    status = await c.wait_state(round_id)
    assert status.state == S.ROUND_STATE_COMPLETED, status.failure_reason
    return status


def close(got: Tensors, want: Tensors) -> None:
    assert list(got) == list(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-12, atol=1e-15)


async def test_two_fedadam_rounds_of_one_experiment_give_the_reference(fl: Clients) -> None:
    fields = {
        "experiment_id": "exp-adam",
        "strategy_name": "fedadam",
        "strategy_params_json": json.dumps(ADAM),
    }
    reference = FedAdamReference(await fl.model(0), **ADAM)
    first = await run_round(fl, "r1", ROUND1, V0, **fields)
    assert first.strategy_name == "fedadam"
    # Stored canonical, every default filled in (here all four were given).
    assert json.loads(first.strategy_params_json) == {**ADAM, "eta_l": 0.1}
    close(await fl.model(first.new_model_version), reference.step(ROUND1))

    v1 = await fl.model(1)
    updates = round2(v1)
    second = await run_round(fl, "r2", updates, V1, **fields)
    want = reference.step(updates)
    close(await fl.model(second.new_model_version), want)
    # The moments carried over: the same round started afresh lands elsewhere.
    afresh = FedAdamReference(v1, **ADAM).step(updates)
    assert not np.allclose(want["w"], afresh["w"])


async def test_another_experiment_starts_from_fresh_state(fl: Clients) -> None:
    params = json.dumps(ADAM)
    first = await run_round(
        fl,
        "r1",
        ROUND1,
        V0,
        experiment_id="e1",
        strategy_name="fedadam",
        strategy_params_json=params,
    )
    v1 = await fl.model(first.new_model_version)
    updates = round2(v1)
    other = await run_round(
        fl,
        "r2",
        updates,
        V1,
        experiment_id="e2",
        strategy_name="fedadam",
        strategy_params_json=params,
    )
    close(await fl.model(other.new_model_version), FedAdamReference(v1, **ADAM).step(updates))


async def test_an_order_statistic_round(fl: Clients) -> None:
    status = await run_round(fl, "r1", ROUND1, V0, strategy_name="fedmedian")
    got = await fl.model(status.new_model_version)
    np.testing.assert_array_equal(got["w"], [1.0, 2.0, 4.0])
    np.testing.assert_array_equal(got["b"], 0.5)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"strategy_name": "fedsgd"}, "strategy_name"),
        (
            {"strategy_name": "fedadam", "strategy_params_json": '{"eta": 0}'},
            "strategy_params_json.eta",
        ),
        (
            {"strategy_name": "fedavg", "strategy_params_json": '{"mu": 1}'},
            "strategy_params_json.mu",
        ),
        ({"strategy_params_json": "[]"}, "strategy_params_json"),
        # Krum with f = 1 needs 5 updates; the round closes at 3.
        ({"strategy_name": "krum", "strategy_params_json": '{"num_malicious": 1}'}, "k_of_n"),
    ],
)
async def test_a_bad_strategy_is_refused_when_the_round_is_configured(
    fl: Clients, fields: dict[str, str], field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        await fl.configure("r1", **fields)
    assert excinfo.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (excinfo.value.details() or "").startswith(f"{field}:"), excinfo.value.details()


async def test_the_same_round_again_with_another_strategy_is_already_exists(
    fl: Clients,
) -> None:
    await fl.configure("r1", strategy_name="fedadam")
    # A retry of the same configuration is fine, however its parameters are spelled.
    again = await fl.configure("r1", strategy_name="fedadam")
    assert again.strategy_name == "fedadam" and again.strategy_params_json == ""
    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        await fl.configure("r1", strategy_name="fedyogi")
    assert excinfo.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "strategy_name" in (excinfo.value.details() or "")
