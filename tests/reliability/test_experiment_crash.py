"""Experiments of many rounds survive kill -9: the registry, aggregator, data store,
coordinator and manager run as `serve` processes (a real Mosquitto, three real proplets in
this process training the real module); the manager is killed between two rounds (before and
after the next one is recorded) and during a round's fan-out, the coordinator during a round
(once right after its completion is committed, once as soon as the round is fanned out).
After each restart the experiment goes on by itself at the right round and ends after its
rounds; no round runs twice (the coordinator holds exactly the experiment's rounds, each with
one task per proplet), and no version is skipped or duplicated (the registry holds
consecutive versions, each trained from the one before: the lineage's base)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from propeller.v1 import coordinator_pb2, manager_pb2, model_registry_pb2
from server.config import MqttConfig
from server.faults import KILL_AT_ENV
from server.manager.plan import round_id_for
from tests.reliability.test_manager_crash import fleet_processes
from tests.support.clients import HYPER, V0, Clients, clients
from tests.support.cluster import run_proplets
from tests.support.processes import RPC_S, ServiceProcess
from tests.support.waits import eventually

pytestmark = pytest.mark.process

IDS = ["edge-a", "edge-b", "edge-c"]
ROUNDS = 3


def request(experiment_id: str, image: str) -> manager_pb2.StartExperimentRequest:
    return manager_pb2.StartExperimentRequest(
        experiment_id=experiment_id,
        model_ref=V0,
        participants=IDS,
        hyperparams=HYPER,
        timeout_s=120,
        task_wasm_image=image,
        rounds=ROUNDS,
    )


async def experiment(c: Clients, eid: str) -> manager_pb2.Experiment:
    e: manager_pb2.Experiment = await c.manager.GetExperiment(
        manager_pb2.GetExperimentRequest(experiment_id=eid), timeout=RPC_S
    )
    return e


async def ended(c: Clients, eid: str) -> manager_pb2.Experiment:
    async def get() -> manager_pb2.Experiment:
        return await experiment(c, eid)

    done = await eventually(
        get,
        lambda e: e.state != manager_pb2.EXPERIMENT_STATE_RUNNING,
        timeout=180,
        what=f"experiment {eid} ended",
    )
    return done


async def lineage_base(c: Clients, version: int) -> str:
    async for chunk in c.registry.GetLineage(
        model_registry_pb2.GetModelRequest(version=version), timeout=RPC_S
    ):
        if chunk.HasField("header"):
            return str(chunk.header.base_model_uri)
    raise AssertionError(f"no lineage for v{version}")


async def check_ran_once(c: Clients, eid: str, first_base: str) -> list[int]:
    """The experiment ended after its rounds, each run once from the version before it;
    returns the versions it stored."""
    e = await ended(c, eid)
    assert e.state == manager_pb2.EXPERIMENT_STATE_COMPLETED, e.end
    assert (e.end.reason, e.end.round) == (manager_pb2.END_REASON_MAX_ROUNDS, ROUNDS)
    ids = [round_id_for(eid, i) for i in range(1, ROUNDS + 1)]
    assert [r.round_id for r in e.rounds] == ids
    listed = await c.coordinator.ListRounds(
        coordinator_pb2.ListRoundsRequest(experiment_id=eid), timeout=RPC_S
    )
    assert [r.round_id for r in listed.rounds] == ids  # no round twice, none skipped
    versions = [r.new_model_version for r in e.rounds]
    assert versions == list(range(versions[0], versions[0] + ROUNDS)), versions
    bases = [first_base, *(f"fl/models/global_model_v{v}" for v in versions[:-1])]
    assert [r.model_ref for r in e.rounds] == bases
    assert [await lineage_base(c, v) for v in versions] == bases
    for r in e.rounds:
        assert r.state == coordinator_pb2.ROUND_STATE_COMPLETED, r.failure_reason
        assert sorted(r.reported) == IDS
        tasks = await c.round_tasks(r.round_id)
        assert sorted(t.proplet_id for t in tasks) == IDS, [t.name for t in tasks]
    return versions


async def killed(process: ServiceProcess) -> None:
    assert await process.wait_exit(bound=120) == -signal.SIGKILL, process.tail()


async def killed_at(
    point: str, c: Clients, coordinator: ServiceProcess, eid: str, image: str
) -> list[int]:
    """Restart the coordinator to die at `point` (`server.faults`), start experiment `eid`
    and see it die there, the experiment still running; start the coordinator again without
    the fault. The versions the experiment stored, each round run once (`check_ran_once`)."""
    coordinator.env[KILL_AT_ENV] = point
    coordinator.terminate()
    await coordinator.restart()
    await c.manager.StartExperiment(request(eid, image), timeout=RPC_S)
    await killed(coordinator)
    assert f"point={point.split(':')[0]}" in coordinator.log_text(), coordinator.tail()
    del coordinator.env[KILL_AT_ENV]
    assert (await experiment(c, eid)).state == manager_pb2.EXPERIMENT_STATE_RUNNING
    await coordinator.restart()
    return await check_ran_once(c, eid, V0)


async def killed_while_round_2_runs(
    c: Clients, coordinator: ServiceProcess, eid: str, image: str
) -> list[int]:
    """Start experiment `eid`, SIGKILL the coordinator as soon as the manager has fanned out
    round 2 (its updates arriving, or about to), start it again; the versions the experiment
    stored, each round run once (`check_ran_once`)."""
    await c.manager.StartExperiment(request(eid, image), timeout=RPC_S)
    async for event in c.manager.WatchExperiment(
        manager_pb2.WatchExperimentRequest(experiment_id=eid), timeout=120
    ):
        if event.type == manager_pb2.EXPERIMENT_EVENT_TYPE_ROUND_STARTED and event.round.index == 2:
            break
    coordinator.kill()
    assert await coordinator.wait_exit() == -signal.SIGKILL
    await coordinator.restart()
    return await check_ran_once(c, eid, V0)


async def test_experiments_survive_kills_of_the_manager_and_the_coordinator(
    mqtt: MqttConfig, tmp_path: Path, trainer_wasm: Path
) -> None:
    image = f"file://{trainer_wasm}"
    async with (
        fleet_processes(mqtt, tmp_path, IDS) as (mgr, coordinator, endpoints),
        run_proplets(endpoints, mqtt, IDS, tmp_path / "proplets", heartbeat_s=1.0),
        clients(endpoints) as c,
    ):
        stored: list[int] = [0]
        # The manager, killed: after round 1's outcome is recorded (round 2 not planned);
        # after round 2 is recorded (nothing of it sent); during round 2's fan-out (the
        # fifth task start of the experiment: two of round 2's three were sent).
        for point in (
            "manager.round_outcome_recorded",
            "manager.next_round_recorded",
            "manager.task_start_published:5",
        ):
            eid = f"exp-{point.split('.')[1].split(':')[0].replace('_', '-')}"
            mgr.env[KILL_AT_ENV] = point
            await mgr.restart()
            await c.wait_alive(IDS)
            await c.manager.StartExperiment(request(eid, image), timeout=RPC_S)
            await killed(mgr)
            assert f"point={point.split(':')[0]}" in mgr.log_text(), mgr.tail()
            del mgr.env[KILL_AT_ENV]
            await mgr.restart()
            versions = await check_ran_once(c, eid, V0)
            stored += versions
            await mgr.terminate_async()

        # The coordinator, killed during round 2: at the end of its aggregation (the new
        # version and its lineage stored in the registry, the completion not committed), and
        # later (its completion committed, the notice not yet sent); started again each time.
        # The manager runs throughout.
        await mgr.restart()
        await c.wait_alive(IDS)
        for point in ("coordinator.model_stored:2", "coordinator.round_completed:2"):
            eid = f"exp-coordinator-killed-{point.split('.')[1].split(':')[0].replace('_', '-')}"
            stored += await killed_at(point, c, coordinator, eid, image)

        # The coordinator killed while round 2 runs (as soon as the manager has fanned it out:
        # its updates are arriving, or about to) and started again.
        stored += await killed_while_round_2_runs(c, coordinator, "exp-coordinator-open", image)

        # Every version once, none skipped, across all six experiments.
        assert stored == list(range(1 + ROUNDS * 6))
        assert await c.versions() == stored
        assert await mgr.terminate_async() == 0, mgr.tail()
