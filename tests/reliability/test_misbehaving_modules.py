"""Misbehaving WASM modules as federated round tasks (Manager.StartExperiment on a real Stack,
a real proplet with small but realistic limits): each fails with its own reason within its
limits, submits nothing to the coordinator, and leaves the proplet alive (heartbeats go on)
and able to run the next round's real trainer to completion."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest

from propeller.v1 import (
    coordinator_pb2,
    manager_pb2,
    manager_pb2_grpc,
    model_registry_pb2,
    model_registry_pb2_grpc,
)
from proplet import Proplet, PropletConfig
from proplet.runner import HARD_DEADLINE_GRACE_S
from server.config import Endpoints, MqttConfig
from server.stack import Stack, StackConfig
from server.topics import Topics
from tests.infra import Mosquitto, eventually
from tests.proplet import wat

T = TypeVar("T")
RPC_S = 10.0
V0 = "fl/models/global_model_v0"
HYPER = coordinator_pb2.Hyperparams(epochs=1, lr=0.01, batch_size=16)
FINAL = (manager_pb2.TASK_STATE_COMPLETED, manager_pb2.TASK_STATE_FAILED)
# The limits under test: PROPLET_TASK_TIMEOUT_S=2, PROPLET_MEMORY_LIMIT_MB=64, and the default
# PROPLET_OUTPUT_LIMIT_MB=16.
TASK_TIMEOUT_S = 2.0
MEMORY_LIMIT = 64 << 20
OUTPUT_LIMIT = 16 << 20
Stub = Any


def invalid_json() -> bytes:
    return wat.printing(b'{"round_id": "r", "update": {"w": [0.1, 0.2,\n', exit_code=0)


def hundred_megabytes() -> bytes:
    """Writes 100 MiB to stdout in 1 MiB writes (and ignores the write errors)."""
    return wat.flood(chunk=1 << 20, times=100)


# (module, how the task's error starts, what else it says)
CASES: dict[str, tuple[Callable[[], bytes], str, str]] = {
    "trap": (wat.trap, "trap: wasm `unreachable` instruction executed", ""),
    "infinite-loop": (wat.infinite_loop, f"deadline exceeded after {TASK_TIMEOUT_S:g}s", ""),
    "memory-hog": (wat.memory_hog, "memory limit exceeded (", "of 64 MiB in use): trap"),
    "invalid-json": (invalid_json, "invalid update: stdout is not one JSON object", ""),
    "100MB-stdout": (
        hundred_megabytes,
        f"output too large: more than {OUTPUT_LIMIT} bytes on stdout",
        "",
    ),
}


@dataclass
class World:
    proplet_id: str
    config: PropletConfig
    manager: Stub
    trainer_url: str

    async def experiment(self, image: str) -> tuple[str, str, Any]:
        """A one-participant round running `image`; (round_id, task_id, round status)."""
        rid = f"r-{uuid.uuid4().hex[:8]}"
        resp = await self.manager.StartExperiment(
            manager_pb2.StartExperimentRequest(
                round_id=rid,
                model_ref=V0,
                participants=[self.proplet_id],
                k_of_n=1,
                timeout_s=60,
                task_wasm_image=image,
                hyperparams=HYPER,
            ),
            timeout=RPC_S,
        )
        [scheduled] = resp.scheduled
        return rid, scheduled.task_id, resp.round

    async def task(self, task_id: str) -> Any:
        return await eventually(
            lambda: self.manager.GetTask(manager_pb2.TaskRef(task_id=task_id), timeout=RPC_S),
            lambda t: t.state in FINAL,
        )

    async def round(self, round_id: str) -> Any:
        return await self.manager.GetRoundStatus(
            coordinator_pb2.GetRoundStatusRequest(round_id=round_id), timeout=RPC_S
        )

    async def heard_from_after(self, t: float) -> Any:
        """The proplet as the manager lists it, once a heartbeat newer than `t` arrived."""

        async def me() -> Any:
            listed = await self.manager.ListProplets(
                manager_pb2.ListPropletsRequest(), timeout=RPC_S
            )
            return next(p for p in listed.proplets if p.id == self.proplet_id)

        return await eventually(me, lambda p: p.last_seen > t, timeout=10)


@pytest.fixture
async def world(
    broker: Mosquitto, topics: Topics, trainer_wasm: Path, tmp_path: Path
) -> AsyncIterator[World]:
    pid = f"p-{uuid.uuid4().hex[:8]}"
    mqtt = MqttConfig(port=broker.port, topics=topics)
    async with AsyncExitStack() as cm:
        stack = await cm.enter_async_context(Stack(StackConfig(mqtt=mqtt, seed_proplet_ids=(pid,))))
        ep = stack.endpoints
        config = PropletConfig(
            proplet_id=pid,
            mqtt=mqtt,
            endpoints=Endpoints(
                coordinator=ep.coordinator, registry=ep.registry, datastore=ep.datastore
            ),
            heartbeat_s=0.25,
            work_dir=tmp_path / "proplet",
            task_timeout_s=TASK_TIMEOUT_S,
            memory_limit_bytes=MEMORY_LIMIT,
            rpc_timeout_s=5.0,
        )
        assert config.output_limit_bytes == OUTPUT_LIMIT  # the default
        await cm.enter_async_context(Proplet(config))
        manager_ch = await cm.enter_async_context(grpc.aio.insecure_channel(ep.manager))
        registry_ch = await cm.enter_async_context(grpc.aio.insecure_channel(ep.registry))
        await model_registry_pb2_grpc.ModelRegistryStub(registry_ch).InitModel(
            model_registry_pb2.InitModelRequest(dimension=3), timeout=RPC_S
        )
        manager = manager_pb2_grpc.ManagerStub(manager_ch)
        await eventually(
            lambda: manager.ListProplets(manager_pb2.ListPropletsRequest(), timeout=RPC_S),
            lambda r: any(p.id == pid and p.alive for p in r.proplets),
        )
        yield World(pid, config, manager, f"file://{trainer_wasm}")


@pytest.mark.parametrize("case", list(CASES))
async def test_a_misbehaving_round_task_fails_alone(
    world: World, case: str, tmp_path: Path
) -> None:
    build, reason, detail = CASES[case]
    module = tmp_path / f"{case}.wasm"
    module.write_bytes(build())

    bad_round, bad_task, _ = await world.experiment(f"file://{module}")
    task = await world.task(bad_task)
    assert task.state == manager_pb2.TASK_STATE_FAILED
    assert task.error.startswith(reason), task.error
    assert detail in task.error, task.error
    # Within its limits: the runner's hard stop is the task timeout plus a grace period.
    assert task.finished_at - task.started_at < TASK_TIMEOUT_S + HARD_DEADLINE_GRACE_S + 1.0

    # Nothing reached the coordinator.
    status = await world.round(bad_round)
    assert status.state == coordinator_pb2.ROUND_STATE_OPEN
    assert status.num_updates == 0 and list(status.reported) == []

    # The proplet lives on: still heartbeating after the failure, listed alive, idle.
    me = await world.heard_from_after(task.finished_at)
    assert me.alive and me.task_count == 0

    # ... and runs the next round's real trainer to completion.
    good_round, good_task, _ = await world.experiment(world.trainer_url)
    good = await world.task(good_task)
    assert good.state == manager_pb2.TASK_STATE_COMPLETED, good.error
    done = await eventually(
        lambda: world.round(good_round),
        lambda s: s.state == coordinator_pb2.ROUND_STATE_COMPLETED,
    )
    assert list(done.reported) == [world.proplet_id] and done.num_updates == 1
    still = await world.round(bad_round)
    assert still.num_updates == 0 and list(still.reported) == []
