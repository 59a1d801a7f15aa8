"""The re-execution audit's rules as plain functions (docs/verifiability.md): which updates a
round's seed samples, and what its policy does with the outcomes. The audit of real updates
by real proplets is tests/security/test_audit.py."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from server.coordinator import rounds as R
from server.coordinator.audit import apply_policy, chosen, draw_seed
from server.coordinator.rounds import AuditOutcome, Round, Update
from server.coordinator.store import update_headers
from server.round_spec import AuditSpec, RoundSpec, validate, with_defaults
from server.tensors import Spec

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
