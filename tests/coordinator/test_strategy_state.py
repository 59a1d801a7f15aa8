"""An experiment's strategy state on the coordinator (docs/strategies.md), with an in-process
backend that runs the aggregator's strategy objects and records what each aggregation got:
the base only for a strategy that needs it, the state its experiment's previous round left
(none outside an experiment, for the first round, or after a change of strategy), the new
state kept with the round's completion and left as it was by a failed round. And the round
spec's checks of a strategy."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from server.coordinator.backend import FEDAVG
from server.coordinator.coordinator import Coordinator, RetryPolicy
from server.coordinator.rounds import RoundState
from server.coordinator.store import MemoryRoundStore
from server.errors import InvalidArgument
from server.round_spec import RoundSpec, validate
from server.tensors import Tensors
from server.topics import Topics
from tests.coordinator.helpers import Clock, MemoryBackend, make_update

V0, V1, V2 = (f"fl/models/global_model_v{n}" for n in range(3))


async def _published(topic: str, payload: bytes) -> None:
    pass


def make() -> tuple[Coordinator, MemoryBackend, MemoryRoundStore]:
    backend, store = MemoryBackend(), MemoryRoundStore()
    coord = Coordinator(
        store,
        backend,
        _published,
        Topics("unit", "fl"),
        retry=RetryPolicy(attempts=1),
        clock=Clock(),
    )
    return coord, backend, store


async def run_round(coord: Coordinator, round_id: str, base: str, **fields: Any) -> RoundState:
    spec = RoundSpec(round_id=round_id, participants=("a", "b"), model_ref=base, **fields)
    await coord.configure(spec, start=True)
    await coord.submit(round_id, make_update("a", [1.0, 2.0, 3.0], 1.0, 10, base=base))
    await coord.submit(round_id, make_update("b", [0.0, -1.0, 4.0], -2.0, 30, base=base))
    await coord.wait_finishing()
    return (await coord.get(round_id)).state


def same(a: Tensors | None, b: Tensors | None) -> bool:
    assert a is not None and b is not None
    return list(a) == list(b) and all(np.array_equal(a[n], b[n]) for n in a)


async def test_the_state_goes_from_one_round_of_an_experiment_to_the_next() -> None:
    coord, backend, store = make()
    adam = {"experiment_id": "e1", "strategy_name": "fedadam"}
    assert await run_round(coord, "r1", V0, **adam) is RoundState.COMPLETED
    first = backend.runs[0]
    assert (first.name, first.state) == ("fedadam", None)
    assert same(first.base, backend.models[0])
    kept = await store.strategy_state("e1")
    assert kept is not None and (kept.round_id, kept.strategy_name) == ("r1", "fedadam")
    assert sorted(kept.tensors) == ["m.b", "m.w", "v.b", "v.w"]

    assert await run_round(coord, "r2", V1, **adam) is RoundState.COMPLETED
    second = backend.runs[1]
    assert same(second.state, kept.tensors)
    assert same(second.base, backend.models[1])
    after = await store.strategy_state("e1")
    assert after is not None and after.round_id == "r2"
    assert not same(after.tensors, kept.tensors)


async def test_no_experiment_or_another_strategy_starts_afresh() -> None:
    coord, backend, store = make()
    await run_round(coord, "r1", V0, strategy_name="fedadam")  # no experiment: nothing kept
    assert await store.strategy_state("") is None
    await run_round(coord, "r2", V1, experiment_id="e1", strategy_name="fedadam")
    assert backend.runs[1].state is None
    await run_round(coord, "r3", V2, experiment_id="e1", strategy_name="fedyogi")
    assert backend.runs[2].state is None  # FedAdam's moments are not FedYogi's
    kept = await store.strategy_state("e1")
    assert kept is not None and (kept.round_id, kept.strategy_name) == ("r3", "fedyogi")


async def test_a_failed_round_leaves_the_state_as_it_was() -> None:
    coord, backend, store = make()
    momentum = {"experiment_id": "e1", "strategy_name": "fedavgm"}
    await run_round(coord, "r1", V0, **momentum)
    kept = await store.strategy_state("e1")
    assert kept is not None
    backend.aggregate_errors.append(InvalidArgument("state.tensors: nothing fits"))
    assert await run_round(coord, "r2", V1, **momentum) is RoundState.FAILED
    assert "state.tensors" in (await coord.get("r2")).failure_reason
    assert await store.strategy_state("e1") == kept


@pytest.mark.parametrize("name", ["", "fedavg", "fedprox", "fedmedian", "fedtrimmedavg"])
async def test_a_stateless_strategy_gets_no_base_and_keeps_nothing(name: str) -> None:
    coord, backend, store = make()
    await run_round(coord, "r1", V0, experiment_id="e1", strategy_name=name)
    [run] = backend.runs
    assert (run.name, run.base, run.state) == (name, None, None)
    if not name:
        assert run == FEDAVG
    assert await store.strategy_state("e1") is None


def spec(**fields: Any) -> RoundSpec:
    return RoundSpec(round_id="r1", participants=tuple("abcdefg"), **fields)


def test_params_are_stored_canonical_with_the_defaults_filled_in() -> None:
    got = validate(spec(strategy_name="fedyogi", strategy_params_json='{ "eta" : 0.5 }'))
    assert json.loads(got.strategy_params_json) == {
        "eta": 0.5,
        "eta_l": 0.0316,
        "beta_1": 0.9,
        "beta_2": 0.99,
        "tau": 0.001,
    }
    assert validate(spec(strategy_name="fedyogi")).strategy_params_json == ""
    # Canonical: validating the stored form again changes nothing (a retry is the same).
    assert validate(got) == got


@pytest.mark.parametrize(
    ("name", "params", "k_of_n", "ok"),
    [
        ("krum", '{"num_malicious": 2}', 7, True),
        ("krum", '{"num_malicious": 2}', 6, False),
        ("multikrum", '{"num_malicious": 1, "num_to_keep": 6}', 6, True),
        ("multikrum", '{"num_malicious": 1, "num_to_keep": 7}', 6, False),
        ("bulyan", '{"num_malicious": 1}', 7, True),
        ("bulyan", '{"num_malicious": 1}', 6, False),
        ("bulyan", '{"num_malicious": 1}', 0, True),  # 0: all 7 participants
    ],
)
def test_k_of_n_must_give_the_rule_enough_updates(
    name: str, params: str, k_of_n: int, ok: bool
) -> None:
    s = spec(strategy_name=name, strategy_params_json=params, k_of_n=k_of_n)
    if ok:
        assert validate(s).strategy_name == name
    else:
        with pytest.raises(InvalidArgument, match=r"^k_of_n: "):
            validate(s)
