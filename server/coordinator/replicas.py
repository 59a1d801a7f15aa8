"""Coordinator replicas on one PostgreSQL database (issue 13, item 2): which replica closes a
round at its deadline and aggregates it, and how the others stay out of its way.

- Every replica accepts every RPC. A round's read-modify-write sections (an update accepted,
  a start, a failure reported, the deadline close, the completion) are serialised across the
  replicas by a lock on the round (`RoundLeases.round_lock`: a PostgreSQL advisory lock), as
  the coordinator's own per-round lock serialises them within one process: each section reads
  the round afresh under it, so no replica writes from a stale record.
- The deadline and the aggregation are held by one replica through a lease in the round's
  row (`lease_owner`, `lease_until`): `claim_due` takes, with `FOR UPDATE SKIP LOCKED`, the
  open rounds whose deadline passed and the aggregating rounds whose lease expired (their
  replica died or stalled); the replica whose update (or failure report, or deadline close)
  turned a round AGGREGATING holds its lease from the transaction that did it. The holder
  renews the lease while it aggregates; one that finds its lease taken over stores nothing
  more of that round.
- A replica that dies leaves its leases to expire; the next claim by another replica carries
  the round on: it closes it, or aggregates it again from its stored updates (the same
  bytes), asking the registry first whether the dead one already stored them.

- A WatchRound on a replica tells its own events as they happen and, every `watch_poll_s`,
  what other replicas committed to the round (`watch_replicated`).

A single coordinator on SQLite or in memory has no replicas and none of this.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from server.coordinator.events import Event, EventType
from server.coordinator.rounds import Round, RoundState
from server.coordinator.store import RoundStore
from server.errors import PropellerError

log = logging.getLogger(__name__)

DEFAULT_LEASE_S = 10.0


def default_replica_id() -> str:
    """hostname + pid: unique among live replicas, and new after a restart (a restarted
    replica waits for its predecessor's leases to expire like any other)."""
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class Replica:
    """This coordinator's name among its replicas, and how long its leases last."""

    replica_id: str
    lease_s: float = DEFAULT_LEASE_S
    # How often a WatchRound on this replica reads the round for what other replicas changed.
    watch_poll_s: float = 0.5

    def __post_init__(self) -> None:
        if not self.replica_id:
            raise ValueError("replica_id: a coordinator replica needs a non-empty id")
        if not self.lease_s > 0:
            raise ValueError(f"lease_s: {self.lease_s} must be positive")
        if not self.watch_poll_s > 0:
            raise ValueError(f"watch_poll_s: {self.watch_poll_s} must be positive")


@runtime_checkable
class RoundLeases(Protocol):
    """What a round store shared by replicas offers (`PostgresRoundStore`)."""

    def round_lock(self, round_id: str) -> AbstractAsyncContextManager[None]:
        """Held by one replica at a time for `round_id`; released if its process dies."""
        ...

    def lease_aggregations(self, owner: str, lease_s: float, clock: Callable[[], float]) -> None:
        """Lease every round this store turns AGGREGATING to `owner`, in that transaction."""
        ...

    async def claim(self, round_id: str, owner: str, now: float, lease_s: float) -> bool:
        """Take (or keep) the round's lease when it is free, expired or `owner`'s."""
        ...

    async def renew(self, round_id: str, owner: str, now: float, lease_s: float) -> bool:
        """Extend `owner`'s lease; False when it is no longer `owner`'s."""
        ...

    async def claim_due(self, owner: str, now: float, lease_s: float) -> list[str]:
        """Lease to `owner` the open rounds whose deadline passed and the aggregating rounds
        whose lease expired, skipping rows another replica has locked; their ids."""
        ...


async def keep_lease(
    leases: RoundLeases, replica: Replica, round_id: str, clock: Callable[[], float]
) -> None:
    """Keep the aggregation's lease while it runs (cancel to stop): renewed three times a
    lease; ends when another replica took it over."""
    while True:
        await asyncio.sleep(replica.lease_s / 3)
        try:
            if not await leases.renew(round_id, replica.replica_id, clock(), replica.lease_s):
                log.warning("[Coordinator.replica] round_id=%s lease taken over", round_id)
                return
        except PropellerError as exc:
            log.warning("[Coordinator.replica] round_id=%s lease not renewed: %s", round_id, exc)


async def watch_replicated(
    store: RoundStore,
    seen: Round,
    queue: asyncio.Queue[Event],
    poll_s: float,
    clock: Callable[[], float],
) -> AsyncIterator[Event]:
    """A replica's watch: this replica's events as they happen (`queue`), and, every
    `poll_s`, the changes other replicas committed, read from the store. Only changes newer
    than the last one told are told (an update or a state each once)."""
    while True:
        try:
            event = await asyncio.wait_for(queue.get(), poll_s)
            events = [event] if _advances(seen, event.round) else []
        except TimeoutError:
            current = await store.get(seen.round_id)
            events = [] if current is None else _changes(seen, current, clock())
        for event in events:
            seen = event.round
            yield event
            # Not `event.round.finished`: the updates read with a completion carry it.
            if event.type in (EventType.COMPLETED, EventType.FAILED):
                return


_STATE_EVENTS = {
    RoundState.OPEN: EventType.STARTED,
    RoundState.AGGREGATING: EventType.AGGREGATING,
    RoundState.COMPLETED: EventType.COMPLETED,
    RoundState.FAILED: EventType.FAILED,
}


def _advances(seen: Round, rnd: Round) -> bool:
    """`rnd` is later than `seen`: more updates, or a later state (states only go forward)."""
    return rnd.num_updates > seen.num_updates or rnd.state is not seen.state


def _changes(seen: Round, current: Round, now: float) -> list[Event]:
    """The events between two records of a round, as its watchers would have been told them
    by the replica that made the changes: each new update, then the state reached."""
    events = [
        Event(EventType.UPDATE_ACCEPTED, current, now, proplet_id)
        for proplet_id in current.reported[seen.num_updates :]
    ]
    kind = _STATE_EVENTS.get(current.state)
    if current.state is not seen.state and kind is not None:
        events.append(Event(kind, current, now))
    return events
