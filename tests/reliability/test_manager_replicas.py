"""Manager replicas on one PostgreSQL database (`server.manager.replicas`), in process: two
`PostgresManagerDatabase`s over one fresh database, as two manager processes hold them. What
one writes the other reads after a refresh (in creation order, deletions too), and a refresh
skips no write committed meanwhile; a result that reaches both is applied once; an
experiment's lease is held by one replica at a time, taken over only once it expired, and
carries a stop asked for elsewhere; WatchExperiment's events come from what a refresh finds.
The kill -9 test with real processes is test_manager_replica_processes.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from server.coordinator.rounds import RoundState
from server.manager.experiments import EventKind, ExperimentState, FanOut, RoundRecord
from server.manager.pg_store import PostgresManagerDatabase
from server.manager.proplets import Proplet
from server.manager.replicas import events_between
from server.manager.tasks import Tasks, TaskState
from server.messages import COMPLETED, RUNNING, TaskResult
from tests.reliability.test_manager_store import EXPERIMENT, PROPLET, TASK

pytestmark = pytest.mark.integration

LEASE_S = 30.0


@pytest.fixture
async def pair(database_url: str) -> AsyncIterator[tuple[PostgresManagerDatabase, ...]]:
    a, b = PostgresManagerDatabase(database_url), PostgresManagerDatabase(database_url)
    await a.open()
    await b.open()
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


async def test_what_one_replica_writes_the_other_reads_after_a_refresh(
    pair: tuple[PostgresManagerDatabase, ...],
) -> None:
    a, b = pair
    a.proplets.put(PROPLET)
    a.tasks.put(TASK)
    a.experiments.put(EXPERIMENT)
    await a.flush()
    assert b.tasks.get(TASK.id) is None  # not read yet: memory, until the refresh
    changed = await b.refresh()
    assert (b.proplets.get("p1"), b.tasks.get(TASK.id)) == (PROPLET, TASK)
    assert b.experiments.get(EXPERIMENT.experiment_id) == EXPERIMENT
    assert changed == [(None, EXPERIMENT)]
    # A change, and a deletion, travel the same way; nothing else is read again.
    running = replace(TASK, state=TaskState.RUNNING, results="")
    b.tasks.put(running)
    b.experiments.delete(EXPERIMENT.experiment_id)
    await b.flush()
    assert await a.refresh() == []  # the experiment is gone: nothing to tell a watcher
    assert a.tasks.get(TASK.id) == running
    assert a.experiments.get(EXPERIMENT.experiment_id) is None
    assert await b.refresh() == []  # its own writes, already in its memory


async def test_records_keep_their_creation_order_across_replicas(
    pair: tuple[PostgresManagerDatabase, ...],
) -> None:
    a, b = pair
    for i, db in enumerate([a, b, a, b, b, a]):
        db.tasks.put(replace(TASK, id=f"t{i}", name=f"task-{i}"))
        await db.flush()
    await a.refresh()
    await b.refresh()
    ids = [f"t{i}" for i in range(6)]
    assert [t.id for t in a.tasks.list()] == ids
    assert [t.id for t in b.tasks.list()] == ids


async def test_a_refresh_skips_no_write_committed_while_it_runs(
    pair: tuple[PostgresManagerDatabase, ...],
) -> None:
    """Writers in a, refreshes in b at the same time: whatever a committed, b reads (change
    numbers are handed out before commit, in any order; a refresh waits for the writes in
    flight)."""
    a, b = pair

    async def writer(n: int) -> None:
        for i in range(40):
            a.proplets.put(Proplet(f"p{n}-{i}", f"edge-{n}-{i}", last_seen=float(i)))
            if i % 5 == 0:
                await a.flush()
        await a.flush()

    async def refresher(done: asyncio.Event) -> None:
        while not done.is_set():
            await b.refresh()

    done = asyncio.Event()
    reading = asyncio.create_task(refresher(done))
    await asyncio.gather(*(writer(n) for n in range(4)))
    done.set()
    await reading
    await b.refresh()
    assert {p.id for p in b.proplets.list()} == {p.id for p in a.proplets.list()}
    assert len(b.proplets.list()) == 160


async def test_a_result_both_replicas_receive_is_applied_once(
    pair: tuple[PostgresManagerDatabase, ...],
) -> None:
    a, b = pair
    scheduled = replace(TASK, state=TaskState.SCHEDULED, results="", attempt=1)
    a.tasks.put(scheduled)
    await a.flush()
    await b.refresh()
    tasks = [Tasks(a.tasks), Tasks(b.tasks)]
    dbs = [a, b]

    async def apply(i: int, state: str) -> bool:
        result = TaskResult(TASK.id, "p1", state, results="r", attempt=1)
        async with dbs[i].task_lock(TASK.id):
            return tasks[i].apply_result(result) is not None

    for state in (RUNNING, COMPLETED):
        applied = await asyncio.gather(apply(0, state), apply(1, state))
        assert sorted(applied) == [False, True], state  # one applies it, one finds a repeat
    await a.refresh()
    await b.refresh()
    assert a.tasks.get(TASK.id) == b.tasks.get(TASK.id)
    done = a.tasks.get(TASK.id)
    assert done is not None and (done.state, done.results) == (TaskState.COMPLETED, "r")


async def test_an_experiment_lease_is_one_replica_s_until_it_expires(
    pair: tuple[PostgresManagerDatabase, ...],
) -> None:
    a, b = pair
    eid = EXPERIMENT.experiment_id
    assert await a.claim(eid, "r-a", 100.0, LEASE_S)
    assert not await b.claim(eid, "r-b", 110.0, LEASE_S)  # held
    a.experiments.put(EXPERIMENT)
    await a.flush()
    # claim_due: a keeps its own, b finds none free.
    assert await a.claim_due("r-a", 120.0, LEASE_S) == [eid]
    assert await b.claim_due("r-b", 121.0, LEASE_S) == []
    assert await a.renew(eid, "r-a", 140.0, LEASE_S) == (True, False)
    # a stops renewing (killed): after its lease, b takes the experiment over.
    assert await b.claim_due("r-b", 169.0, LEASE_S) == []
    assert await b.claim_due("r-b", 171.0, LEASE_S) == [eid]
    assert await a.renew(eid, "r-a", 172.0, LEASE_S) == (False, False)  # a knows it lost it
    # A stop asked for on a reaches b, the driver, with its next renewal.
    await a.request_stop(eid)
    assert await b.renew(eid, "r-b", 173.0, LEASE_S) == (True, True)
    # An ended experiment is nobody's to claim.
    await b.refresh()
    b.experiments.put(replace(EXPERIMENT, state=ExperimentState.COMPLETED))
    await b.flush()
    assert await a.claim_due("r-a", 1000.0, LEASE_S) == []


async def test_claim_due_skips_the_experiments_another_replica_is_claiming(
    pair: tuple[PostgresManagerDatabase, ...],
) -> None:
    a, b = pair
    ids = [f"exp-{i}" for i in range(6)]
    for eid in ids:
        a.experiments.put(replace(EXPERIMENT, experiment_id=eid))
    await a.flush()
    got = await asyncio.gather(a.claim_due("r-a", 1.0, LEASE_S), b.claim_due("r-b", 1.0, LEASE_S))
    assert sorted([*got[0], *got[1]]) == ids  # each once, to one of them


def test_watch_events_from_what_another_replica_wrote() -> None:
    r1 = RoundRecord(1, "r1", "v0", ("p1",))
    started = replace(EXPERIMENT, rounds=(r1,), fan_out=FanOut.DONE)
    assert events_between(None, started) == [(EventKind.ROUND_STARTED, r1)]
    assert events_between(replace(started, fan_out=FanOut.RECORDED), started) == [
        (EventKind.ROUND_STARTED, r1)
    ]
    assert events_between(started, started) == []
    f1 = replace(r1, state=RoundState.COMPLETED, new_model_version=1, eval_done=True)
    r2 = RoundRecord(2, "r2", "v1", ("p1",))
    # Two steps at once: round 1 finished and evaluated, round 2 out.
    later = replace(started, rounds=(f1, r2))
    assert events_between(started, later) == [
        (EventKind.ROUND_FINISHED, f1),
        (EventKind.ROUND_EVALUATED, f1),
        (EventKind.ROUND_STARTED, r2),
    ]
    ended = replace(later, state=ExperimentState.COMPLETED)
    assert events_between(later, ended) == [(EventKind.ENDED, None)]
