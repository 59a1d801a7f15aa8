"""The Manager gRPC servicer: proto <-> domain translation around `Manager`, nothing more."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeVar

from google.protobuf.message import Message

from propeller.v1 import coordinator_pb2, manager_pb2
from server.coordinator.wire import (
    STATES,
    answer_round,
    spec_fields,
    spec_from_proto,
    status_to_proto,
)
from server.errors import InvalidArgument, grpc_errors
from server.grpc_server import Context
from server.ids import (
    MAX_MODULE_BYTES,
    check_id,
    check_name,
    check_text,
    check_text_map,
    check_texts,
)
from server.manager.driver import ExperimentLoop
from server.manager.experiments import (
    EventKind,
    Experiment,
    ExperimentEvent,
    ExperimentState,
    RoundRecord,
)
from server.manager.orchestrator import Manager
from server.manager.plan import (
    EndReason,
    EvaluationPlan,
    ExperimentPlan,
    MetricGoal,
    MetricSource,
    Sampling,
    StoppingRule,
)
from server.manager.proplets import Proplet
from server.manager.tasks import Task, TaskState, matches
from server.paging import PAGE_BYTES, PagedRequest, page_in_order
from server.wire import message_from

_T = TypeVar("_T")
_R = TypeVar("_R")


def _listed(
    response: Callable[..., _R],
    field: str,
    request: PagedRequest,
    entries: Sequence[_T],
    to_proto: Callable[[_T], Message],
    keep: Callable[[_T], bool] | None = None,
) -> _R:
    """A List RPC's answer: the page `request` asks for of `entries` (creation order,
    `page_in_order`) in the response's repeated `field`, with the next page's token. The
    listing an error names is the response's name without "Response"."""
    listing = getattr(response, "__name__", "List").removesuffix("Response")
    page = page_in_order(request, listing, entries, to_proto, keep)
    return response(**{field: page.items}, next_page_token=page.next_page_token)


_TO_PROTO: dict[TaskState, manager_pb2.TaskState] = {
    TaskState.PENDING: manager_pb2.TASK_STATE_PENDING,
    TaskState.SCHEDULED: manager_pb2.TASK_STATE_SCHEDULED,
    TaskState.RUNNING: manager_pb2.TASK_STATE_RUNNING,
    TaskState.COMPLETED: manager_pb2.TASK_STATE_COMPLETED,
    TaskState.FAILED: manager_pb2.TASK_STATE_FAILED,
    TaskState.SKIPPED: manager_pb2.TASK_STATE_SKIPPED,
    TaskState.INTERRUPTED: manager_pb2.TASK_STATE_INTERRUPTED,
}
_FROM_PROTO: dict[int, TaskState] = {int(v): k for k, v in _TO_PROTO.items()}


def state_to_proto(state: TaskState) -> manager_pb2.TaskState:
    return _TO_PROTO[state]


def state_from_proto(value: int) -> TaskState | None:
    """None for TASK_STATE_UNSPECIFIED (no filter)."""
    if value == manager_pb2.TASK_STATE_UNSPECIFIED:
        return None
    try:
        return _FROM_PROTO[value]
    except KeyError:
        raise InvalidArgument(f"state: {value} is not a TaskState") from None


def task_to_proto(task: Task) -> manager_pb2.Task:
    return message_from(manager_pb2.Task, task, state=state_to_proto(task.state))


def _scheduled(e: Experiment) -> list[manager_pb2.ScheduledParticipant]:
    return [
        manager_pb2.ScheduledParticipant(
            proplet_id=s.proplet_id, task_id=s.task_id, task_name=s.task_name
        )
        for s in e.scheduled
    ]


def _skipped(e: Experiment) -> list[manager_pb2.SkippedParticipant]:
    return [
        manager_pb2.SkippedParticipant(proplet_id=s.proplet_id, reason=s.reason) for s in e.skipped
    ]


