"""Fuel receipts at the coordinator: the fuel plausibility rule (docs/verifiability.md, "Fuel
receipts").

Every update a metering proplet sends carries the wasmtime fuel its training run consumed,
signed with the rest of its header. Fuel counts instructions, so for one experiment (one
module, one model, the same hyperparameters) the fuel a run spends per sample is about the
same on every proplet: a little higher on small datasets (the run's fixed part is shared by
fewer samples), never much lower. A proplet that claims more samples than it trained on
(`num_samples` inflated to weigh more in the aggregate) shows a fuel per sample far below the
others'.

The rule, when a round sets `min_fuel_ratio` (0 < r <= 1; 0 = off): an update is refused
(FAILED_PRECONDITION naming header.fuel_consumed; the proplet's task fails with that reason,
which the round records among its failed participants) when

    fuel_consumed / num_samples < r x reference

where the reference is the median fuel per sample of the updates the experiment accepted
before it: this round's so far and those of the experiment's latest completed round before
it. An update without a fuel receipt (fuel_consumed 0) is refused outright by such a round.
With no earlier update to compare with (the first update of an experiment's first round) an
update passes. A median moves only when half the references move: liars in a minority cannot
drag it down to their level. Site partials (hierarchical rounds) are not judged here: their
proplets' updates were, at their site.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable

from server.coordinator.rounds import Round, RoundState, Update
from server.coordinator.store import RoundStore, update_headers
from server.errors import FailedPrecondition

# Completed rounds whose fuel figures are kept in memory (a round's never change once it
# completed); cleared when full.
_KEPT_ROUNDS = 1024


def fuel_per_sample(update: Update) -> float:
    return update.fuel_consumed / update.num_samples


def reference(updates: Iterable[Update]) -> tuple[float, int] | None:
    """The median fuel per sample of the metered `updates` and how many there are (None when
    none is metered)."""
    figures = [fuel_per_sample(u) for u in updates if u.fuel_consumed > 0 and u.num_samples > 0]
    if not figures:
        return None
    return statistics.median(figures), len(figures)


def check_fuel(rnd: Round, update: Update, earlier: Iterable[Update]) -> None:
    """The fuel plausibility rule (module docstring) for `update` in `rnd`, against the
    experiment's `earlier` updates; FAILED_PRECONDITION when it fails."""
    ratio = rnd.min_fuel_ratio
    if ratio <= 0 or update.contributors:
        return
    if update.fuel_consumed <= 0:
        raise FailedPrecondition(
            f"header.fuel_consumed: 0 (no fuel receipt), but round {rnd.round_id!r} checks "
            f"fuel per sample (min_fuel_ratio={ratio:g}); update not counted"
        )
    ref = reference(earlier)
    if ref is None:
        return
    median, count = ref
    per_sample = fuel_per_sample(update)
    if per_sample < ratio * median:
        raise FailedPrecondition(
            f"header.fuel_consumed: {update.fuel_consumed} fuel for {update.num_samples} "
            f"samples is {per_sample:.6g} a sample, below min_fuel_ratio={ratio:g} of the "
            f"{median:.6g} a sample the experiment's {count} earlier updates spent (their "
            "median): implausibly little work for its num_samples; update not counted"
        )


class FuelPlausibility:
    """`check_fuel` with the references read from the coordinator's store: the round's
    accepted updates and its experiment's latest completed round before it (whose figures are
    kept, as they no longer change)."""

    def __init__(self, store: RoundStore) -> None:
        self._store = store
        self._completed: dict[str, tuple[Update, ...]] = {}

    async def check(self, rnd: Round, update: Update) -> None:
        if rnd.min_fuel_ratio <= 0 or update.contributors:
            return
        earlier = list(update_headers(await self._store.updates(rnd.round_id)))
        earlier += await self._previous_round(rnd)
        check_fuel(rnd, update, earlier)

    async def _previous_round(self, rnd: Round) -> tuple[Update, ...]:
        """The updates of the experiment's latest round completed before `rnd` (none for its
        first round, or a round without an experiment)."""
        if not rnd.experiment_id:
            return ()
        previous: Round | None = None
        for r in await self._store.list(rnd.experiment_id):
            if r.round_id == rnd.round_id:
                break
            if r.state is RoundState.COMPLETED:
                previous = r
        if previous is None:
            return ()
        kept = self._completed.get(previous.round_id)
        if kept is None:
            kept = tuple(update_headers(await self._store.updates(previous.round_id)))
            if len(self._completed) >= _KEPT_ROUNDS:
                self._completed.clear()
            self._completed[previous.round_id] = kept
        return kept
