"""The coordinator's durable state: the store contract (`SqliteRoundStore`, one SQLite file, and
`PostgresRoundStore`, one transaction per change in either) and `Coordinator.resume` over
it, in process with a scripted clock and backend. Every test that takes `db` runs
against both (tests.support.state). The crash tests with real processes are in
test_coordinator_processes.py."""

from __future__ import annotations

import asyncio
import gc
import json
import sqlite3
import weakref
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server.coordinator import rounds as R
from server.coordinator.app import CoordinatorConfig
from server.coordinator.coordinator import Coordinator, RetryPolicy
from server.coordinator.records import Notice, StateCorrupted, StrategyState
from server.coordinator.rounds import Round, RoundState, Update
from server.coordinator.store import STATE_FILE, SqliteRoundStore, StoredUpdates, each_update
from server.errors import Unavailable
from server.round_spec import AuditSpec, Hyperparams, RoundSpec, validate, with_defaults
from server.tensors import Spec, sha256_of
from server.topics import Topics
from tests.coordinator.helpers import (
    UPDATES,
    Clock,
    MemoryBackend,
    fedavg,
    round_of_three,
)
from tests.support.state import DurableRoundStore, StateBackend
from tests.support.waits import eventually

BASE = "fl/models/global_model_v0"
TOPICS = Topics("t", "fl")
SPECS = (Spec("w", np.dtype("<f8"), (3,)), Spec("b", np.dtype("<f8"), ()))


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / STATE_FILE


async def opened(path: Path) -> SqliteRoundStore:
    store = SqliteRoundStore(path)
    await store.open()
    return store


@pytest.fixture
def db(state_backend: StateBackend) -> StateBackend:
    return state_backend


@pytest.fixture
async def store(db: StateBackend) -> AsyncIterator[DurableRoundStore]:
    s = await db.opened_round_store()
    yield s
    await s.close()


async def reopen(db: StateBackend, store: DurableRoundStore) -> DurableRoundStore:
    """What a restart sees: close the store, open it again."""
    await store.close()
    return await db.opened_round_store()


def new_round(round_id: str = "r1", experiment_id: str = "", **kw: Any) -> Round:
    spec = RoundSpec(
        round_id=round_id,
        experiment_id=experiment_id,
        participants=("a", "b", "c"),
        timeout_s=10.0,
        **kw,
    )
    return R.new_round(with_defaults(validate(spec)), BASE, SPECS, 100.0)


def raw(db: StateBackend, sql: str, *args: Any) -> list[Any]:
    """Read the tables with a connection of its own, as another process would."""
    return db.raw("coordinator", sql, *args)


# ---- the round record ------------------------------------------------------------------


async def test_every_field_of_a_round_survives_a_restart(
    store: DurableRoundStore, db: StateBackend
) -> None:
    rnd = Round(
        round_id="r-all",
        experiment_id="exp-1",
        participants=("p1", "p2", "p3", "p4"),
        k_of_n=3,
        timeout_s=12.5,
        model_ref="fl/models/global_model_v7",
        specs=(
            Spec("w", np.dtype("<f4"), (2, 3)),
            Spec("b", np.dtype("<f8"), ()),
        ),
        # The free hyperparameters too (issue 11): stored merged, split again on reading.
        hyperparams=Hyperparams(3, 0.125, 16, '{"mode":"literal","mu":0.01,"shuffle":false}'),
        task_wasm_image="local-registry:5000/fl-client-wasm:latest",
        requested_model_ref="",
        state=RoundState.COMPLETED,
        configured_at=1700000000.125,
        started_at=1700000001.0000002,
        deadline=1700000013.5000002,
        completed_at=1700000009.75,
        reported=("p3", "p1", "p4"),
        metrics={"loss": 0.1 + 0.2, "accuracy": 1 / 3},
        new_model_version=8,
        new_model_uri="fl/models/global_model_v8",
        failure_reason="",
        closed_by="k_of_n",
        module_digest="sha256:" + "ab" * 32,
        base_model_sha256="cd" * 32,
        fuel_budget=2**62 + 1,
        min_fuel_ratio=0.375,
    )
    failed = replace(
        new_round("r-failed", min_k_of_n=2),
        state=RoundState.FAILED,
        failure_reason="min_k_of_n 2 can no longer be reached: ...",
        failed=(R.ParticipantFailure("a", "trap: ü"), R.ParticipantFailure("b", "gone")),
    )
    await store.put(rnd)
    await store.put(failed)
    again = await reopen(db, store)
    try:
        assert await again.get("r-all") == rnd
        assert await again.get("r-failed") == failed
        assert (await again.get("r-failed")).min_k_of_n == 2  # type: ignore[union-attr]
        assert await again.get("zz") is None
    finally:
        await again.close()


