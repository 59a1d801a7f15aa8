"""The manager killed with SIGKILL and restarted over the same state directory: proplets
(registered by real MQTT announcements), tasks in their states (Completed, Pending,
Scheduled, with env, inline module, results and timestamps) and experiments are all still
there with the same ids and fields, and the manager carries on from them (a result published
while it was down completes its task)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from propeller.v1 import coordinator_pb2, manager_pb2, manager_pb2_grpc
from server.config import Endpoints, MqttConfig
from server.faults import KILL_AT_ENV
from server.grpc_server import channel
from server.messages import COMPLETED, RUNNING
from server.topics import Topics
from tests.manager.fakes import WASM, FakeProplet
from tests.support.clients import FINISHED, Clients, clients, experiment_request
from tests.support.cluster import round_services, run_proplets
from tests.support.infra import Mosquitto
from tests.support.processes import RPC_S, ServiceProcess, mqtt_env, service_process
from tests.support.waits import eventually

Stub = Any  # generated gRPC stubs carry no type information
log = logging.getLogger(__name__)


def manager_env(
    mqtt: MqttConfig, state_dir: Path, coordinator: str, oci_registry: str = ""
) -> dict[str, str]:
    """`oci_registry`: where the manager resolves the seed's image (`seed_image_registry`)."""
    env = {
        **mqtt_env(mqtt),
        "PROPELLER_STATE_DIR": str(state_dir),
        "COORDINATOR_ADDR": coordinator,
        # Liveness is not what is tested here: long enough that no proplet ages out.
        "PROPELLER_ALIVE_WINDOW_S": "3600",
    }
    if oci_registry:
        env["PROPELLER_OCI_REGISTRY"] = oci_registry
    return env


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
    broker: Mosquitto, topics: Topics, mqtt: MqttConfig, tmp_path: Path, seed_image_registry: str
) -> None:
    # The real coordinator (and a registry holding v0) in this process; no update is
    # submitted here, so nothing listens on the aggregator's address.
    async with round_services(mqtt, aggregator_addr="127.0.0.1:9", rpc_timeout_s=5.0) as services:
        env = manager_env(mqtt, tmp_path / "state", services.coordinator, seed_image_registry)
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
                # Pinned at the start, kept: the image by its manifest, the module by digest.
                assert {t.image_url.startswith(f"{WASM}@sha256:") for t in round_tasks} == {True}
                assert len({t.env["MODULE_DIGEST"] for t in round_tasks}) == 1

                # A second kill and restart, with nothing done in between, changes nothing.
                settled = await snapshot(stub)
                mgr.kill()
                await mgr.restart()
                assert await snapshot(stub) == settled
            assert await mgr.terminate_async() == 0, mgr.tail()


# ---- kill -9 in the middle of StartExperiment's fan-out --------------------------------

FLEET = 20  # proplets in the round
# Where the manager dies (`server/faults.py`): before the experiment is recorded, after its
# round is configured (not started), after the round is open (no task created yet), after
# the fifth of the twenty task starts was published.
POINTS = [
    "manager.before_record",
    "manager.round_configured",
    "manager.round_started",
    "manager.task_start_published:5",
]


@contextlib.asynccontextmanager
async def fleet_services(
    mqtt: MqttConfig, tmp_path: Path, ids: list[str]
) -> AsyncIterator[tuple[ServiceProcess, Endpoints]]:
    """Registry (v0 stored), aggregator, data store (a dataset per proplet) and coordinator
    as `serve` processes, running; the manager as a process with a state directory, not
    started. Yields the manager and every address."""
    async with fleet_processes(mqtt, tmp_path, ids) as (manager, _, endpoints):
        yield manager, endpoints


