"""A closed round's aggregation, between reading its updates and writing its outcome: the new
model (`new_model`: the round's strategy run over its (clipped) updates with the experiment's
strategy state, the result checked and put in the base model's order, the state to keep), its
storing in the registry with its lineage (`store_model`: once, also after a retry or a
restart), or, on a site coordinator, the partial sent to the root (`forward_partial`).

The coordinator calls these without holding the round's lock and writes what they answer under
it; a `PropellerError` from them is the round's failure reason.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from server import metrics
from server.aggregator.strategies import strategy_class
from server.aggregator.strategies.base import Strategy
from server.coordinator import rounds as R
from server.coordinator import site as S
from server.coordinator.backend import (
    FEDAVG,
    Lineage,
    ModelBackend,
    RetryPolicy,
    StateLineage,
    StrategyRun,
    with_retry,
)
from server.coordinator.checks import ClippedUpdates
from server.coordinator.records import StrategyState
from server.coordinator.rounds import Round, Update
from server.coordinator.store import RoundStore, RoundUpdates, update_headers
from server.errors import AlreadyExists, ResourceExhausted, Unavailable
from server.streams import MAX_PAYLOAD_BYTES
from server.tensors import Tensors, nbytes_of, offload_if_big, sha256_of


@dataclass(frozen=True)
class NewModel:
    """A round's aggregate, ready to store: its tensors (in the base model's order) and their
    sha256, each update's weight in it, the experiment's strategy state to keep (None: none),
    and what the version's lineage says of that state."""

    round: Round
    updates: RoundUpdates
    tensors: Tensors
    sha256: str
    weights: Sequence[float]
    state: StrategyState | None
    state_lineage: StateLineage | None

    def lineage(self, version: int) -> Lineage:
        return Lineage(
            version,
            self.sha256,
            self.round,
            self.updates,
            self.weights,
            self.state_lineage,
            # The round's audited updates, the rejected ones included (not among `updates`).
            self.round.audits,
        )


async def new_model(
    backend: ModelBackend,
    store: RoundStore,
    retry: RetryPolicy,
    rnd: Round,
    updates: RoundUpdates,
    strategy: type[Strategy],
) -> NewModel:
    """Aggregate `rnd`'s `updates` (read in arrival order, so aggregating again after a
    restart gives exactly the same bytes, and the same sha256, as the first attempt) by its
    `strategy` (`strategy_class(rnd.strategy_name)`)."""
    round_id = rnd.round_id
    inputs: RoundUpdates = updates
    aggregation_began = time.perf_counter()
    base: Tensors | None = None
    clipped = any(u.clip_scale != 1.0 for u in update_headers(updates))
    if clipped or strategy.needs_base:
        base = await backend.base_tensors(rnd.model_ref)
    if clipped:
        assert base is not None
        inputs = ClippedUpdates(updates, base)
    # The state the experiment's last completed round left: a round aggregated again (a
    # retry, or resumed after a crash) reads the same one, since the state changes only
    # together with a round's completion.
    state, state_from = await strategy_state(store, rnd) if strategy.stateful else (None, None)
    run = StrategyRun(
        rnd.strategy_name,
        rnd.strategy_params_json,
        base if strategy.needs_base else None,
        state,
    )
    result = await with_retry(
        retry,
        "aggregate",
        round_id,
        lambda _n: backend.aggregate(round_id, inputs, run),
    )
    aggregated, sha = result.model, result.sha256
    nbytes = nbytes_of(aggregated)
    tensors = await offload_if_big(nbytes, R.check_tensors, rnd.specs, aggregated, "aggregate")
    kept = state_to_keep(rnd, strategy.stateful, result.state)
    metrics.phase_took("aggregation", aggregation_began)
    state_lineage = (
        None
        if result.state is None
        else StateLineage(
            state,
            state_from,
            await offload_if_big(nbytes_of(result.state), sha256_of, result.state),
        )
    )
    if list(tensors) != list(aggregated):
        # Put into the base model's order: other bytes, so another digest.
        sha = await offload_if_big(nbytes, sha256_of, tensors)
    weights = result.weights or ()
    return NewModel(rnd, updates, tensors, sha, weights, kept, state_lineage)