async def test_a_rounds_audit_and_its_outcomes_survive_a_restart(
    store: DurableRoundStore, db: StateBackend
) -> None:
    """The audit as configured, the seed in use (drawn when the configuration said 0) and
    the outcomes recorded at the close (docs/verifiability.md)."""
    audited = replace(
        new_round("r-audited", audit=AuditSpec(fraction=0.5, seed=0, policy="flag")),
        audit_seed=2**63 - 5,
        audits=(
            R.AuditOutcome("a", R.AUDIT_MATCH, "ab" * 32, "ab" * 32),
            R.AuditOutcome("b", R.AUDIT_MISMATCH, "cd" * 32, "ef" * 32, "differs: ü", True),
            R.AuditOutcome("c", R.AUDIT_ERROR, "01" * 32, "", "audit error: gone"),
        ),
    )
    await store.put(audited)
    again = await reopen(db, store)
    try:
        assert await again.get("r-audited") == audited
    finally:
        await again.close()


async def test_a_file_of_an_older_coordinator_is_read_and_brought_up_to_date(path: Path) -> None:
    """A coordinator.sqlite written before min_k_of_n, participant failures and the outbox."""
    store = await opened(path)
    await store.put(new_round("old"))
    await store.close()
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("ALTER TABLE rounds DROP COLUMN min_k_of_n")
        conn.execute("ALTER TABLE rounds DROP COLUMN failed")
        conn.execute("ALTER TABLE rounds DROP COLUMN module_digest")
        conn.execute("ALTER TABLE rounds DROP COLUMN base_model_sha256")
        conn.execute("ALTER TABLE rounds DROP COLUMN audit")
        conn.execute("ALTER TABLE rounds DROP COLUMN audits")
        for column in ("base_model_sha256", "module_digest", "signature", "certificate"):
            conn.execute(f"ALTER TABLE updates DROP COLUMN {column}")
        conn.execute("ALTER TABLE updates DROP COLUMN distance")
        conn.execute("ALTER TABLE updates DROP COLUMN clip_scale")
        conn.execute("ALTER TABLE rounds DROP COLUMN fuel_budget")
        conn.execute("ALTER TABLE rounds DROP COLUMN min_fuel_ratio")
        conn.execute("ALTER TABLE updates DROP COLUMN fuel_consumed")
        conn.execute("DROP TABLE notices")
    conn.close()
    store = await opened(path)
    try:
        old = await store.get("old")
        assert old == new_round("old") and old is not None
        assert (old.min_k_of_n, old.failed) == (0, ())
        assert (old.fuel_budget, old.min_fuel_ratio) == (0, 0.0)
        changed = R.participant_failed(R.start_round(old, 101.0), "a", "x", 102.0)
        await store.put(changed)
        assert await store.unsent() == []
    finally:
        await store.close()
    store = await opened(path)
    try:
        assert await store.get("old") == changed
    finally:
        await store.close()


async def test_a_completion_and_its_notice_commit_together_and_stay_until_sent(
    store: DurableRoundStore, db: StateBackend
) -> None:
    done = replace(new_round("r1"), state=RoundState.COMPLETED, new_model_version=1)
    notice = Notice("r1", TOPICS.round_next, b'{"round_id": "r1"}')
    await store.put(done, notice)
    await store.put(replace(new_round("r2"), state=RoundState.COMPLETED), Notice("r2", "t", b"2"))
    assert raw(db, "SELECT round_id, sent FROM notices ORDER BY seq") == [
        ("r1", 0),
        ("r2", 0),
    ]
    store = await reopen(db, store)
    assert [n.round_id for n in await store.unsent()] == ["r1", "r2"]
    assert (await store.unsent())[0] == notice
    await store.sent("r1")
    store = await reopen(db, store)
    assert [n.round_id for n in await store.unsent()] == ["r2"]
    # A notice never exists without the change it announces: both in one transaction.
    unstorable = Notice("r3", "t", object())  # type: ignore[arg-type]
    with pytest.raises(Unavailable):
        await store.put(new_round("r3"), unstorable)  # the round's row is rolled back
    assert await store.get("r3") is None
    assert [n.round_id for n in await store.unsent()] == ["r2"]
    await store.close()


