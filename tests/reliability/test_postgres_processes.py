"""The services on PostgreSQL as real processes: the registry, the coordinator and the manager
run as `serve` processes with PROPELLER_DATABASE_URL set (a database of the test's own on the
suite's PostgreSQL), with the aggregator, the data store, a real Mosquitto and three real
proplets training the real module. The seed round runs and its state is in PostgreSQL (no
SQLite file of theirs is written); then the coordinator is killed with SIGKILL right after a
round's completion is committed (its notice not yet published), and again while a round's
updates are arriving: after each restart the experiment goes on and ends after its rounds,
no round twice, no version skipped or duplicated."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from propeller.v1 import coordinator_pb2, manager_pb2
from server.config import MqttConfig
from tests.reliability.test_experiment_crash import (
    IDS,
    ROUNDS,
    ended,
    killed_at,
    killed_while_round_2_runs,
)
from tests.reliability.test_manager_crash import fleet_processes
from tests.support.clients import HYPER, V0, clients
from tests.support.cluster import run_proplets
from tests.support.processes import RPC_S
from tests.support.state import StateBackend

pytestmark = pytest.mark.process


async def test_the_seed_round_and_coordinator_kills_on_postgresql(
    mqtt: MqttConfig, tmp_path: Path, trainer_wasm: Path, database_url: str
) -> None:
    image = f"file://{trainer_wasm}"
    db = StateBackend("postgres", tmp_path / "state", database_url)
    async with (
        fleet_processes(mqtt, tmp_path, IDS, {"PROPELLER_DATABASE_URL": database_url}) as (
            mgr,
            coordinator,
            endpoints,
        ),
        run_proplets(endpoints, mqtt, IDS, tmp_path / "proplets", heartbeat_s=1.0),
        clients(endpoints) as c,
    ):
        await mgr.restart()
        await c.wait_alive(IDS)

        # The seed round: one round, three proplets, the real trainer.
        seed = manager_pb2.StartExperimentRequest(
            experiment_id="seed",
            model_ref=V0,
            participants=IDS,
            hyperparams=HYPER,
            timeout_s=120,
            task_wasm_image=image,
        )
        await c.manager.StartExperiment(seed, timeout=RPC_S)
        done = await ended(c, "seed")
        assert done.state == manager_pb2.EXPERIMENT_STATE_COMPLETED, done.end
        [rnd] = done.rounds
        assert rnd.state == coordinator_pb2.ROUND_STATE_COMPLETED, rnd.failure_reason
        assert (sorted(rnd.reported), rnd.new_model_version) == (IDS, 1)
        # Where it is: PostgreSQL, not the services' SQLite files.
        assert db.raw("coordinator", "SELECT round_id, state FROM rounds") == [
            (rnd.round_id, "completed")
        ]
        assert db.raw("coordinator", "SELECT count(*) FROM updates") == [(3,)]
        assert db.raw("coordinator", "SELECT sent FROM notices") == [(1,)]
        assert db.raw("registry", "SELECT version FROM models ORDER BY version") == [(0,), (1,)]
        assert db.raw("manager", "SELECT id FROM experiments") == [("seed",)]
        assert db.raw("manager", "SELECT count(*) FROM tasks") == [(3,)]
        written = await asyncio.to_thread(lambda: {p.name for p in tmp_path.rglob("*.sqlite")})
        assert not written & {"coordinator.sqlite", "manager.sqlite", "registry.sqlite"}
        stored = [0, 1]

        # Killed right after round 2's completion is committed, before its notice is sent.
        point = "coordinator.round_completed:2"
        stored += await killed_at(point, c, coordinator, "exp-coordinator-killed", image)

        # Killed while round 2 runs (its updates arriving, or about to), then started again.
        stored += await killed_while_round_2_runs(c, coordinator, "exp-coordinator-open", image)

        # Every version once, none skipped; every round's notice published.
        assert stored == list(range(2 + ROUNDS * 2))
        assert await c.versions() == stored
        assert db.raw("coordinator", "SELECT count(*) FROM rounds") == [(1 + ROUNDS * 2,)]
        assert db.raw("coordinator", "SELECT count(*) FROM notices WHERE sent = 0") == [(0,)]
        assert await mgr.terminate_async() == 0, mgr.tail()
