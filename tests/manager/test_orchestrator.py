"""The manager's orchestration with its two boundaries (MQTT publish, coordinator) replaced by
recording fakes: what gets published, what gets configured, and what happens when either
side fails."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import pytest

from server.config import Endpoints
from server.coordinator import rounds as R
from server.coordinator.rounds import Round
from server.errors import AlreadyExists, FailedPrecondition, NotFound, Unavailable
from server.manager.experiments import Experiment, FanOut, InMemoryExperimentStore
from server.manager.modules import PinnedModule
from server.manager.orchestrator import Manager
from server.manager.proplets import InMemoryPropletStore, Proplets, Skipped
from server.manager.tasks import InMemoryTaskStore, Tasks, TaskState
from server.messages import PropletAnnounce, ResultAck, TaskResult, TaskStart
from server.round_spec import Hyperparams, RoundSpec, validate, with_defaults
from server.topics import Topics
from tests.manager.fakes import FakeClock
from tests.support.waits import eventually

T = TypeVar("T")

TOPICS = Topics("unit", "fl")


@dataclass
class Rounds:
    """The coordinator's round calls, run by its own round rules (defaults; the deadline
    counts from the start, at 1000.0; a repeated configuration answers the round as it is)."""

    configured: list[RoundSpec] = field(default_factory=list)
    started: list[str] = field(default_factory=list)
    rounds: dict[str, Round] = field(default_factory=dict)
    failures: list[tuple[str, str, str]] = field(default_factory=list)
    fail_configure: Exception | None = None
    # Set on every change a test makes (what `watch_round` waits for).
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    # What every watch fails with (a watch that timed out, a coordinator restarting).
    watch_fails: Exception | None = None

    async def configure_round(
        self, spec: RoundSpec, *, strategy_name: str = "", strategy_params_json: str = ""
    ) -> Round:
        self.configured.append(spec)
        if self.fail_configure is not None:
            raise self.fail_configure
        cfg = with_defaults(validate(spec))
        rnd = self.rounds.get(spec.round_id)
        if rnd is not None:
            R.check_same_config(rnd, cfg)
            return rnd
        rnd = R.new_round(cfg, spec.model_ref, (), 999.0)
        self.rounds[spec.round_id] = rnd
        return rnd

    async def start_round(self, round_id: str) -> Round:
        self.started.append(round_id)
        rnd = self.rounds[round_id] = R.start_round(self.rounds[round_id], 1000.0)
        return rnd

    async def get_round_status(self, round_id: str) -> Round:
        return R.require_round(self.rounds.get(round_id), round_id)

    async def watch_round(self, round_id: str, timeout_s: float) -> AsyncGenerator[Round, None]:
        if self.watch_fails is not None:
            raise self.watch_fails
        while True:
            self.changed.clear()
            rnd = await self.get_round_status(round_id)
            yield rnd
            if rnd.finished:
                return
            await self.changed.wait()

    def complete(self, round_id: str, version: int, metrics: dict[str, float]) -> None:
        """The round completes, storing `version` (what aggregation would do)."""
        uri = f"fl/models/global_model_v{version}"
        rnd = self.rounds[round_id]
        self.rounds[round_id] = R.complete(rnd, version, uri, metrics, 2000.0)
        self.changed.set()

    def fail(self, round_id: str, reason: str) -> None:
        self.rounds[round_id] = R.fail(self.rounds[round_id], reason, 2000.0)
        self.changed.set()

    async def report_failure(self, round_id: str, proplet_id: str, reason: str) -> R.RoundState:
        self.failures.append((round_id, proplet_id, reason))
        rnd = R.participant_failed(await self.get_round_status(round_id), proplet_id, reason, 1.0)
        self.rounds[round_id] = rnd
        return rnd.state


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


# What every image pins to in these tests: its manifest, and the module's digest.
MANIFEST = "sha256:" + "ab" * 32
MODULE = "sha256:" + "cd" * 32


@dataclass
class Modules:
    """The registry as StartExperiment sees it: every image resolves to MANIFEST / MODULE."""

    asked: list[str] = field(default_factory=list)

    async def pin(self, image: str) -> PinnedModule:
        self.asked.append(image)
        return PinnedModule(f"{image}@{MANIFEST}", MODULE)


@dataclass
class World:
    manager: Manager
    rounds: Rounds
    broker: Broker
    clock: FakeClock
    modules: Modules


@pytest.fixture
def world() -> World:
    clock = FakeClock()
    rounds, broker, modules = Rounds(), Broker(), Modules()
    manager = Manager(
        proplets=Proplets(InMemoryPropletStore(), 30.0, clock),
        tasks=Tasks(InMemoryTaskStore(), clock),
        experiments=InMemoryExperimentStore(),
        rounds=rounds,
        publish=broker.publish,
        topics=TOPICS,
        task_endpoints=Endpoints(),
        modules=modules,
        clock=clock,
    )
    return World(manager, rounds, broker, clock, modules)


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


async def test_the_round_and_its_tasks_run_the_module_pinned_at_the_start(world: World) -> None:
    await announce(world, "p1", "p2")
    request = config(["p1", "p2"], experiment_id="e")
    started = await world.manager.start_experiment(request)
    pinned = f"{BASE.task_wasm_image}@{MANIFEST}"
    (spec,) = world.rounds.configured
    assert (spec.task_wasm_image, spec.module_digest) == (pinned, MODULE)
    assert (started.round.task_wasm_image, started.round.module_digest) == (pinned, MODULE)
    for _, payload in world.broker.published:
        start = TaskStart.from_json(payload)
        assert (start.image_url, start.env["MODULE_DIGEST"]) == (pinned, MODULE)
    # The experiment keeps the request as asked; a repeat is not resolved again (the tag
    # may have moved: the experiment runs what it pinned).
    assert world.manager.get_experiment("e").config == validate(request, experiment=True)
    await world.manager.start_experiment(request)
    assert world.modules.asked == [BASE.task_wasm_image]


async def test_an_image_that_resolves_to_another_module_than_asked_is_refused(
    world: World,
) -> None:
    await announce(world, "p1")
    other = "sha256:" + "ef" * 32
    with pytest.raises(FailedPrecondition) as exc:
        await world.manager.start_experiment(config(["p1"], module_digest=other))
    assert str(exc.value) == (
        f"module_digest: {BASE.task_wasm_image} resolves to module {MODULE}, not {other}"
    )
    assert world.rounds.configured == [] and world.manager.list_experiments() == []
    started = await world.manager.start_experiment(config(["p1"], module_digest=MODULE))
    assert started.round.module_digest == MODULE


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


async def test_a_big_fan_out_holds_at_most_its_window_of_starts_in_flight(
    world: World,
) -> None:
    """A slow broker: each start waits for its acknowledgement. 200 participants go out
    `start_window` at a time, never all at once, and every one of them is delivered."""
    world.manager.start_window = 16
    in_flight, peak = 0, 0

    async def slow_publish(topic: str, payload: bytes) -> None:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.001)
        in_flight -= 1
        world.broker.published.append((topic, payload))

    world.manager.publish = slow_publish
    ids = [f"p{i}" for i in range(200)]
    await announce(world, *ids)
    started = await world.manager.start_experiment(config(ids))
    assert len(started.experiment.scheduled) == 200 and started.experiment.skipped == []
    starts = {TaskStart.from_json(p).proplet_id for t, p in world.broker.published}
    assert starts == set(ids)
    assert peak == 16


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
    assert ack == ("p1", ResultAck("nope", 0, "Running"))
    assert m.proplets.all() == []
    await announce(world, "p1")
    assert [p.id for p in m.proplets.all()] == ["p1"]


async def test_skipped_participants_listed_beside_scheduled(world: World) -> None:
    await announce(world, "p1")
    started = await world.manager.start_experiment(config(["ghost", "p1"], k_of_n=1))
    assert started.experiment.skipped == [Skipped("ghost", "unknown proplet")]
    (spec,) = world.rounds.configured
    assert spec.participants == ("p1",) and spec.k_of_n == 1
    assert world.rounds.started == ["r1"]


# ---- a repeated request, too few alive, a fan-out cut short ----------------------------


def answer(started: Any) -> tuple[Any, ...]:
    e = started.experiment
    return (e.experiment_id, e.config, list(e.scheduled), list(e.skipped), e.created_at)


async def test_a_repeated_request_gets_the_same_answer_and_starts_nothing_again(
    world: World,
) -> None:
    await announce(world, "p1", "p2")
    request = config(["p1", "p2", "ghost"], k_of_n=2, experiment_id="e")
    first = await world.manager.start_experiment(request)
    world.clock.advance(100)  # later, and "ghost" still unknown
    again = await world.manager.start_experiment(request)
    assert answer(again) == answer(first)
    assert again.round.round_id == "r1"
    assert len(world.rounds.configured) == 1 and world.rounds.started == ["r1"]
    assert len(world.broker.published) == 2
    assert len(world.manager.tasks.find()) == 2
    # The same request after every proplet died too: still the same answer.
    world.clock.advance(100)
    assert answer(await world.manager.start_experiment(request)) == answer(first)


async def test_a_different_request_with_the_same_id_names_what_differs(world: World) -> None:
    await announce(world, "p1")
    await world.manager.start_experiment(config(["p1"], experiment_id="e"))
    with pytest.raises(AlreadyExists) as exc:
        await world.manager.start_experiment(config(["p1"], experiment_id="e", timeout_s=31))
    assert str(exc.value) == "experiment_id: 'e' already exists with a different timeout_s"


async def test_fewer_alive_than_k_of_n_is_refused_unless_min_k_of_n_allows(world: World) -> None:
    await announce(world, "p1", "p2", "p3")
    world.clock.advance(20)
    await announce(world, "p1", "p2")  # p3 has been silent for 20 s, then 40 s
    world.clock.advance(20)
    with pytest.raises(FailedPrecondition) as exc:
        await world.manager.start_experiment(config(["p1", "p2", "p3"], k_of_n=3))
    assert "k_of_n 3 needs 3 live participants, 2 of 3 are alive" in str(exc.value)
    assert "p3: not alive (last seen 40.0 s ago)" in str(exc.value)
    assert world.rounds.configured == [] and world.manager.list_experiments() == []
    assert world.broker.published == []

    started = await world.manager.start_experiment(
        config(["p1", "p2", "p3"], k_of_n=3, min_k_of_n=2)
    )
    (spec,) = world.rounds.configured
    assert (spec.participants, spec.k_of_n, spec.min_k_of_n) == (("p1", "p2"), 2, 2)
    assert [s.proplet_id for s in started.experiment.skipped] == ["p3"]
    assert started.experiment.config.min_k_of_n == 2  # the request as asked, for a repeat


async def fanned_out(manager: Manager, experiment_id: str) -> Experiment:
    """Run the manager's recovery (`run_fan_outs`) until the experiment's fan-out is done."""
    fan_outs = asyncio.create_task(manager.run_fan_outs())
    try:
        return await eventually(
            lambda: _async(manager.get_experiment(experiment_id)),
            lambda e: e.fan_out is FanOut.DONE,
            what=f"the fan-out of {experiment_id} finished",
        )
    finally:
        fan_outs.cancel()
        await asyncio.gather(fan_outs, return_exceptions=True)


async def test_an_unreachable_coordinator_leaves_the_experiment_to_be_finished(
    world: World,
) -> None:
    m = world.manager
    await announce(world, "p1", "p2")
    world.rounds.fail_configure = Unavailable("Coordinator.ConfigureRound: connection refused")
    with pytest.raises(Unavailable) as exc:
        await m.start_experiment(config(["p1", "p2"]))
    assert "experiment 'exp-r1' is recorded and its start is retried" in str(exc.value)
    recorded = m.get_experiment("exp-r1")
    assert recorded.fan_out is FanOut.RECORDED and m.tasks.find() == []
    world.rounds.fail_configure = None  # the coordinator is back
    done = await fanned_out(m, "exp-r1")
    assert done.scheduled == recorded.scheduled  # the task ids recorded before the fan-out
    assert {t.id for t in m.tasks.find()} == {s.task_id for s in recorded.scheduled}
    assert {t.state for t in m.tasks.find()} == {TaskState.SCHEDULED}
    assert len(world.broker.published) == 2


async def test_a_fan_out_stopped_half_way_is_finished_by_the_next_manager(world: World) -> None:
    """The manager stops (cancelled, as at shutdown) after one of three task starts went out;
    another manager over the same stores finishes the fan-out from the record: the round is
    opened once, every start whose participant has not reported is sent (again: the
    proplet ignores a start it holds), and the experiment keeps its task ids."""
    m = world.manager
    await announce(world, "p1", "p2", "p3")
    gate = asyncio.Event()
    published_one = asyncio.Event()

    async def stalls_after_one(topic: str, payload: bytes) -> None:
        if world.broker.published:
            await gate.wait()  # never set: the broker hangs
        await world.broker.publish(topic, payload)
        published_one.set()

    m.publish = stalls_after_one
    call = asyncio.create_task(m.start_experiment(config(["p1", "p2", "p3"])))
    await asyncio.wait_for(published_one.wait(), 5)
    await m.aclose()  # cancels the fan-out in flight
    call.cancel()
    await asyncio.gather(call, return_exceptions=True)
    recorded = m.get_experiment("exp-r1")
    assert recorded.fan_out is FanOut.RECORDED
    [first] = world.broker.published

    again = replace(m, publish=world.broker.publish)  # same stores, a new manager
    done = await fanned_out(again, "exp-r1")
    assert [s.task_id for s in done.scheduled] == [s.task_id for s in recorded.scheduled]
    assert world.rounds.started == ["r1"]  # opened once; the repeat found it open
    # All three were scheduled (on disk) before any start left: each start is sent (again)
    # as attempt 1, since none of the participants has reported yet.
    sent = TaskStart.from_json(first[1]).proplet_id
    starts = [TaskStart.from_json(p) for _, p in world.broker.published]
    assert sorted((s.proplet_id, s.attempt) for s in starts) == sorted(
        [(sent, 1), ("p1", 1), ("p2", 1), ("p3", 1)]
    )
    assert {t.state for t in again.tasks.find()} == {TaskState.SCHEDULED}


async def test_a_failed_round_task_is_reported_to_the_coordinator(world: World) -> None:
    m = world.manager
    await announce(world, "p1", "p2")
    started = await m.start_experiment(config(["p1", "p2"], k_of_n=2))
    t1 = started.experiment.scheduled[0]
    failed = TaskResult(t1.task_id, "p1", "Failed", error="fetch module: no such file", attempt=1)
    await m.handle_message(TOPICS.proplet_results_for("p1"), failed.to_json())
    await eventually(lambda: _async(world.rounds.failures), what="the failure reported")
    assert world.rounds.failures == [("r1", "p1", "fetch module: no such file")]
    assert world.rounds.rounds["r1"].state is R.RoundState.FAILED  # 1 of 2 left < k_of_n 2
    # A stopped task is a participant that will not report either.
    t2 = started.experiment.scheduled[1]
    await m.stop_task(t2.task_id)
    await eventually(lambda: _async(len(world.rounds.failures) == 2), what="the stop reported")
    assert world.rounds.failures[1][:2] == ("r1", "p2")


async def _async(value: T) -> T:
    return value


# --- MQTT intake by topic identity; reconciliation (issue 9 item 4, issue 10 item 1) ------


async def test_an_announcement_counts_only_for_the_proplet_whose_topic_it_came_on(
    world: World,
) -> None:
    m = world.manager
    forged = PropletAnnounce("victim", "forged").to_json()
    assert await m.handle_message(TOPICS.proplet_create_for("evil"), forged) is None
    assert await m.handle_message(TOPICS.proplet_alive_for("evil"), forged) is None
    # The seed's shared topics carry no identity: not read.
    await m.handle_message(f"{TOPICS.base}/control/proplet/create", forged)
    assert m.proplets.all() == []


async def test_a_result_counts_only_from_the_proplet_the_task_is_assigned_to(
    world: World,
) -> None:
    m = world.manager
    await announce(world, "p1", "p2")
    started = await m.start_experiment(config(["p1"], k_of_n=1))
    [s] = started.experiment.scheduled
    for topic_of, claimed in (("p2", "p1"), ("p2", "p2"), ("p2", ""), ("p1", "p2")):
        forged = TaskResult(s.task_id, claimed, "Completed", results="forged", attempt=1)
        ack = await m.handle_message(TOPICS.proplet_results_for(topic_of), forged.to_json())
        # Handled: acknowledged to its sender, which stops sending it.
        assert ack == (topic_of, ResultAck(s.task_id, 1, "Completed"))
    assert m.tasks.get(s.task_id).state is TaskState.SCHEDULED
    # The assigned proplet, naming itself or not (older peers): recorded.
    real = TaskResult(s.task_id, "", "Completed", results="real", attempt=1)
    await m.handle_message(TOPICS.proplet_results_for("p1"), real.to_json())
    task = m.tasks.get(s.task_id)
    assert (task.state, task.results, task.reported_by) == (TaskState.COMPLETED, "real", "p1")


async def test_reconcile_sends_a_start_nobody_reported_on_again(world: World) -> None:
    m = world.manager
    world.clock.now = 1000.0  # the fake coordinator's round starts then: well before its end
    await announce(world, "p1")
    started = await m.start_experiment(config(["p1"], k_of_n=1))
    [s] = started.experiment.scheduled
    topic = TOPICS.task_start_for("p1")
    assert len(world.broker.on(topic)) == 1
    world.clock.advance(m.start_resend_s - 1)
    await m.reconcile()
    assert len(world.broker.on(topic)) == 1  # not yet
    world.clock.advance(2)
    await m.reconcile()
    await m.reconcile()  # once per interval
    again = world.broker.on(topic)
    assert len(again) == 2 and again[1] == again[0]  # the same start, the same attempt
    # Reported on: never sent again.
    running = TaskResult(s.task_id, "p1", "Running", attempt=1)
    await m.handle_message(TOPICS.proplet_results_for("p1"), running.to_json())
    world.clock.advance(m.start_resend_s * 3)
    await m.reconcile()
    assert len(world.broker.on(topic)) == 2


async def test_reconcile_interrupts_an_overdue_round_task_and_tells_the_coordinator(
    world: World,
) -> None:
    m = world.manager
    await announce(world, "p1")
    started = await m.start_experiment(config(["p1"], k_of_n=1, timeout_s=30))
    [s] = started.experiment.scheduled
    running = TaskResult(s.task_id, "p1", "Running", attempt=1)
    await m.handle_message(TOPICS.proplet_results_for("p1"), running.to_json())
    deadline = float(m.tasks.get(s.task_id).env["ROUND_DEADLINE"])
    world.clock.now = deadline + m.report_grace_s + 1
    await m.reconcile()
    task = m.tasks.get(s.task_id)
    assert task.state is TaskState.INTERRUPTED
    assert task.error.startswith("interrupted: no result from p1 by the round's deadline")
    await eventually(lambda: _async(world.rounds.failures), what="the failure reported")
    assert world.rounds.failures == [("r1", "p1", task.error)]
