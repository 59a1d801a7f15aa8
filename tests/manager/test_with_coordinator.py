"""StartExperiment against the real Coordinator and ModelRegistry: what the manager configures
is what the coordinator runs, and the coordinator's refusals reach the user unchanged."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from propeller.v1 import coordinator_pb2, coordinator_pb2_grpc, manager_pb2
from server.config import MqttConfig
from server.grpc_server import channel
from server.topics import Topics
from tests.manager.fakes import (
    FakeProplet,
    experiment,
    running_manager,
    until_alive,
)
from tests.support.cluster import round_services
from tests.support.infra import Mosquitto
from tests.support.security import operator_tls


@dataclass
class Services:
    stub: Any  # ManagerStub (the generated service code is untyped)
    coordinator: Any  # CoordinatorStub


@pytest.fixture
async def manager(mqtt: MqttConfig, seed_image_registry: str) -> AsyncIterator[Services]:
    # The real coordinator and registry (v0 stored); nothing here aggregates: no update is
    # ever submitted.
    async with (
        round_services(mqtt, aggregator_addr="127.0.0.1:9", rpc_timeout_s=5.0) as services,
        running_manager(
            mqtt.port,
            mqtt.topics,
            coordinator_addr=services.coordinator,
            oci_registry=seed_image_registry,
        ) as m,
        channel(services.coordinator, operator_tls()) as chan,
    ):
        yield Services(m.stub, coordinator_pb2_grpc.CoordinatorStub(chan))


async def test_round_runs_as_configured(
    broker: Mosquitto, topics: Topics, manager: Services
) -> None:
    async with (
        FakeProplet(broker.port, topics, "p-1") as p1,
        FakeProplet(broker.port, topics, "p-2") as p2,
    ):
        await until_alive(manager.stub, "p-1")
        await until_alive(manager.stub, "p-2")
        resp = await manager.stub.StartExperiment(
            experiment(
                "r-1",
                ["p-1", "p-2", "p-ghost"],
                experiment_id="exp-1",
                hyperparams=coordinator_pb2.Hyperparams(epochs=3, lr=0.1, batch_size=8),
                k_of_n=2,
                timeout_s=45,
            )
        )
        assert [s.proplet_id for s in resp.skipped] == ["p-ghost"]

        status = await manager.stub.GetRoundStatus(
            coordinator_pb2.GetRoundStatusRequest(round_id="r-1")
        )
        assert status.state == coordinator_pb2.ROUND_STATE_OPEN
        assert (status.experiment_id, list(status.participants)) == ("exp-1", ["p-1", "p-2"])
        assert (status.k_of_n, status.timeout_s) == (2, 45.0)
        assert (status.hyperparams.epochs, status.hyperparams.lr) == (3, 0.1)
        assert status.hyperparams.batch_size == 8
        assert status.deadline == pytest.approx(status.started_at + 45.0)

        # The manager answers with the coordinator's own status, field for field.
        direct = await manager.coordinator.GetRoundStatus(
            coordinator_pb2.GetRoundStatusRequest(round_id="r-1")
        )
        assert status == direct and resp.round == direct

        for fp in (p1, p2):
            start = await fp.next_start()
            assert start.name == f"fl-round-r-1-{fp.id}"
            assert start.env["MODEL_URI"] == "fl/models/global_model_v0"
            # The deadline timeout_s set on the round reaches each task.
            assert start.env["ROUND_DEADLINE"] == repr(status.deadline)
            assert json.loads(start.env["HYPERPARAMS"]) == {
                "epochs": 3,
                "lr": 0.1,
                "batch_size": 8,
            }


async def test_coordinator_refusals_keep_their_codes(
    broker: Mosquitto, topics: Topics, manager: Services
) -> None:
    async with FakeProplet(broker.port, topics, "p-1"):
        await until_alive(manager.stub, "p-1")
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await manager.stub.StartExperiment(
                experiment("r-2", ["p-1"], model_ref="fl/models/global_model_v5")
            )
        assert exc.value.code() == grpc.StatusCode.NOT_FOUND

        await manager.stub.StartExperiment(experiment("r-3", ["p-1"]))
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await manager.stub.StartExperiment(experiment("r-3", ["p-1"], experiment_id="again"))
        assert exc.value.code() == grpc.StatusCode.ALREADY_EXISTS
        listed = await manager.stub.ListTasks(manager_pb2.ListTasksRequest(name_prefix="fl-"))
        assert [t.name for t in listed.tasks] == ["fl-round-r-3-p-1"]


async def test_free_hyperparameters_reach_the_round_and_every_task(
    broker: Mosquitto, topics: Topics, manager: Services
) -> None:
    async with FakeProplet(broker.port, topics, "p-1") as p1:
        await until_alive(manager.stub, "p-1")
        hp = coordinator_pb2.Hyperparams(
            epochs=2, lr=0.05, extra_json='{"shuffle": false, "mu": 0.5}'
        )
        await manager.stub.StartExperiment(experiment("r-x", ["p-1"], hyperparams=hp))
        status = await manager.coordinator.GetRoundStatus(
            coordinator_pb2.GetRoundStatusRequest(round_id="r-x")
        )
        # Stored with the round in its canonical form.
        assert status.hyperparams.extra_json == '{"mu":0.5,"shuffle":false}'
        start = await p1.next_start()
        assert json.loads(start.env["HYPERPARAMS"]) == {
            "epochs": 2,
            "lr": 0.05,
            "batch_size": 1,
            "mu": 0.5,
            "shuffle": False,
        }

        # A bad key is refused before anything is configured, and named.
        bad = coordinator_pb2.Hyperparams(extra_json='{"mu": 1, "lr": 0.2}')
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await manager.stub.StartExperiment(experiment("r-y", ["p-1"], hyperparams=bad))
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert str(exc.value.details()).startswith("hyperparams.extra_json.lr:")
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await manager.coordinator.ConfigureRound(
                coordinator_pb2.ConfigureRoundRequest(
                    round_id="r-z", participants=["p-1"], hyperparams=bad
                )
            )
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert str(exc.value.details()).startswith("hyperparams.extra_json.lr:")
