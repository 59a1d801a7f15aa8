"""The manager's orchestration with its two boundaries (MQTT publish, coordinator) replaced by
recording fakes: what gets published, what gets configured, and what happens when either
side fails."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from propeller.v1 import coordinator_pb2
from server.config import Endpoints
from server.errors import AlreadyExists, FailedPrecondition, NotFound, Unavailable
from server.manager.experiments import ExperimentConfig, Hyperparams, InMemoryExperimentStore
from server.manager.orchestrator import Manager
from server.manager.proplets import InMemoryPropletStore, Proplets, Skipped
from server.manager.tasks import InMemoryTaskStore, Tasks, TaskState
from server.messages import PropletAnnounce, TaskResult, TaskStart
from server.topics import Topics
from tests.manager.fakes import FakeClock

TOPICS = Topics("unit", "fl")


@dataclass
class Rounds:
    configured: list[coordinator_pb2.ConfigureRoundRequest] = field(default_factory=list)
    started: list[str] = field(default_factory=list)
    fail_configure: Exception | None = None

    async def configure_round(
        self, request: coordinator_pb2.ConfigureRoundRequest
    ) -> coordinator_pb2.RoundStatus:
        self.configured.append(request)
        if self.fail_configure is not None:
            raise self.fail_configure
        return coordinator_pb2.RoundStatus(round_id=request.round_id)

    async def start_round(self, round_id: str) -> coordinator_pb2.RoundStatus:
        self.started.append(round_id)
        req = self.configured[-1]
        return coordinator_pb2.RoundStatus(
            round_id=round_id,
            state=coordinator_pb2.ROUND_STATE_OPEN,
            k_of_n=req.k_of_n,
            participants=req.participants,
            model_ref=req.model_ref,
            timeout_s=req.timeout_s or 60.0,
            started_at=1000.0,
            deadline=1000.0 + (req.timeout_s or 60.0),
        )

    async def get_round_status(self, round_id: str) -> coordinator_pb2.RoundStatus:
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


BASE = ExperimentConfig(
    experiment_id="",
    round_id="r1",
    model_ref="fl/models/global_model_v0",
    participants=[],
    hyperparams=Hyperparams(epochs=1, lr=0.01, batch_size=16),
    k_of_n=0,
    timeout_s=30,
    task_wasm_image="reg:5000/fl:latest",
)


def config(participants: list[str], **kw: Any) -> ExperimentConfig:
    return replace(BASE, participants=participants, **kw)


async def announce(world: World, *ids: str) -> None:
    for pid in ids:
        await world.manager.handle_message(TOPICS.proplet_create, PropletAnnounce(pid).to_json())


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


async def test_round_start_carries_configured_k_timeout_and_deadline(world: World) -> None:
    await announce(world, "p1", "p2", "p3")
    started = await world.manager.start_experiment(config(["p1", "p2", "p3"], k_of_n=2))
    (payload,) = world.broker.on(TOPICS.round_start)
    msg = json.loads(payload)
    assert (msg["k_of_n"], msg["timeout_s"], msg["deadline"]) == (2, 30.0, 1030.0)
    assert msg["participants"] == ["p1", "p2", "p3"]
    assert msg["hyperparams"] == {"epochs": 1, "lr": 0.01, "batch_size": 16}
    assert started.round.k_of_n == 2
    assert started.experiment.experiment_id == "exp-r1"
    # Round start published before the task starts.
    assert world.broker.published[0][0] == TOPICS.round_start
    # Each addressed start goes to its proplet's own topic.
    assert sorted(t for t, _ in world.broker.published if TOPICS.is_task_start(t)) == [
        TOPICS.task_start_for(p) for p in ("p1", "p2", "p3")
    ]


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
    await m.handle_message(TOPICS.proplet_create, b"not json")
    await m.handle_message(TOPICS.proplet_alive, b'{"name": "no id"}')
    await m.handle_message(TOPICS.proplet_alive, b"[1, 2]")
    await m.handle_message(TOPICS.proplet_results, b'{"task_id": "t", "state": "Exploded"}')
    await m.handle_message(TOPICS.proplet_results, TaskResult("nope", "p1", "Running").to_json())
    assert m.proplets.all() == []
    await announce(world, "p1")
    assert [p.id for p in m.proplets.all()] == ["p1"]


async def test_skipped_participants_listed_beside_scheduled(world: World) -> None:
    await announce(world, "p1")
    started = await world.manager.start_experiment(config(["ghost", "p1"]))
    assert started.experiment.skipped == [Skipped("ghost", "unknown proplet")]
    (req,) = world.rounds.configured
    assert list(req.participants) == ["p1"] and req.k_of_n == 1 and not req.start
