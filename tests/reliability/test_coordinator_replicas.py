"""Coordinator replicas on one PostgreSQL database (`server.coordinator.replicas`), in process:
two `Coordinator`s, each with a `PostgresRoundStore` of its own over one fresh database, a
shared in-memory registry and aggregator and a scripted clock. Updates to both replicas are
counted once and close the round once; a due round is closed by one replica; an aggregating
replica that goes away leaves its round to the other after its lease; a WatchRound on one
replica sees what the other did. The kill -9 tests with real processes are in
test_coordinator_replica_processes.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server.coordinator.coordinator import Coordinator, EventType, RetryPolicy
from server.coordinator.pg_store import PostgresRoundStore
from server.coordinator.replicas import Replica
from server.coordinator.rounds import RoundState
from server.topics import Topics
from tests.coordinator.helpers import (
    UPDATES,
    Clock,
    MemoryBackend,
    fedavg,
    round_of_three,
)
from tests.support.state import StateBackend
from tests.support.waits import eventually

pytestmark = pytest.mark.integration

BASE = "fl/models/global_model_v0"
LEASE_S = 30.0


class Published:
    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.broker_down = False

    async def __call__(self, topic: str, payload: bytes) -> None:
        if self.broker_down:
            raise ConnectionError("the broker is down")
        self.messages.append(json.loads(payload))


class Replicas:
    """Two replicas, "r-a" and "r-b", on one database."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.clock = Clock()
        self.backend = MemoryBackend()
        self.stores: list[PostgresRoundStore] = []
        self.published: list[Published] = []
        self.coordinators: list[Coordinator] = []

    async def start(self, replica_id: str) -> Coordinator:
        store = PostgresRoundStore(self.url)
        await store.open()
        published = Published()
        coord = Coordinator(
            store,
            self.backend,
            published,
            Topics("t", "fl"),
            retry=RetryPolicy(attempts=3, initial_backoff_s=0.001),
            clock=self.clock,
            replica=Replica(replica_id, LEASE_S, watch_poll_s=0.05),
        )
        self.stores.append(store)
        self.published.append(published)
        self.coordinators.append(coord)
        return coord

    def notices(self) -> list[dict[str, Any]]:
        return [m for p in self.published for m in p.messages]

    async def wait_finishing(self) -> None:
        for c in self.coordinators:
            await c.wait_finishing()

    async def close(self) -> None:
        for c in self.coordinators:
            await c.aclose()
        for s in self.stores:
            await s.close()


@pytest.fixture
async def replicas(database_url: str) -> AsyncIterator[Replicas]:
    r = Replicas(database_url)
    try:
        yield r
    finally:
        await r.close()


async def aggregating(backend: MemoryBackend) -> None:
    async def calls() -> int:
        return backend.aggregate_calls

    await eventually(calls, what="an aggregation under way")


def lease(db: StateBackend, round_id: str) -> tuple[str, float]:
    [(owner, until)] = db.raw(
        "coordinator", "SELECT lease_owner, lease_until FROM rounds WHERE round_id = ?", round_id
    )
    return str(owner), float(until)


async def test_updates_to_both_replicas_are_counted_once_and_close_the_round_once(
    replicas: Replicas, database_url: str
) -> None:
    a, b = await replicas.start("r-a"), await replicas.start("r-b")
    await a.configure(round_of_three("r1"), start=True)
    # Every update at once, to alternating replicas, and each one again to the other replica.
    first = await asyncio.gather(
        *((a if i % 2 == 0 else b).submit("r1", u) for i, u in enumerate(UPDATES))
    )
    again = await asyncio.gather(
        *((b if i % 2 == 0 else a).submit("r1", u) for i, u in enumerate(UPDATES))
    )
    await replicas.wait_finishing()
    assert [s.duplicate for s in first] == [False, False, False]
    assert [s.duplicate for s in again] == [True, True, True]
    rnd = await b.get("r1")
    assert (rnd.state, sorted(rnd.reported), rnd.new_model_version) == (
        RoundState.COMPLETED,
        ["a", "b", "c"],
        1,
    )
    assert (replicas.backend.aggregate_calls, sorted(replicas.backend.models)) == (1, [0, 1])
    assert [n["round_id"] for n in replicas.notices()] == ["r1"]
    by_id = {u.proplet_id: u for u in UPDATES}
    in_order = [by_id[p] for p in rnd.reported]
    assert np.allclose(replicas.backend.models[1]["w"], fedavg(in_order)["w"])
    db = StateBackend("postgres", Path("no-state-dir"), database_url)
    assert lease(db, "r1")[0] in ("r-a", "r-b")


