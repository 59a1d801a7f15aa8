"""The coordinator over time (closing, aggregating, retrying, events) with an in-process
backend whose failures the tests script; the real services are in test_integration.py."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import numpy as np
import pytest

from server.coordinator.coordinator import Coordinator, Event, EventType, RetryPolicy
from server.coordinator.rounds import Round, RoundState
from server.coordinator.store import MemoryRoundStore, update_headers
from server.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from server.round_spec import RoundSpec
from server.tensors import sha256_of
from server.topics import Topics
from tests.coordinator.helpers import UPDATES, Clock, MemoryBackend, fedavg, make_update
from tests.support.waits import eventually

TOPICS = Topics("unit", "fl")


class Published:
    def __init__(self) -> None:
        self.messages: list[tuple[str, dict[str, Any]]] = []

    async def __call__(self, topic: str, payload: bytes) -> None:
        self.messages.append((topic, json.loads(payload)))


def make(
    backend: MemoryBackend | None = None, clock: Clock | None = None
) -> tuple[Coordinator, MemoryBackend, Published, Clock]:
    backend = backend or MemoryBackend()
    clock = clock or Clock()
    published = Published()
    coord = Coordinator(
        MemoryRoundStore(),
        backend,
        published,
        TOPICS,
        retry=RetryPolicy(attempts=5, initial_backoff_s=0.001),
        clock=clock,
    )
    return coord, backend, published, clock


def config(**kw: Any) -> RoundSpec:
    args: dict[str, Any] = {"round_id": "r1", "participants": ("a", "b", "c"), "timeout_s": 10}
    args.update(kw)
    return RoundSpec(**args)


async def one_update_round(coord: Coordinator) -> Round:
    """Round r1 started with k_of_n 1, given UPDATES[0]: the round once it has finished."""
    await coord.configure(config(k_of_n=1), start=True)
    await coord.submit("r1", UPDATES[0])
    await coord.wait_finishing()
    return await coord.get("r1")


async def test_round_completes_at_k_of_n_and_announces_it() -> None:
    coord, backend, published, _ = make()
    await coord.configure(config(), start=True)
    for u in UPDATES[:2]:
        result = await coord.submit("r1", u)
        assert result.round.state is RoundState.OPEN
    result = await coord.submit("r1", UPDATES[2])
    assert not result.duplicate
    assert result.round.num_updates == 3
    assert result.round.state is RoundState.AGGREGATING
    await coord.wait_finishing()
    rnd = await coord.get("r1")
    assert rnd.state is RoundState.COMPLETED
    assert (rnd.new_model_version, rnd.new_model_uri) == (1, "fl/models/global_model_v1")
    assert rnd.closed_by == "k_of_n"
    assert rnd.reported == ("a", "b", "c")
    assert rnd.metrics["loss"] == pytest.approx((0.9 * 10 + 0.3 * 30 + 0.1 * 60) / 100)
    expected = fedavg(UPDATES)
    for name in expected:
        np.testing.assert_allclose(backend.models[1][name], expected[name])
    [(topic, msg)] = published.messages
    assert topic == TOPICS.round_next
    assert msg["round_id"] == "r1"
    assert msg["new_model_version"] == 1
    assert msg["model_uri"] == "fl/models/global_model_v1"
    assert msg["closed_by"] == "k_of_n"
    assert msg["num_updates"] == 3


async def test_version_comes_from_the_registry_not_a_counter() -> None:
    backend = MemoryBackend()
    backend.models[1] = backend.models[0]
    backend.models[2] = backend.models[0]
    coord, _, _, _ = make(backend)
    await coord.configure(config(k_of_n=1, model_ref="fl/models/global_model_v2"), start=True)
    await coord.submit("r1", make_update("a", [1, 1, 1], 1, 5, base="fl/models/global_model_v2"))
    await coord.wait_finishing()
    assert (await coord.get("r1")).new_model_version == 3


async def test_empty_model_ref_means_latest() -> None:
    backend = MemoryBackend()
    backend.models[4] = backend.models[0]
    coord, _, _, _ = make(backend)
    rnd = await coord.configure(config())
    assert rnd.model_ref == "fl/models/global_model_v4"


async def test_unknown_model_ref_is_not_found() -> None:
    coord, _, _, _ = make()
    with pytest.raises(NotFound, match="model_ref"):
        await coord.configure(config(model_ref="fl/models/global_model_v9"))
    with pytest.raises(NotFound):
        await coord.get("r1")


async def test_configure_is_idempotent_and_conflicts_are_refused() -> None:
    coord, _, _, clock = make()
    first = await coord.configure(config())
    assert first.state is RoundState.PENDING
    assert await coord.configure(config()) == first
    with pytest.raises(AlreadyExists, match="timeout_s"):
        await coord.configure(config(timeout_s=5))
    clock.now += 3
    started = await coord.configure(config(), start=True)  # a retry asking to open it
    assert started.state is RoundState.OPEN
    assert started.deadline == clock.now + 10
    assert await coord.configure(config(), start=True) == started


async def test_start_round() -> None:
    coord, _, _, clock = make()
    await coord.configure(config())
    with pytest.raises(FailedPrecondition):
        await coord.submit("r1", UPDATES[0])
    clock.now = 2000.0
    rnd = await coord.start("r1")
    assert (rnd.state, rnd.started_at, rnd.deadline) == (RoundState.OPEN, 2000.0, 2010.0)
    clock.now = 2005.0
    assert await coord.start("r1") == rnd
    with pytest.raises(NotFound):
        await coord.start("nope")


async def test_rejections_change_nothing() -> None:
    coord, _, _, _ = make()
    await coord.configure(config(), start=True)
    await coord.submit("r1", UPDATES[0])
    before = await coord.get("r1")
    bad = [
        ("r1", make_update("mallory", [0, 0, 0], 0, 1), FailedPrecondition),
        ("zz", UPDATES[1], NotFound),
        (
            "r1",
            make_update("b", [0, 0, 0], 0, 1, base="fl/models/global_model_v3"),
            FailedPrecondition,
        ),
        ("r1", make_update("b", [0, 0], 0, 1), InvalidArgument),
        ("r1", make_update("b", [0, float("nan"), 0], 0, 1), InvalidArgument),
        ("r1", make_update("b", [0, 0, 0], 0, 0), InvalidArgument),
    ]
    for round_id, u, error in bad:
        with pytest.raises(error):
            await coord.submit(round_id, u)
    dup = await coord.submit("r1", make_update("a", [9, 9, 9], 9, 99))
    assert dup.duplicate
    after = await coord.get("r1")
    assert after == before
    assert after.num_updates == 1
    [kept] = update_headers(await coord.store.updates("r1"))
    assert kept.num_samples == 10  # the first one is kept


async def test_late_update_after_close_is_refused() -> None:
    coord, backend, _, _ = make()
    backend.gate = asyncio.Event()
    await coord.configure(config(k_of_n=2), start=True)
    await coord.submit("r1", UPDATES[0])
    await coord.submit("r1", UPDATES[1])
    with pytest.raises(FailedPrecondition, match="aggregating; late update not counted"):
        await coord.submit("r1", UPDATES[2])
    backend.gate.set()
    await coord.wait_finishing()
    with pytest.raises(FailedPrecondition, match="completed; late update not counted"):
        await coord.submit("r1", UPDATES[2])
    assert (await coord.submit("r1", UPDATES[0])).duplicate
    rnd = await coord.get("r1")
    assert rnd.num_updates == 2
    assert backend.aggregate_calls == 1


async def test_deadline_with_one_update_completes() -> None:
    coord, _, published, clock = make()
    await coord.configure(config(), start=True)
    await coord.submit("r1", UPDATES[1])
    await coord.close_due()
    assert (await coord.get("r1")).state is RoundState.OPEN
    clock.now += 10
    await coord.close_due()
    assert (await coord.get("r1")).state is RoundState.AGGREGATING
    await coord.wait_finishing()
    rnd = await coord.get("r1")
    assert rnd.state is RoundState.COMPLETED
    assert rnd.closed_by == "deadline"
    assert rnd.failure_reason == ""
    assert (rnd.num_updates, rnd.k_of_n) == (1, 3)
    assert published.messages[0][1]["closed_by"] == "deadline"


async def test_deadline_with_no_update_fails() -> None:
    coord, backend, published, clock = make()
    await coord.configure(config(), start=True)
    clock.now += 11
    await coord.close_due()
    rnd = await coord.get("r1")
    assert rnd.state is RoundState.FAILED
    assert rnd.failure_reason == "deadline passed with 0 of 3 updates"
    assert backend.aggregate_calls == 0
    assert published.messages == []


async def test_pending_round_has_no_deadline() -> None:
    coord, _, _, clock = make()
    await coord.configure(config())
    clock.now += 1000
    await coord.close_due()
    assert (await coord.get("r1")).state is RoundState.PENDING


async def test_transient_failures_are_retried() -> None:
    coord, backend, _, _ = make()
    backend.aggregate_errors = [Unavailable("aggregator down"), DeadlineExceeded("slow")]
    backend.put_errors = [Unavailable("registry down")]
    rnd = await one_update_round(coord)
    assert rnd.state is RoundState.COMPLETED
    assert (backend.aggregate_calls, backend.put_calls) == (3, 2)
    assert sorted(backend.models) == [0, 1]


async def test_a_write_that_landed_is_not_stored_twice() -> None:
    coord, backend, _, _ = make()
    backend.put_errors = [DeadlineExceeded("reply lost")]
    backend.put_lands = True
    rnd = await one_update_round(coord)
    assert rnd.state is RoundState.COMPLETED
    assert rnd.new_model_version == 1
    assert sorted(backend.models) == [0, 1]


async def test_each_version_is_stored_with_its_lineage() -> None:
    coord, backend, _, _ = make()
    await coord.configure(config(k_of_n=2), start=True)
    for u in UPDATES[:2]:
        await coord.submit("r1", u)
    await coord.wait_finishing()
    lineage = backend.lineages[1]
    assert (lineage.round.round_id, lineage.model_sha256) == ("r1", sha256_of(backend.models[1]))
    headers = update_headers(lineage.updates)
    assert [u.proplet_id for u in headers] == ["a", "b"]
    assert all(u.sha256 == sha256_of(v.tensors) for u, v in zip(headers, UPDATES, strict=False))


async def test_a_retry_that_finds_another_rounds_identical_version_stores_its_own() -> None:
    coord, backend, _, _ = make()
    # r0 stores exactly the model r1 will make (same base, same single update).
    v0 = "fl/models/global_model_v0"
    await coord.configure(config(round_id="r0", k_of_n=1, model_ref=v0), start=True)
    await coord.submit("r0", UPDATES[0])
    await coord.wait_finishing()
    # r1's first write is lost (nothing lands): its retry finds r0's v1 by its bytes, whose
    # lineage is r0's: r1 stores a version of its own, with its own lineage.
    backend.put_errors = [DeadlineExceeded("reply lost")]
    await coord.configure(config(k_of_n=1, model_ref=v0), start=True)
    await coord.submit("r1", UPDATES[0])
    await coord.wait_finishing()
    rnd = await coord.get("r1")
    assert rnd.state is RoundState.COMPLETED and rnd.new_model_version == 2
    assert backend.lineages[1].round.round_id == "r0"
    assert backend.lineages[2].round.round_id == "r1"


async def test_persistent_failure_fails_the_round_with_reason() -> None:
    coord, backend, published, _ = make()
    backend.aggregate_errors = [Unavailable(f"aggregator down {i}") for i in range(10)]
    rnd = await one_update_round(coord)
    assert rnd.state is RoundState.FAILED
    assert "aggregation failed" in rnd.failure_reason
    assert "aggregator down 4" in rnd.failure_reason
    assert backend.aggregate_calls == 5
    assert published.messages == []


async def test_registry_that_stays_down_fails_the_round_with_reason() -> None:
    coord, backend, published, _ = make()
    backend.put_errors = [Unavailable(f"registry down {i}") for i in range(10)]
    rnd = await one_update_round(coord)
    assert rnd.state is RoundState.FAILED
    assert rnd.failure_reason.startswith("storing the new model failed: store model: 5 attempts")
    assert "registry down 4" in rnd.failure_reason
    assert (backend.aggregate_calls, backend.put_calls) == (1, 5)
    assert sorted(backend.models) == [0]
    assert published.messages == []


async def test_permanent_failure_is_not_retried() -> None:
    coord, backend, _, _ = make()
    backend.aggregate_errors = [InvalidArgument("updates[0]: bad")]
    rnd = await one_update_round(coord)
    assert rnd.state is RoundState.FAILED
    assert "updates[0]: bad" in rnd.failure_reason
    assert backend.aggregate_calls == 1


async def collect(coord: Coordinator, round_id: str, into: list[Event]) -> None:
    async for event in coord.watch(round_id):
        into.append(event)


async def watching(coord: Coordinator, round_id: str) -> tuple[list[Event], asyncio.Task[None]]:
    """Start watching: the snapshot is in (so the watcher is registered) when this returns;
    the task collects the rest."""
    stream = coord.watch(round_id)
    events = [await anext(stream)]

    async def rest() -> None:
        async for event in stream:
            events.append(event)

    return events, asyncio.create_task(rest())


async def test_watch_sees_every_change_in_order() -> None:
    coord, _, _, _ = make()
    await coord.configure(config(k_of_n=2))
    events, watcher = await watching(coord, "r1")
    await coord.start("r1")
    await coord.submit("r1", UPDATES[0])
    await coord.submit("r1", UPDATES[0])  # duplicate: no event
    await coord.submit("r1", UPDATES[2])
    await asyncio.wait_for(watcher, 5)
    assert [(e.type, e.proplet_id) for e in events] == [
        (EventType.SNAPSHOT, ""),
        (EventType.STARTED, ""),
        (EventType.UPDATE_ACCEPTED, "a"),
        (EventType.UPDATE_ACCEPTED, "c"),
        (EventType.AGGREGATING, ""),
        (EventType.COMPLETED, ""),
    ]
    assert events[0].round.state is RoundState.PENDING
    assert events[-1].round.new_model_version == 1
    # Finished: a snapshot, then the end.
    again: list[Event] = []
    await asyncio.wait_for(collect(coord, "r1", again), 5)
    assert [e.type for e in again] == [EventType.SNAPSHOT]
    assert again[0].round.state is RoundState.COMPLETED


async def test_watch_sees_failure() -> None:
    coord, _, _, clock = make()
    await coord.configure(config(), start=True)
    events, watcher = await watching(coord, "r1")
    clock.now += 20
    await coord.close_due()
    await asyncio.wait_for(watcher, 5)
    assert [e.type for e in events] == [EventType.SNAPSHOT, EventType.FAILED]
    assert events[-1].round.failure_reason == "deadline passed with 0 of 3 updates"


async def test_watch_unknown_round() -> None:
    coord, _, _, _ = make()
    with pytest.raises(NotFound):
        await collect(coord, "nope", [])


async def test_resume_finishes_closed_rounds_only() -> None:
    coord, backend, _, _ = make()
    backend.gate = asyncio.Event()
    await coord.configure(config(k_of_n=1), start=True)
    await coord.submit("r1", UPDATES[0])
    await coord.aclose()  # shut down mid-aggregation
    assert (await coord.get("r1")).state is RoundState.AGGREGATING
    backend.gate.set()
    again = Coordinator(coord.store, backend, coord.publish, TOPICS, clock=coord.clock)
    await again.resume()
    await again.wait_finishing()
    assert (await again.get("r1")).state is RoundState.COMPLETED
    calls = backend.aggregate_calls
    await again.resume()
    await again.wait_finishing()
    assert backend.aggregate_calls == calls


async def test_list_rounds_by_experiment() -> None:
    coord, _, _, _ = make()
    await coord.configure(config(round_id="r1", experiment_id="e1"))
    await coord.configure(config(round_id="r2", experiment_id="e2"))
    await coord.configure(config(round_id="r3", experiment_id="e1"))
    assert [r.round_id for r in await coord.list()] == ["r1", "r2", "r3"]
    assert [r.round_id for r in await coord.list("e1")] == ["r1", "r3"]


# ---- participant failures ------------------------------------------------------------


async def test_failures_that_leave_fewer_than_k_of_n_fail_the_round_at_once() -> None:
    coord, backend, published, clock = make()
    await coord.configure(config(k_of_n=2), start=True)
    events, watcher = await watching(coord, "r1")
    rnd = await coord.participant_failed("r1", "a", "fetch module: file not found")
    assert rnd.state is RoundState.OPEN  # b and c can still make 2
    await coord.submit("r1", UPDATES[1])
    rnd = await coord.participant_failed("r1", "c", "trap")
    assert rnd.state is RoundState.FAILED  # long before the deadline (clock never moved)
    assert clock.now < rnd.deadline
    await asyncio.wait_for(watcher, 5)
    assert [e.type for e in events] == [
        EventType.SNAPSHOT,
        EventType.UPDATE_ACCEPTED,
        EventType.FAILED,
    ]
    stored = await coord.get("r1")
    assert [(f.proplet_id, f.reason) for f in stored.failed] == [
        ("a", "fetch module: file not found"),
        ("c", "trap"),
    ]
    assert "a: fetch module: file not found; c: trap" in stored.failure_reason
    assert backend.aggregate_calls == 0 and published.messages == []
    # Repeats change nothing; a failure for a finished round is not an error.
    assert (await coord.participant_failed("r1", "c", "again")).failed == stored.failed
    assert (await coord.participant_failed("r1", "b", "late")).failed == stored.failed
    with pytest.raises(FailedPrecondition, match="not a participant"):
        await coord.participant_failed("r1", "zz", "?")
    with pytest.raises(NotFound, match="round_id"):
        await coord.participant_failed("nope", "a", "?")


async def test_with_min_k_of_n_a_failure_closes_the_round_with_the_others() -> None:
    coord, _, published, _ = make()
    await coord.configure(config(min_k_of_n=2), start=True)
    await coord.submit("r1", UPDATES[0])
    await coord.submit("r1", UPDATES[1])
    rnd = await coord.participant_failed("r1", "c", "stopped")
    assert (rnd.state, rnd.closed_by) == (RoundState.AGGREGATING, "min_k_of_n")
    await coord.wait_finishing()
    done = await coord.get("r1")
    assert done.state is RoundState.COMPLETED and done.reported == ("a", "b")
    [(_, msg)] = published.messages
    assert (msg["num_updates"], msg["closed_by"]) == (2, "min_k_of_n")


# ---- the round-complete notification (outbox) ----------------------------------------


class FlakyPublish(Published):
    """Fails the first `failures` publishes, as a broker that is down would."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    async def __call__(self, topic: str, payload: bytes) -> None:
        if self.failures:
            self.failures -= 1
            raise Unavailable("mqtt: broker unreachable")
        await super().__call__(topic, payload)