async def test_configuration_order_and_experiment_filter_survive(
    store: DurableRoundStore, db: StateBackend
) -> None:
    r1, r2, r3 = new_round("r1", "e1"), new_round("r2", "e2"), new_round("r3", "e1")
    for r in (r1, r2, r3):
        await store.put(r)
    await store.put(R.start_round(r1, 200.0))  # rewriting a record keeps its place
    again = await reopen(db, store)
    try:
        assert [r.round_id for r in await again.list()] == ["r1", "r2", "r3"]
        assert [r.round_id for r in await again.list("e1")] == ["r1", "r3"]
        assert (await again.get("r1")) == R.start_round(r1, 200.0)
    finally:
        await again.close()


async def test_the_due_rounds_are_the_open_ones_past_their_deadline(
    store: DurableRoundStore, db: StateBackend
) -> None:
    """What the deadline task reads each tick (not the whole history), before and after a
    restart: open rounds whose deadline (start + 10 s) has passed, in configuration order."""
    late = R.start_round(new_round("late"), 100.0)
    rounds = [
        R.start_round(new_round("later"), 120.0),  # due from 130
        late,
        new_round("pending"),  # never started: no deadline
        R.start_round(new_round("early"), 105.0),  # due from 115
        replace(R.start_round(new_round("closing"), 100.0), state=RoundState.AGGREGATING),
        replace(R.start_round(new_round("done"), 100.0), state=RoundState.COMPLETED),
    ]
    for r in rounds:
        await store.put(r)
    assert [r.round_id for r in await store.due(109.0)] == []
    assert [r.round_id for r in await store.due(110.0)] == ["late"]
    assert await store.due(110.0) == [late]
    again = await reopen(db, store)
    try:
        assert [r.round_id for r in await again.due(129.0)] == ["late", "early"]
        assert [r.round_id for r in await again.due(1e9)] == ["later", "late", "early"]
    finally:
        await again.close()


async def test_the_deadline_is_stored_as_absolute_wall_time(
    store: DurableRoundStore, db: StateBackend
) -> None:
    started = R.start_round(new_round(), 1234.5)
    await store.put(started)
    [(state, started_at, deadline)] = raw(
        db, "SELECT state, started_at, deadline FROM rounds WHERE round_id = 'r1'"
    )
    assert (state, started_at, deadline) == ("open", 1234.5, 1244.5)


async def test_a_strategy_state_commits_with_its_completion_and_survives(
    store: DurableRoundStore, db: StateBackend
) -> None:
    rng = np.random.default_rng(7)
    moments = {"m": rng.standard_normal((2, 3)), "v": np.asarray(0.25, dtype="<f4")}
    r1 = replace(new_round("r1", "e1"), state=RoundState.COMPLETED, new_model_version=1)
    await store.put(r1, Notice("r1", "t", b"1"), StrategyState("e1", "r1", "fedadam", moments))
    store = await reopen(db, store)
    kept = await store.strategy_state("e1")
    assert kept is not None and (kept.round_id, kept.strategy_name) == ("r1", "fedadam")
    assert list(kept.tensors) == ["m", "v"]
    for name, want in moments.items():
        assert kept.tensors[name].dtype == want.dtype and np.array_equal(kept.tensors[name], want)
    assert await store.strategy_state("e2") is None
    # A completion that fails to commit leaves the previous state, not half of the new one.
    r2 = replace(new_round("r2", "e1"), state=RoundState.COMPLETED, new_model_version=2)
    newer = StrategyState("e1", "r2", "fedadam", {"m": np.zeros((2, 3))})
    unstorable = Notice("r2", "t", object())  # type: ignore[arg-type]
    with pytest.raises(Unavailable):
        await store.put(r2, unstorable, newer)
    assert (await store.strategy_state("e1")).round_id == "r1"  # type: ignore[union-attr]
    await store.put(r2, Notice("r2", "t", b"2"), newer)
    store = await reopen(db, store)
    try:
        replaced = await store.strategy_state("e1")
        assert replaced is not None and replaced.round_id == "r2"
        assert np.array_equal(replaced.tensors["m"], np.zeros((2, 3)))
    finally:
        await store.close()