async def store_model(
    backend: ModelBackend, retry: RetryPolicy, model: NewModel, resumed: bool
) -> tuple[int, str]:
    """Store `model` as the registry's next version with its lineage; (version, uri)."""
    rnd = model.round

    async def store_once(attempt: int) -> tuple[int, str]:
        # A retry, or a round resumed after a restart, may follow a write that landed
        # although its reply never arrived: look for those exact bytes first. The
        # version's lineage (its updates as signed) goes right after it; the round is
        # completed only once both are stored, so a crash in between sends it again.
        if attempt > 1 or resumed:
            found = await backend.find(model.sha256, rnd.base_version)
            if found is not None:
                try:
                    await backend.put_lineage(model.lineage(found[0]))
                    return found
                except AlreadyExists:
                    pass  # the same bytes, but another round's version: store ours
        stored = await backend.put(model.tensors, model.sha256)
        await backend.put_lineage(model.lineage(stored[0]))
        return stored

    return await with_retry(retry, "store model", rnd.round_id, store_once)


async def forward_partial(
    backend: ModelBackend,
    upstream: S.Upstream,
    retry: RetryPolicy,
    rnd: Round,
    updates: RoundUpdates,
    site_id: str,
) -> Update:
    """A site round's end: its updates' weighted mean and sample total (the partial),
    submitted to the root as the site's update; the partial sent."""
    round_id = rnd.round_id
    headers = update_headers(updates)
    inputs: RoundUpdates = updates
    if any(u.clip_scale != 1.0 for u in headers):
        inputs = ClippedUpdates(updates, await backend.base_tensors(rnd.model_ref))
    # The plain weighted mean whatever the round's strategy: the root applies the
    # strategy (its server optimiser, its state) to the mean of the sites' means.
    result = await with_retry(
        retry,
        "aggregate",
        round_id,
        lambda _n: backend.aggregate(round_id, inputs, FEDAVG),
    )
    mean = await offload_if_big(
        nbytes_of(result.model), R.check_tensors, rnd.specs, result.model, "aggregate"
    )
    partial = S.partial_of(rnd, headers, mean, site_id)
    await with_retry(
        retry,
        "submit the site's partial to the root",
        round_id,
        lambda _n: upstream.submit(round_id, partial),
    )
    return partial


async def strategy_state(store: RoundStore, rnd: Round) -> tuple[Tensors | None, int | None]:
    """The experiment's strategy state for `rnd`, if an earlier round of it left one by
    the same strategy (a round outside an experiment, or the first, starts afresh), and
    the version that round produced (the lineage links the two)."""
    if not rnd.experiment_id:
        return None, None
    kept = await store.strategy_state(rnd.experiment_id)
    if kept is None or kept.strategy_name != strategy_class(rnd.strategy_name).name:
        return None, None
    left_by = await store.get(kept.round_id)
    return kept.tensors, None if left_by is None else left_by.new_model_version


def state_to_keep(rnd: Round, stateful: bool, state: Tensors | None) -> StrategyState | None:
    """What to keep for the experiment; refused (the round fails before its model is
    stored) when a stateful strategy answered none or one too big to keep."""
    if not stateful:
        return None
    if state is None:
        raise Unavailable(f"aggregate: strategy {rnd.strategy_name} answered no state")
    if nbytes_of(state) > MAX_PAYLOAD_BYTES:
        raise ResourceExhausted(
            f"state: strategy state of {nbytes_of(state)} bytes, more than the "
            f"{MAX_PAYLOAD_BYTES} the coordinator keeps"
        )
    if not rnd.experiment_id:
        return None
    name = strategy_class(rnd.strategy_name).name
    return StrategyState(rnd.experiment_id, rnd.round_id, name, state)