@contextlib.asynccontextmanager
async def fleet_processes(
    mqtt: MqttConfig,
    tmp_path: Path,
    ids: list[str],
    state: Mapping[str, str] | None = None,
    *,
    insecure: bool = False,
) -> AsyncIterator[tuple[ServiceProcess, ServiceProcess, Endpoints]]:
    """`fleet_services`, yielding the coordinator process too (manager, coordinator,
    addresses). `state`: variables for the registry, the coordinator and the manager on top
    (e.g. PROPELLER_DATABASE_URL); `insecure`: every service without TLS (`mqtt` then a
    plaintext listener)."""
    state = dict(state or {})
    with contextlib.ExitStack() as stack:

        def process(service: str, env: Mapping[str, str]) -> ServiceProcess:
            return stack.enter_context(service_process(service, env, tmp_path, insecure=insecure))

        registry = process("registry", state)
        aggregator = process("aggregator", {})
        datastore = process("datastore", {"PROPELLER_DATASTORE_SEED_IDS": ",".join(ids)})
        coordinator = stack.enter_context(
            service_process(
                "coordinator",
                {
                    **mqtt_env(mqtt),
                    "AGGREGATOR_ADDR": aggregator.addr,
                    "MODEL_REGISTRY_ADDR": registry.addr,
                    "DATA_STORE_ADDR": datastore.addr,
                    "PROPELLER_STATE_DIR": str(tmp_path / "coordinator-state"),
                    "PROPELLER_COORDINATOR_TICK_S": "0.05",
                    **state,
                },
                tmp_path,
                insecure=insecure,
            )
        )
        services = (registry, aggregator, datastore, coordinator)
        for s in services:
            s.start()
        await asyncio.gather(*(s.ready() for s in services))
        endpoints = Endpoints(
            manager="",
            coordinator=coordinator.addr,
            aggregator=aggregator.addr,
            registry=registry.addr,
            datastore=datastore.addr,
        )
        async with clients({"registry": registry.addr}, insecure=insecure) as c:
            await c.init_model(3)
        env = {
            **manager_env(mqtt, tmp_path / "manager-state", coordinator.addr),
            # What the round tasks are told to reach.
            "MODEL_REGISTRY_ADDR": registry.addr,
            "DATA_STORE_ADDR": datastore.addr,
            **state,
        }
        manager = process("manager", env)
        yield manager, coordinator, replace(endpoints, manager=manager.addr)


def the_answer(resp: manager_pb2.StartExperimentResponse) -> tuple[Any, ...]:
    """What a repeated StartExperiment must answer the same (the round's status moves on)."""
    return (
        resp.experiment_id,
        resp.round_id,
        sorted((s.proplet_id, s.task_id, s.task_name) for s in resp.scheduled),
        sorted((s.proplet_id, s.reason) for s in resp.skipped),
    )


async def killed_at(
    manager: ServiceProcess, stub: Stub, point: str, request: manager_pb2.StartExperimentRequest
) -> None:
    """StartExperiment on a manager armed to kill itself at `point`: the call is cut off and
    the process dies by SIGKILL there."""
    with pytest.raises(grpc.aio.AioRpcError) as cut:
        await stub.StartExperiment(request, timeout=RPC_S)
    assert cut.value.code() == grpc.StatusCode.UNAVAILABLE, cut.value
    assert await manager.wait_exit() == -signal.SIGKILL, manager.tail()
    name, _, count = point.partition(":")
    assert f"point={name} pass={count or 1}" in manager.log_text(), manager.tail()


async def round_finished(c: Clients, request: manager_pb2.StartExperimentRequest) -> None:
    """Every task of the round in a final state (completed), and the round completed with
    every participant's update."""
    n = len(request.participants)

    async def tasks() -> list[manager_pb2.Task]:
        return await c.round_tasks(request.round_id)

    done = await eventually(
        tasks,
        lambda ts: len(ts) == n and all(t.state in FINISHED for t in ts),
        timeout=120,
        what=f"the {n} tasks of {request.round_id} finished",
    )
    assert {t.state for t in done} == {manager_pb2.TASK_STATE_COMPLETED}, [t.error for t in done]
    status = await c.wait_state(request.round_id, timeout=120, via="manager")
    assert status.state == coordinator_pb2.ROUND_STATE_COMPLETED, status.failure_reason
    assert sorted(status.reported) == sorted(request.participants)


