"""Experiments of many rounds on the whole stack (five services in process, real proplets
running the trainer): round r + 1 starts from the version round r stored by itself, the
experiment ends with its reason, GetExperiment / ListExperimentRounds / WatchExperiment show
every round, StopExperiment ends it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from propeller.v1 import coordinator_pb2, manager_pb2, model_registry_pb2
from server.config import MqttConfig
from server.manager.plan import Sampling, round_id_for, sample
from tests.manager.fakes import FakeProplet
from tests.support.clients import HYPER, V0
from tests.support.cluster import Cluster, cluster
from tests.support.waits import eventually

TIMEOUT = 90.0


@pytest.fixture
async def stack(mqtt: MqttConfig, trainer_image: str, tmp_path: Path) -> AsyncIterator[Cluster]:
    async with cluster(mqtt, tmp_path, proplets=3, image=trainer_image) as c:
        yield c


def request(c: Cluster, experiment_id: str, **fields: Any) -> manager_pb2.StartExperimentRequest:
    fields.setdefault("participants", c.proplet_ids)
    return manager_pb2.StartExperimentRequest(
        experiment_id=experiment_id,
        model_ref=V0,
        hyperparams=HYPER,
        timeout_s=60,
        task_wasm_image=c.image,
        **fields,
    )


async def ended(c: Cluster, experiment_id: str) -> manager_pb2.Experiment:
    async def get() -> manager_pb2.Experiment:
        e: manager_pb2.Experiment = await c.manager.GetExperiment(
            manager_pb2.GetExperimentRequest(experiment_id=experiment_id), timeout=10
        )
        return e

    done = await eventually(
        get,
        lambda e: e.state != manager_pb2.EXPERIMENT_STATE_RUNNING,
        timeout=TIMEOUT,
        what=f"experiment {experiment_id} ended",
    )
    return done


async def lineage_base(c: Cluster, version: int) -> str:
    async for chunk in c.registry.GetLineage(
        model_registry_pb2.GetModelRequest(version=version), timeout=10
    ):
        if chunk.HasField("header"):
            return str(chunk.header.base_model_uri)
    raise AssertionError(f"no lineage header for v{version}")


async def test_rounds_follow_each_other_from_the_stored_versions(stack: Cluster) -> None:
    c = stack
    watch = c.manager.WatchExperiment(manager_pb2.WatchExperimentRequest(experiment_id="exp-3"))
    with pytest.raises(grpc.aio.AioRpcError) as err:  # not started yet
        await watch.read()
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    started = await c.manager.StartExperiment(request(c, "exp-3", rounds=3), timeout=60)
    # No round_id given: the first round's is derived like the others'.
    assert started.round_id == "exp-3-r1"
    events: list[manager_pb2.ExperimentEvent] = []
    async for event in c.manager.WatchExperiment(
        manager_pb2.WatchExperimentRequest(experiment_id="exp-3"), timeout=TIMEOUT
    ):
        events.append(event)
    e = await ended(c, "exp-3")

    assert e.state == manager_pb2.EXPERIMENT_STATE_COMPLETED
    assert (e.end.reason, e.end.round, e.end.round_id) == (
        manager_pb2.END_REASON_MAX_ROUNDS,
        3,
        "exp-3-r3",
    )
    assert [r.round_id for r in e.rounds] == ["exp-3-r1", "exp-3-r2", "exp-3-r3"]
    assert [r.model_ref for r in e.rounds] == [
        V0,
        "fl/models/global_model_v1",
        "fl/models/global_model_v2",
    ]
    assert [r.new_model_version for r in e.rounds] == [1, 2, 3]
    for r in e.rounds:
        assert r.state == coordinator_pb2.ROUND_STATE_COMPLETED
        assert sorted(r.sampled) == sorted(c.proplet_ids) == sorted(r.reported)
        assert r.closed_by == "k_of_n" and "loss" in r.train_metrics
    # Every version once, each trained from the one before (the registry's lineage).
    assert await c.versions() == [0, 1, 2, 3]
    assert [await lineage_base(c, v) for v in (1, 2, 3)] == [
        V0,
        "fl/models/global_model_v1",
        "fl/models/global_model_v2",
    ]
    # The coordinator ran exactly these rounds for the experiment.
    listed = await c.coordinator.ListRounds(
        coordinator_pb2.ListRoundsRequest(experiment_id="exp-3"), timeout=10
    )
    assert [r.round_id for r in listed.rounds] == ["exp-3-r1", "exp-3-r2", "exp-3-r3"]

    # The watch: the experiment as it was, then each round's end, the next one's start, the end.
    kinds = [manager_pb2.ExperimentEventType.Name(ev.type) for ev in events]
    assert kinds[0] == "EXPERIMENT_EVENT_TYPE_SNAPSHOT"
    assert kinds[-1] == "EXPERIMENT_EVENT_TYPE_ENDED"
    finished = [
        ev.round.index
        for ev in events
        if "FINISHED" in manager_pb2.ExperimentEventType.Name(ev.type)
    ]
    assert finished == [1, 2, 3][-len(finished) :] and finished[-1] == 3
    assert events[-1].experiment.end.reason == manager_pb2.END_REASON_MAX_ROUNDS

    # The history a page at a time.
    page = await c.manager.ListExperimentRounds(
        manager_pb2.ListExperimentRoundsRequest(experiment_id="exp-3", page_size=2), timeout=10
    )
    assert [r.index for r in page.rounds] == [1, 2] and page.next_page_token
    rest = await c.manager.ListExperimentRounds(
        manager_pb2.ListExperimentRoundsRequest(
            experiment_id="exp-3", page_size=2, page_token=page.next_page_token
        ),
        timeout=10,
    )
    assert [r.index for r in rest.rounds] == [3] and not rest.next_page_token
    # The same request again: the same experiment, nothing run again.
    again = await c.manager.StartExperiment(request(c, "exp-3", rounds=3), timeout=60)
    assert again.round_id == "exp-3-r1"
    assert await c.versions() == [0, 1, 2, 3]


async def test_sampled_rounds_are_reproducible(stack: Cluster) -> None:
    c = stack
    sampling = manager_pb2.Sampling(count=2, seed=11)
    await c.manager.StartExperiment(
        request(c, "exp-s", participants=[], all_alive=True, rounds=2, sampling=sampling),
        timeout=60,
    )
    e = await ended(c, "exp-s")
    assert e.end.reason == manager_pb2.END_REASON_MAX_ROUNDS, e.end
    for r in e.rounds:
        # The choice depends only on (seed, round index, the sorted alive set).
        assert list(r.sampled) == sample(Sampling(count=2, seed=11), c.proplet_ids, r.index)
        assert sorted(r.reported) == list(r.sampled)
    assert e.config.all_alive and e.config.sampling.count == 2


async def test_a_target_on_the_training_loss_ends_early(stack: Cluster) -> None:
    c = stack
    stopping = manager_pb2.StoppingRule(
        metric="loss",
        source=manager_pb2.METRIC_SOURCE_TRAINING,
        goal=manager_pb2.METRIC_GOAL_MINIMIZE,
        target=1e9,  # any loss reaches it
    )
    await c.manager.StartExperiment(request(c, "exp-t", rounds=20, stopping=stopping), timeout=60)
    e = await ended(c, "exp-t")
    assert e.state == manager_pb2.EXPERIMENT_STATE_COMPLETED
    assert (e.end.reason, e.end.round) == (manager_pb2.END_REASON_TARGET_REACHED, 1)
    assert "loss" in e.end.detail
    assert await c.versions() == [0, 1]


async def test_stop_ends_the_experiment_and_no_round_follows(stack: Cluster) -> None:
    c = stack
    await c.manager.StartExperiment(request(c, "exp-stop", rounds=1000), timeout=60)
    async for event in c.manager.WatchExperiment(
        manager_pb2.WatchExperimentRequest(experiment_id="exp-stop"), timeout=TIMEOUT
    ):
        if event.type == manager_pb2.EXPERIMENT_EVENT_TYPE_ROUND_FINISHED:
            break
    stopped = await c.manager.StopExperiment(
        manager_pb2.StopExperimentRequest(experiment_id="exp-stop"), timeout=30
    )
    assert stopped.state == manager_pb2.EXPERIMENT_STATE_STOPPED
    assert stopped.end.reason == manager_pb2.END_REASON_STOPPED
    # Idempotent: the same answer again.
    again = await c.manager.StopExperiment(
        manager_pb2.StopExperimentRequest(experiment_id="exp-stop"), timeout=30
    )
    assert again.end == stopped.end
    # A watch of an ended experiment: its snapshot, then the stream closes.
    events = [
        ev
        async for ev in c.manager.WatchExperiment(
            manager_pb2.WatchExperimentRequest(experiment_id="exp-stop"), timeout=10
        )
    ]
    assert [ev.type for ev in events] == [manager_pb2.EXPERIMENT_EVENT_TYPE_SNAPSHOT]
    # No round is configured after the stop: the one in flight ends (its tasks were stopped,
    # so it fails at once, or it had its updates), and none follows it.
    rounds = stopped.current_round

    async def listed_rounds() -> Any:
        return await c.coordinator.ListRounds(
            coordinator_pb2.ListRoundsRequest(experiment_id="exp-stop"), timeout=10
        )

    finished = (coordinator_pb2.ROUND_STATE_COMPLETED, coordinator_pb2.ROUND_STATE_FAILED)
    listed = await eventually(
        listed_rounds,
        lambda page: all(r.state in finished for r in page.rounds),
        what="the round in flight at the stop finished",
    )
    assert len(listed.rounds) == rounds
    assert [r.round_id for r in listed.rounds] == [
        round_id_for("exp-stop", i) for i in range(1, rounds + 1)
    ]


async def test_a_failed_round_fails_the_experiment_saying_which_and_why(
    mqtt: MqttConfig, trainer_image: str, tmp_path: Path
) -> None:
    async with (
        cluster(mqtt, tmp_path, proplets=0, image=trainer_image) as c,
        FakeProplet(mqtt.port, mqtt.topics, "p-broken") as broken,
    ):
        await c.wait_alive(["p-broken"])
        await c.manager.StartExperiment(
            request(c, "exp-f", participants=["p-broken"], rounds=5), timeout=60
        )
        start = await broken.next_start()
        await broken.report(start.id, "Failed", error="the module trapped")
        e = await ended(c, "exp-f")
    assert e.state == manager_pb2.EXPERIMENT_STATE_FAILED
    assert (e.end.reason, e.end.round, e.end.round_id) == (
        manager_pb2.END_REASON_FAILED,
        1,
        "exp-f-r1",
    )
    assert "the module trapped" in e.end.detail, e.end.detail
    assert e.rounds[0].state == coordinator_pb2.ROUND_STATE_FAILED


async def test_bad_many_round_fields_name_the_field(stack: Cluster) -> None:
    c = stack
    cases: list[tuple[dict[str, Any], str]] = [
        ({"rounds": -1}, "rounds"),
        ({"all_alive": True}, "participants"),
        ({"k_fraction": 2.0}, "k_fraction"),
        ({"strategy_params_json": "[]"}, "strategy_params_json"),
        ({"sampling": manager_pb2.Sampling(fraction=1.5)}, "sampling.fraction"),
        ({"stopping": manager_pb2.StoppingRule(metric="loss", target=1)}, "stopping.goal"),
        ({"rounds": 3, "round_id": "bad-round_id-r2"}, "round_id"),
    ]
    for fields, name in cases:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await c.manager.StartExperiment(request(c, f"bad-{name}", **fields), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, fields
        assert (err.value.details() or "").startswith(f"{name}:"), err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await c.manager.StartExperiment(request(c, "", rounds=2), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.value.details() or "").startswith("round_id:")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await c.manager.StopExperiment(
            manager_pb2.StopExperimentRequest(experiment_id="nope"), timeout=10
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_federated_evaluation_on_the_proplets_held_out_splits(stack: Cluster) -> None:
    c = stack
    await c.manager.StartExperiment(
        request(
            c,
            "exp-eval",
            rounds=2,
            evaluation=manager_pb2.EvaluationPlan(every_rounds=1),
            stopping=manager_pb2.StoppingRule(
                metric="accuracy",
                goal=manager_pb2.METRIC_GOAL_MAXIMIZE,
                patience_rounds=50,
            ),
        ),
        timeout=60,
    )
    e = await ended(c, "exp-eval")
    assert e.end.reason == manager_pb2.END_REASON_MAX_ROUNDS, e.end
    for r in e.rounds:
        # Every proplet evaluated the round's new version on its test split.
        assert sorted(r.evaluated) == sorted(c.proplet_ids), list(r.eval_missing)
        assert {"loss", "accuracy"} <= set(r.eval_metrics)
        assert 0.0 <= r.eval_metrics["accuracy"] <= 1.0
        assert r.eval_num_samples > 0
        tasks = await c.manager.ListTasks(
            manager_pb2.ListTasksRequest(name_prefix=f"fl-eval-{r.round_id}-"), timeout=10
        )
        assert sorted(t.proplet_id for t in tasks.tasks) == sorted(c.proplet_ids)
        for t in tasks.tasks:
            assert t.env["FL_TASK"] == "evaluate" and t.env["MODEL_URI"] == r.new_model_uri
            assert t.state == manager_pb2.TASK_STATE_COMPLETED
    # The weighted mean is of what the proplets reported (their tasks' results).
    first = e.rounds[0]
    tasks = await c.manager.ListTasks(
        manager_pb2.ListTasksRequest(name_prefix=f"fl-eval-{first.round_id}-"), timeout=10
    )
    results = [json.loads(t.results) for t in tasks.tasks]
    total = sum(r["num_samples"] for r in results)
    assert first.eval_num_samples == total
    expected = sum(r["num_samples"] * r["metrics"]["accuracy"] for r in results) / total
    assert first.eval_metrics["accuracy"] == pytest.approx(expected)
    # Evaluation submits nothing: each round has its training updates only.
    assert await c.versions() == [0, 1, 2]
