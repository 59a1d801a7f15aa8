"""Manager replicas on one PostgreSQL database (issue 13, item 2: "manager replicas likewise
for task state"), the pattern of `server.coordinator.replicas`:

- Every replica accepts every RPC. Each answer is given from the database: before it, the
  replica's stores take every row another replica changed since they last looked
  (`ManagerReplicaStore.refresh`: rows carry a change number from one sequence, and a
  refresh reads under a lock that waits for the writes in flight, so none is skipped).
- A task's read-modify-write sections (StartTask, StopTask, a result applied, a task
  interrupted by reconciliation) hold the task's lock (`task_lock`: a PostgreSQL advisory
  lock) and read the task afresh under it, so a result published once and received by every
  replica is applied once: the first applies it, the others find it applied (a repeat).
- Each running experiment is driven by one replica at a time through a lease
  (`manager.experiment_leases`: owner, until): `claim_due` takes, with `FOR UPDATE SKIP
  LOCKED`, the running experiments whose lease is free or expired; the holder renews it
  (every `lease_s / 3`) and, once it finds the lease lost, stops driving. A replica killed
  with SIGKILL leaves its leases to expire; another claims them and carries the experiment
  on from its record (the fan-out and every step of the loop are idempotent).
- StopExperiment on a replica that does not drive the experiment asks the driver to stop it
  (`request_stop`, read with each renewal) and answers once the record says it is stopped.
- WatchExperiment on a replica that does not drive the experiment gets its events from
  what each refresh finds changed (`events_between`).

A manager on SQLite (or in memory) is one process and has no replicas: a second manager on
the same state directory is refused at start (`sqlite_store._only_manager`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from server.coordinator.replicas import default_replica_id
from server.errors import Unavailable
from server.manager.experiments import EventKind, Experiment, ExperimentStore, FanOut, RoundRecord

DEFAULT_LEASE_S = 10.0
DEFAULT_REFRESH_S = 0.5
# How long a call on a replica waits for what another replica does (a fan-out, a stop).
WAIT_S = 60.0

__all__ = ["DEFAULT_LEASE_S", "Replica", "ReplicaStore", "default_replica_id", "events_between"]


@dataclass(frozen=True)
class Replica:
    """This manager's name among its replicas, how long its experiment leases last, and how
    often it reads what the other replicas changed."""

    replica_id: str
    lease_s: float = DEFAULT_LEASE_S
    refresh_s: float = DEFAULT_REFRESH_S

    def __post_init__(self) -> None:
        if not self.replica_id:
            raise ValueError("replica_id: a manager replica needs a non-empty id")
        if not self.lease_s > 0:
            raise ValueError(f"lease_s: {self.lease_s} must be positive")
        if not self.refresh_s > 0:
            raise ValueError(f"refresh_s: {self.refresh_s} must be positive")


@runtime_checkable
class ReplicaStore(Protocol):
    """What the manager's state shared by replicas offers (`PostgresManagerDatabase`)."""

    async def refresh(self) -> list[tuple[Experiment | None, Experiment]]:
        """Take every row changed elsewhere since the last refresh; the experiments that
        changed, each as it was before and as it is now."""
        ...

    def task_lock(self, task_id: str) -> AbstractAsyncContextManager[None]:
        """Held by one replica at a time for `task_id`; the task is fresh inside, and what
        was written inside is committed before another replica gets it."""
        ...

    async def claim(self, experiment_id: str, owner: str, now: float, lease_s: float) -> bool:
        """Take (or keep) the experiment's lease when it is free, expired or `owner`'s."""
        ...

    async def renew(
        self, experiment_id: str, owner: str, now: float, lease_s: float
    ) -> tuple[bool, bool]:
        """Extend `owner`'s lease: (still held, a stop requested)."""
        ...

    async def claim_due(self, owner: str, now: float, lease_s: float) -> list[str]:
        """Lease to `owner` the running experiments whose lease is free, expired or
        `owner`'s, skipping rows another replica has locked; their ids."""
        ...

    async def request_stop(self, experiment_id: str) -> None:
        """Ask the experiment's driver, whichever replica it is, to stop it."""
        ...


def events_between(
    old: Experiment | None, new: Experiment
) -> list[tuple[EventKind, RoundRecord | None]]:
    """The WatchExperiment events another replica's writes amount to, from the record as
    this replica last saw it (`old`, None: not seen) to the record as it is now, in the
    order the driver emitted them: rounds finished (and evaluated), the current round
    started, the experiment ended."""
    before = {r.index: r for r in old.rounds} if old is not None else {}
    was_out = (
        old.rounds[-1].index if old is not None and old.rounds and old.fan_out is FanOut.DONE else 0
    )
    events: list[tuple[EventKind, RoundRecord | None]] = []
    for rnd in new.rounds:
        seen = before.get(rnd.index)
        current = rnd is new.rounds[-1]
        if current and new.fan_out is FanOut.DONE and was_out < rnd.index:
            events.append((EventKind.ROUND_STARTED, rnd))
        if rnd.finished and not (seen is not None and seen.finished):
            events.append((EventKind.ROUND_FINISHED, rnd))
        if rnd.eval_done and not (seen is not None and seen.eval_done):
            events.append((EventKind.ROUND_EVALUATED, rnd))
    if not new.running and (old is None or old.running):
        events.append((EventKind.ENDED, None))
    return events


class Refreshing(Protocol):
    """The part of the `Manager` a replica waits with."""

    replica: Replica | None
    experiments: ExperimentStore

    async def fresh(self) -> None: ...


async def recorded_elsewhere(
    manager: Refreshing, eid: str, done: Callable[[Experiment | None], bool]
) -> Experiment | None:
    """Experiment `eid`'s record once `done` says another replica has got it there, read
    afresh every `refresh_s`; UNAVAILABLE after `WAIT_S` (repeat the call)."""
    poll_s = manager.replica.refresh_s if manager.replica else DEFAULT_REFRESH_S
    give_up = time.monotonic() + WAIT_S
    while time.monotonic() < give_up:
        await asyncio.sleep(poll_s)
        await manager.fresh()
        experiment = manager.experiments.get(eid)
        if done(experiment):
            return experiment
    raise Unavailable(
        f"experiment_id: {eid!r} is driven by another manager replica, which has not yet "
        f"done what this call waits for in {WAIT_S:g} s; repeat the call"
    )