# ---- updates ---------------------------------------------------------------------------


def mixed_round() -> Round:
    specs = (Spec("w", np.dtype("<f4"), (2, 3)), Spec("b", np.dtype("<f8"), ()))
    cfg = with_defaults(validate(RoundSpec("r1", ("a", "b", "c"), timeout_s=10.0)))
    return R.start_round(R.new_round(cfg, BASE, specs, 1.0), 2.0)


def mixed_update(proplet: str, seed: int, num_samples: int) -> Update:
    rng = np.random.default_rng(seed)
    # A Fortran-ordered array: the BLOB must hold C order, as the wire does.
    w = np.asfortranarray(rng.standard_normal((2, 3)).astype(np.float32))
    return Update(
        proplet_id=proplet,
        base_model_uri=BASE,
        num_samples=num_samples,
        metrics={"loss": seed / 7},
        tensors={"w": w, "b": np.array(rng.standard_normal())},
        received_at=1000.0 + seed,
    )


async def test_each_accepted_update_is_one_row_with_its_bytes(
    store: DurableRoundStore, db: StateBackend
) -> None:
    rnd = mixed_round()
    await store.put(rnd)
    sent = [mixed_update("c", 1, 5), mixed_update("a", 2, 7)]
    for u in sent:
        rnd = R.record_update(rnd, u.proplet_id)
        await store.accept(rnd, u)

    rows = raw(
        db,
        "SELECT proplet_id, seq, num_samples, length(tensors), sha256 FROM updates "
        "WHERE round_id = 'r1' ORDER BY seq",
    )
    assert [(p, seq, n, size) for p, seq, n, size, _ in rows] == [
        ("c", 0, 5, 6 * 4 + 8),
        ("a", 1, 7, 6 * 4 + 8),
    ]
    assert [sha for *_, sha in rows] == [sha256_of(u.tensors) for u in sent]
    [(reported,)] = raw(db, "SELECT reported FROM rounds WHERE round_id = 'r1'")
    assert json.loads(reported) == ["c", "a"]

    again = await reopen(db, store)
    try:
        assert (await again.get("r1")) == rnd
        stored = await again.updates("r1")
        assert isinstance(stored, StoredUpdates)
        assert [u.proplet_id for u in stored.headers] == ["c", "a"]
        loaded = [u async for u in stored]
        for got, want in zip(loaded, sent, strict=True):
            assert (got.proplet_id, got.base_model_uri, got.num_samples) == (
                want.proplet_id,
                want.base_model_uri,
                want.num_samples,
            )
            assert got.metrics == want.metrics
            assert got.received_at == want.received_at
            assert list(got.tensors) == ["w", "b"]
            for name in ("w", "b"):
                assert got.tensors[name].dtype == want.tensors[name].dtype
                assert got.tensors[name].shape == want.tensors[name].shape
                assert np.array_equal(got.tensors[name], want.tensors[name])
        assert len(await again.updates("zz")) == 0
    finally:
        await again.close()


async def test_an_updates_provenance_survives_a_restart(
    store: DurableRoundStore, db: StateBackend
) -> None:
    rnd = mixed_round()
    await store.put(rnd)
    u = replace(
        mixed_update("a", 3, 4),
        base_model_sha256="ef" * 32,
        module_digest="sha256:" + "12" * 32,
        signature=b"0E\x02 signature",
        certificate=b"-----BEGIN CERTIFICATE-----\n...",
        distance=2.5,
        clip_scale=0.4,
        fuel_consumed=2**63 - 1,
    )
    u = replace(u, sha256=sha256_of(u.tensors))
    rnd = R.record_update(rnd, "a")
    await store.accept(rnd, u)
    again = await reopen(db, store)
    try:
        [header] = (await again.updates("r1")).headers
        assert replace(header, tensors=u.tensors) == u
        [loaded] = [x async for x in each_update(await again.updates("r1"))]
        assert loaded.sha256 == sha256_of(loaded.tensors)
    finally:
        await again.close()