_EXPERIMENT_STATES = {
    ExperimentState.RUNNING: manager_pb2.EXPERIMENT_STATE_RUNNING,
    ExperimentState.COMPLETED: manager_pb2.EXPERIMENT_STATE_COMPLETED,
    ExperimentState.STOPPED: manager_pb2.EXPERIMENT_STATE_STOPPED,
    ExperimentState.FAILED: manager_pb2.EXPERIMENT_STATE_FAILED,
}
_END_REASONS = {
    EndReason.MAX_ROUNDS: manager_pb2.END_REASON_MAX_ROUNDS,
    EndReason.TARGET_REACHED: manager_pb2.END_REASON_TARGET_REACHED,
    EndReason.PLATEAU: manager_pb2.END_REASON_PLATEAU,
    EndReason.STOPPED: manager_pb2.END_REASON_STOPPED,
    EndReason.FAILED: manager_pb2.END_REASON_FAILED,
}
_SOURCES = {
    MetricSource.EVALUATION: manager_pb2.METRIC_SOURCE_EVALUATION,
    MetricSource.TRAINING: manager_pb2.METRIC_SOURCE_TRAINING,
}
_GOALS = {
    MetricGoal.MINIMIZE: manager_pb2.METRIC_GOAL_MINIMIZE,
    MetricGoal.MAXIMIZE: manager_pb2.METRIC_GOAL_MAXIMIZE,
}
_EVENTS = {
    EventKind.SNAPSHOT: manager_pb2.EXPERIMENT_EVENT_TYPE_SNAPSHOT,
    EventKind.ROUND_STARTED: manager_pb2.EXPERIMENT_EVENT_TYPE_ROUND_STARTED,
    EventKind.ROUND_FINISHED: manager_pb2.EXPERIMENT_EVENT_TYPE_ROUND_FINISHED,
    EventKind.ENDED: manager_pb2.EXPERIMENT_EVENT_TYPE_ENDED,
    EventKind.ROUND_EVALUATED: manager_pb2.EXPERIMENT_EVENT_TYPE_ROUND_EVALUATED,
}


def plan_from_proto(request: manager_pb2.StartExperimentRequest) -> ExperimentPlan:
    """The request's many-round fields (all unset: the seed's one round); INVALID_ARGUMENT
    naming the field that is out of range."""
    stop = request.stopping
    if stop.source not in (0, *_SOURCES.values()):
        raise InvalidArgument(f"stopping.source: {stop.source} is not a MetricSource")
    if stop.goal not in (0, *_GOALS.values()):
        raise InvalidArgument(f"stopping.goal: {stop.goal} is not a MetricGoal")
    sources: dict[int, MetricSource] = {int(v): k for k, v in _SOURCES.items()}
    goals: dict[int, MetricGoal] = {int(v): k for k, v in _GOALS.items()}
    if request.rounds < 0:
        raise InvalidArgument(f"rounds: {request.rounds} must be >= 0 (0 = 1)")
    return ExperimentPlan(
        rounds=request.rounds or 1,
        strategy_name=request.strategy_name,
        strategy_params_json=request.strategy_params_json,
        all_alive=request.all_alive,
        sampling=Sampling(
            fraction=request.sampling.fraction,
            count=request.sampling.count,
            min_available=request.sampling.min_available,
            seed=request.sampling.seed,
        ),
        k_fraction=request.k_fraction,
        evaluation=EvaluationPlan(
            every_rounds=request.evaluation.every_rounds,
            fraction=request.evaluation.fraction,
            timeout_s=request.evaluation.timeout_s,
        ),
        stopping=StoppingRule(
            metric=stop.metric,
            source=sources.get(stop.source, MetricSource.EVALUATION),
            goal=goals.get(stop.goal),
            target=stop.target if stop.HasField("target") else None,
            patience_rounds=stop.patience_rounds,
            min_delta=stop.min_delta,
        ),
    )