async def test_a_due_round_is_closed_by_one_replica(replicas: Replicas, database_url: str) -> None:
    a, b = await replicas.start("r-a"), await replicas.start("r-b")
    await a.configure(round_of_three("r1"), start=True)
    await b.submit("r1", UPDATES[0])
    replicas.clock.now += 10
    await asyncio.gather(a.close_due(), b.close_due(), a.close_due(), b.close_due())
    await replicas.wait_finishing()
    rnd = await a.get("r1")
    assert (rnd.state, rnd.closed_by, rnd.num_updates) == (RoundState.COMPLETED, "deadline", 1)
    assert (replicas.backend.aggregate_calls, sorted(replicas.backend.models)) == (1, [0, 1])
    assert [n["round_id"] for n in replicas.notices()] == ["r1"]


async def test_an_aggregation_left_by_a_replica_is_taken_over_after_its_lease(
    replicas: Replicas, database_url: str
) -> None:
    db = StateBackend("postgres", Path("no-state-dir"), database_url)
    a, b = await replicas.start("r-a"), await replicas.start("r-b")
    replicas.backend.gate = asyncio.Event()  # a's aggregation never finishes
    await b.configure(round_of_three("r1", k_of_n=2), start=True)
    await b.submit("r1", UPDATES[0])
    await a.submit("r1", UPDATES[1])  # the k-th: a claims the aggregation
    await aggregating(replicas.backend)
    assert lease(db, "r1") == ("r-a", replicas.clock.now + LEASE_S)
    await a.aclose()  # a goes away mid-aggregation; its lease stays until it expires
    replicas.backend.gate.set()
    await b.close_due()
    await b.wait_finishing()
    assert (await b.get("r1")).state is RoundState.AGGREGATING
    assert replicas.backend.aggregate_calls == 1

    replicas.clock.now += LEASE_S + 0.001
    await b.close_due()
    await b.wait_finishing()
    rnd = await b.get("r1")
    assert (rnd.state, rnd.new_model_version, rnd.reported) == (
        RoundState.COMPLETED,
        1,
        ("a", "b"),
    )
    assert lease(db, "r1")[0] == "r-b"
    assert (replicas.backend.aggregate_calls, sorted(replicas.backend.models)) == (2, [0, 1])
    assert np.array_equal(replicas.backend.models[1]["w"], fedavg(UPDATES[:2])["w"])
    assert [n["round_id"] for n in replicas.notices()] == ["r1"]


async def test_a_stalled_replica_whose_round_was_taken_over_stores_nothing(
    replicas: Replicas,
) -> None:
    a, b = await replicas.start("r-a"), await replicas.start("r-b")
    stalled = replicas.backend.gate = asyncio.Event()  # a stalls in its aggregation
    await a.configure(round_of_three("r1", k_of_n=1), start=True)
    await a.submit("r1", UPDATES[0])
    await aggregating(replicas.backend)
    replicas.backend.gate = None  # b's aggregation runs through
    replicas.clock.now += LEASE_S + 0.001
    await b.close_due()
    await b.wait_finishing()
    assert (await b.get("r1")).new_model_version == 1
    stalled.set()  # a wakes up with its aggregate, its lease b's now
    await a.wait_finishing()
    rnd = await a.get("r1")
    assert (rnd.state, rnd.new_model_version) == (RoundState.COMPLETED, 1)
    assert (replicas.backend.aggregate_calls, sorted(replicas.backend.models)) == (2, [0, 1])
    assert [n["round_id"] for n in replicas.notices()] == ["r1"]


