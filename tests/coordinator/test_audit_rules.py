"""The re-execution audit's rules as plain functions (docs/verifiability.md): which updates a
round's seed samples, and what its policy does with the outcomes. The audit of real updates
by real proplets is tests/security/test_audit.py."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from server.coordinator import rounds as R
from server.coordinator.audit import Auditor, apply_policy, chosen, draw_seed
from server.coordinator.coordinator import Coordinator
from server.coordinator.rounds import AuditOutcome, Round, Update
from server.coordinator.site import Hierarchy
from server.coordinator.store import MemoryRoundStore, update_headers
from server.errors import FailedPrecondition, InvalidArgument, PropellerError
from server.round_spec import AuditSpec, RoundSpec, validate, with_defaults
from server.tensors import Spec, sha256_of
from server.topics import Topics
from tests.coordinator.helpers import MemoryBackend, make_update
from tests.support.waits import eventually

BASE = "fl/models/global_model_v0"
SPECS = (Spec("w", np.dtype("<f8"), (3,)), Spec("b", np.dtype("<f8"), ()))
PROPLETS = [f"p{i}" for i in range(2000)]


def test_fraction_zero_samples_nothing_and_one_samples_everything() -> None:
    assert not any(chosen(7, "r1", p, 0.0) for p in PROPLETS)
    assert all(chosen(7, "r1", p, 1.0) for p in PROPLETS)


def test_the_sample_is_reproducible_from_the_seed_and_about_the_fraction() -> None:
    first = [p for p in PROPLETS if chosen(42, "r1", p, 0.3)]
    again = [p for p in PROPLETS if chosen(42, "r1", p, 0.3)]
    assert first == again
    assert 0.25 < len(first) / len(PROPLETS) < 0.35
    # Another seed, or another round, samples others.
    assert first != [p for p in PROPLETS if chosen(43, "r1", p, 0.3)]
    assert first != [p for p in PROPLETS if chosen(42, "r2", p, 0.3)]
    # A larger fraction keeps every update a smaller one took (the same hash, a higher bar).
    assert set(first) <= {p for p in PROPLETS if chosen(42, "r1", p, 0.6)}


def test_a_drawn_seed_is_never_zero_and_differs_between_rounds() -> None:
    seeds = {draw_seed() for _ in range(50)}
    assert 0 not in seeds and len(seeds) == 50


def closed_round(policy: str = "", min_k_of_n: int = 0, k: int = 4) -> Round:
    spec = RoundSpec(
        round_id="r1",
        participants=("a", "b", "c", "d"),
        k_of_n=k,
        min_k_of_n=min_k_of_n,
        audit=AuditSpec(fraction=1.0, policy=policy),
    )
    rnd = R.new_round(with_defaults(validate(spec)), BASE, SPECS, 1.0, audit_seed=5)
    rnd = R.start_round(rnd, 2.0)
    for p in ("a", "b", "c", "d")[:k]:
        rnd = R.record_update(rnd, p)
    assert rnd.state is R.RoundState.AGGREGATING
    return rnd


def updates(*ids: str) -> list[Update]:
    t = {"w": np.zeros(3), "b": np.array(0.0)}
    return [Update(p, BASE, 10, {}, t, sha256=f"{i:064x}") for i, p in enumerate(ids)]


def outcome(p: str, kind: str, **kw: Any) -> AuditOutcome:
    return AuditOutcome(p, kind, "aa" * 32, "bb" * 32 if kind != R.AUDIT_ERROR else "", **kw)


def test_reject_leaves_a_mismatch_out_and_keeps_the_rest() -> None:
    rnd = closed_round(min_k_of_n=2)
    ups = updates("a", "b", "c", "d")
    found = [outcome("a", R.AUDIT_MATCH), outcome("b", R.AUDIT_MISMATCH)]
    verdict = apply_policy(rnd, found, ups)
    assert verdict.failure == ""
    assert [u.proplet_id for u in update_headers(verdict.updates)] == ["a", "c", "d"]
    assert verdict.round.audits == (found[0], replace(found[1], rejected=True))
    assert verdict.round.audit_flagged


def test_reject_fails_the_round_when_fewer_than_its_floor_remain() -> None:
    # k_of_n 4 without min_k_of_n: every update is needed, so one rejection fails the round.
    rnd = closed_round()
    verdict = apply_policy(rnd, [outcome("c", R.AUDIT_MISMATCH)], updates("a", "b", "c", "d"))
    assert verdict.failure == (
        "audit mismatch: the re-execution audit rejected the updates of c; 3 of 4 remain, "
        "k_of_n 4 needs 4"
    )
    assert verdict.round.audits[0].rejected


def test_reject_of_every_update_fails_the_round_even_without_a_floor() -> None:
    rnd = closed_round(min_k_of_n=1, k=2)
    found = [outcome("a", R.AUDIT_MISMATCH), outcome("b", R.AUDIT_MISMATCH)]
    verdict = apply_policy(rnd, found, updates("a", "b"))
    assert verdict.failure.startswith(
        "audit mismatch: the re-execution audit rejected the updates of a, b; 0 of 2 remain"
    )


def test_flag_aggregates_everything_and_marks_the_round() -> None:
    rnd = closed_round(policy="flag")
    found = [outcome("a", R.AUDIT_MISMATCH), outcome("b", R.AUDIT_MATCH)]
    verdict = apply_policy(rnd, found, updates("a", "b", "c", "d"))
    assert verdict.failure == ""
    assert len(update_headers(verdict.updates)) == 4
    assert not any(o.rejected for o in verdict.round.audits)
    assert verdict.round.audit_flagged


@pytest.mark.parametrize("policy", ["", "flag"])
def test_an_audit_error_never_rejects_but_marks_the_round(policy: str) -> None:
    rnd = closed_round(policy=policy)
    verdict = apply_policy(rnd, [outcome("a", R.AUDIT_ERROR)], updates("a", "b", "c", "d"))
    assert verdict.failure == ""
    assert len(update_headers(verdict.updates)) == 4
    assert verdict.round.audit_flagged and not verdict.round.audits[0].rejected


def test_only_matches_leave_the_round_unmarked() -> None:
    rnd = closed_round()
    verdict = apply_policy(rnd, [outcome("a", R.AUDIT_MATCH)], updates("a", "b", "c", "d"))
    assert not verdict.round.audit_flagged


# ---- the coordinator's side, with an in-process backend ------------------------------------

TOPICS = Topics("unit", "fl")


class CountingSources:
    """Audit inputs that are never there: each call counted, then refused."""

    def __init__(self) -> None:
        self.calls = 0

    async def module(self, image: str, digest: str) -> bytes:
        self.calls += 1
        raise PropellerError("module: not available here")

    async def dataset(self, proplet_id: str) -> tuple[Any, Any, str]:
        self.calls += 1
        raise PropellerError("dataset: not available here")


async def _published(topic: str, payload: bytes) -> None:
    return None


def coordinator(backend: MemoryBackend, sources: CountingSources | None, **kw: Any) -> Coordinator:
    auditor = None if sources is None else Auditor(sources, backend)
    return Coordinator(MemoryRoundStore(), backend, _published, TOPICS, auditor=auditor, **kw)


AUDITED = RoundSpec(
    round_id="r1",
    participants=("a", "b"),
    timeout_s=10,
    audit=AuditSpec(fraction=1.0),
)


async def test_a_root_coordinator_and_one_without_an_auditor_refuse_an_audit() -> None:
    root = coordinator(MemoryBackend(), CountingSources(), hierarchy=Hierarchy("root"))
    with pytest.raises(InvalidArgument) as err:
        await root.configure(AUDITED)
    assert str(err.value).startswith("audit.fraction: a root coordinator's updates are its sites'")
    bare = coordinator(MemoryBackend(), None)
    with pytest.raises(
        FailedPrecondition, match=r"audit\.fraction: this coordinator has no auditor"
    ):
        await bare.configure(AUDITED)
    # Without an audit both take the round.
    await bare.configure(replace(AUDITED, audit=AuditSpec()))


async def test_an_auditor_failure_is_an_error_outcome_and_the_round_goes_on() -> None:
    backend, sources = MemoryBackend(), CountingSources()
    coord = coordinator(backend, sources)
    await coord.configure(AUDITED, start=True)
    for u in (make_update("a", [1, 2, 3], 0.5, 10), make_update("b", [3, 2, 1], 0.5, 30)):
        await coord.submit("r1", u)
    await coord.wait_finishing()
    rnd = await coord.get("r1")
    assert rnd.state is R.RoundState.COMPLETED
    assert [(a.proplet_id, a.outcome, a.rejected) for a in rnd.audits] == [
        ("a", R.AUDIT_ERROR, False),
        ("b", R.AUDIT_ERROR, False),
    ]
    assert all(a.detail.startswith("audit error: ") for a in rnd.audits)
    assert sources.calls > 0
    lineage = backend.lineages[1]
    assert [a.proplet_id for a in lineage.audits] == ["a", "b"]


async def test_outcomes_recorded_before_a_restart_are_applied_not_rerun() -> None:
    backend, sources = MemoryBackend(), CountingSources()
    coord = coordinator(backend, sources)
    # min_k_of_n 1: the round may go on without the update its audit rejected.
    await coord.configure(replace(AUDITED, min_k_of_n=1), start=True)
    store = coord.store
    # The round as a coordinator left it when it stopped mid-aggregation: closed, its
    # audit's outcomes recorded (b's update did not match and is to be left out).
    rnd = await coord.get("r1")
    for u in (make_update("a", [1, 2, 3], 0.5, 10), make_update("b", [3, 2, 1], 0.5, 30)):
        rnd = R.record_update(rnd, u.proplet_id)
        await store.accept(rnd, replace(u, sha256=sha256_of(u.tensors)))
    recorded = (
        AuditOutcome("a", R.AUDIT_MATCH, "aa" * 32, "aa" * 32),
        AuditOutcome("b", R.AUDIT_MISMATCH, "bb" * 32, "cc" * 32, "differs: update bytes", True),
    )
    await store.put(replace(rnd, audits=recorded))
    again = Coordinator(store, backend, _published, TOPICS, auditor=Auditor(sources, backend))
    await again.resume()
    await again.wait_finishing()
    done = await again.get("r1")
    assert done.state is R.RoundState.COMPLETED and done.audits == recorded
    assert sources.calls == 0
    lineage = backend.lineages[1]
    assert [u.proplet_id for u in update_headers(lineage.updates)] == ["a"]
    assert lineage.audits == recorded


class BlockedSources(CountingSources):
    """Audit inputs that never arrive (until the audit is cancelled)."""

    async def module(self, image: str, digest: str) -> bytes:
        self.calls += 1
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def dataset(self, proplet_id: str) -> tuple[Any, Any, str]:
        self.calls += 1
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


async def test_a_round_that_fails_drops_the_audits_still_running() -> None:
    coord = coordinator(MemoryBackend(), BlockedSources())
    await coord.configure(replace(AUDITED, participants=("a", "b", "c")), start=True)
    await coord.submit("r1", make_update("a", [1, 2, 3], 0.5, 10))
    await eventually(
        lambda: _audits_running("r1"), lambda n: n == 1, what="a's audit running", timeout=10
    )
    # b cannot report: k_of_n 3 cannot be reached, the round fails before any aggregation.
    failed = await coord.participant_failed("r1", "b", "task failed")
    assert failed.state is R.RoundState.FAILED
    await eventually(
        lambda: _audits_running("r1"), lambda n: n == 0, what="the audit dropped", timeout=10
    )


async def _audits_running(round_id: str) -> int:
    await asyncio.sleep(0)
    return sum(
        1
        for t in asyncio.all_tasks()
        if t.get_name().startswith(f"audit-{round_id}-") and not t.done()
    )


async def test_a_coordinator_without_an_auditor_resuming_an_audited_round_records_errors() -> None:
    backend = MemoryBackend()
    coord = coordinator(backend, CountingSources())
    await coord.configure(AUDITED, start=True)
    rnd = await coord.get("r1")
    for u in (make_update("a", [1, 2, 3], 0.5, 10), make_update("b", [3, 2, 1], 0.5, 30)):
        rnd = R.record_update(rnd, u.proplet_id)
        await coord.store.accept(rnd, replace(u, sha256=sha256_of(u.tensors)))
    again = Coordinator(coord.store, backend, _published, TOPICS)
    await again.resume()
    await again.wait_finishing()
    done = await again.get("r1")
    # Never taken for a pass: each sampled update (fraction 1: both) is an audit error, kept.
    assert done.state is R.RoundState.COMPLETED
    assert [(a.proplet_id, a.outcome, a.rejected) for a in done.audits] == [
        ("a", R.AUDIT_ERROR, False),
        ("b", R.AUDIT_ERROR, False),
    ]
    assert done.audits[0].detail == "audit error: this coordinator has no auditor"