async def test_an_update_and_its_round_commit_together_or_not_at_all(
    store: DurableRoundStore, db: StateBackend
) -> None:
    rnd = mixed_round()
    await store.put(rnd)
    first = R.record_update(rnd, "a")
    await store.accept(first, mixed_update("a", 1, 5))

    # The same proplet again violates the (round, proplet) key: the round change in the same
    # transaction is rolled back with it.
    with pytest.raises(Unavailable):
        await store.accept(R.record_update(first, "a"), mixed_update("a", 2, 9))
    # A record that does not count the update is refused, and the update row with it.
    with pytest.raises(Unavailable):
        await store.accept(first, mixed_update("b", 3, 9))

    assert await store.get("r1") == first
    assert raw(db, "SELECT proplet_id, num_samples FROM updates") == [("a", 5)]
    [(reported,)] = raw(db, "SELECT reported FROM rounds")
    assert json.loads(reported) == ["a"]
    # The store keeps working after a rolled-back transaction.
    second = R.record_update(first, "b")
    await store.accept(second, mixed_update("b", 3, 9))
    assert (await store.get("r1")) == second


async def test_two_processes_accepting_into_one_round_never_miscount(
    store: DurableRoundStore, db: StateBackend
) -> None:
    """Two stores over one state (two coordinator processes, say), each counting an update
    on the round as it read it: one commits, the other finds the rows and its record
    disagree and stores nothing. The round's row lock (PostgreSQL) or the write lock
    (SQLite) orders them."""
    rnd = mixed_round()
    await store.put(rnd)
    other = await db.opened_round_store()
    try:
        results = await asyncio.gather(
            store.accept(R.record_update(rnd, "a"), mixed_update("a", 1, 5)),
            other.accept(R.record_update(rnd, "b"), mixed_update("b", 2, 7)),
            return_exceptions=True,
        )
        failed = [r for r in results if isinstance(r, BaseException)]
        assert len(failed) == 1 and isinstance(failed[0], Unavailable), results
        [(proplet, seq)] = raw(db, "SELECT proplet_id, seq FROM updates")
        assert seq == 0
        [(reported,)] = raw(db, "SELECT reported FROM rounds")
        assert json.loads(reported) == [proplet]
    finally:
        await other.close()


async def test_stored_update_arrays_are_not_kept_in_memory(store: DurableRoundStore) -> None:
    rnd = mixed_round()
    await store.put(rnd)
    update = mixed_update("a", 1, 5)
    w = update.tensors["w"]
    ref = weakref.ref(w)
    await store.accept(R.record_update(rnd, "a"), update)
    del update, w

    # The database thread lets go of its work item a moment after the commit is reported.
    async def released() -> bool:
        gc.collect()
        return ref() is None

    await eventually(released, timeout=5, what="the update's array released")
    stored = await store.updates("r1")
    one, two = await stored.load(0), await stored.load(0)
    assert one.tensors["w"] is not two.tensors["w"]  # read fresh each time, not cached
    assert not one.tensors["w"].flags.writeable


async def test_damaged_tensor_bytes_are_reported_not_used(
    store: DurableRoundStore, db: StateBackend
) -> None:
    rnd = mixed_round()
    await store.put(rnd)
    await store.accept(R.record_update(rnd, "a"), mixed_update("a", 1, 5))
    await store.close()
    zeros = {
        "sqlite": "zeroblob(length(tensors))",
        "postgres": "decode(repeat('00', length(tensors)), 'hex')",
    }
    db.execute("coordinator", f"UPDATE updates SET tensors = {zeros[db.kind]}")
    again = await db.opened_round_store()
    try:
        stored = await again.updates("r1")
        with pytest.raises(StateCorrupted, match="integrity check"):
            await stored.load(0)
    finally:
        await again.close()


