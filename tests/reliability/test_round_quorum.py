"""Rounds that cannot reach their quorum, on a real Stack with real proplets: a round whose
module is missing on every proplet fails as soon as the task failures are known (the manager
tells the coordinator), with each participant's reason in its status, not at its deadline;
StartExperiment refuses a k_of_n that more participants are alive than, naming the missing
one, unless the request allows a lower quorum (min_k_of_n), which then runs with the others."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from propeller.v1 import coordinator_pb2, manager_pb2
from server.config import MqttConfig
from tests.support.cluster import Cluster, cluster
from tests.support.waits import eventually

S = coordinator_pb2
log = logging.getLogger(__name__)
DEADLINE_S = 3600.0  # no round here may close by its deadline


@pytest.fixture
async def fleet(mqtt: MqttConfig, tmp_path: Path) -> AsyncIterator[Cluster]:
    """The Stack and three proplets; a proplet silent for 2 s (4 heartbeats) is not alive."""
    async with cluster(mqtt, tmp_path, proplets=3, stack={"alive_window_s": 2.0}) as c:
        yield c


async def test_a_round_whose_module_is_missing_everywhere_fails_with_the_reasons(
    fleet: Cluster, tmp_path: Path
) -> None:
    missing = tmp_path / "not-there.wasm"
    rid = f"r-{uuid.uuid4().hex[:8]}"
    started = await fleet.start_experiment(
        rid, fleet.proplet_ids, f"file://{missing}", k_of_n=3, timeout_s=DEADLINE_S
    )
    assert len(started.scheduled) == 3
    tasks = [await fleet.finished(s.task_id) for s in started.scheduled]
    assert {t.state for t in tasks} == {manager_pb2.TASK_STATE_FAILED}
    status = await fleet.wait_state(rid, via="manager")
    assert status.state == S.ROUND_STATE_FAILED
    assert status.completed_at < status.deadline  # failed, not timed out
    log.info(
        "[test] round failed %.3fs after the first task failure (deadline in %.0fs)",
        status.completed_at - min(t.finished_at for t in tasks),
        status.deadline - status.completed_at,
    )
    assert status.num_updates == 0
    # Which participants failed and why: each task's own error, in the round's status.
    errors = {t.proplet_id: t.error for t in tasks}
    assert all(str(missing) in e for e in errors.values()), errors
    assert status.failure_reason.startswith(
        "k_of_n 3 can no longer be reached: 1 of 3 participants failed, 2 can still report ("
    )
    first = status.failed[0]
    assert f"{first.proplet_id}: {first.reason}" in status.failure_reason
    # Every participant that failed, with its task's error (the later ones are listed too).
    everyone = await eventually(
        lambda: fleet.status(rid, via="manager"),
        lambda s: len(s.failed) == 3,
        what="the three failures listed",
    )
    assert {f.proplet_id: f.reason for f in everyone.failed} == errors
    assert everyone.failure_reason == status.failure_reason
    assert everyone == await fleet.status(rid)  # the coordinator's own status says the same


async def test_fewer_alive_than_k_of_n_is_refused_unless_a_lower_quorum_is_allowed(
    fleet: Cluster, trainer_wasm: Path
) -> None:
    dead, *alive = fleet.proplet_ids
    await fleet.stop_proplet(dead)
    await fleet.wait_alive(alive)
    image = f"file://{trainer_wasm}"

    rid = f"r-{uuid.uuid4().hex[:8]}"
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await fleet.start_experiment(rid, fleet.proplet_ids, image, k_of_n=3, timeout_s=DEADLINE_S)
    err = refused.value
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = err.details() or ""
    assert "k_of_n 3 needs 3 live participants, 2 of 3 are alive" in details
    assert f"missing: {dead}: not alive (last seen" in details
    assert "set min_k_of_n to run with fewer" in details
    # Nothing was started: no round, no task, no experiment.
    assert await fleet.round_tasks(rid) == []
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await fleet.status(rid)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND

    started = await fleet.start_experiment(
        rid, fleet.proplet_ids, image, k_of_n=3, min_k_of_n=2, timeout_s=DEADLINE_S
    )
    assert sorted(s.proplet_id for s in started.scheduled) == sorted(alive)
    assert [s.proplet_id for s in started.skipped] == [dead]
    assert (started.round.k_of_n, started.round.min_k_of_n) == (2, 2)
    assert list(started.round.participants) == [s.proplet_id for s in started.scheduled]
    status = await fleet.wait_state(rid, via="manager")
    assert status.state == S.ROUND_STATE_COMPLETED, status.failure_reason
    assert sorted(status.reported) == sorted(alive) and status.closed_by == "k_of_n"
    experiment = await fleet.manager.GetExperiment(
        manager_pb2.GetExperimentRequest(experiment_id=f"exp-{rid}")
    )
    assert (experiment.config.k_of_n, experiment.config.min_k_of_n) == (3, 2)

    async def done() -> bool:
        tasks = await fleet.round_tasks(rid)
        return {t.state for t in tasks} == {manager_pb2.TASK_STATE_COMPLETED}

    await eventually(done, what="both round tasks completed")
