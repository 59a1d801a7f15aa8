"""The Manager gRPC servicer: proto <-> domain translation around `Manager`, nothing more."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import fields

from propeller.v1 import coordinator_pb2, manager_pb2
from server.coordinator.wire import answer_round, spec_fields, spec_from_proto, status_to_proto
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
from server.manager.experiments import Experiment
from server.manager.orchestrator import Manager
from server.manager.proplets import Proplet
from server.manager.tasks import Task, TaskState, matches
from server.messages import TaskSpec
from server.paging import PageRequest, page_of

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


# The Task fields the message carries as they are: what the task runs (its `TaskSpec`), its
# outcome and its times (the state is an enum on the wire).
_TASK_FIELDS = (
    *(f.name for f in fields(TaskSpec)),
    "results",
    "error",
    "created_at",
    "updated_at",
    "started_at",
    "finished_at",
)


def task_to_proto(task: Task) -> manager_pb2.Task:
    return manager_pb2.Task(
        **{name: getattr(task, name) for name in _TASK_FIELDS}, state=state_to_proto(task.state)
    )


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


def experiment_to_proto(e: Experiment) -> manager_pb2.Experiment:
    return manager_pb2.Experiment(
        experiment_id=e.experiment_id,
        config=manager_pb2.StartExperimentRequest(**spec_fields(e.config)),
        scheduled=_scheduled(e),
        skipped=_skipped(e),
        created_at=e.created_at,
    )


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
        self, manager: Manager, persisted: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        self.manager = manager
        self.persisted = persisted or _nothing_pending

    @contextlib.asynccontextmanager
    async def _answering(self, context: Context, method: str) -> AsyncIterator[None]:
        """`grpc_errors` for a method whose answer must be on disk before it leaves: once the
        body has its reply, wait for `persisted()` (a failure there is INTERNAL)."""
        async with grpc_errors(context, method):
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
            started = await self.manager.start_experiment(spec_from_proto(request))
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
            wanted = PageRequest.of(request, "ListExperiments", int)
            # Creation order: the store's, where new experiments only ever come at the end.
            experiments = self.manager.experiments.list()
            page = page_of(wanted.indexed(experiments), wanted, experiment_to_proto)
            return manager_pb2.ListExperimentsResponse(
                experiments=page.items, next_page_token=page.next_page_token
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
            wanted = PageRequest.of(request, "ListProplets", int)
            page = page_of(wanted.indexed(self.manager.proplets.all()), wanted, self._proplet)
            return manager_pb2.ListPropletsResponse(
                proplets=page.items, next_page_token=page.next_page_token
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
            wanted = PageRequest.of(request, "ListTasks", int)
            # Positions among all tasks (creation order), so a task changing state or
            # reporting proplet between two pages cannot shift the next one.
            page = page_of(
                wanted.indexed(self.manager.tasks.listed()),
                wanted,
                task_to_proto,
                keep=lambda t: matches(t, name_prefix=prefix, proplet_id=proplet_id, state=state),
            )
            return manager_pb2.ListTasksResponse(
                tasks=page.items, next_page_token=page.next_page_token
            )
