"""The rules between two rounds of an experiment (`server.manager.plan`): round ids, the
reproducible sample, a round's k_of_n and when the experiment ends."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.errors import InvalidArgument
from server.ids import MAX_ID_LENGTH, valid_id
from server.manager.plan import (
    EndReason,
    EvaluationPlan,
    ExperimentPlan,
    MetricGoal,
    MetricSource,
    Sampling,
    StoppingRule,
    round_id_for,
    round_k,
    sample,
    verdict,
)

IDS = [f"p-{i:02d}" for i in range(20)]


def test_round_ids_are_derived_from_the_experiment_and_the_index() -> None:
    assert round_id_for("exp-1", 1) == "exp-1-r1"
    assert round_id_for("exp-1", 12) == "exp-1-r12"


@given(st.text(alphabet="abc-_.0", min_size=1, max_size=MAX_ID_LENGTH).map(lambda s: "e" + s))
def test_round_ids_stay_ids_and_never_collide(experiment_id: str) -> None:
    experiment_id = experiment_id[:MAX_ID_LENGTH]
    ids = [round_id_for(experiment_id, i) for i in (1, 2, 10, 9999)]
    assert all(valid_id(r) for r in ids), ids
    assert len(set(ids)) == len(ids)
    # Another experiment id sharing the first 40 characters gets other round ids.
    other = experiment_id[:40] + "x" * (MAX_ID_LENGTH - 40)
    if other != experiment_id:
        assert round_id_for(other, 1) != round_id_for(experiment_id, 1)


def test_sample_is_reproducible_from_seed_round_and_alive_set() -> None:
    s = Sampling(count=5, seed=7)
    first = sample(s, IDS, 3)
    assert len(first) == 5 and first == sorted(first) and set(first) <= set(IDS)
    # The same inputs in another order: the same choice.
    assert sample(s, list(reversed(IDS)), 3) == first
    # Another round, another seed or another alive set: (almost surely) another choice.
    assert len({tuple(sample(s, IDS, r)) for r in range(1, 11)}) > 1
    assert len({tuple(sample(Sampling(count=5, seed=k), IDS, 3)) for k in range(10)}) > 1
    assert sample(s, IDS[:-1], 3) != first or sample(s, IDS[1:], 3) != first


def test_sample_size_by_fraction_and_count() -> None:
    assert Sampling().size(20) == 20
    assert Sampling(fraction=0.25).size(20) == 5
    assert Sampling(fraction=0.01).size(20) == 1  # rounded up
    assert Sampling(count=3).size(20) == 3
    assert Sampling(count=30).size(20) == 20  # capped at the alive
    assert Sampling(fraction=0.1, count=4).size(20) == 4  # count is a floor
    assert Sampling(fraction=0.5, count=4).size(20) == 10


def test_round_k_of_the_sample() -> None:
    assert round_k(0, 0.0, 6) == 6
    assert round_k(4, 0.0, 6) == 4
    assert round_k(9, 0.0, 6) == 6
    assert round_k(0, 0.5, 5) == 3


def plan(**stopping: object) -> ExperimentPlan:
    return ExperimentPlan(rounds=10, stopping=StoppingRule(**stopping))  # type: ignore[arg-type]


def test_max_rounds_end_the_experiment() -> None:
    p = ExperimentPlan(rounds=3)
    assert verdict(p, 2, [{}, {}]) is None
    v = verdict(p, 3, [{}, {}, {}])
    assert v is not None and v.reason is EndReason.MAX_ROUNDS


def test_target_on_a_metric() -> None:
    p = plan(metric="accuracy", goal=MetricGoal.MAXIMIZE, target=0.9)
    assert verdict(p, 1, [{"accuracy": 0.5}]) is None
    v = verdict(p, 2, [{"accuracy": 0.5}, {"accuracy": 0.91}])
    assert v is not None and v.reason is EndReason.TARGET_REACHED and "0.91" in v.detail
    low = plan(metric="loss", goal=MetricGoal.MINIMIZE, target=0.1, source=MetricSource.TRAINING)
    assert verdict(low, 1, [{"loss": 0.2}]) is None
    assert verdict(low, 2, [{"loss": 0.2}, {"loss": 0.1}]) is not None
    # A round without the metric (not evaluated) decides nothing.
    assert verdict(p, 2, [{"accuracy": 0.5}, {}]) is None


def test_plateau() -> None:
    p = plan(metric="loss", goal=MetricGoal.MINIMIZE, patience_rounds=2, min_delta=0.01)
    seen = [{"loss": 1.0}, {"loss": 0.5}, {"loss": 0.495}]
    assert verdict(p, 3, seen) is None  # only one round without improvement
    v = verdict(p, 4, [*seen, {"loss": 0.499}])
    assert v is not None and v.reason is EndReason.PLATEAU
    assert verdict(p, 4, [*seen, {"loss": 0.3}]) is None


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: ExperimentPlan(rounds=0), "rounds"),
        (lambda: ExperimentPlan(strategy_params_json="[1]"), "strategy_params_json"),
        (lambda: ExperimentPlan(strategy_params_json="{"), "strategy_params_json"),
        (lambda: ExperimentPlan(k_fraction=1.5), "k_fraction"),
        (lambda: Sampling(fraction=-0.1), "sampling.fraction"),
        (lambda: Sampling(count=-1), "sampling.count"),
        (lambda: EvaluationPlan(every_rounds=-1), "evaluation.every_rounds"),
        (lambda: StoppingRule(metric="loss", target=1.0), "stopping.goal"),
        (lambda: StoppingRule(metric="loss", goal=MetricGoal.MINIMIZE), "stopping.metric"),
        (lambda: StoppingRule(target=1.0), "stopping.metric"),
        (lambda: StoppingRule(metric="a b", goal=MetricGoal.MINIMIZE), "stopping.metric"),
    ],
)
def test_bad_plans_name_the_field(make: object, field: str) -> None:
    with pytest.raises(InvalidArgument, match=f"^{field}:"):
        make()  # type: ignore[operator]


def test_plan_round_trips_through_its_record() -> None:
    p = ExperimentPlan(
        rounds=5,
        strategy_name="fedavgm",
        strategy_params_json='{"momentum": 0.9}',
        all_alive=True,
        sampling=Sampling(fraction=0.5, count=2, min_available=3, seed=42),
        k_fraction=0.5,
        evaluation=EvaluationPlan(every_rounds=2, fraction=0.5, timeout_s=9),
        stopping=StoppingRule(metric="acc", goal=MetricGoal.MAXIMIZE, target=0.9),
    )
    assert ExperimentPlan.from_dict(p.to_dict()) == p
    assert ExperimentPlan.from_dict(ExperimentPlan().to_dict()) == ExperimentPlan()