# ---- configuration ---------------------------------------------------------------------


def test_state_dir_and_retry_policy_from_the_environment(tmp_path: Path) -> None:
    default = CoordinatorConfig.from_env({"PROPELLER_INSECURE": "1"})
    assert default.state_dir is None and default.state_file is None
    assert default.retry == RetryPolicy(attempts=5, initial_backoff_s=0.2, max_backoff_s=5.0)
    c = CoordinatorConfig.from_env(
        {
            "PROPELLER_INSECURE": "1",
            "PROPELLER_STATE_DIR": str(tmp_path),
            "PROPELLER_COORDINATOR_RETRY_ATTEMPTS": "8",
            "PROPELLER_COORDINATOR_RETRY_BACKOFF_S": "0.5",
            "PROPELLER_COORDINATOR_RETRY_MAX_BACKOFF_S": "2",
        }
    )
    assert c.state_dir == tmp_path
    assert c.state_file == tmp_path / "coordinator.sqlite"
    assert [c.retry.backoff_s(n) for n in range(1, 8)] == [0.5, 1.0, 2.0, 2.0, 2.0, 2.0, 2.0]
    assert c.retry.total_backoff_s() == 11.5  # 7 waits between 8 attempts
    with pytest.raises(ValueError, match="PROPELLER_COORDINATOR_RETRY_MAX_BACKOFF_S"):
        CoordinatorConfig.from_env(
            {"PROPELLER_INSECURE": "1", "PROPELLER_COORDINATOR_RETRY_MAX_BACKOFF_S": "x"}
        )


# ---- the coordinator over the durable store ---------------------------------------------


class Published:
    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    async def __call__(self, topic: str, payload: bytes) -> None:
        self.messages.append(json.loads(payload))


def coordinator(store: DurableRoundStore, backend: MemoryBackend, clock: Clock) -> Coordinator:
    return Coordinator(
        store,
        backend,
        Published(),
        TOPICS,
        retry=RetryPolicy(attempts=3, initial_backoff_s=0.001),
        clock=clock,
    )


async def test_an_acknowledged_update_is_already_on_disk(
    store: DurableRoundStore, db: StateBackend
) -> None:
    coord = coordinator(store, MemoryBackend(), Clock())
    await coord.configure(round_of_three("r1"), start=True)
    result = await coord.submit("r1", UPDATES[0])
    assert (result.duplicate, result.round.num_updates) == (False, 1)
    # Another connection (another process) sees it: the transaction committed before submit
    # returned, so the gRPC answer that follows it cannot precede the commit.
    assert raw(db, "SELECT proplet_id FROM updates") == [("a",)]