def _plan_fields(plan: ExperimentPlan) -> dict[str, object]:
    stop = plan.stopping
    return {
        "rounds": plan.rounds,
        "strategy_name": plan.strategy_name,
        "strategy_params_json": plan.strategy_params_json,
        "all_alive": plan.all_alive,
        "sampling": manager_pb2.Sampling(
            fraction=plan.sampling.fraction,
            count=plan.sampling.count,
            min_available=plan.sampling.min_available,
            seed=plan.sampling.seed,
        ),
        "k_fraction": plan.k_fraction,
        "evaluation": manager_pb2.EvaluationPlan(
            every_rounds=plan.evaluation.every_rounds,
            fraction=plan.evaluation.fraction,
            timeout_s=plan.evaluation.timeout_s,
        ),
        "stopping": manager_pb2.StoppingRule(
            metric=stop.metric,
            source=_SOURCES[stop.source] if stop.metric else manager_pb2.METRIC_SOURCE_UNSPECIFIED,
            goal=_GOALS[stop.goal] if stop.goal else manager_pb2.METRIC_GOAL_UNSPECIFIED,
            target=stop.target,
            patience_rounds=stop.patience_rounds,
            min_delta=stop.min_delta,
        ),
    }


def round_to_proto(r: RoundRecord) -> manager_pb2.ExperimentRound:
    return message_from(
        manager_pb2.ExperimentRound,
        r,
        # In flight: OPEN (the fan-out opened it; the coordinator's status says more).
        state=STATES[r.state] if r.state else coordinator_pb2.ROUND_STATE_OPEN,
        train_metrics=dict(r.train_metrics),
        eval_metrics=dict(r.eval_metrics),
        eval_missing=[
            manager_pb2.SkippedParticipant(proplet_id=s.proplet_id, reason=s.reason)
            for s in r.eval_missing
        ],
    )


def experiment_to_proto(e: Experiment, *, with_rounds: bool = True) -> manager_pb2.Experiment:
    """The experiment; with its latest rounds that fit in one answer (`PAGE_BYTES`) unless
    `with_rounds` is False (ListExperiments, events): `rounds_omitted` counts the others."""
    message = manager_pb2.Experiment(
        experiment_id=e.experiment_id,
        config=manager_pb2.StartExperimentRequest(
            **spec_fields(e.config),
            **_plan_fields(e.plan),  # type: ignore[arg-type]
        ),
        scheduled=_scheduled(e),
        skipped=_skipped(e),
        created_at=e.created_at,
        state=_EXPERIMENT_STATES[e.state],
        current_round=e.round_index,
    )
    if e.end is not None:
        message.end.CopyFrom(
            manager_pb2.ExperimentEnd(
                reason=_END_REASONS[e.end.reason],
                round=e.end.round,
                round_id=e.end.round_id,
                detail=e.end.detail,
                ended_at=e.end.ended_at,
            )
        )
    rounds = e.rounds or (e.current_round,)
    shown: list[manager_pb2.ExperimentRound] = []
    if with_rounds:
        budget = PAGE_BYTES
        for r in reversed(rounds):
            proto = round_to_proto(r)
            budget -= proto.ByteSize() + 8
            if budget < 0 and shown:
                break
            shown.append(proto)
    message.rounds.extend(reversed(shown))
    message.rounds_omitted = len(rounds) - len(shown)
    return message


def event_to_proto(event: ExperimentEvent) -> manager_pb2.ExperimentEvent:
    snapshot = event.kind is EventKind.SNAPSHOT
    message = manager_pb2.ExperimentEvent(
        type=_EVENTS[event.kind],
        experiment=experiment_to_proto(event.experiment, with_rounds=snapshot),
        timestamp=event.timestamp,
    )
    if event.round is not None:
        message.round.CopyFrom(round_to_proto(event.round))
    return message


