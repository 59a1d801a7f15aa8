"""What the manager does with its state: react to proplet messages, start and stop tasks, run
an experiment's round from configuration to one started task per live participant, and tell
the coordinator when a round's participant can no longer report.

StartExperiment survives a crash: the experiment (request, participants, task ids) is on disk
before anything leaves the manager, the fan-out (round configured and opened, tasks created,
starts published) is idempotent step by step, and `run_fan_outs` finishes any recorded
experiment whose fan-out did not (after a restart, or after the coordinator was unreachable).
A repeated request gets the same answer (the same experiment and tasks).

On PostgreSQL it is one of its replicas (`server.manager.replicas`: `fresh`, `task_lock`).

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
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field, replace
from typing import Any

from server import metrics, tracing
from server.config import Endpoints
from server.coordinator.rounds import Round, RoundState
from server.errors import (
    FailedPrecondition,
    InvalidArgument,
    PropellerError,
    Unavailable,
)
from server.faults import crash_point
from server.manager.coordinator import RoundService
from server.manager.experiments import (
    End,
    EventKind,
    Experiment,
    ExperimentEvent,
    ExperimentEvents,
    ExperimentState,
    ExperimentStore,
    FanOut,
    RoundRecord,
    ScheduledParticipant,
    participant_task,
    round_of,
    same_request,
)
from server.manager.failures import TRANSIENT, failure_of, report_failure
from server.manager.modules import Modules, pin_module
from server.manager.participants import first_round, plan_round
from server.manager.plan import (
    EndReason,
    ExperimentPlan,
    check_experiment,
)
from server.manager.proplets import Proplets, Skipped
from server.manager.records import require
from server.manager.replicas import Replica, ReplicaStore, events_between, recorded_elsewhere
from server.manager.tasks import Task, Tasks, TaskState
from server.messages import PropletAnnounce, ResultAck, TaskResult
from server.round_spec import RoundSpec
from server.topics import Report, Topics

log = logging.getLogger(__name__)

Publish = Callable[[str, bytes], Awaitable[None]]


async def _nothing_pending() -> None:
    return None


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
    # Resolves an experiment's task_wasm_image to the module it pins (`server.manager.modules`).
    modules: Modules
    clock: Callable[[], float] = time.time
    # Reconciliation (`reconcile`): a task without ROUND_DEADLINE is interrupted this long
    # after its start if no final result came; a round task this long after its deadline; a
    # start no proplet has reported on is sent again this often.
    task_deadline_s: float = 900.0
    report_grace_s: float = 30.0
    start_resend_s: float = 10.0
    _resent: dict[str, float] = field(default_factory=dict, init=False, repr=False)
    # Waits until every change made to the stores so far is on disk (`ManagerApp.persisted`).
    persisted: Callable[[], Awaitable[None]] = _nothing_pending
    # On PostgreSQL, this manager among its replicas and the state they share
    # (`server.manager.replicas`); None: the only manager.
    replica: Replica | None = None
    shared: ReplicaStore | None = None
    # Backoff of the background retries (fan-outs, failure reports): doubling up to the cap.
    retry_initial_s: float = 0.2
    retry_max_s: float = 5.0
    # Task starts of one fan-out in flight at once. Each is a QoS 1 publish whose timeout
    # counts from the call; thousands at once queue behind the MQTT client's own in-flight
    # window and time out before they are even sent (3,000 at once did, on a loaded machine:
    # docs/benchmarks.md, "Fleet"). A window keeps each publish's timeout for its delivery.
    start_window: int = 64
    # The fan-out in flight per experiment id: a repeated request, or `run_fan_outs`, joins it.
    _fan_outs: dict[str, asyncio.Task[ExperimentStarted]] = field(
        default_factory=dict, init=False, repr=False
    )
    # Set when a recorded experiment may need its fan-out finished (`run_fan_outs`).
    _fan_outs_due: asyncio.Event = field(default_factory=asyncio.Event, init=False, repr=False)
    _background: set[asyncio.Task[None]] = field(default_factory=set, init=False, repr=False)
    # WatchExperiment's events (round started / finished, experiment ended).
    events: ExperimentEvents = field(default_factory=ExperimentEvents, init=False, repr=False)
    # Set when an experiment may need its loop (`server.manager.driver`) started.
    experiments_due: asyncio.Event = field(default_factory=asyncio.Event, init=False, repr=False)
    # Set whenever a task reaches a final state (an experiment's evaluation waits on it).
    task_finished: asyncio.Event = field(default_factory=asyncio.Event, init=False, repr=False)

    def __post_init__(self) -> None:
        self._fan_outs_due.set()  # at start: whatever a crash left recorded

    # --- replicas --------------------------------------------------------------------------

    async def fresh(self) -> None:
        """With replicas: the stores take what the others changed since they last looked, and
        WatchExperiment hears of the experiments that moved on elsewhere."""
        if self.shared is None:
            return
        for old, new in await self.shared.refresh():
            for kind, rnd in events_between(old, new):
                self.emit(kind, new, rnd)

    def task_lock(self, task_id: str) -> AbstractAsyncContextManager[None]:
        """Around a task's read-modify-write: with replicas, the task's lock (the task fresh
        inside); else nothing."""
        if self.shared is None:
            return contextlib.nullcontext()
        return self.shared.task_lock(task_id)

    async def leased(self, eid: str) -> bool:
        """Whether this manager may drive `eid` (taking its lease if free); no replicas: yes."""
        if self.shared is None or self.replica is None:
            return True
        replica = self.replica
        return await self.shared.claim(eid, replica.replica_id, self.clock(), replica.lease_s)

    # --- MQTT intake ---------------------------------------------------------------------

    async def handle_message(self, topic: str, payload: bytes) -> tuple[str, ResultAck] | None:
        """Handler for the manager's MQTT subscriptions (`Topics.reports`): what a proplet
        says, checked against the proplet whose topic it came on. Returns, for a task result,
        the proplet to acknowledge it to and the acknowledgement, to publish once the state is
        on disk; malformed payloads are dropped (and not acknowledged)."""
        report = self.topics.parse_report(topic)
        if report is None:
            log.debug("[Manager.mqtt] topic=%s: not ours; ignored", topic)
            return None
        kind, sender = report
        try:
            if kind is Report.RESULTS:
                result = TaskResult.from_json(payload)
                async with self.task_lock(result.task_id):
                    task = self._apply_result(sender, result)
                if task is not None:
                    self._task_ended(task)
                    if task.state.final:
                        self.task_finished.set()
                return sender, ResultAck.of(result)
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
            async with self.task_lock(task.id):
                ended = self.tasks.reconcile(task.id, why)
            if ended is not None:
                log.warning(
                    "[Manager.reconcile] task_id=%s name=%s: %s", ended.id, ended.name, ended.error
                )
                self._task_ended(ended)
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
        with tracing.task_start(task.id, task.proplet_id):
            await self.publish(topic, tracing.carried(task.start_message()).to_json())
        log.info(
            "[Manager.StartTask] task_id=%s name=%s proplet_id=%s attempt=%d published",
            task.id,
            task.name,
            task.proplet_id or "*",
            task.attempt,
        )
        crash_point("manager.task_start_published")

    async def start_task(self, task_id: str) -> Task:
        async with self.task_lock(task_id):
            scheduled, previous = self.tasks.schedule(task_id)
            try:
                await self._publish_start(scheduled)
            except Unavailable:
                self.tasks.unschedule(previous)
                raise
        # A fast proplet may already have reported Running.
        return self.tasks.get(task_id)

    async def stop_task(self, task_id: str) -> Task:
        async with self.task_lock(task_id):
            task = self.tasks.check_stoppable(task_id)
            topic = self.topics.task_stop_for(task.proplet_id)
            await self.publish(topic, task.stop_message().to_json())
            log.info("[Manager.StopTask] task_id=%s proplet_id=%s", task.id, task.proplet_id or "*")
            task = self.tasks.interrupt(task_id)
        self._task_ended(task)
        return task

    # --- participants that cannot report -------------------------------------------------

    def _task_ended(self, task: Task) -> None:
        """A round task that failed or was interrupted: the coordinator is told, in the
        background (`server.manager.failures`)."""
        failure = failure_of(task, self.clock)
        if failure is None:
            return
        self._spawn(
            report_failure(
                self.rounds,
                failure,
                self.clock,
                retry_initial_s=self.retry_initial_s,
                retry_max_s=self.retry_max_s,
            ),
            f"report-{failure.round_id}-{failure.proplet_id}",
        )

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def aclose(self) -> None:
        """Cancel the background work (failure reports, fan-outs in flight: a recorded
        experiment's fan-out is finished at the next start)."""
        tasks: list[asyncio.Task[Any]] = [*self._background, *self._fan_outs.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- experiments ---------------------------------------------------------------------

    def end_experiment(self, eid: str, reason: EndReason, detail: str) -> Experiment:
        """Record that experiment `eid` ended after (or in) its current round (the caller
        awaits `persisted()`); an ended one is left as it is."""
        experiment = require(self.experiments, eid, "experiment")
        if not experiment.running:
            return experiment
        state = {
            EndReason.STOPPED: ExperimentState.STOPPED,
            EndReason.FAILED: ExperimentState.FAILED,
        }.get(reason, ExperimentState.COMPLETED)
        rnd = experiment.current_round
        ended = replace(
            experiment,
            state=state,
            end=End(reason, rnd.index, rnd.round_id, detail, self.clock()),
        )
        self.experiments.put(ended)
        log.info(
            "[Manager.experiments] experiment_id=%s ended after round %d: %s (%s)",
            eid,
            rnd.index,
            reason.value,
            detail,
        )
        self.emit(EventKind.ENDED, ended, None)
        return ended

    def get_experiment(self, experiment_id: str) -> Experiment:
        return require(self.experiments, experiment_id, "experiment")

    def list_experiments(self) -> list[Experiment]:
        return sorted(self.experiments.list(), key=lambda e: e.created_at)

    async def get_round_status(self, round_id: str) -> Round:
        if not round_id:
            raise InvalidArgument("round_id: must not be empty")
        return await self.rounds.get_round_status(round_id)

    async def start_experiment(
        self, request: RoundSpec, plan: ExperimentPlan | None = None
    ) -> ExperimentStarted:
        """Pin its module (`task_wasm_image` resolved to a digest: the round and its tasks run
        that module only), record the experiment (refused before anything is recorded when
        too few of its participants are alive), then fan its first round out; the same
        request again joins or repeats the answer (with the module pinned the first time), a
        different one with the same experiment id is ALREADY_EXISTS. The rounds after the
        first are the experiment loop's (`server.manager.driver`)."""
        plan = plan or ExperimentPlan()
        config = check_experiment(request, plan)
        eid = config.experiment_id
        experiment = self.experiments.get(eid)
        if experiment is None:
            module = await pin_module(self.modules, config)
            # A concurrent request may have recorded it while the module was resolved.
            experiment = self.experiments.get(eid)
            if experiment is None and not await self.leased(eid):
                # Another replica holds it: it records the experiment; its answer.
                started = await self._fanned_out_elsewhere(eid)
                same_request(started.experiment, config, plan)
                return started
            if experiment is None:
                experiment = plan_round(
                    self.proplets, first_round(config, plan, module, self.clock()), 1, config
                )
                crash_point("manager.before_record")
                # In memory at once (a concurrent repeat finds it); on disk before the fan-out
                # lets anything leave the manager.
                self.experiments.put(experiment)
                self.experiments_due.set()
        same_request(experiment, config, plan)
        return await tracing.experiment_started(eid, self.finish_fan_out(experiment))

    async def finish_fan_out(self, experiment: Experiment) -> ExperimentStarted:
        """The experiment's answer, after the fan-out of its current round (joining the one
        in flight, if any)."""
        if experiment.fan_out is FanOut.DONE:
            round_id = experiment.round_spec.round_id
            return ExperimentStarted(experiment, await self.rounds.get_round_status(round_id))
        eid = experiment.experiment_id
        task = self._fan_outs.get(eid)
        if task is None and self.shared is not None:
            await self.persisted()  # recorded before its lease is taken
            if not await self.leased(eid):
                return await self._fanned_out_elsewhere(eid)
            task = self._fan_outs.get(eid)
        if task is None:
            fan_out = tracing.round_fan_out(
                experiment.round_spec.round_id, eid, len(experiment.rounds) <= 1, self._fan_out(eid)
            )
            task = asyncio.create_task(fan_out, name=f"fan-out-{eid}")
            self._fan_outs[eid] = task

            def done(t: asyncio.Task[ExperimentStarted]) -> None:
                if self._fan_outs.get(eid) is t:
                    del self._fan_outs[eid]
                if not t.cancelled() and isinstance(t.exception(), TRANSIENT):
                    self._fan_outs_due.set()  # `run_fan_outs` tries again

            task.add_done_callback(done)
        # A caller that goes away does not stop the fan-out.
        return await asyncio.shield(task)

    async def _fanned_out_elsewhere(self, eid: str) -> ExperimentStarted:
        """The answer once the replica that drives `eid` has recorded it and finished its
        fan-out, as the database shows it."""
        experiment = await recorded_elsewhere(
            self, eid, lambda e: e is not None and (e.fan_out is FanOut.DONE or not e.running)
        )
        assert experiment is not None
        if not experiment.running and experiment.fan_out is not FanOut.DONE:
            raise FailedPrecondition(
                f"experiment_id: {eid!r} is {experiment.state.value}; its round "
                f"{experiment.round_spec.round_id!r} is not started"
            )
        return await self.finish_fan_out(experiment)

    async def fan_out_settled(self, eid: str) -> None:
        """Wait for the fan-out of `eid` in flight, if any, to end (however it ends)."""
        task = self._fan_outs.get(eid)
        if task is not None:
            await asyncio.wait({task})

    def plan_round(self, experiment: Experiment, index: int, spec: RoundSpec) -> Experiment:
        """`experiment` with round `index` recorded as its current round
        (`server.manager.participants.plan_round`)."""
        return plan_round(self.proplets, experiment, index, spec)

    def emit(self, kind: EventKind, experiment: Experiment, rnd: RoundRecord | None) -> None:
        self.events.emit(ExperimentEvent(kind, experiment, rnd, self.clock()))

    async def _fan_out(self, eid: str) -> ExperimentStarted:
        """Configure and open the round, create the tasks, publish their starts, mark the
        experiment DONE. Every step may have been done before (by a call the manager died
        in): the coordinator answers a repeated configuration with the round as it is, a task
        already created is not created again, a start that may have left is published again
        unless its participant has reported (the proplet ignores a start it holds)."""
        await self.persisted()  # the record is on disk before the round or a task exists
        fan_out_began = time.perf_counter()
        experiment = require(self.experiments, eid, "experiment")
        if not experiment.running:  # stopped before its round went out: nothing goes out
            raise FailedPrecondition(
                f"experiment_id: {eid!r} is {experiment.state.value}; its round "
                f"{experiment.round_spec.round_id!r} is not started"
            )
        config = experiment.round_spec
        try:
            rnd = await self.rounds.configure_round(
                round_of(experiment),
                strategy_name=experiment.plan.strategy_name,
                strategy_params_json=experiment.plan.strategy_params_json,
            )
            crash_point("manager.round_configured")
            if rnd.state is RoundState.PENDING:
                # The deadline counts from here, the moment the proplets are told about the
                # round: it reaches each task as ROUND_DEADLINE, beside the HYPERPARAMS.
                rnd = await self.rounds.start_round(config.round_id)
        except TRANSIENT as exc:
            raise type(exc)(
                f"{exc} (experiment {eid!r} is recorded and its start is retried; repeat the "
                "call for its answer)"
            ) from exc
        except PropellerError as exc:
            if len(experiment.rounds) > 1:
                # A later round refused: the experiment ends there, failed, saying why.
                self.end_experiment(
                    eid, EndReason.FAILED, f"round {config.round_id!r} not configured: {exc}"
                )
                await self.persisted()
                raise
            # The coordinator refused the round (no such model, the round id taken by another
            # configuration...): the request is not accepted, nothing of it is kept.
            self.experiments.delete(eid)
            await self.persisted()
            raise
        crash_point("manager.round_started")

        tasks = [self._round_task(experiment, s, rnd) for s in experiment.scheduled]
        closed = (
            f"round {config.round_id!r} is {rnd.state.value} before the task started"
            if rnd.finished  # it ended while the manager was down: nothing to start
            else ""
        )
        not_started = await self.launch(tasks, done=set(rnd.reported), closed=closed)
        for proplet_id, reason in not_started.items():
            log.warning(
                "[Manager.StartExperiment] round_id=%s proplet_id=%s: %s",
                config.round_id,
                proplet_id,
                reason,
            )
        # The record as it is now (the operator may have stopped the experiment meanwhile).
        latest = require(self.experiments, eid, "experiment")
        scheduled = [s for s in experiment.scheduled if s.proplet_id not in not_started]
        current = replace(
            latest.current_round,
            sampled=tuple(s.proplet_id for s in scheduled),
            started_at=rnd.started_at,
        )
        done = replace(
            latest,
            scheduled=scheduled,
            skipped=[*experiment.skipped, *(Skipped(p, r) for p, r in not_started.items())],
            fan_out=FanOut.DONE,
            rounds=(*latest.rounds[:-1], current) if latest.rounds else (),
        )
        self.experiments.put(done)
        await self.persisted()
        self.emit(EventKind.ROUND_STARTED, done, done.current_round)
        metrics.phase_took("fan_out", fan_out_began)
        log.info(
            "[Manager.StartExperiment] experiment_id=%s round_id=%s scheduled=%d skipped=%d "
            "k_of_n=%d min_k_of_n=%d timeout_s=%g",
            eid,
            config.round_id,
            len(done.scheduled),
            len(done.skipped),
            rnd.k_of_n,
            rnd.min_k_of_n,
            rnd.timeout_s,
        )
        return ExperimentStarted(done, rnd)

    async def launch(self, tasks: list[Task], *, done: set[str], closed: str) -> dict[str, str]:
        """Start `tasks` (one per proplet, created under recorded ids), each step repeatable
        after a crash: a PENDING task is scheduled (on disk) and its start published; a
        SCHEDULED one whose proplet is not in `done` (has not reported) is published again,
        the same attempt (a proplet ignores a start it holds); with `closed` (why the work is
        over) a PENDING task is failed instead. Returns the proplets whose task did not
        start, with why (their task FAILED saying so)."""
        not_started: dict[str, str] = {}
        starts: list[Task] = []
        for task in tasks:
            if task.state is TaskState.PENDING:
                if closed:
                    not_started[task.proplet_id] = closed
                else:
                    starts.append(self.tasks.schedule(task.id)[0])
            elif task.state is TaskState.SCHEDULED and task.proplet_id not in done:
                starts.append(task)
        # Every start that leaves is SCHEDULED on disk first: after a crash, a task that
        # may have run is never taken for one that never started.
        await self.persisted()
        window = asyncio.Semaphore(self.start_window)

        async def publish(task: Task) -> None:
            async with window:
                await self._publish_start(task)

        outcomes = await asyncio.gather(*(publish(t) for t in starts), return_exceptions=True)
        for task, outcome in zip(starts, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                if not isinstance(outcome, Exception):
                    raise outcome
                not_started[task.proplet_id] = f"task start not delivered: {outcome}"
        by_proplet = {t.proplet_id: t for t in tasks}
        for proplet_id, reason in not_started.items():
            self._task_ended(self.tasks.fail(by_proplet[proplet_id].id, reason))
        return not_started

    def evaluation_task(
        self, experiment: Experiment, rnd: RoundRecord, s: ScheduledParticipant
    ) -> Task:
        """The evaluation task of `s` after round `rnd` (the model it stored, FL_TASK=evaluate,
        the evaluation's deadline as ROUND_DEADLINE), created under the id the record holds
        unless it exists."""
        return participant_task(
            self.tasks,
            self.task_endpoints,
            experiment,
            experiment.config,
            s,
            round_id=rnd.round_id,
            model_uri=rnd.new_model_uri,
            deadline=rnd.eval_deadline,
            module_digest=experiment.module_digest,
            evaluate=True,
        )

    def _round_task(self, experiment: Experiment, s: ScheduledParticipant, rnd: Round) -> Task:
        """The participant's task, created under the id the experiment recorded for it unless
        an earlier fan-out did."""
        config = experiment.round_spec
        return participant_task(
            self.tasks,
            self.task_endpoints,
            experiment,
            config,
            s,
            round_id=config.round_id,
            model_uri=rnd.model_ref or config.model_ref,
            deadline=rnd.deadline,
            module_digest=rnd.module_digest or experiment.module_digest,
        )

    async def run_fan_outs(self) -> None:
        """Forever: finish the fan-out of every experiment recorded but not DONE: at start
        (the manager died during a StartExperiment), and after one failed because the
        coordinator was unreachable, retrying with backoff while it still is. Cancel to stop."""
        delay = self.retry_initial_s
        while True:
            await self._fan_outs_due.wait()
            self._fan_outs_due.clear()
            again = False
            for experiment in self.experiments.list():
                if experiment.fan_out is not FanOut.RECORDED or not experiment.running:
                    continue
                eid = experiment.experiment_id
                try:
                    started = await self.finish_fan_out(experiment)
                except TRANSIENT as exc:
                    again = True
                    log.warning("[Manager.fan-out] experiment_id=%s not finished: %s", eid, exc)
                except PropellerError as exc:
                    log.error("[Manager.fan-out] experiment_id=%s refused, removed: %s", eid, exc)
                except Exception:
                    again = True
                    log.exception("[Manager.fan-out] experiment_id=%s failed", eid)
                else:
                    log.info(
                        "[Manager.fan-out] experiment_id=%s finished: scheduled=%d skipped=%d",
                        eid,
                        len(started.experiment.scheduled),
                        len(started.experiment.skipped),
                    )
            if again:
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry_max_s)
                self._fan_outs_due.set()
            else:
                delay = self.retry_initial_s
