"""The manager's orchestration with its two boundaries (MQTT publish, coordinator) replaced by
recording fakes: what gets published, what gets configured, and what happens when either
side fails."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from server.config import Endpoints
from server.coordinator import rounds as R
from server.coordinator.rounds import Round
from server.errors import AlreadyExists, FailedPrecondition, NotFound, Unavailable
from server.manager.experiments import InMemoryExperimentStore
from server.manager.orchestrator import Manager
from server.manager.proplets import InMemoryPropletStore, Proplets, Skipped
from server.manager.tasks import InMemoryTaskStore, Tasks, TaskState
from server.messages import PropletAnnounce, ResultAck, TaskResult, TaskStart
from server.round_spec import Hyperparams, RoundSpec, validate, with_defaults
from server.topics import Topics
from tests.manager.fakes import FakeClock

TOPICS = Topics("unit", "fl")


@dataclass
class Rounds:
    """The coordinator's round calls, run by its own round rules (defaults; the deadline
    counts from the start, at 1000.0)."""

    configured: list[RoundSpec] = field(default_factory=list)
    started: list[str] = field(default_factory=list)
    rounds: dict[str, Round] = field(default_factory=dict)
    fail_configure: Exception | None = None

    async def configure_round(self, spec: RoundSpec) -> Round:
        self.configured.append(spec)
        if self.fail_configure is not None:
            raise self.fail_configure
        rnd = R.new_round(with_defaults(validate(spec)), spec.model_ref, (), 999.0)
        self.rounds[spec.round_id] = rnd
        return rnd

    async def start_round(self, round_id: str) -> Round:
        self.started.append(round_id)
        rnd = self.rounds[round_id] = R.start_round(self.rounds[round_id], 1000.0)
        return rnd

    async def get_round_status(self, round_id: str) -> Round:
        raise NotFound(f"round_id: {round_id!r}")


@dataclass
class Broker:
    published: list[tuple[str, bytes]] = field(default_factory=list)
    unreachable: set[str] = field(default_factory=set)  # proplet ids whose starts fail

    async def publish(self, topic: str, payload: bytes) -> None:
        if TOPICS.is_task_start(topic) and TaskStart.from_json(payload).proplet_id in (
            self.unreachable
        ):
            raise Unavailable("mqtt: publish failed: broker gone")
        self.published.append((topic, payload))

    def on(self, topic: str) -> list[bytes]:
        return [p for t, p in self.published if t == topic]


@dataclass
class World:
    manager: Manager
    rounds: Rounds
    broker: Broker
    clock: FakeClock


@pytest.fixture
def world() -> World:
    clock = FakeClock()
    rounds, broker = Rounds(), Broker()
    manager = Manager(
        proplets=Proplets(InMemoryPropletStore(), 30.0, clock),
        tasks=Tasks(InMemoryTaskStore(), clock),
        experiments=InMemoryExperimentStore(),
        rounds=rounds,
        publish=broker.publish,
        topics=TOPICS,
        task_endpoints=Endpoints(),
        clock=clock,
    )
    return World(manager, rounds, broker, clock)


BASE = RoundSpec(
    experiment_id="",
    round_id="r1",
    model_ref="fl/models/global_model_v0",
    participants=(),
    hyperparams=Hyperparams(epochs=1, lr=0.01, batch_size=16),
    k_of_n=0,
    timeout_s=30,
    task_wasm_image="reg:5000/fl:latest",
)


def config(participants: list[str], **kw: Any) -> RoundSpec:
    return replace(BASE, participants=tuple(participants), **kw)


async def announce(world: World, *ids: str) -> None:
    for pid in ids:
        await world.manager.handle_message(
            TOPICS.proplet_create_for(pid), PropletAnnounce(pid).to_json()
        )


async def test_no_live_participant_configures_nothing(world: World) -> None:
    await announce(world, "old")
    world.clock.advance(31)
    with pytest.raises(FailedPrecondition) as exc:
        await world.manager.start_experiment(config(["old", "ghost"]))
    assert str(exc.value).startswith("participants: none of the 2 participants is alive")
    assert "ghost: unknown proplet" in str(exc.value)
    assert "old: not alive (last seen 31.0 s ago)" in str(exc.value)
    assert world.rounds.configured == []
    assert world.broker.published == []
    assert world.manager.tasks.find() == []
    assert world.manager.list_experiments() == []


async def test_k_of_n_and_timeout_reach_the_round_and_the_tasks(world: World) -> None:
    await announce(world, "p1", "p2", "p3")
    started = await world.manager.start_experiment(config(["p1", "p2", "p3"], k_of_n=2))
    (spec,) = world.rounds.configured
    assert (spec.k_of_n, spec.timeout_s) == (2, 30.0)
    assert spec.participants == ("p1", "p2", "p3")
    assert spec.hyperparams == Hyperparams(epochs=1, lr=0.01, batch_size=16)
    assert world.rounds.started == ["r1"]
    assert (started.round.k_of_n, started.round.timeout_s) == (2, 30.0)
    assert started.round.deadline == 1030.0
    assert started.experiment.experiment_id == "exp-r1"
    # Only task starts are published, each to its proplet's own topic, and each carries the
    # round's deadline and hyperparameters.
    assert sorted(t for t, _ in world.broker.published) == [
        TOPICS.task_start_for(p) for p in ("p1", "p2", "p3")
    ]
    for _, payload in world.broker.published:
        env = TaskStart.from_json(payload).env
        assert env["ROUND_DEADLINE"] == repr(1030.0)
        assert json.loads(env["HYPERPARAMS"]) == {"epochs": 1, "lr": 0.01, "batch_size": 16}


async def test_duplicate_experiment_id_is_already_exists(world: World) -> None:
    await announce(world, "p1")
    await world.manager.start_experiment(config(["p1"], experiment_id="e"))
    with pytest.raises(AlreadyExists, match="experiment_id"):
        await world.manager.start_experiment(config(["p1"], experiment_id="e", round_id="r2"))
    assert len(world.rounds.configured) == 1


async def test_coordinator_refusal_leaves_no_tasks_or_experiment(world: World) -> None:
    await announce(world, "p1")
    world.rounds.fail_configure = AlreadyExists("Coordinator.ConfigureRound: round exists")
    with pytest.raises(AlreadyExists):
        await world.manager.start_experiment(config(["p1"]))
    assert world.rounds.started == []
    assert world.broker.published == []
    assert world.manager.tasks.find() == []
    with pytest.raises(NotFound, match="experiment_id"):
        world.manager.get_experiment("exp-r1")


async def test_undeliverable_task_start_is_reported_not_claimed(world: World) -> None:
    await announce(world, "p1", "p2")
    world.broker.unreachable = {"p2"}
    started = await world.manager.start_experiment(config(["p1", "p2"]))
    assert [s.proplet_id for s in started.experiment.scheduled] == ["p1"]
    (skipped,) = started.experiment.skipped
    assert skipped.proplet_id == "p2"
    assert skipped.reason.startswith("task start not delivered: mqtt: publish failed")
    (failed,) = world.manager.tasks.find(name_prefix="fl-round-r1-p2")
    assert failed.state is TaskState.FAILED and "not delivered" in failed.error


async def test_start_task_publish_failure_leaves_task_pending(world: World) -> None:
    task = world.manager.tasks.create("t", image_url="x", proplet_id="p9")
    world.broker.unreachable = {"p9"}
    with pytest.raises(Unavailable):
        await world.manager.start_task(task.id)
    assert world.manager.tasks.get(task.id).state is TaskState.PENDING


async def test_malformed_mqtt_payloads_are_dropped(world: World) -> None:
    m = world.manager
    await m.handle_message(TOPICS.proplet_create_for("p1"), b"not json")
    await m.handle_message(TOPICS.proplet_alive_for("p1"), b'{"name": "no id"}')
    await m.handle_message(TOPICS.proplet_alive_for("p1"), b"[1, 2]")
    bogus = b'{"task_id": "t", "state": "Exploded"}'
    assert await m.handle_message(TOPICS.proplet_results_for("p1"), bogus) is None
    unknown = TaskResult("nope", "p1", "Running")
    # Well-formed: acknowledged (the proplet stops sending it), though it changes nothing.
    ack = await m.handle_message(TOPICS.proplet_results_for("p1"), unknown.to_json())
    assert ack == ResultAck("nope", 0, "Running")
    assert m.proplets.all() == []
    await announce(world, "p1")
    assert [p.id for p in m.proplets.all()] == ["p1"]


async def test_skipped_participants_listed_beside_scheduled(world: World) -> None:
    await announce(world, "p1")
    started = await world.manager.start_experiment(config(["ghost", "p1"]))
    assert started.experiment.skipped == [Skipped("ghost", "unknown proplet")]
    (spec,) = world.rounds.configured
    assert spec.participants == ("p1",) and spec.k_of_n == 1
    assert world.rounds.started == ["r1"]