async def test_a_manager_killed_during_a_fan_out_finishes_it_after_the_restart(
    mqtt: MqttConfig, tmp_path: Path, trainer_wasm: Path
) -> None:
    """kill -9 at four points of StartExperiment's fan-out to 20 proplets. After each
    restart: the experiment exists (unless the kill came before it was recorded), every task
    reaches a final state and the round completes without anyone calling again, and a
    repeated StartExperiment answers the same experiment and tasks (a different request with
    the same id is still ALREADY_EXISTS)."""
    ids = [f"edge-{i:02d}" for i in range(FLEET)]
    async with (
        fleet_services(mqtt, tmp_path, ids) as (mgr, endpoints),
        run_proplets(endpoints, mqtt, ids, tmp_path / "proplets", heartbeat_s=1.0),
        clients(endpoints) as c,
    ):
        for n, point in enumerate(POINTS):
            request = experiment_request(
                f"r{n}-{point.split('.')[1].split(':')[0]}",
                ids,
                f"file://{trainer_wasm}",
                timeout_s=300,
            )
            eid = f"exp-{request.round_id}"
            if mgr.running:  # from the phase before
                assert await mgr.terminate_async() == 0, mgr.tail()
            mgr.env[KILL_AT_ENV] = point
            await mgr.restart()
            await c.wait_alive(ids)
            await killed_at(mgr, c.manager, point, request)

            del mgr.env[KILL_AT_ENV]
            await mgr.restart()
            restarted = time.monotonic()
            if point == "manager.before_record":
                # Nothing was recorded, nothing left the manager: as if never asked.
                with pytest.raises(grpc.aio.AioRpcError) as unknown:
                    await c.manager.GetExperiment(
                        manager_pb2.GetExperimentRequest(experiment_id=eid), timeout=RPC_S
                    )
                assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
                assert await c.round_tasks(request.round_id) == []
                first = await c.manager.StartExperiment(request, timeout=RPC_S)
            else:
                # Recorded before anything left the manager; its fan-out is finished by the
                # restarted manager on its own.
                recorded = await c.manager.GetExperiment(
                    manager_pb2.GetExperimentRequest(experiment_id=eid), timeout=RPC_S
                )
                assert sorted(s.proplet_id for s in recorded.scheduled) == sorted(ids)
                await round_finished(c, request)
                log.info(
                    "[test] %s: %d tasks final, round completed %.2fs after the restart",
                    point,
                    FLEET,
                    time.monotonic() - restarted,
                )
                first = await c.manager.StartExperiment(request, timeout=RPC_S)
                assert the_answer(first)[2] == sorted(
                    (s.proplet_id, s.task_id, s.task_name) for s in recorded.scheduled
                )
            await round_finished(c, request)
            assert not first.skipped and len(first.scheduled) == FLEET
            tasks = await c.round_tasks(request.round_id)
            assert sorted(t.id for t in tasks) == sorted(s.task_id for s in first.scheduled)

            again = await c.manager.StartExperiment(request, timeout=RPC_S)
            assert the_answer(again) == the_answer(first)
            assert again.round.state == coordinator_pb2.ROUND_STATE_COMPLETED
            other = experiment_request(request.round_id, ids, request.task_wasm_image, k_of_n=2)
            other.experiment_id = eid
            with pytest.raises(grpc.aio.AioRpcError) as exists:
                await c.manager.StartExperiment(other, timeout=RPC_S)
            assert exists.value.code() == grpc.StatusCode.ALREADY_EXISTS
            assert "k_of_n" in (exists.value.details() or "")
            assert len(await c.round_tasks(request.round_id)) == FLEET
            log.info("[test] %s: recovered", point)
        assert await mgr.terminate_async() == 0, mgr.tail()
