"""The manager's durable state, on both backends (`manager.sqlite`, and the `manager` schema
of PostgreSQL; tests.support.state): every proplet, task and experiment field survives
closing and reopening, in creation order; an acknowledged call is already committed; a failed
write is reported, not hidden. The crash test with a real process is test_manager_crash.py."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from propeller.v1 import manager_pb2, manager_pb2_grpc
from server.errors import FailedPrecondition
from server.manager import ManagerApp, ManagerConfig
from server.manager.experiments import Experiment, FanOut, ScheduledParticipant
from server.manager.proplets import Proplet, Skipped
from server.manager.sqlite_store import ManagerDatabase, StateWriteFailed, experiment_from_json
from server.manager.tasks import Task, TaskState
from server.round_spec import Hyperparams, RoundSpec
from server.topics import Topics
from tests.manager.fakes import WASM, mqtt_config
from tests.services.harness import served
from tests.support.infra import Mosquitto
from tests.support.security import service_tls
from tests.support.state import StateBackend

PROPLET = Proplet("p1", "edge-1", {"os": "linux", "arch": "x86"}, 1005.5, 1000.25)
TASK = Task(
    id="7d1e2f",
    name="train",
    image_url="",
    file=b"\0asm\x01\0\0\0" * 100,
    env={"ROUND_ID": "r1", "EMPTY": ""},
    cli_args=["--epochs", "2"],
    proplet_id="p1",
    state=TaskState.COMPLETED,
    results='{"loss": 0.1}',
    error="",
    created_at=1000.0,
    updated_at=1003.0,
    started_at=1001.0,
    finished_at=1003.0,
    reported_by="p1",
)
EXPERIMENT = Experiment(
    experiment_id="exp-r1",
    config=RoundSpec(
        experiment_id="exp-r1",
        round_id="r1",
        model_ref="fl/models/global_model_v0",
        participants=("p1", "p2"),
        hyperparams=Hyperparams(3, 0.125, 16, '{"mu":0.01,"shuffle":false}'),
        k_of_n=1,
        timeout_s=12.5,
        task_wasm_image=WASM,
        min_k_of_n=1,
    ),
    scheduled=[ScheduledParticipant("p1", "7d1e2f", "fl-round-r1-p1")],
    skipped=[Skipped("p2", "not alive (last seen 40.0 s ago)")],
    created_at=1000.5,
)


async def opened(state: StateBackend) -> ManagerDatabase:
    db = state.manager_database()
    await db.open()
    return db


async def reopened(state: StateBackend, db: ManagerDatabase) -> ManagerDatabase:
    await db.close()
    return await opened(state)


def rows(state: StateBackend, sql: str) -> list[tuple[object, ...]]:
    """Read the tables with a connection of its own, as another process would."""
    return state.raw("manager", sql)


async def test_every_field_survives_reopening(state_backend: StateBackend) -> None:
    state = state_backend
    db = await opened(state)
    db.proplets.put(PROPLET)
    db.tasks.put(TASK)
    db.experiments.put(EXPERIMENT)
    db = await reopened(state, db)
    try:
        assert db.proplets.list() == [PROPLET]
        assert db.tasks.get(TASK.id) == TASK
        assert db.experiments.list() == [EXPERIMENT]
        assert db.proplets.get("nope") is None
    finally:
        await db.close()


async def test_an_experiment_s_fan_out_state_and_its_removal_survive(
    state_backend: StateBackend,
) -> None:
    state = state_backend
    db = await opened(state)
    recorded = replace(EXPERIMENT, experiment_id="e-rec", fan_out=FanOut.RECORDED)
    db.experiments.put(recorded)
    db.experiments.put(replace(EXPERIMENT, experiment_id="e-gone"))
    db = await reopened(state, db)
    try:
        assert db.experiments.get("e-rec") == recorded
        db.experiments.delete("e-gone")
        db.experiments.delete("never-there")
        db.experiments.put(replace(recorded, fan_out=FanOut.DONE))
        db = await reopened(state, db)
        assert [e.experiment_id for e in db.experiments.list()] == ["e-rec"]
        assert db.experiments.get("e-rec") == replace(recorded, fan_out=FanOut.DONE)
        # A record of an older manager (no fan-out state, no min_k_of_n) reads as DONE.
        document = json.loads(str(rows(state, "SELECT record FROM experiments")[0][0]))
        del document["fan_out"], document["config"]["min_k_of_n"]
        old = experiment_from_json(document)
        assert old.fan_out is FanOut.DONE and old.config.min_k_of_n == 0
    finally:
        await db.close()


async def test_creation_order_and_updates_survive(state_backend: StateBackend) -> None:
    state = state_backend
    db = await opened(state)
    tasks = [replace(TASK, id=f"t{i}", name=f"n{i}", state=TaskState.PENDING) for i in range(5)]
    for t in tasks:
        db.tasks.put(t)
    # Updating the first task (state, results; the module unchanged) keeps its place.
    done = replace(tasks[0], state=TaskState.COMPLETED, results="42", updated_at=2000.0)
    db.tasks.put(done)
    # A changed module is written too.
    other = replace(tasks[1], file=b"new module")
    db.tasks.put(other)
    db.proplets.put(replace(PROPLET, id="b"))
    db.proplets.put(replace(PROPLET, id="a"))
    db.proplets.put(replace(PROPLET, id="b", last_seen=2000.0, name="renamed"))
    db = await reopened(state, db)
    try:
        assert [t.id for t in db.tasks.list()] == [t.id for t in tasks]
        assert db.tasks.get("t0") == done
        assert db.tasks.get("t1") == other
        assert db.tasks.get("t2") == tasks[2]
        assert [(p.id, p.name, p.last_seen) for p in db.proplets.list()] == [
            ("b", "renamed", 2000.0),
            ("a", PROPLET.name, PROPLET.last_seen),
        ]
    finally:
        await db.close()


async def test_flush_means_on_disk(state_backend: StateBackend) -> None:
    state = state_backend
    db = await opened(state)
    try:
        db.tasks.put(TASK)
        assert db.tasks.get(TASK.id) == TASK  # at once, from memory
        await db.flush()
        assert rows(state, "SELECT id, state FROM tasks") == [(TASK.id, "COMPLETED")]
    finally:
        await db.close()


async def test_a_failed_write_is_reported_and_stays_reported(state_backend: StateBackend) -> None:
    state = state_backend
    db = await opened(state)
    try:
        state.execute("manager", "DROP TABLE experiments")
        db.experiments.put(EXPERIMENT)
        with pytest.raises(StateWriteFailed, match="restart the manager"):
            await db.flush()
        db.proplets.put(PROPLET)  # memory and disk no longer agree: keep saying so
        with pytest.raises(StateWriteFailed):
            await db.flush()
    finally:
        with pytest.raises(StateWriteFailed):
            await db.close()


def test_state_dir_from_the_environment(tmp_path: Path) -> None:
    assert ManagerConfig.from_env({"PROPELLER_INSECURE": "1"}).state_dir is None
    assert (
        ManagerConfig.from_env(
            {"PROPELLER_INSECURE": "1", "PROPELLER_STATE_DIR": str(tmp_path)}
        ).state_dir
        == tmp_path
    )


async def test_an_acknowledged_call_is_already_on_disk(
    broker: Mosquitto, topics: Topics, state_backend: StateBackend
) -> None:
    state = state_backend
    """Through the real servicer: when CreateTask / StartTask answer, the row is committed."""
    config = ManagerConfig(
        addr="127.0.0.1:0",
        coordinator_addr="127.0.0.1:9",
        tls=service_tls("manager"),
        mqtt=mqtt_config(broker.port, topics).as_identity(service_tls("manager")),
        state_dir=state.state_dir,
        database_url=state.url,
    )
    async with ManagerApp(config) as app, served(app.bindings) as chan:
        stub = manager_pb2_grpc.ManagerStub(chan)
        task = await stub.CreateTask(
            manager_pb2.CreateTaskRequest(name="t", image_url=WASM, env={"A": "1"}), timeout=10
        )
        assert rows(state, "SELECT id, state, env FROM tasks") == [
            (task.id, "PENDING", '{"A": "1"}')
        ]
        await stub.StartTask(manager_pb2.TaskRef(task_id=task.id), timeout=10)
        assert rows(state, "SELECT state FROM tasks") == [("SCHEDULED",)]
    # Reopened by a new app: the same task.
    async with ManagerApp(config) as app, served(app.bindings) as chan:
        stub = manager_pb2_grpc.ManagerStub(chan)
        again = await stub.GetTask(manager_pb2.TaskRef(task_id=task.id), timeout=10)
        assert again.state == manager_pb2.TASK_STATE_SCHEDULED and dict(again.env) == {"A": "1"}


async def test_a_second_manager_on_one_state_directory_is_refused(tmp_path: Path) -> None:
    """SQLite is one manager's: a second one on the same directory fails at start, saying
    why, and starts once the first has stopped (replicas share PostgreSQL instead)."""
    first = ManagerDatabase(tmp_path)
    await first.open()
    second = ManagerDatabase(tmp_path)
    with pytest.raises(FailedPrecondition, match="another manager is running") as refused:
        await second.open()
    assert "PROPELLER_DATABASE_URL" in str(refused.value)
    first.proplets.put(PROPLET)
    await first.close()
    await second.open()
    assert second.proplets.get("p1") == PROPLET
    await second.close()