async def test_resume_after_a_restart(db: StateBackend) -> None:
    clock = Clock(1000.0)
    backend = MemoryBackend()
    store = await db.opened_round_store()
    first = coordinator(store, backend, clock)
    # r-done: completed before the stop; never aggregated again.
    await first.configure(round_of_three("r-done", k_of_n=1), start=True)
    await first.submit("r-done", UPDATES[0])
    await first.wait_finishing()
    assert (await first.get("r-done")).new_model_version == 1
    backend.gate = asyncio.Event()
    # r-agg: closed by k_of_n, aggregation in flight when the process stops.
    await first.configure(round_of_three("r-agg", k_of_n=2), start=True)
    await first.submit("r-agg", UPDATES[0])
    await first.submit("r-agg", UPDATES[1])
    # r-due1 / r-due0: open, their deadline will pass while the coordinator is down.
    await first.configure(round_of_three("r-due1"), start=True)
    await first.submit("r-due1", UPDATES[2])
    await first.configure(round_of_three("r-due0"), start=True)
    # r-later: open, its deadline is still ahead after the restart.
    clock.now += 5
    await first.configure(round_of_three("r-later"), start=True)
    await first.submit("r-later", UPDATES[1])
    # r-agg's aggregation runs in the background: stop only once it is held at the gate.
    await eventually(
        lambda: asyncio.sleep(0, backend.aggregate_calls),
        lambda calls: calls == 2,
        timeout=30,
        what="r-agg's aggregation at the gate",
    )
    await first.aclose()  # stops r-agg's aggregation mid-way
    await store.close()
    assert backend.aggregate_calls == 2

    clock.now += 6  # 11 s after r-due*'s start: past their deadline, r-later has 4 s left
    backend.gate.set()
    store = await db.opened_round_store()
    later_deadline = R.require_round(await store.get("r-later"), "r-later").deadline
    second = coordinator(store, backend, clock)
    try:
        await second.resume()
        await second.wait_finishing()
        agg, due1, due0, later = [
            await second.get(r) for r in ("r-agg", "r-due1", "r-due0", "r-later")
        ]
        assert (agg.state, agg.closed_by, agg.reported) == (
            RoundState.COMPLETED,
            "k_of_n",
            ("a", "b"),
        )
        assert agg.new_model_version is not None
        assert np.array_equal(backend.models[agg.new_model_version]["w"], fedavg(UPDATES[:2])["w"])
        assert (due1.state, due1.closed_by, due1.num_updates) == (
            RoundState.COMPLETED,
            "deadline",
            1,
        )
        assert (due0.state, due0.closed_by, due0.failure_reason) == (
            RoundState.FAILED,
            "deadline",
            "deadline passed with 0 of 3 updates",
        )
        assert (later.state, later.deadline) == (RoundState.OPEN, later_deadline)
        # r-later closes at its original deadline, not 10 s after the restart.
        clock.now = later_deadline - 0.001
        await second.close_due()
        assert (await second.get("r-later")).state is RoundState.OPEN
        clock.now = later_deadline
        await second.close_due()
        await second.wait_finishing()
        later = await second.get("r-later")
        assert (later.state, later.closed_by) == (RoundState.COMPLETED, "deadline")
        done = await second.get("r-done")
        assert (done.state, done.new_model_version) == (RoundState.COMPLETED, 1)
        # r-done, r-agg, r-due1, r-later: one aggregation after the restart and one model
        # each, none stored twice.
        assert backend.aggregate_calls == 2 + 3
        assert sorted(backend.models) == [0, 1, 2, 3, 4]
    finally:
        await second.aclose()
        await store.close()


async def test_duplicate_after_a_restart_is_not_counted_again(db: StateBackend) -> None:
    clock = Clock()
    store = await db.opened_round_store()
    first = coordinator(store, MemoryBackend(), clock)
    await first.configure(round_of_three("r1"), start=True)
    await first.submit("r1", UPDATES[0])
    await store.close()
    store = await db.opened_round_store()
    try:
        second = coordinator(store, MemoryBackend(), clock)
        await second.resume()
        again = await second.submit("r1", replace(UPDATES[0], num_samples=999))
        assert (again.duplicate, again.round.num_updates) == (True, 1)
        [kept] = (await store.updates("r1")).headers
        assert kept.num_samples == 10
    finally:
        await store.close()


class SlowAfterCommit:
    """Makes `store` commit, then take its time to return: the window in which a caller may
    go away."""

    def __init__(self, store: DurableRoundStore) -> None:
        self.committed = asyncio.Event()
        self.release = asyncio.Event()
        self._accept = store.accept
        store.accept = self.accept  # type: ignore[method-assign]

    async def accept(self, rnd: Round, update: Update) -> None:
        await self._accept(rnd, update)
        self.committed.set()
        await self.release.wait()


async def test_a_cancelled_submit_does_not_strand_the_round_it_closed(
    db: StateBackend,
) -> None:
    store = await db.opened_round_store()
    slow = SlowAfterCommit(store)
    backend = MemoryBackend()
    coord = coordinator(store, backend, Clock())
    try:
        await coord.configure(round_of_three("r1", k_of_n=1), start=True)
        call = asyncio.create_task(coord.submit("r1", UPDATES[0]))
        await slow.committed.wait()
        call.cancel()  # the client hung up while the k-th update was being committed
        slow.release.set()
        with pytest.raises(asyncio.CancelledError):
            await call
        await coord.wait_finishing()
        rnd = await coord.get("r1")
        assert (rnd.state, rnd.new_model_version) == (RoundState.COMPLETED, 1)
        assert backend.aggregate_calls == 1
    finally:
        await coord.aclose()
        await store.close()