def check_task_request(request: manager_pb2.CreateTaskRequest) -> None:
    """A task's fields within the rules of `server.ids`: its name, proplet id, environment and
    arguments; an inline module of at most `MAX_MODULE_BYTES` (what the task runs is the
    task store's to judge)."""
    check_name(request.name, "name")
    check_id(request.proplet_id, "proplet_id", optional=True)
    check_text(request.image_url, "image_url")
    if len(request.file) > MAX_MODULE_BYTES:
        raise InvalidArgument(f"file: {len(request.file)} bytes, at most {MAX_MODULE_BYTES}")
    check_text_map(request.env, "env")
    check_texts(request.cli_args, "cli_args")


async def _nothing_pending() -> None:
    return None


class ManagerServicer:
    """Implements `propeller.v1.Manager`. Each answer first awaits `persisted()`, so what a
    client is told (a created task, a listed proplet) is already on disk."""

    def __init__(
        self,
        manager: Manager,
        persisted: Callable[[], Awaitable[None]] | None = None,
        loop: ExperimentLoop | None = None,
    ) -> None:
        self.manager = manager
        self.persisted = persisted or _nothing_pending
        self.loop = loop or ExperimentLoop(manager)

    @contextlib.asynccontextmanager
    async def _answering(self, context: Context, method: str) -> AsyncIterator[None]:
        """`grpc_errors` for a method whose answer must be on disk before it leaves: once the
        body has its reply, wait for `persisted()` (a failure there is INTERNAL)."""
        async with grpc_errors(context, method):
            await self.manager.fresh()  # with replicas: what the others changed
            yield
            await self.persisted()

    def _proplet(self, p: Proplet) -> manager_pb2.Proplet:
        proplets = self.manager.proplets
        return manager_pb2.Proplet(
            id=p.id,
            name=p.name,
            alive=proplets.is_alive(p),
            last_seen=p.last_seen,
            registered_at=p.registered_at,
            metadata=p.metadata,
            task_count=self.manager.tasks.running_on(p.id),
        )

    async def StartExperiment(
        self, request: manager_pb2.StartExperimentRequest, context: Context
    ) -> manager_pb2.StartExperimentResponse:
        async with self._answering(context, "Manager.StartExperiment"):
            started = await self.manager.start_experiment(
                spec_from_proto(request), plan_from_proto(request)
            )
            e = started.experiment
            return manager_pb2.StartExperimentResponse(
                experiment_id=e.experiment_id,
                round_id=e.config.round_id,
                round=status_to_proto(started.round),
                scheduled=_scheduled(e),
                skipped=_skipped(e),
            )

    async def GetExperiment(
        self, request: manager_pb2.GetExperimentRequest, context: Context
    ) -> manager_pb2.Experiment:
        async with self._answering(context, "Manager.GetExperiment"):
            check_id(request.experiment_id, "experiment_id")
            return experiment_to_proto(self.manager.get_experiment(request.experiment_id))

    async def ListExperiments(
        self, request: manager_pb2.ListExperimentsRequest, context: Context
    ) -> manager_pb2.ListExperimentsResponse:
        async with self._answering(context, "Manager.ListExperiments"):
            # Creation order: the store's, where new experiments only ever come at the end.
            return _listed(
                manager_pb2.ListExperimentsResponse,
                "experiments",
                request,
                self.manager.experiments.list(),
                lambda e: experiment_to_proto(e, with_rounds=False),
            )

    async def StopExperiment(
        self, request: manager_pb2.StopExperimentRequest, context: Context
    ) -> manager_pb2.Experiment:
        async with self._answering(context, "Manager.StopExperiment"):
            check_id(request.experiment_id, "experiment_id")
            return experiment_to_proto(await self.loop.stop(request.experiment_id))

    async def WatchExperiment(
        self, request: manager_pb2.WatchExperimentRequest, context: Context
    ) -> AsyncIterator[manager_pb2.ExperimentEvent]:
        async with grpc_errors(context, "Manager.WatchExperiment"):
            check_id(request.experiment_id, "experiment_id")
            await self.manager.fresh()
            experiment = self.manager.get_experiment(request.experiment_id)
            snapshot = ExperimentEvent(EventKind.SNAPSHOT, experiment, None, self.manager.clock())
            async for event in self.manager.events.watch(snapshot):
                yield event_to_proto(event)

    async def ListExperimentRounds(
        self, request: manager_pb2.ListExperimentRoundsRequest, context: Context
    ) -> manager_pb2.ListExperimentRoundsResponse:
        async with self._answering(context, "Manager.ListExperimentRounds"):
            check_id(request.experiment_id, "experiment_id")
            experiment = self.manager.get_experiment(request.experiment_id)
            rounds = experiment.rounds or (experiment.current_round,)
            return _listed(
                manager_pb2.ListExperimentRoundsResponse, "rounds", request, rounds, round_to_proto
            )

    async def GetRoundStatus(
        self, request: coordinator_pb2.GetRoundStatusRequest, context: Context
    ) -> coordinator_pb2.RoundStatus:
        return await answer_round(
            context, "Manager.GetRoundStatus", request.round_id, self.manager.get_round_status
        )

    async def ListProplets(
        self, request: manager_pb2.ListPropletsRequest, context: Context
    ) -> manager_pb2.ListPropletsResponse:
        async with self._answering(context, "Manager.ListProplets"):
            return _listed(
                manager_pb2.ListPropletsResponse,
                "proplets",
                request,
                self.manager.proplets.all(),
                self._proplet,
            )

    async def GetProplet(
        self, request: manager_pb2.GetPropletRequest, context: Context
    ) -> manager_pb2.Proplet:
        async with self._answering(context, "Manager.GetProplet"):
            check_id(request.proplet_id, "proplet_id")
            return self._proplet(self.manager.proplets.get(request.proplet_id))

    async def CreateTask(
        self, request: manager_pb2.CreateTaskRequest, context: Context
    ) -> manager_pb2.Task:
        async with self._answering(context, "Manager.CreateTask"):
            check_task_request(request)
            task = self.manager.tasks.create(
                request.name,
                image_url=request.image_url,
                file=request.file,
                env=dict(request.env),
                cli_args=list(request.cli_args),
                proplet_id=request.proplet_id,
            )
            return task_to_proto(task)

    async def StartTask(self, request: manager_pb2.TaskRef, context: Context) -> manager_pb2.Task:
        async with self._answering(context, "Manager.StartTask"):
            check_id(request.task_id, "task_id")
            return task_to_proto(await self.manager.start_task(request.task_id))

    async def StopTask(self, request: manager_pb2.TaskRef, context: Context) -> manager_pb2.Task:
        async with self._answering(context, "Manager.StopTask"):
            check_id(request.task_id, "task_id")
            return task_to_proto(await self.manager.stop_task(request.task_id))

    async def GetTask(self, request: manager_pb2.TaskRef, context: Context) -> manager_pb2.Task:
        async with self._answering(context, "Manager.GetTask"):
            check_id(request.task_id, "task_id")
            return task_to_proto(self.manager.tasks.get(request.task_id))

    async def ListTasks(
        self, request: manager_pb2.ListTasksRequest, context: Context
    ) -> manager_pb2.ListTasksResponse:
        async with self._answering(context, "Manager.ListTasks"):
            prefix = check_name(request.name_prefix, "name_prefix", optional=True)
            proplet_id = check_id(request.proplet_id, "proplet_id", optional=True)
            state = state_from_proto(request.state)
            # Positions among all tasks (creation order), so a task changing state or
            # reporting proplet between two pages cannot shift the next one.
            return _listed(
                manager_pb2.ListTasksResponse,
                "tasks",
                request,
                self.manager.tasks.listed(),
                task_to_proto,
                keep=lambda t: matches(t, name_prefix=prefix, proplet_id=proplet_id, state=state),
            )