async def test_an_unsent_notice_is_published_by_one_replica(replicas: Replicas) -> None:
    a, b = await replicas.start("r-a"), await replicas.start("r-b")
    replicas.published[0].broker_down = True  # a completes the round, its publish fails
    await a.configure(round_of_three("r1", k_of_n=1), start=True)
    await a.submit("r1", UPDATES[0])
    await a.wait_finishing()
    assert (await a.get("r1")).state is RoundState.COMPLETED
    assert replicas.notices() == []
    replicas.published[0].broker_down = False
    # Both read the outbox at once (a retrying, b starting up): one of them publishes it.
    done = await asyncio.gather(*(c.deliver_unsent() for c in (a, b, a, b)))
    assert done == [True] * 4
    assert [n["round_id"] for n in replicas.notices()] == ["r1"]
    assert await a.store.unsent() == []


async def test_watching_one_replica_shows_what_another_did(replicas: Replicas) -> None:
    a, b = await replicas.start("r-a"), await replicas.start("r-b")
    await a.configure(round_of_three("r1", k_of_n=2))
    seen: list[tuple[EventType, int]] = []

    async def watch() -> None:
        async for event in b.watch("r1"):
            seen.append((event.type, event.round.num_updates))

    watching = asyncio.create_task(watch())

    async def told(kind: EventType) -> bool:
        return kind in [t for t, _ in seen]

    await eventually(lambda: told(EventType.SNAPSHOT), what="the snapshot")
    await a.start("r1")
    await eventually(lambda: told(EventType.STARTED), what="the start, from the store")
    await a.submit("r1", UPDATES[0])
    await eventually(lambda: told(EventType.UPDATE_ACCEPTED), what="the update, from the store")
    await a.submit("r1", UPDATES[1])
    await a.wait_finishing()
    await asyncio.wait_for(watching, 10)
    assert seen[:3] == [
        (EventType.SNAPSHOT, 0),
        (EventType.STARTED, 0),
        (EventType.UPDATE_ACCEPTED, 1),
    ]
    assert seen[-1] == (EventType.COMPLETED, 2)
    assert len([t for t, _ in seen if t is EventType.COMPLETED]) == 1


async def test_the_update_that_closes_the_round_leases_it_in_its_own_transaction(
    replicas: Replicas, database_url: str
) -> None:
    db = StateBackend("postgres", Path("no-state-dir"), database_url)
    a, b = await replicas.start("r-a"), await replicas.start("r-b")
    replicas.backend.gate = asyncio.Event()  # the aggregation waits: the lease is what counts
    await a.configure(round_of_three("r1", k_of_n=2), start=True)
    await b.submit("r1", UPDATES[0])
    assert lease(db, "r1") == ("", 0.0)  # an open round's updates take no lease
    # The k-th update's transaction, alone (the coordinator's follow-up not run): the round
    # is AGGREGATING and already b's, so a's claim loop leaves it alone.
    rnd = await b.get("r1")
    closing = replace(rnd, reported=(*rnd.reported, "b"))
    closing = replace(closing, state=RoundState.AGGREGATING, closed_by="k_of_n")
    await replicas.stores[1].accept(closing, UPDATES[1])
    assert lease(db, "r1") == ("r-b", replicas.clock.now + LEASE_S)
    await a.close_due()
    assert replicas.backend.aggregate_calls == 0
    # Rewriting an aggregating round (a failure, a completion) leaves its lease as it is.
    replicas.clock.now += 1
    await replicas.stores[0].put(closing)
    assert lease(db, "r1") == ("r-b", replicas.clock.now - 1 + LEASE_S)
    replicas.backend.gate.set()
