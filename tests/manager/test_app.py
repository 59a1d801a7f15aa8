"""The Manager as a user meets it: a real gRPC server, a real Mosquitto, proplets speaking the
MQTT protocol, and a coordinator serving the real Coordinator contract."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from propeller.v1 import coordinator_pb2, manager_pb2
from server.config import TLS_DIR_ENV
from server.errors import Unavailable
from server.manager import ManagerConfig
from server.messages import COMPLETED, RUNNING, TaskResult
from server.mqtt import MqttSession
from server.oci import ImageRef
from server.pki import manager_replica_service
from server.provenance import module_digest
from server.topics import Topics
from tests.manager.fakes import (
    TASK_ENDPOINTS,
    WASM,
    FakeCoordinator,
    FakeProplet,
    RunningManager,
    experiment,
    fake_coordinator,
    mqtt_config,
    running_manager,
    until_alive,
)
from tests.support.environment import config_from_env
from tests.support.infra import Mosquitto
from tests.support.security import proplet_tls, service_tls
from tests.support.waits import eventually
from tests.test_round_spec import NOT_FINITE_OR_NEGATIVE


async def proplet(stub: Any, proplet_id: str) -> manager_pb2.Proplet:
    p: manager_pb2.Proplet = await stub.GetProplet(
        manager_pb2.GetPropletRequest(proplet_id=proplet_id)
    )
    return p


async def task(stub: Any, task_id: str) -> manager_pb2.Task:
    t: manager_pb2.Task = await stub.GetTask(manager_pb2.TaskRef(task_id=task_id))
    return t


@dataclass(frozen=True)
class Failure:
    code: grpc.StatusCode
    details: str


async def rpc_error(call: Any) -> Failure:
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await call
    return Failure(exc.value.code(), exc.value.details() or "")


async def until_state(stub: Any, task_id: str, state: int) -> manager_pb2.Task:
    async def check() -> bool:
        return (await task(stub, task_id)).state == state

    await eventually(check, what=f"task {task_id} in {manager_pb2.TaskState.Name(state)}")
    return await task(stub, task_id)


# --- proplets --------------------------------------------------------------------------


async def test_announced_proplet_is_listed_alive(broker: Mosquitto, topics: Topics) -> None:
    async with (
        running_manager(broker.port, topics) as m,
        FakeProplet(broker.port, topics, "p-1", name="edge-1"),
    ):
        await until_alive(m.stub, "p-1")
        p = await proplet(m.stub, "p-1")
        assert (p.name, dict(p.metadata)) == ("edge-1", {"os": "test", "arch": "wasm32"})
        assert p.registered_at <= p.last_seen <= time.time()

        err = await rpc_error(m.stub.GetProplet(manager_pb2.GetPropletRequest(proplet_id="no")))
        assert err.code == grpc.StatusCode.NOT_FOUND
        assert err.details.startswith("proplet_id:")


async def test_heartbeating_proplet_never_flaps_and_silent_one_dies(
    broker: Mosquitto, topics: Topics
) -> None:
    async with (
        running_manager(broker.port, topics, alive_window_s=1.0) as m,
        FakeProplet(broker.port, topics, "p-1", heartbeat_s=0.2) as p1,
    ):
        await until_alive(m.stub, "p-1")
        # Sample liveness across three windows while heartbeats flow: alive every time.
        end = time.monotonic() + 3.0
        samples = 0
        while time.monotonic() < end:
            assert (await proplet(m.stub, "p-1")).alive, "live proplet flapped to dead"
            samples += 1
            await asyncio.sleep(0.05)
        assert samples > 10

        await p1.stop_heartbeat()
        await until_alive(m.stub, "p-1", alive=False)
        last_seen = (await proplet(m.stub, "p-1")).last_seen
        assert time.time() - last_seen > 1.0


async def test_malformed_payloads_are_dropped(broker: Mosquitto, topics: Topics) -> None:
    async with (
        running_manager(broker.port, topics) as m,
        MqttSession(
            mqtt_config(broker.port, topics).as_identity(proplet_tls("junk")), "junk"
        ) as junk,
    ):
        await junk.publish(topics.proplet_create_for("junk"), b"\xff not json")
        await junk.publish(topics.proplet_alive_for("junk"), b'{"proplet_id": 7}')
        await junk.publish(
            topics.proplet_results_for("junk"), b'{"task_id": "x", "state": "Bogus"}'
        )
        async with FakeProplet(broker.port, topics, "p-ok"):
            await until_alive(m.stub, "p-ok")
        listed = await m.stub.ListProplets(manager_pb2.ListPropletsRequest())
        assert [p.id for p in listed.proplets] == ["p-ok"]


# --- tasks -----------------------------------------------------------------------------


async def test_task_is_delivered_to_its_proplet_and_completes(
    broker: Mosquitto, topics: Topics
) -> None:
    async with (
        running_manager(broker.port, topics) as m,
        FakeProplet(broker.port, topics, "p-1") as p1,
        FakeProplet(broker.port, topics, "p-2") as p2,
    ):
        created = await m.stub.CreateTask(
            manager_pb2.CreateTaskRequest(
                name="fl-manual-r1",
                image_url=WASM,
                proplet_id="p-1",
                env={"ROUND_ID": "manual-r1", "MODEL_URI": "fl/models/global_model_v0"},
            )
        )
        assert created.state == manager_pb2.TASK_STATE_PENDING

        started = await m.stub.StartTask(manager_pb2.TaskRef(task_id=created.id))
        assert started.state in (manager_pb2.TASK_STATE_SCHEDULED, manager_pb2.TASK_STATE_RUNNING)
        start = await p1.next_start()
        assert (start.id, start.name, start.image_url, start.proplet_id) == (
            created.id,
            "fl-manual-r1",
            WASM,
            "p-1",
        )
        assert start.env == {"ROUND_ID": "manual-r1", "MODEL_URI": "fl/models/global_model_v0"}

        await p1.report(created.id, RUNNING)
        await until_state(m.stub, created.id, manager_pb2.TASK_STATE_RUNNING)
        assert (await proplet(m.stub, "p-1")).task_count == 1
        err = await rpc_error(m.stub.StartTask(manager_pb2.TaskRef(task_id=created.id)))
        assert err.code == grpc.StatusCode.FAILED_PRECONDITION

        await p1.report(created.id, COMPLETED, results='{"num_samples": 64}')
        done = await until_state(m.stub, created.id, manager_pb2.TASK_STATE_COMPLETED)
        assert done.results == '{"num_samples": 64}'
        assert 0 < done.started_at <= done.finished_at
        assert (await proplet(m.stub, "p-1")).task_count == 0
        # The start was addressed to p-1 only.
        assert p2.starts.empty()

        listed = await m.stub.ListTasks(
            manager_pb2.ListTasksRequest(state=manager_pb2.TASK_STATE_COMPLETED)
        )
        assert [t.id for t in listed.tasks] == [created.id]


async def test_stop_task_publishes_stop_and_interrupts(broker: Mosquitto, topics: Topics) -> None:
    async with (
        running_manager(broker.port, topics) as m,
        FakeProplet(broker.port, topics, "p-1") as p1,
    ):
        created = await m.stub.CreateTask(
            manager_pb2.CreateTaskRequest(name="loop", file=b"\0asm", proplet_id="p-1")
        )
        await m.stub.StartTask(manager_pb2.TaskRef(task_id=created.id))
        first = await p1.next_start()
        assert (first.file, first.attempt) == (b"\0asm", 1)
        await p1.report(created.id, RUNNING)
        await until_state(m.stub, created.id, manager_pb2.TASK_STATE_RUNNING)

        stopped = await m.stub.StopTask(manager_pb2.TaskRef(task_id=created.id))
        assert stopped.state == manager_pb2.TASK_STATE_INTERRUPTED
        stop = await asyncio.wait_for(p1.stops.get(), 10)
        assert (stop.id, stop.proplet_id) == (created.id, "p-1")
        err = await rpc_error(m.stub.StopTask(manager_pb2.TaskRef(task_id=created.id)))
        assert err.code == grpc.StatusCode.FAILED_PRECONDITION

        # An interrupted task can be started again: a new attempt.
        again = await m.stub.StartTask(manager_pb2.TaskRef(task_id=created.id))
        assert again.state == manager_pb2.TASK_STATE_SCHEDULED
        second = await p1.next_start()
        assert (second.id, second.attempt) == (created.id, 2)

        # The first run's late Completed, arriving after the restart on purpose, is not taken
        # for the second run's. Results are handled in order, so once the second run's Running
        # is applied, the stale Completed has been seen (and would have made the task final).
        await p1.report(created.id, COMPLETED, results="stale", attempt=first.attempt)
        await p1.report(created.id, RUNNING, attempt=second.attempt)
        running = await until_state(m.stub, created.id, manager_pb2.TASK_STATE_RUNNING)
        assert running.results == ""
        await p1.report(created.id, COMPLETED, results="fresh", attempt=second.attempt)
        done = await until_state(m.stub, created.id, manager_pb2.TASK_STATE_COMPLETED)
        assert done.results == "fresh"


async def test_task_request_errors(broker: Mosquitto, topics: Topics) -> None:
    async with running_manager(broker.port, topics) as m:
        err = await rpc_error(m.stub.CreateTask(manager_pb2.CreateTaskRequest(image_url=WASM)))
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT
        assert err.details.startswith("name:")
        err = await rpc_error(m.stub.CreateTask(manager_pb2.CreateTaskRequest(name="t")))
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT
        assert err.details.startswith("image_url:")
        for call in (m.stub.StartTask, m.stub.StopTask, m.stub.GetTask):
            err = await rpc_error(call(manager_pb2.TaskRef(task_id="nope")))
            assert err.code == grpc.StatusCode.NOT_FOUND
            assert err.details.startswith("task_id:")
        # A task may name a proplet that has not registered yet.
        t = await m.stub.CreateTask(
            manager_pb2.CreateTaskRequest(name="later", image_url=WASM, proplet_id="p-later")
        )
        assert t.proplet_id == "p-later"


# --- experiments -----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def experiment_manager(
    broker: Mosquitto, topics: Topics, image_registry: str, **settings: Any
) -> AsyncIterator[tuple[FakeCoordinator, RunningManager]]:
    """A manager whose coordinator is a `FakeCoordinator` and which resolves images at
    `image_registry` (the `seed_image_registry` fixture); `settings`: other ManagerConfig
    fields."""
    async with (
        fake_coordinator() as (coord, coord_addr),
        running_manager(
            broker.port,
            topics,
            coordinator_addr=coord_addr,
            oci_registry=image_registry,
            **settings,
        ) as m,
    ):
        yield coord, m


async def test_experiment_configures_round_and_starts_one_task_per_participant(
    broker: Mosquitto, topics: Topics, seed_image_registry: str, trainer_wasm: Path
) -> None:
    ids = ["p-1", "p-2", "p-3"]
    module = module_digest(await asyncio.to_thread(trainer_wasm.read_bytes))
    async with (
        experiment_manager(broker, topics, seed_image_registry) as (coord, m),
        FakeProplet(broker.port, topics, ids[0]) as p1,
        FakeProplet(broker.port, topics, ids[1]) as p2,
        FakeProplet(broker.port, topics, ids[2]) as p3,
    ):
        for pid in ids:
            await until_alive(m.stub, pid)
        resp = await m.stub.StartExperiment(
            experiment(
                "r-100",
                ids,
                experiment_id="exp-100",
                hyperparams=coordinator_pb2.Hyperparams(epochs=2, lr=0.05, batch_size=16),
                k_of_n=2,
                timeout_s=45,
            )
        )

        # The coordinator got exactly what the user asked for, then was told to start.
        (req,) = coord.configured
        assert (req.round_id, req.experiment_id, list(req.participants)) == (
            "r-100",
            "exp-100",
            ids,
        )
        assert (req.k_of_n, req.timeout_s, req.model_ref) == (2, 45.0, "fl/models/global_model_v0")
        assert (req.hyperparams.epochs, req.hyperparams.lr, req.hyperparams.batch_size) == (
            2,
            0.05,
            16,
        )
        # ... running the module the image names now, pinned: the image to its manifest's
        # digest, the module to its bytes' digest.
        pinned = ImageRef.parse(req.task_wasm_image)
        assert req.task_wasm_image == f"{WASM}@{pinned.digest}" and pinned.digest
        assert req.module_digest == module and not req.start
        assert coord.started == ["r-100"]

        assert (resp.experiment_id, resp.round_id) == ("exp-100", "r-100")
        assert resp.round.state == coordinator_pb2.ROUND_STATE_OPEN
        assert resp.round.k_of_n == 2
        assert list(resp.skipped) == []
        assert [(s.proplet_id, s.task_name) for s in resp.scheduled] == [
            (pid, f"fl-round-r-100-{pid}") for pid in ids
        ]

        # The round as the coordinator answered it, unchanged on the manager's wire.
        assert resp.round == coord.rounds["r-100"]
        assert (resp.round.round_id, resp.round.timeout_s) == ("r-100", 45.0)
        assert resp.round.deadline == pytest.approx(resp.round.started_at + 45.0)
        assert resp.round.model_ref == "fl/models/global_model_v0"

        task_ids = {s.proplet_id: s.task_id for s in resp.scheduled}
        for fp in (p1, p2, p3):
            start = await fp.next_start()
            assert (start.id, start.name, start.image_url, start.proplet_id) == (
                task_ids[fp.id],
                f"fl-round-r-100-{fp.id}",
                req.task_wasm_image,
                fp.id,
            )
            assert start.env == {
                "ROUND_ID": "r-100",
                "MODEL_URI": "fl/models/global_model_v0",
                "HYPERPARAMS": '{"epochs": 2, "lr": 0.05, "batch_size": 16}',
                "PROPLET_ID": fp.id,
                "COORDINATOR_URL": TASK_ENDPOINTS.coordinator,
                "MODEL_REGISTRY_URL": TASK_ENDPOINTS.registry,
                "DATA_STORE_URL": TASK_ENDPOINTS.datastore,
                "ROUND_DEADLINE": repr(resp.round.deadline),
                "MODULE_DIGEST": module,
            }
            await fp.report(start.id, COMPLETED, results="update submitted")

        # Seed step 7: exactly one task per participant, listed by round prefix.
        listed = await m.stub.ListTasks(manager_pb2.ListTasksRequest(name_prefix="fl-round-r-100"))
        assert sorted(t.proplet_id for t in listed.tasks) == ids
        for t in listed.tasks:
            await until_state(m.stub, t.id, manager_pb2.TASK_STATE_COMPLETED)

        got = await m.stub.GetExperiment(manager_pb2.GetExperimentRequest(experiment_id="exp-100"))
        assert got.config.k_of_n == 2 and list(got.config.participants) == ids
        assert [s.task_id for s in got.scheduled] == [s.task_id for s in resp.scheduled]
        listed_exps = await m.stub.ListExperiments(manager_pb2.ListExperimentsRequest())
        assert [e.experiment_id for e in listed_exps.experiments] == ["exp-100"]

        status = await m.stub.GetRoundStatus(
            coordinator_pb2.GetRoundStatusRequest(round_id="r-100")
        )
        assert (status.round_id, status.state) == ("r-100", coordinator_pb2.ROUND_STATE_OPEN)
        assert status == coord.rounds["r-100"]


async def test_experiment_skips_unknown_and_dead_participants_and_says_so(
    broker: Mosquitto, topics: Topics, seed_image_registry: str
) -> None:
    async with (
        experiment_manager(broker, topics, seed_image_registry, alive_window_s=1.0) as (coord, m),
        FakeProplet(broker.port, topics, "p-live", heartbeat_s=0.2) as live,
        FakeProplet(broker.port, topics, "p-dead", heartbeat_s=None) as dead,
    ):
        await until_alive(m.stub, "p-live")
        await until_alive(m.stub, "p-dead", alive=False)
        # All three (k_of_n 0) would be refused; the request allows a quorum of one.
        resp = await m.stub.StartExperiment(
            experiment(
                "r-200", ["p-dead", "p-live", "p-ghost"], k_of_n=0, min_k_of_n=1, timeout_s=30
            )
        )
        assert resp.experiment_id == "exp-r-200"
        assert [s.proplet_id for s in resp.scheduled] == ["p-live"]
        skipped = {s.proplet_id: s.reason for s in resp.skipped}
        assert skipped["p-ghost"] == "unknown proplet"
        assert skipped["p-dead"].startswith("not alive (last seen ")
        assert skipped["p-dead"].endswith(" s ago)")

        # Only the scheduled participant is in the round, and k_of_n is what it can reach.
        (req,) = coord.configured
        assert list(req.participants) == ["p-live"] and (req.k_of_n, req.min_k_of_n) == (1, 1)
        assert resp.round.k_of_n == 1
        assert list(resp.round.participants) == ["p-live"]

        start = await live.next_start()
        assert start.name == "fl-round-r-200-p-live"
        assert start.env["ROUND_DEADLINE"] == repr(resp.round.deadline)
        assert dead.starts.empty()
        listed = await m.stub.ListTasks(manager_pb2.ListTasksRequest(name_prefix="fl-round-r-200"))
        assert [t.proplet_id for t in listed.tasks] == ["p-live"]


async def test_experiment_with_no_live_participant_fails_without_configuring(
    broker: Mosquitto, topics: Topics, seed_image_registry: str
) -> None:
    async with (
        experiment_manager(broker, topics, seed_image_registry) as (coord, m),
    ):
        err = await rpc_error(m.stub.StartExperiment(experiment("r-300", ["a", "b"])))
        assert err.code == grpc.StatusCode.FAILED_PRECONDITION
        assert err.details.startswith("participants: none of the 2 participants is alive")
        assert coord.configured == []
        listed = await m.stub.ListTasks(manager_pb2.ListTasksRequest())
        assert list(listed.tasks) == []


async def test_experiment_errors_keep_their_codes(
    broker: Mosquitto, topics: Topics, seed_image_registry: str
) -> None:
    async with (
        experiment_manager(broker, topics, seed_image_registry) as (_, m),
        FakeProplet(broker.port, topics, "p-1"),
    ):
        await until_alive(m.stub, "p-1")

        err = await rpc_error(m.stub.StartExperiment(experiment("", ["p-1"])))
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT
        assert err.details.startswith("round_id:")
        err = await rpc_error(m.stub.StartExperiment(experiment("r", ["p-1"], k_of_n=2)))
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT
        assert err.details.startswith("k_of_n:")
        # A non-finite number is not "negative": each says what is wrong.
        for field, value, details in NOT_FINITE_OR_NEGATIVE:
            hp = coordinator_pb2.Hyperparams(lr=value)
            kw: dict[str, Any] = {"hyperparams": hp} if field == "lr" else {field: value}
            err = await rpc_error(m.stub.StartExperiment(experiment("r", ["p-1"], **kw)))
            assert (err.code, err.details) == (grpc.StatusCode.INVALID_ARGUMENT, details)

        err = await rpc_error(
            m.stub.StartExperiment(
                experiment("r-400", ["p-1"], model_ref="fl/models/global_model_v7")
            )
        )
        assert err.code == grpc.StatusCode.NOT_FOUND
        assert "model_ref" in err.details

        await m.stub.StartExperiment(experiment("r-401", ["p-1"]))
        err = await rpc_error(
            m.stub.StartExperiment(experiment("r-401", ["p-1"], experiment_id="other"))
        )
        assert err.code == grpc.StatusCode.ALREADY_EXISTS
        err = await rpc_error(
            m.stub.StartExperiment(experiment("r-402", ["p-1"], experiment_id="exp-r-401"))
        )
        assert err.code == grpc.StatusCode.ALREADY_EXISTS
        assert err.details.startswith("experiment_id:")

        err = await rpc_error(
            m.stub.GetRoundStatus(coordinator_pb2.GetRoundStatusRequest(round_id="nope"))
        )
        assert err.code == grpc.StatusCode.NOT_FOUND
        err = await rpc_error(
            m.stub.GetExperiment(manager_pb2.GetExperimentRequest(experiment_id="nope"))
        )
        assert err.code == grpc.StatusCode.NOT_FOUND
        assert err.details.startswith("experiment_id:")


def test_config_from_env() -> None:
    config = config_from_env(
        ManagerConfig, PROPELLER_MANAGER_LISTEN="0.0.0.0:7070", PROPELLER_ALIVE_WINDOW_S="12.5"
    )
    assert (config.addr, config.coordinator_addr, config.alive_window_s) == (
        "0.0.0.0:7070",
        "coordinator:8086",
        12.5,
    )
    assert config.mqtt.host == "mosquitto" and config.mqtt.topics.domain == "d1"
    assert config.task_endpoints.coordinator == "coordinator:8086"
    assert config.task_endpoints.registry == "model-registry:8084"
    assert config.task_endpoints.datastore == "local-data-store:8083"
    defaults = ManagerConfig.from_env({"PROPELLER_INSECURE": "1"})
    assert defaults == ManagerConfig(tls=None)
    assert defaults.alive_window_s == 30.0
    with pytest.raises(ValueError, match="alive_window_s"):
        ManagerConfig(alive_window_s=0, tls=None)


def test_a_manager_replica_s_id_is_its_certificate_s() -> None:
    """Under mutual TLS a replica is who its certificate says: service `manager-{id}` gives
    the replica id (its MQTT user name and client id are the certificate's); a
    PROPELLER_MANAGER_REPLICA_ID that disagrees is refused, naming both; the single manager's
    certificate leaves the setting as given."""
    bundle = service_tls(manager_replica_service("r7"))
    env = {TLS_DIR_ENV: str(bundle.cert.parent), "PROPELLER_DATABASE_URL": "postgresql://x/y"}
    config = ManagerConfig.from_env(env)
    assert config.replica_id == "r7"
    assert config.replica is not None and config.replica.replica_id == "r7"
    assert ManagerConfig.from_env({**env, "PROPELLER_MANAGER_REPLICA_ID": "r7"}).replica_id == "r7"
    with pytest.raises(ValueError, match=r"PROPELLER_MANAGER_REPLICA_ID: 'r8', but .*manager-r7"):
        ManagerConfig.from_env({**env, "PROPELLER_MANAGER_REPLICA_ID": "r8"})
    single = {**env, TLS_DIR_ENV: str(service_tls("manager").cert.parent)}
    assert ManagerConfig.from_env(single).replica_id == ""
    assert ManagerConfig.from_env({**single, "PROPELLER_MANAGER_REPLICA_ID": "x"}).replica_id == "x"


# --- results acknowledged, tasks nobody reports on (issue 10, item 1) -------------------


async def test_each_result_is_acknowledged_to_its_proplet_once_recorded(
    broker: Mosquitto, topics: Topics, tmp_path: Path
) -> None:
    async with (
        running_manager(broker.port, topics, state_dir=tmp_path) as m,
        FakeProplet(broker.port, topics, "p-1") as p1,
    ):
        await until_alive(m.stub, "p-1")
        created = await m.stub.CreateTask(
            manager_pb2.CreateTaskRequest(name="t", image_url=WASM, proplet_id="p-1")
        )
        await m.stub.StartTask(manager_pb2.TaskRef(task_id=created.id))
        await p1.next_start()
        for state in (RUNNING, COMPLETED, COMPLETED):  # the last one a repeat
            await p1.report(created.id, state, results="ok")
            ack = await asyncio.wait_for(p1.acks.get(), 10)
            assert (ack.task_id, ack.attempt, ack.state) == (created.id, 1, state)
            # Acknowledged only once on disk: a manager crash after it loses nothing.
            assert stored_state(tmp_path, created.id) == (
                "RUNNING" if state == RUNNING else "COMPLETED"
            )
        assert (await task(m.stub, created.id)).results == "ok"


async def test_a_message_that_arrives_as_the_manager_shuts_down_is_left_quietly(
    broker: Mosquitto, topics: Topics, caplog: pytest.LogCaptureFixture
) -> None:
    """Once its exit has begun, the manager handles no message (the proplet sends its result
    again until acknowledged) and publishes nothing (Unavailable, as with the broker away):
    no ERROR from a message that reached state being released."""
    async with running_manager(broker.port, topics) as m:
        pass
    result = TaskResult("t-1", "p-1", COMPLETED, results="ok", attempt=1).to_json()
    with caplog.at_level(logging.DEBUG, logger="server.manager.app"):
        await m.app._on_message(topics.proplet_results_for("p-1"), result)
    assert "shutting down" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    with pytest.raises(Unavailable, match="manager: shutting down"):
        await m.app._publish(topics.result_ack_for("p-1"), b"{}")


def stored_state(state_dir: Path, task_id: str) -> str:
    with contextlib.closing(sqlite3.connect(state_dir / "manager.sqlite")) as conn:
        (state,) = conn.execute("SELECT state FROM tasks WHERE id = ?", (task_id,)).fetchone()
    return str(state)


async def test_a_round_task_nobody_reports_on_is_interrupted_after_its_deadline(
    broker: Mosquitto, topics: Topics
) -> None:
    async with (
        running_manager(broker.port, topics, report_grace_s=0.5, reconcile_interval_s=0.05) as m,
        FakeProplet(broker.port, topics, "p-1") as p1,
    ):
        await until_alive(m.stub, "p-1")
        deadline = time.time() + 1.0
        created = await m.stub.CreateTask(
            manager_pb2.CreateTaskRequest(
                name="fl-round-r1-p-1",
                image_url=WASM,
                proplet_id="p-1",
                env={"ROUND_ID": "r1", "ROUND_DEADLINE": repr(deadline)},
            )
        )
        await m.stub.StartTask(manager_pb2.TaskRef(task_id=created.id))
        await p1.next_start()  # delivered; the proplet then goes silent (it died, say)
        await p1.report(created.id, RUNNING)
        ended = await until_state(m.stub, created.id, manager_pb2.TASK_STATE_INTERRUPTED)
        assert ended.error == (
            "interrupted: no result from p-1 by the round's deadline (0.5 s grace) "
            "(task left RUNNING)"
        )
        assert ended.finished_at >= deadline + 0.5
        # The proplet was cut off, not dead: its result, sent again, is the outcome.
        await p1.report(created.id, COMPLETED, results="late but real")
        done = await until_state(m.stub, created.id, manager_pb2.TASK_STATE_COMPLETED)
        assert (done.results, done.error) == ("late but real", "")
