"""The manager killed with SIGKILL and restarted over the same state directory: proplets
(registered by real MQTT announcements), tasks in their states (Completed, Pending,
Scheduled, with env, inline module, results and timestamps) and experiments are all still
there with the same ids and fields, and the manager carries on from them (a result published
while it was down completes its task)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from propeller.v1 import coordinator_pb2, manager_pb2, manager_pb2_grpc
from server.config import MqttConfig
from server.grpc_server import channel
from server.messages import COMPLETED, RUNNING
from server.topics import Topics
from tests.manager.fakes import WASM, FakeProplet
from tests.support.cluster import round_services
from tests.support.infra import Mosquitto
from tests.support.processes import RPC_S, mqtt_env, service_process
from tests.support.waits import eventually

Stub = Any  # generated gRPC stubs carry no type information


def manager_env(mqtt: MqttConfig, state_dir: Path, coordinator: str) -> dict[str, str]:
    return {
        **mqtt_env(mqtt),
        "PROPELLER_STATE_DIR": str(state_dir),
        "COORDINATOR_ADDR": coordinator,
        # Liveness is not what is tested here: long enough that no proplet ages out.
        "PROPELLER_ALIVE_WINDOW_S": "3600",
    }


async def snapshot(stub: Stub) -> dict[str, Any]:
    """Everything the manager shows, as protos (compared field by field)."""
    proplets = await stub.ListProplets(manager_pb2.ListPropletsRequest(), timeout=RPC_S)
    tasks = await stub.ListTasks(manager_pb2.ListTasksRequest(), timeout=RPC_S)
    experiments = await stub.ListExperiments(manager_pb2.ListExperimentsRequest(), timeout=RPC_S)
    return {
        "proplets": list(proplets.proplets),
        "tasks": list(tasks.tasks),
        "experiments": list(experiments.experiments),
    }


async def task_state(stub: Stub, task_id: str) -> int:
    task = await stub.GetTask(manager_pb2.TaskRef(task_id=task_id), timeout=RPC_S)
    state: int = task.state
    return state


async def until_task_state(stub: Stub, task_id: str, state: int) -> None:
    async def check() -> bool:
        return await task_state(stub, task_id) == state

    await eventually(check, what=f"task {task_id} {manager_pb2.TaskState.Name(state)}", timeout=30)


async def until_listed(stub: Stub, *proplet_ids: str) -> None:
    async def check() -> bool:
        listed = await stub.ListProplets(manager_pb2.ListPropletsRequest(), timeout=RPC_S)
        return {p.id for p in listed.proplets if p.alive} >= set(proplet_ids)

    await eventually(check, what=f"proplets {proplet_ids} alive", timeout=30)


async def build_state(stub: Stub, p1: FakeProplet) -> dict[str, str]:
    """One task Completed, one Pending, one Scheduled, an experiment; returns their ids."""
    module = bytes(np.arange(256, dtype=np.uint8)) * 64  # an inline "module", 16 KiB
    done = await stub.CreateTask(
        manager_pb2.CreateTaskRequest(
            name="done", file=module, env={"A": "1", "B": "two"}, cli_args=["-x"], proplet_id="p1"
        ),
        timeout=RPC_S,
    )
    await stub.StartTask(manager_pb2.TaskRef(task_id=done.id), timeout=RPC_S)
    start = await p1.next_start()
    assert start.id == done.id and start.file == module
    await p1.report(done.id, RUNNING)
    await until_task_state(stub, done.id, manager_pb2.TASK_STATE_RUNNING)
    await p1.report(done.id, COMPLETED, results='{"loss": 0.25}')
    await until_task_state(stub, done.id, manager_pb2.TASK_STATE_COMPLETED)

    pending = await stub.CreateTask(
        manager_pb2.CreateTaskRequest(name="pending", image_url=WASM, env={"K": "v"}),
        timeout=RPC_S,
    )
    scheduled = await stub.CreateTask(
        manager_pb2.CreateTaskRequest(name="scheduled", image_url=WASM, proplet_id="p1"),
        timeout=RPC_S,
    )
    await stub.StartTask(manager_pb2.TaskRef(task_id=scheduled.id), timeout=RPC_S)
    assert (await p1.next_start()).id == scheduled.id

    started = await stub.StartExperiment(
        manager_pb2.StartExperimentRequest(
            experiment_id="exp-durable",
            round_id="r-durable",
            model_ref="fl/models/global_model_v0",
            participants=["p1", "p2", "ghost"],
            hyperparams=coordinator_pb2.Hyperparams(epochs=2, lr=0.05, batch_size=8),
            k_of_n=2,
            timeout_s=600,
            task_wasm_image=WASM,
        ),
        timeout=RPC_S,
    )
    assert [s.proplet_id for s in started.scheduled] == ["p1", "p2"]
    assert [s.proplet_id for s in started.skipped] == ["ghost"]
    assert await task_state(stub, done.id) == manager_pb2.TASK_STATE_COMPLETED
    assert await task_state(stub, pending.id) == manager_pb2.TASK_STATE_PENDING
    assert await task_state(stub, scheduled.id) == manager_pb2.TASK_STATE_SCHEDULED
    return {"done": done.id, "pending": pending.id, "scheduled": scheduled.id}


async def test_a_killed_manager_keeps_proplets_tasks_and_experiments(
    broker: Mosquitto, topics: Topics, mqtt: MqttConfig, tmp_path: Path
) -> None:
    # The real coordinator (and a registry holding v0) in this process; no update is
    # submitted here, so nothing listens on the aggregator's address.
    async with round_services(mqtt, aggregator_addr="127.0.0.1:9", rpc_timeout_s=5.0) as services:
        env = manager_env(mqtt, tmp_path / "state", services.coordinator)
        with service_process("manager", env, tmp_path) as mgr:
            await mgr.restart()
            async with channel(mgr.addr, mgr.tls) as chan:
                stub = manager_pb2_grpc.ManagerStub(chan)
                # No heartbeats: nothing changes once the proplets have announced themselves.
                async with (
                    FakeProplet(broker.port, topics, "p1", name="edge-1", heartbeat_s=None) as p1,
                    FakeProplet(broker.port, topics, "p2", name="edge-2", heartbeat_s=None),
                ):
                    await until_listed(stub, "p1", "p2")
                    ids = await build_state(stub, p1)
                    before = await snapshot(stub)
                    mgr.kill()  # right after the last answer

                    # While the manager is down, p1 finishes the scheduled task: the broker
                    # keeps the result for the manager's persistent session.
                    await p1.report(ids["scheduled"], COMPLETED, results="late")

                    await mgr.restart()
                    after = await snapshot(stub)
                    await until_task_state(stub, ids["scheduled"], manager_pb2.TASK_STATE_COMPLETED)

                # Same ids, same fields: everything except the task the late result completed.
                assert after["proplets"] == before["proplets"]
                assert [p.id for p in after["proplets"]] == ["p1", "p2"]
                assert after["experiments"] == before["experiments"]
                [experiment] = after["experiments"]
                assert experiment.experiment_id == "exp-durable"
                assert experiment.config.hyperparams.lr == 0.05
                assert [s.reason for s in experiment.skipped] == ["unknown proplet"]
                by_id = {t.id: t for t in before["tasks"]}
                assert len(after["tasks"]) == len(before["tasks"]) == 5  # 3 + 2 round tasks
                for task in after["tasks"]:
                    if task.id != ids["scheduled"]:
                        assert task == by_id[task.id], task.name
                assert [t.id for t in after["tasks"]] == [t.id for t in before["tasks"]]
                done = by_id[ids["done"]]
                assert done.results == '{"loss": 0.25}' and dict(done.env) == {"A": "1", "B": "two"}
                assert len(done.file) == 16384 and list(done.cli_args) == ["-x"]
                late = await stub.GetTask(manager_pb2.TaskRef(task_id=ids["scheduled"]))
                assert late.results == "late" and late.created_at == by_id[late.id].created_at
                round_tasks = [
                    t for t in after["tasks"] if t.name.startswith("fl-round-r-durable-")
                ]
                assert {t.state for t in round_tasks} == {manager_pb2.TASK_STATE_SCHEDULED}
                assert {t.env["ROUND_ID"] for t in round_tasks} == {"r-durable"}

                # A second kill and restart, with nothing done in between, changes nothing.
                settled = await snapshot(stub)
                mgr.kill()
                await mgr.restart()
                assert await snapshot(stub) == settled
            assert await mgr.terminate_async() == 0, mgr.tail()