async def test_a_notification_that_could_not_be_published_stays_in_the_outbox() -> None:
    publish = FlakyPublish(failures=2)
    coord = Coordinator(MemoryRoundStore(), MemoryBackend(), publish, TOPICS)
    assert (await one_update_round(coord)).state is RoundState.COMPLETED
    assert publish.messages == []
    [notice] = await coord.store.unsent()
    assert notice.round_id == "r1" and notice.topic == TOPICS.round_next
    # The outbox task publishes it once the broker answers (one more failure first).
    outbox = asyncio.create_task(coord.run_outbox(retry_s=0.01))
    try:
        await eventually(coord.store.unsent, lambda u: not u, what="the outbox emptied")
    finally:
        outbox.cancel()
        await asyncio.gather(outbox, return_exceptions=True)
    [(topic, msg)] = publish.messages
    assert (topic, msg["round_id"], msg["new_model_version"]) == (TOPICS.round_next, "r1", 1)


async def test_a_restarted_coordinator_publishes_what_its_outbox_holds() -> None:
    first = FlakyPublish(failures=1)
    store = MemoryRoundStore()
    coord = Coordinator(store, MemoryBackend(), first, TOPICS)
    await coord.configure(config(k_of_n=1), start=True)
    await coord.submit("r1", UPDATES[0])
    await coord.wait_finishing()
    await coord.aclose()
    assert first.messages == [] and len(await store.unsent()) == 1
    again = Published()
    restarted = Coordinator(store, MemoryBackend(), again, TOPICS)
    assert await restarted.deliver_unsent()
    assert [m["round_id"] for _, m in again.messages] == ["r1"]
    assert await store.unsent() == []
    assert await restarted.deliver_unsent()  # nothing left: nothing published twice
    assert len(again.messages) == 1
