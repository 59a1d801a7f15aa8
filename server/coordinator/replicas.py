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

A single coordinator on SQLite or in memory has no replicas and none of this.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

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
