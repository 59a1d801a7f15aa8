"""The experiment loop: round after round, by itself, until the experiment ends.

The manager drives experiments (not the coordinator): it already owns them, the proplets
that are alive (what sampling chooses from) and the crash-safe fan-out of a round
(`Manager.finish_fan_out`); the coordinator keeps owning each round. Nothing calls from the
coordinator to the manager: the manager learns that a round finished from the coordinator's
`WatchRound` stream (the round's full status: reported participants, metrics, the version
stored, or why it failed), and after a broken stream or a restart from `GetRoundStatus`.
The MQTT round-complete notice is not used: it says nothing of failed rounds nor of metrics.

With replicas (`server.manager.replicas`) a replica drives only the experiments whose lease
it holds, and carries on a dead replica's from their records once their leases expire.

One driver task per running experiment repeats one step, each idempotent and each reading
the experiment's record first, so a restart (or a retry after an error) resumes where the
record says:

1. current round recorded, fan-out not done -> finish the fan-out (`finish_fan_out`);
2. current round fanned out, not finished -> wait for its end, record its outcome;
3. current round finished -> end the experiment (the round failed; `plan.verdict`: max
   rounds, target, plateau) or record round r + 1 (sampled now, its task ids chosen, from the
   version round r stored) in one write, then fan it out.

Round r + 1's id is derived from the experiment and r + 1 (`plan.round_id_for`) and it is
recorded before anything of it leaves the manager: a crash before that write plans it again
(no part of it exists anywhere), a crash after finds it recorded. So no round runs twice and
none is skipped; the coordinator stores one version per round.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass, field, replace

from server.coordinator.rounds import Round, RoundState
from server.errors import FailedPrecondition, PropellerError, Unavailable
from server.faults import crash_point
from server.lifecycle import cancel_and_wait
from server.manager.experiments import (
    EventKind,
    Experiment,
    FanOut,
    RoundRecord,
    ScheduledParticipant,
    eval_task_name,
)
from server.manager.orchestrator import Manager
from server.manager.plan import (
    EndReason,
    Evaluation,
    MetricSource,
    Sampling,
    round_id_for,
    sample,
    verdict,
    weighted_metrics,
)
from server.manager.proplets import Skipped
from server.manager.records import require
from server.manager.replicas import Replica, ReplicaStore, recorded_elsewhere
from server.manager.tasks import STOPPABLE, TaskState
from server.round_spec import DEFAULT_TIMEOUT_S

log = logging.getLogger(__name__)

# How long past a round's timeout one watch of it lasts (aggregation, storing the version).
WATCH_MARGIN_S = 60.0


@dataclass(eq=False)
class ExperimentLoop:
    """Drives every running experiment of `manager` (`run`, until cancelled), and stops one
    on request (`stop`)."""

    manager: Manager
    # How often a round that waits for alive proplets looks again.
    poll_s: float = 0.5
    _drivers: dict[str, asyncio.Task[None]] = field(default_factory=dict, init=False)
    # With replicas: experiments being stopped here, and the tasks that stop them.
    _stopping: set[str] = field(default_factory=set, init=False)
    _background: set[asyncio.Task[None]] = field(default_factory=set, init=False)

    async def run(self) -> None:
        """Forever: a driver for each running experiment without one (at start: every one the
        store holds; then each new one); with replicas, for each one this replica holds the
        lease of (`_run_leased`). Cancel to stop."""
        m = self.manager
        m.experiments_due.set()
        try:
            if m.shared is not None and m.replica is not None:
                await self._run_leased(m.shared, m.replica)
            while True:
                await m.experiments_due.wait()
                m.experiments_due.clear()
                for e in m.experiments.list():
                    if e.running and e.experiment_id not in self._drivers:
                        self._start(e.experiment_id)
        finally:
            await self.aclose()

    async def _run_leased(self, shared: ReplicaStore, replica: Replica) -> None:
        """Forever, every `lease_s / 3` (or when an experiment is new here): renew the leases
        of the experiments driven here (a driver whose lease was lost stops; one whose stop
        was asked for on another replica is stopped), then claim the running experiments
        whose lease is free or expired and drive them."""
        m = self.manager
        owner, lease_s = replica.replica_id, replica.lease_s
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(m.experiments_due.wait(), lease_s / 3)
            m.experiments_due.clear()
            try:
                for eid in list(self._drivers):
                    held, stop = await shared.renew(eid, owner, m.clock(), lease_s)
                    if not held:
                        log.warning(
                            "[Manager.experiments] experiment_id=%s: lease lost; another "
                            "replica drives it",
                            eid,
                        )
                        driver = self._drivers.pop(eid, None)
                        if driver is not None:
                            await cancel_and_wait(driver)
                    elif stop and eid not in self._stopping:
                        task = asyncio.create_task(self._stop_here(eid), name=f"stop-{eid}")
                        self._background.add(task)
                        task.add_done_callback(self._background.discard)
                claimed = await shared.claim_due(owner, m.clock(), lease_s)
                if claimed:
                    await m.fresh()  # what the previous holder wrote
                for eid in claimed:
                    experiment = m.experiments.get(eid)
                    if eid in self._drivers or eid in self._stopping or experiment is None:
                        continue
                    if not experiment.running:
                        continue
                    log.info(
                        "[Manager.experiments] experiment_id=%s driven by replica %s (round %d)",
                        eid,
                        owner,
                        experiment.round_index,
                    )
                    self._start(eid)
            except Exception:  # the database unreachable...: logged, tried again
                log.exception("[Manager.experiments] leases not renewed or claimed")

    async def _stop_here(self, eid: str) -> None:
        try:
            await self.stop(eid)
        except Exception:
            log.exception("[Manager.StopExperiment] experiment_id=%s not stopped", eid)

    def _start(self, eid: str) -> None:
        task = asyncio.create_task(self._drive(eid), name=f"experiment-{eid}")
        self._drivers[eid] = task

        def done(t: asyncio.Task[None]) -> None:
            if self._drivers.get(eid) is t:
                del self._drivers[eid]

        task.add_done_callback(done)

    async def aclose(self) -> None:
        drivers = [*self._drivers.values(), *self._background]
        self._drivers.clear()
        for task in drivers:
            await cancel_and_wait(task)

    async def stop(self, eid: str) -> Experiment:
        """StopExperiment: the experiment ends STOPPED after its current round's fan-out (if
        one is in flight), and that round's tasks still scheduled or running are stopped. An
        ended experiment is answered as it is."""
        m = self.manager
        experiment = require(m.experiments, eid, "experiment")
        if not experiment.running:
            return experiment
        if eid not in self._drivers and not await m.leased(eid):
            return await self._stopped_elsewhere(eid)
        # No driver starts for it meanwhile (with replicas, the lease loop would).
        stopping = eid not in self._stopping
        self._stopping.add(eid)
        try:
            return await self._stop_driven(eid)
        finally:
            if stopping:
                self._stopping.discard(eid)

    async def _stop_driven(self, eid: str) -> Experiment:
        m = self.manager
        driver = self._drivers.pop(eid, None)
        if driver is not None:
            await cancel_and_wait(driver)
        await m.fan_out_settled(eid)
        experiment = m.end_experiment(eid, EndReason.STOPPED, "stopped by the operator")
        await m.persisted()
        for s in (*experiment.scheduled, *experiment.current_round.eval_tasks):
            task = m.tasks.store.get(s.task_id)
            if task is None or task.state not in STOPPABLE:
                continue
            try:
                await m.stop_task(task.id)
            except PropellerError as exc:  # its round's deadline ends it anyway
                log.warning("[Manager.StopExperiment] task_id=%s not stopped: %s", task.id, exc)
        await m.persisted()
        return require(m.experiments, eid, "experiment")

    async def _stopped_elsewhere(self, eid: str) -> Experiment:
        """StopExperiment for an experiment another replica drives: ask it to stop (it reads
        the request when it renews its lease) and answer once the record says it ended."""
        m = self.manager
        assert m.shared is not None
        await m.shared.request_stop(eid)
        ended = await recorded_elsewhere(m, eid, lambda e: e is None or not e.running)
        return ended or require(m.experiments, eid, "experiment")

    async def _drive(self, eid: str) -> None:
        m = self.manager
        delay = m.retry_initial_s
        while True:
            try:
                await m.fresh()
            except Exception as exc:  # the database unreachable: tried again
                log.warning("[Manager.experiments] experiment_id=%s not read: %s", eid, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, m.retry_max_s)
                continue
            experiment = m.experiments.get(eid)
            if experiment is None or not experiment.running:
                return
            try:
                await self._step(experiment)
            except Exception as exc:  # every failure is logged and retried
                log.warning(
                    "[Manager.experiments] experiment_id=%s round %d: %s; retrying in %.1f s",
                    eid,
                    experiment.round_index,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, m.retry_max_s)
            else:
                delay = m.retry_initial_s

    async def _step(self, experiment: Experiment) -> None:
        current = experiment.current_round
        if experiment.fan_out is FanOut.RECORDED:
            await self.manager.finish_fan_out(experiment)
        elif not current.finished:
            # A round ends by its deadline at the latest: one watch lasts that long and a
            # minute for aggregation, then the round's status is looked at again.
            bound = (experiment.round_spec.timeout_s or DEFAULT_TIMEOUT_S) + WATCH_MARGIN_S
            outcome = await self._outcome(current.round_id, bound)
            await self._record_outcome(experiment.experiment_id, outcome)
        else:
            await self._after_round(experiment)

    async def _outcome(self, round_id: str, timeout_s: float) -> Round:
        """The round once finished: from the coordinator's stream, or, when the stream fails
        (the coordinator restarting) or times out, from its status if finished by then (else
        the error, and the driver tries again)."""
        rounds = self.manager.rounds
        try:
            async with contextlib.aclosing(rounds.watch_round(round_id, timeout_s)) as events:
                async for rnd in events:
                    if rnd.finished:
                        return rnd
        except PropellerError:
            rnd = await rounds.get_round_status(round_id)
            if rnd.finished:
                return rnd
            raise
        raise Unavailable(f"round_id: the watch of {round_id!r} ended before the round did")

    async def _record_outcome(self, eid: str, rnd: Round) -> None:
        m = self.manager
        experiment = require(m.experiments, eid, "experiment")
        current = experiment.current_round
        if not experiment.running or current.finished or current.round_id != rnd.round_id:
            return
        current = replace(
            current,
            state=rnd.state,
            new_model_version=rnd.new_model_version or 0,
            new_model_uri=rnd.new_model_uri,
            reported=tuple(rnd.reported),
            closed_by=rnd.closed_by,
            failure_reason=rnd.failure_reason,
            train_metrics=dict(rnd.metrics),
            finished_at=rnd.completed_at or m.clock(),
        )
        experiment = self._with_current(experiment, current)
        m.experiments.put(experiment)
        await m.persisted()
        crash_point("manager.round_outcome_recorded")
        log.info(
            "[Manager.experiments] experiment_id=%s round %d (%s) %s: version=%d reported=%d",
            eid,
            current.index,
            current.round_id,
            rnd.state.value,
            current.new_model_version,
            len(current.reported),
        )
        m.emit(EventKind.ROUND_FINISHED, experiment, current)

    async def _after_round(self, experiment: Experiment) -> None:
        """The current round is finished: end the experiment, or record the next round and
        fan it out."""
        m = self.manager
        eid = experiment.experiment_id
        last = experiment.current_round
        if last.state is RoundState.FAILED:
            m.end_experiment(
                eid,
                EndReason.FAILED,
                f"round {last.index} ({last.round_id}) failed: {last.failure_reason}",
            )
            await m.persisted()
            return
        if experiment.plan.evaluation.due(last.index) and not last.eval_done:
            await self._evaluate(experiment)
            return
        source = experiment.plan.stopping.source
        metrics = [
            r.eval_metrics if source is MetricSource.EVALUATION else r.train_metrics
            for r in experiment.rounds
            if r.finished
        ]
        ends = verdict(experiment.plan, last.index, metrics)
        if ends is not None:
            m.end_experiment(eid, ends.reason, ends.detail)
            await m.persisted()
            return
        index = last.index + 1
        spec = replace(
            experiment.config,
            round_id=round_id_for(eid, index),
            model_ref=last.new_model_uri,
        )
        # Too few proplets alive: wait for them, up to the round's timeout.
        give_up = m.clock() + (experiment.config.timeout_s or DEFAULT_TIMEOUT_S)
        while True:
            experiment = require(m.experiments, eid, "experiment")
            if not experiment.running:
                return
            try:
                planned = m.plan_round(experiment, index, spec)
                break
            except FailedPrecondition as exc:
                if m.clock() >= give_up:
                    m.end_experiment(eid, EndReason.FAILED, f"round {index} could not start: {exc}")
                    await m.persisted()
                    return
                log.info("[Manager.experiments] experiment_id=%s waiting: %s", eid, exc)
                await asyncio.sleep(self.poll_s)
        m.experiments.put(planned)
        await m.persisted()
        crash_point("manager.next_round_recorded")
        await m.finish_fan_out(planned)

    async def _evaluate(self, experiment: Experiment) -> None:
        """Federated evaluation of the model the current round stored: tasks on a sample of
        the alive candidates (`plan.evaluation.fraction`), recorded before they start; their
        results awaited until all are in or the evaluation's deadline; the sample-weighted
        metrics recorded with the round. Those without a usable result are listed with why."""
        m = self.manager
        eid = experiment.experiment_id
        plan = experiment.plan
        last = experiment.current_round
        if not last.eval_tasks:
            candidates = experiment.config.participants or tuple(p.id for p in m.proplets.all())
            alive, _ = m.proplets.split(candidates)
            chosen = sample(
                Sampling(fraction=plan.evaluation.fraction, seed=plan.sampling.seed),
                alive,
                last.index,
            )
            timeout = plan.evaluation.timeout_s or experiment.config.timeout_s or DEFAULT_TIMEOUT_S
            last = replace(
                last,
                eval_tasks=tuple(
                    ScheduledParticipant(pid, str(uuid.uuid4()), eval_task_name(last.round_id, pid))
                    for pid in chosen
                ),
                eval_deadline=m.clock() + timeout,
                eval_done=not chosen,
            )
            experiment = self._with_current(experiment, last)
            m.experiments.put(experiment)
            await m.persisted()
            if not chosen:
                log.warning(
                    "[Manager.experiments] experiment_id=%s round %d: no alive proplet to "
                    "evaluate on",
                    eid,
                    last.index,
                )
                m.emit(EventKind.ROUND_EVALUATED, experiment, last)
                return
        tasks = [m.evaluation_task(experiment, last, s) for s in last.eval_tasks]
        closed = "" if m.clock() < last.eval_deadline else "the evaluation's deadline passed"
        await m.launch(tasks, done={t.proplet_id for t in tasks if t.state.final}, closed=closed)
        while True:
            m.task_finished.clear()
            await m.fresh()  # results applied by other replicas
            tasks = [m.tasks.get(s.task_id) for s in last.eval_tasks]
            left = last.eval_deadline - m.clock()
            if all(t.state.final for t in tasks) or left <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(m.task_finished.wait(), min(self.poll_s, left))
        evaluations: list[Evaluation] = []
        evaluated: list[str] = []
        missing: list[Skipped] = []
        for task in tasks:
            if task.state is TaskState.COMPLETED:
                try:
                    evaluations.append(Evaluation.from_json(task.results))
                    evaluated.append(task.proplet_id)
                except ValueError as exc:
                    missing.append(Skipped(task.proplet_id, f"results not an evaluation: {exc}"))
            elif task.state.final:
                missing.append(
                    Skipped(task.proplet_id, task.error or f"task {task.state.value.lower()}")
                )
            else:
                missing.append(Skipped(task.proplet_id, "no result by the evaluation's deadline"))
        last = replace(
            last,
            eval_metrics=weighted_metrics(evaluations),
            eval_num_samples=sum(e.num_samples for e in evaluations),
            evaluated=tuple(evaluated),
            eval_missing=tuple(missing),
            eval_done=True,
        )
        experiment = self._with_current(require(m.experiments, eid, "experiment"), last)
        m.experiments.put(experiment)
        await m.persisted()
        log.info(
            "[Manager.experiments] experiment_id=%s round %d evaluated on %d proplet(s): %s",
            eid,
            last.index,
            len(evaluated),
            dict(last.eval_metrics),
        )
        m.emit(EventKind.ROUND_EVALUATED, experiment, last)

    @staticmethod
    def _with_current(experiment: Experiment, current: RoundRecord) -> Experiment:
        return replace(experiment, rounds=(*experiment.rounds[:-1], current))
