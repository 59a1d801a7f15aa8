"""The experiment loop (`server.manager.driver`) over the manager with its boundaries faked
(`test_orchestrator.World`): rounds follow each other from the stored versions, federated
evaluation after a round (sample-weighted, with the proplets that gave none and why), the
stopping rule on an evaluation metric, a failed round, a stop, and the record's round trip
through manager.sqlite."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

import pytest

from server.coordinator.rounds import RoundState
from server.errors import DeadlineExceeded, FailedPrecondition, Unavailable
from server.manager.driver import ExperimentLoop
from server.manager.experiments import EVALUATE, FL_TASK, ExperimentState
from server.manager.plan import (
    EndReason,
    EvaluationPlan,
    ExperimentPlan,
    MetricGoal,
    StoppingRule,
)
from server.manager.proplets import Skipped
from server.manager.tasks import TaskState
from server.messages import COMPLETED, FAILED, TaskResult, TaskStart
from tests.manager.test_orchestrator import TOPICS, World, announce, config, world  # noqa: F401
from tests.support.state import StateBackend
from tests.support.waits import eventually


@pytest.fixture
async def loop(world: World) -> AsyncIterator[ExperimentLoop]:  # noqa: F811
    driver = ExperimentLoop(world.manager, poll_s=0.01)
    running = asyncio.create_task(driver.run())
    yield driver
    running.cancel()
    await asyncio.gather(running, return_exceptions=True)
    await world.manager.aclose()


def starts(w: World, *, evaluation: bool) -> list[TaskStart]:
    found = [TaskStart.from_json(p) for t, p in w.broker.published if TOPICS.is_task_start(t)]
    return [s for s in found if (s.env.get(FL_TASK) == EVALUATE) is evaluation]


async def result(
    w: World, start: TaskStart, state: str, *, results: str = "", error: str = ""
) -> None:
    await w.manager.handle_message(
        TOPICS.proplet_results_for(start.proplet_id),
        TaskResult(
            start.id, start.proplet_id, state, results=results, error=error, attempt=start.attempt
        ).to_json(),
    )


async def until(condition: Callable[[], bool], what: str) -> None:
    """`eventually` for a condition on in-memory state."""

    async def probe() -> bool:
        return condition()

    await eventually(probe, what=what, timeout=10)


async def configured(w: World, n: int) -> None:
    await until(lambda: len(w.rounds.configured) >= n, f"{n} rounds configured")


def evaluation(n: int, accuracy: float) -> str:
    return json.dumps({"num_samples": n, "metrics": {"accuracy": accuracy}})


async def test_rounds_chain_evaluate_and_stop_at_the_target(
    world: World,  # noqa: F811
    loop: ExperimentLoop,
) -> None:
    await announce(world, "p1", "p2", "p3")
    plan = ExperimentPlan(
        rounds=5,
        evaluation=EvaluationPlan(every_rounds=1, timeout_s=10),
        stopping=StoppingRule(metric="accuracy", goal=MetricGoal.MAXIMIZE, target=0.9),
    )
    await world.manager.start_experiment(config(["p1", "p2", "p3"], experiment_id="e"), plan)
    world.rounds.complete("r1", 1, {"loss": 0.5})

    await until(lambda: len(starts(world, evaluation=True)) == 3, "evaluation tasks")
    evals = {s.proplet_id: s for s in starts(world, evaluation=True)}
    for s in evals.values():
        # The version round 1 stored, on each proplet's held-out split.
        assert s.env["MODEL_URI"] == "fl/models/global_model_v1"
        assert s.env["ROUND_ID"] == "r1" and s.name == f"fl-eval-r1-{s.proplet_id}"
    await result(world, evals["p1"], COMPLETED, results=evaluation(10, 0.5))
    await result(world, evals["p2"], COMPLETED, results=evaluation(30, 0.7))
    # p3 never answers: the evaluation ends at its deadline without it.
    world.clock.advance(11)

    await configured(world, 2)
    second = world.rounds.configured[1]
    assert (second.round_id, second.model_ref) == ("e-r2", "fl/models/global_model_v1")
    e = world.manager.get_experiment("e")
    first = e.rounds[0]
    assert first.eval_metrics == {"accuracy": pytest.approx((10 * 0.5 + 30 * 0.7) / 40)}
    assert (first.eval_num_samples, first.evaluated) == (40, ("p1", "p2"))
    assert first.eval_missing == (Skipped("p3", "no result by the evaluation's deadline"),)
    assert first.train_metrics == {"loss": 0.5}
    # An evaluation task's failure is no round participant's: the coordinator is not told.
    assert world.rounds.failures == []

    await until(lambda: world.manager.get_experiment("e").fan_out.value == "done", "round 2 out")
    world.rounds.complete("e-r2", 2, {"loss": 0.4})
    await until(lambda: len(starts(world, evaluation=True)) == 6, "round 2 evaluation")
    evals = {s.proplet_id: s for s in starts(world, evaluation=True)[3:]}
    await result(world, evals["p1"], COMPLETED, results=evaluation(10, 0.95))
    await result(world, evals["p2"], COMPLETED, results="not json")
    await result(world, evals["p3"], FAILED, error="no test split")

    await until(lambda: not world.manager.get_experiment("e").running, "the end")
    e = world.manager.get_experiment("e")
    assert e.state is ExperimentState.COMPLETED
    assert e.end is not None and (e.end.reason, e.end.round) == (EndReason.TARGET_REACHED, 2)
    assert "accuracy 0.95" in e.end.detail
    missing = dict((s.proplet_id, s.reason) for s in e.rounds[1].eval_missing)
    assert missing["p3"] == "no test split"
    assert missing["p2"].startswith("results not an evaluation: not JSON")
    assert [r.round_id for r in world.rounds.configured] == ["r1", "e-r2"]


async def test_a_failed_round_ends_the_experiment(
    world: World,  # noqa: F811
    loop: ExperimentLoop,
) -> None:
    await announce(world, "p1")
    await world.manager.start_experiment(
        config(["p1"], experiment_id="e"), ExperimentPlan(rounds=3)
    )
    world.rounds.fail("r1", "deadline passed with no update")
    await until(lambda: not world.manager.get_experiment("e").running, "the end")
    e = world.manager.get_experiment("e")
    assert e.state is ExperimentState.FAILED and e.end is not None
    assert (e.end.reason, e.end.round, e.end.round_id) == (EndReason.FAILED, 1, "r1")
    assert e.end.detail == "round 1 (r1) failed: deadline passed with no update"
    assert e.rounds[0].state is RoundState.FAILED
    assert len(world.rounds.configured) == 1


async def test_stop_ends_it_and_stops_the_round_tasks(
    world: World,  # noqa: F811
    loop: ExperimentLoop,
) -> None:
    await announce(world, "p1", "p2")
    await world.manager.start_experiment(
        config(["p1", "p2"], experiment_id="e"), ExperimentPlan(rounds=3)
    )
    stopped = await loop.stop("e")
    assert stopped.state is ExperimentState.STOPPED
    assert stopped.end is not None and stopped.end.reason is EndReason.STOPPED
    tasks = world.manager.tasks.find(name_prefix="fl-round-r1-")
    assert {t.state for t in tasks} == {TaskState.INTERRUPTED}
    assert len([t for t, _ in world.broker.published if TOPICS.is_task_stop(t)]) == 2
    # Its round completing afterwards starts nothing.
    world.rounds.complete("r1", 1, {})
    assert await loop.stop("e") == world.manager.get_experiment("e")
    assert len(world.rounds.configured) == 1


async def test_the_record_round_trips_through_the_manager_s_database(
    world: World,  # noqa: F811
    loop: ExperimentLoop,
    state_backend: StateBackend,
) -> None:
    await announce(world, "p1", "p2")
    plan = ExperimentPlan(rounds=2, evaluation=EvaluationPlan(every_rounds=2, timeout_s=5))
    await world.manager.start_experiment(config(["p1", "p2"], experiment_id="e"), plan)
    world.rounds.complete("r1", 1, {"loss": 0.5})
    await configured(world, 2)
    await until(lambda: world.manager.get_experiment("e").fan_out.value == "done", "round 2 out")
    world.rounds.complete("e-r2", 2, {"loss": 0.25})
    await until(lambda: len(starts(world, evaluation=True)) == 2, "evaluation tasks")
    for s in starts(world, evaluation=True):
        await result(world, s, COMPLETED, results=evaluation(5, 0.8))
    await until(lambda: not world.manager.get_experiment("e").running, "the end")
    record = world.manager.get_experiment("e")
    assert record.rounds[1].eval_metrics == {"accuracy": 0.8}
    assert record.rounds[0].eval_tasks == ()  # evaluated every 2nd round only

    db = state_backend.manager_database()
    await db.open()
    db.experiments.put(record)
    await db.close()
    again = state_backend.manager_database()
    await again.open()
    try:
        assert again.experiments.get("e") == record
    finally:
        await again.close()


async def test_an_experiment_stopped_before_its_round_went_out_sends_nothing(
    world: World,  # noqa: F811
    loop: ExperimentLoop,
) -> None:
    await announce(world, "p1")
    request = config(["p1"], experiment_id="e")
    world.rounds.fail_configure = Unavailable("coordinator: connection refused")
    with pytest.raises(Unavailable):
        await world.manager.start_experiment(request, ExperimentPlan(rounds=3))
    stopped = await loop.stop("e")
    assert stopped.state is ExperimentState.STOPPED
    world.rounds.fail_configure = None
    with pytest.raises(FailedPrecondition, match=r"^experiment_id: 'e' is stopped"):
        await world.manager.start_experiment(request, ExperimentPlan(rounds=3))
    assert world.rounds.rounds == {} and world.broker.published == []


async def test_without_the_round_stream_the_round_status_still_moves_it_on(
    world: World,  # noqa: F811
    loop: ExperimentLoop,
) -> None:
    # Every watch fails at once (timed out, or the coordinator restarting): the loop looks at
    # the round's status instead, and retries until the round has finished.
    world.rounds.watch_fails = DeadlineExceeded("Coordinator.WatchRound: deadline exceeded")
    world.manager.retry_initial_s = world.manager.retry_max_s = 0.01
    await announce(world, "p1")
    await world.manager.start_experiment(
        config(["p1"], experiment_id="e"), ExperimentPlan(rounds=2)
    )
    world.rounds.complete("r1", 1, {})
    await configured(world, 2)
    await until(lambda: world.manager.get_experiment("e").fan_out.value == "done", "round 2 out")
    world.rounds.complete("e-r2", 2, {})
    await until(lambda: not world.manager.get_experiment("e").running, "the end")
    e = world.manager.get_experiment("e")
    assert e.end is not None and e.end.reason is EndReason.MAX_ROUNDS
    assert [r.new_model_version for r in e.rounds] == [1, 2]
