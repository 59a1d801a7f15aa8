"""The fuel plausibility rule (`server.coordinator.fuel`) as plain functions and over a store:
off unless a round sets it, an update without a receipt refused by a round that sets it, the
median of the experiment's earlier updates as the reference (this round's and its previous
completed round's), honest proplets with different dataset sizes accepted and a 10x sample
claim refused. The figures are the real trainer's (tests/security/test_fuel_receipts.py)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from server.coordinator import rounds as R
from server.coordinator.fuel import FuelPlausibility, check_fuel, reference
from server.coordinator.rounds import Round, RoundState, Update
from server.coordinator.store import MemoryRoundStore
from server.errors import FailedPrecondition
from server.round_spec import RoundSpec, validate, with_defaults
from server.tensors import Spec
from tests.coordinator.helpers import make_update

# (num_samples, fuel) of the linear trainer's honest runs (one epoch).
HONEST = {"small": (24, 415_218), "mid": (64, 957_343), "big": (160, 2_275_364)}
SPECS = (Spec("w", np.dtype("<f8"), (3,)), Spec("b", np.dtype("<f8"), ()))


def fuelled(proplet: str, num_samples: int, fuel: int) -> Update:
    return replace(make_update(proplet, [0.0] * 3, 0.0, num_samples), fuel_consumed=fuel)


def honest() -> list[Update]:
    return [fuelled(p, n, f) for p, (n, f) in HONEST.items()]


def a_round(round_id: str = "r1", ratio: float = 0.5, **kw: Any) -> Round:
    spec = RoundSpec(
        round_id=round_id,
        participants=("small", "mid", "big", "liar"),
        experiment_id="exp",
        min_fuel_ratio=ratio,
        **kw,
    )
    return R.new_round(with_defaults(validate(spec)), "fl/models/global_model_v0", SPECS, 1.0)


def test_the_reference_is_the_median_fuel_per_sample_of_metered_updates() -> None:
    assert reference([]) is None
    assert reference([fuelled("old", 10, 0)]) is None  # no receipt: not a reference
    median, count = reference(honest()) or (0.0, 0)
    assert count == 3 and median == pytest.approx(957_343 / 64)


def test_honest_updates_of_any_dataset_size_pass_and_a_10x_claim_is_refused() -> None:
    rnd = a_round()
    updates = honest()
    for i, u in enumerate(updates):  # each against the others, in any order
        check_fuel(rnd, u, updates[:i] + updates[i + 1 :])
    n, fuel = HONEST["mid"]
    with pytest.raises(FailedPrecondition) as err:
        check_fuel(rnd, fuelled("liar", n * 10, fuel), updates)
    assert str(err.value).startswith(
        f"header.fuel_consumed: {fuel} fuel for 640 samples is 1495.85 a sample, below "
        "min_fuel_ratio=0.5 of the 14958.5 a sample the experiment's 3 earlier updates spent"
    )
    # Twice the samples for the fuel would pass a ratio of 0.5 only just: 0.8 catches it.
    double = fuelled("liar", n * 2, fuel)
    check_fuel(rnd, double, updates)
    with pytest.raises(FailedPrecondition):
        check_fuel(a_round(ratio=0.8), double, updates)


def test_the_rule_is_off_by_default_and_judges_no_site_partial() -> None:
    liar = fuelled("liar", 6400, 1)
    check_fuel(a_round(ratio=0.0), liar, honest())
    check_fuel(a_round(ratio=0.0), fuelled("old", 10, 0), honest())
    check_fuel(a_round(), replace(liar, contributors=("x", "y")), honest())


def test_a_round_with_the_rule_refuses_an_update_without_a_fuel_receipt() -> None:
    with pytest.raises(FailedPrecondition, match=r"^header\.fuel_consumed: 0 \(no fuel receipt\)"):
        check_fuel(a_round(), fuelled("old", 10, 0), [])


def test_with_nothing_to_compare_an_update_passes_and_liars_in_a_minority_move_nothing() -> None:
    check_fuel(a_round(), fuelled("first", 640, 1000), [])
    # One liar among the references does not drag the median to its level.
    references = [*honest(), fuelled("liar", 640, 957_343)]
    with pytest.raises(FailedPrecondition):
        check_fuel(a_round(), fuelled("liar2", 640, 957_343), references)


async def test_the_previous_completed_round_of_the_experiment_is_a_reference() -> None:
    store = MemoryRoundStore()
    first = R.start_round(a_round("r1"), 2.0)
    for u in honest():
        first = R.record_update(first, u.proplet_id)
        await store.accept(first, u)
    await store.put(replace(first, state=RoundState.COMPLETED))
    second = R.start_round(a_round("r2"), 3.0)
    await store.put(second)
    fuel = FuelPlausibility(store)
    n, f = HONEST["mid"]
    # The liar reports first in round 2: round 1's updates are the reference.
    with pytest.raises(FailedPrecondition, match="the experiment's 3 earlier updates"):
        await fuel.check(second, fuelled("liar", n * 10, f))
    await fuel.check(second, fuelled("liar", n, f))
    # Another experiment's rounds are no reference.
    other = R.start_round(replace(a_round("r3"), experiment_id="other"), 3.0)
    await store.put(other)
    await fuel.check(other, fuelled("liar", n * 10, f))
