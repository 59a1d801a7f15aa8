"""What the manager does with its state: react to proplet messages, start and stop tasks, and
run an experiment's round from configuration to one started task per live participant.

MQTT publishing and the coordinator are injected (`Publish`, `RoundService`, both in domain
terms), so this is testable with plain fakes; `ManagerApp` wires in the real ones.

MQTT intake trusts the topic, not the payload: a proplet reports on topics that end in its own
id, which the broker lets only that proplet publish to (`server.mqtt_acl`). An announcement or
heartbeat whose payload names another proplet, and a task result for a task assigned to
another proplet, are dropped. Every well-formed result is acknowledged to its sender once
handled (`ResultAck`), so the proplet stops sending it again; `reconcile` (run periodically)
sends again the starts of tasks no proplet has reported on yet and interrupts the tasks left
SCHEDULED or RUNNING past their deadline.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

from server.config import Endpoints
from server.coordinator.rounds import Round
from server.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    Unavailable,
)
from server.manager.coordinator import RoundService
from server.manager.experiments import (
    Experiment,
    ExperimentStore,
    ScheduledParticipant,
    effective_k_of_n,
    round_task_env,
    round_task_name,
)
from server.manager.proplets import Proplets, Skipped
from server.manager.records import require
from server.manager.tasks import Task, Tasks
from server.messages import PropletAnnounce, ResultAck, TaskResult
from server.round_spec import RoundSpec, validate
from server.topics import Report, Topics

log = logging.getLogger(__name__)

Publish = Callable[[str, bytes], Awaitable[None]]


@dataclass(frozen=True)
class ExperimentStarted:
    experiment: Experiment
    round: Round


@dataclass(kw_only=True, eq=False)
class Manager:
    """The manager's behaviour over its stores; what it talks to is given as fields, so a
    test builds it from plain fakes."""

    proplets: Proplets
    tasks: Tasks
    experiments: ExperimentStore
    rounds: RoundService
    publish: Publish
    topics: Topics
    task_endpoints: Endpoints
    clock: Callable[[], float] = time.time
    # Reconciliation (`reconcile`): a task without ROUND_DEADLINE is interrupted this long
    # after its start if no final result came; a round task this long after its deadline; a
    # start no proplet has reported on is sent again this often.
    task_deadline_s: float = 900.0
    report_grace_s: float = 30.0
    start_resend_s: float = 10.0
    _resent: dict[str, float] = field(default_factory=dict, init=False, repr=False)
    # Experiment ids whose StartExperiment is in flight, so two concurrent calls with one
    # id cannot both pass the existence check while the first awaits the coordinator.
    _starting: set[str] = field(default_factory=set, init=False, repr=False)

    # --- MQTT intake ---------------------------------------------------------------------

    async def handle_message(self, topic: str, payload: bytes) -> ResultAck | None:
        """Handler for the manager's MQTT subscriptions (`Topics.reports`): what a proplet
        says, checked against the proplet whose topic it came on. Returns the acknowledgement
        of a task result, to publish to its sender once the state is on disk; malformed
        payloads are dropped (and not acknowledged)."""
        report = self.topics.parse_report(topic)
        if report is None:
            log.debug("[Manager.mqtt] topic=%s: not ours; ignored", topic)
            return None
        kind, sender = report
        try:
            if kind is Report.RESULTS:
                result = TaskResult.from_json(payload)
                self._apply_result(sender, result)
                return ResultAck.of(result)
            announce = PropletAnnounce.from_json(payload)
        except ValueError as exc:
            log.warning("[Manager.mqtt] topic=%s: malformed payload dropped: %s", topic, exc)
            return None
        if announce.proplet_id != sender:
            log.warning(
                "[Manager.proplets] topic=%s: proplet %s announced itself as %s; dropped",
                topic,
                sender,
                announce.proplet_id,
            )
            return None
        known = self.proplets.store.get(announce.proplet_id) is not None
        proplet = self.proplets.announce(announce)
        if not known:
            log.info(
                "[Manager.proplets] proplet_id=%s name=%s registered", proplet.id, proplet.name
            )
        return None

    def _apply_result(self, sender: str, result: TaskResult) -> Task | None:
        """Apply a result `sender` published (its payload may leave proplet_id out)."""
        if result.proplet_id not in ("", sender):
            log.warning(
                "[Manager.results] task_id=%s: proplet %s reported as %s; dropped",
                result.task_id,
                sender,
                result.proplet_id,
            )
            return None
        return self.tasks.apply_result(replace(result, proplet_id=sender))

    # --- reconciliation ------------------------------------------------------------------

    async def reconcile(self) -> None:
        """Send again the starts no proplet has reported on for `start_resend_s` (a start
        lost with a broker that died: a proplet ignores one it already has, and sends its
        result again instead), and interrupt the tasks left SCHEDULED or RUNNING past their
        deadline (`Tasks.overdue`), saying why."""
        now = self.clock()
        overdue = self.tasks.overdue(
            now, task_deadline_s=self.task_deadline_s, grace_s=self.report_grace_s
        )
        for task, why in overdue:
            ended = self.tasks.reconcile(task.id, why)
            if ended is not None:
                log.warning(
                    "[Manager.reconcile] task_id=%s name=%s: %s", ended.id, ended.name, ended.error
                )
        late = {t.id for t, _ in overdue}
        unstarted = [t for t in self.tasks.unstarted(now - self.start_resend_s) if t.id not in late]
        self._resent = {t.id: self._resent[t.id] for t in unstarted if t.id in self._resent}
        for task in unstarted:
            if now - self._resent.get(task.id, -math.inf) < self.start_resend_s:
                continue
            self._resent[task.id] = now
            try:
                await self._publish_start(task)
            except Unavailable as exc:
                log.warning(
                    "[Manager.reconcile] task_id=%s: start not sent again: %s", task.id, exc
                )

    # --- tasks ---------------------------------------------------------------------------

    async def _publish_start(self, task: Task) -> None:
        topic = self.topics.task_start_for(task.proplet_id)
        await self.publish(topic, task.start_message().to_json())
        log.info(
            "[Manager.StartTask] task_id=%s name=%s proplet_id=%s attempt=%d published",
            task.id,
            task.name,
            task.proplet_id or "*",
            task.attempt,
        )

    async def start_task(self, task_id: str) -> Task:
        scheduled, previous = self.tasks.schedule(task_id)
        try:
            await self._publish_start(scheduled)
        except Unavailable:
            self.tasks.unschedule(previous)
            raise
        # A fast proplet may already have reported Running.
        return self.tasks.get(task_id)

    async def stop_task(self, task_id: str) -> Task:
        task = self.tasks.check_stoppable(task_id)
        topic = self.topics.task_stop_for(task.proplet_id)
        await self.publish(topic, task.stop_message().to_json())
        log.info("[Manager.StopTask] task_id=%s proplet_id=%s", task.id, task.proplet_id or "*")
        return self.tasks.interrupt(task_id)

    # --- experiments ---------------------------------------------------------------------

    def get_experiment(self, experiment_id: str) -> Experiment:
        return require(self.experiments, experiment_id, "experiment")

    def list_experiments(self) -> list[Experiment]:
        return sorted(self.experiments.list(), key=lambda e: e.created_at)

    async def get_round_status(self, round_id: str) -> Round:
        if not round_id:
            raise InvalidArgument("round_id: must not be empty")
        return await self.rounds.get_round_status(round_id)

    async def start_experiment(self, request: RoundSpec) -> ExperimentStarted:
        config = validate(request, experiment=True)
        eid = config.experiment_id
        if eid in self._starting or self.experiments.get(eid) is not None:
            raise AlreadyExists(f"experiment_id: {eid!r} already exists")
        self._starting.add(eid)
        try:
            return await self._start_experiment(config)
        finally:
            self._starting.discard(eid)

    async def _start_experiment(self, config: RoundSpec) -> ExperimentStarted:
        n = len(config.participants)
        participants, skipped = self.proplets.split(config.participants)
        for s in skipped:
            log.warning(
                "[Manager.StartExperiment] round_id=%s proplet_id=%s skipped: %s",
                config.round_id,
                s.proplet_id,
                s.reason,
            )
        if not participants:
            reasons = "; ".join(f"{s.proplet_id}: {s.reason}" for s in skipped)
            raise FailedPrecondition(
                f"participants: none of the {n} participants is alive: {reasons}"
            )

        # The coordinator is given the scheduled participants only, and a k_of_n they can reach.
        await self.rounds.configure_round(
            replace(
                config,
                participants=tuple(participants),
                k_of_n=effective_k_of_n(config.k_of_n, len(participants)),
            )
        )
        # The deadline counts from here, the moment the proplets are told about the round: it
        # reaches each task as ROUND_DEADLINE, beside the HYPERPARAMS.
        status = await self.rounds.start_round(config.round_id)
        model_uri = status.model_ref or config.model_ref

        tasks = [
            self.tasks.create(
                round_task_name(config.round_id, pid),
                image_url=config.task_wasm_image,
                env=round_task_env(
                    round_id=config.round_id,
                    model_uri=model_uri,
                    hyperparams=config.hyperparams,
                    proplet_id=pid,
                    endpoints=self.task_endpoints,
                    deadline=status.deadline,
                ),
                proplet_id=pid,
            )
            for pid in participants
        ]
        outcomes = await asyncio.gather(
            *(self._start_round_task(t) for t in tasks), return_exceptions=True
        )
        scheduled: list[ScheduledParticipant] = []
        for task, outcome in zip(tasks, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                if not isinstance(outcome, Exception):
                    raise outcome
                reason = f"task start not delivered: {outcome}"
                self.tasks.fail(task.id, reason)
                skipped.append(Skipped(task.proplet_id, reason))
                log.warning(
                    "[Manager.StartExperiment] round_id=%s proplet_id=%s: %s",
                    config.round_id,
                    task.proplet_id,
                    reason,
                )
            else:
                scheduled.append(ScheduledParticipant(task.proplet_id, task.id, task.name))

        experiment = Experiment(
            experiment_id=config.experiment_id,
            config=config,
            scheduled=scheduled,
            skipped=skipped,
            created_at=self.clock(),
        )
        self.experiments.put(experiment)
        log.info(
            "[Manager.StartExperiment] experiment_id=%s round_id=%s scheduled=%d skipped=%d "
            "k_of_n=%d timeout_s=%g",
            experiment.experiment_id,
            config.round_id,
            len(scheduled),
            len(skipped),
            status.k_of_n,
            status.timeout_s,
        )
        return ExperimentStarted(experiment, status)

    async def _start_round_task(self, task: Task) -> None:
        scheduled, previous = self.tasks.schedule(task.id)
        try:
            await self._publish_start(scheduled)
        except BaseException:
            self.tasks.unschedule(previous)
            raise
