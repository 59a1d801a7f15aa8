"""Tasks and their life cycle.

    PENDING --start--> SCHEDULED --Running--> RUNNING --Completed--> COMPLETED
                           |                     |-----Failed------> FAILED
                           |---------stop--------|-----Interrupted-> INTERRUPTED

A final state (COMPLETED, FAILED, INTERRUPTED, SKIPPED) is left only by a new start; results
arriving for a finished task are ignored. Every start is a new attempt (`Task.attempt`, 1, 2,
...) carried in the TaskStart and echoed in each TaskResult: a result of another attempt (a
late report of a run that was stopped before the task was started again) is ignored too.
Applying a result is idempotent (proplets send each one again until it is acknowledged): a
repeat changes nothing.

A task still SCHEDULED or RUNNING past its deadline (`overdue`: a round task's ROUND_DEADLINE
plus a grace for the last report, any other task a bound from its start) is `reconcile`d:
INTERRUPTED, with a reason saying no result came. A final result of the same attempt arriving
after that (a proplet that was cut off by a broker outage) still replaces it: what happened
beats the guess.
The caller publishes the MQTT messages; this module only decides and records.
"""

from __future__ import annotations

import enum
import logging
import math
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from server import messages, metrics
from server.errors import FailedPrecondition, InvalidArgument
from server.manager.records import InMemoryStore, RecordStore, require

log = logging.getLogger(__name__)

Clock = Callable[[], float]


class TaskState(enum.Enum):
    PENDING = "PENDING"
    SCHEDULED = "SCHEDULED"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    SKIPPED = "SKIPPED"
    INTERRUPTED = "INTERRUPTED"

    @property
    def final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES = frozenset(
    {TaskState.COMPLETED, TaskState.FAILED, TaskState.SKIPPED, TaskState.INTERRUPTED}
)
# States from which StartTask (re)schedules a task.
STARTABLE = frozenset({TaskState.PENDING, *FINAL_STATES})
# States a stop interrupts.
STOPPABLE = frozenset({TaskState.SCHEDULED, TaskState.RUNNING})

# The start of the error of a task `reconcile` interrupted (no result by its deadline): a final
# result of the same attempt may still replace it.
UNREPORTED = "interrupted: no result"

_RESULT_STATES = {
    messages.RUNNING: TaskState.RUNNING,
    messages.COMPLETED: TaskState.COMPLETED,
    messages.FAILED: TaskState.FAILED,
    messages.INTERRUPTED: TaskState.INTERRUPTED,
}


@dataclass(frozen=True)
class Task(messages.TaskSpec):
    """A task as the manager records it: what it runs (`TaskSpec`, as its starts carry it)
    and where it is in its life cycle."""

    state: TaskState = TaskState.PENDING
    results: str = ""
    error: str = ""
    created_at: float = 0.0
    updated_at: float = 0.0
    started_at: float = 0.0
    finished_at: float = 0.0
    # The proplet whose results we last applied (differs from proplet_id for broadcasts).
    reported_by: str = ""
    # How many times the task was started; results of any other attempt are stale.
    attempt: int = 0

    @property
    def key(self) -> str:
        return self.id

    def start_message(self) -> messages.TaskStart:
        return messages.TaskStart.of(self, self.attempt)

    def stop_message(self) -> messages.TaskStop:
        return messages.TaskStop(id=self.id, proplet_id=self.proplet_id)


# Where task records live: in memory, or manager.sqlite (`sqlite_store`); `list` is in
# creation order.
TaskStore = RecordStore[Task]
InMemoryTaskStore = InMemoryStore[Task]


def matches(
    task: Task, *, name_prefix: str = "", proplet_id: str = "", state: TaskState | None = None
) -> bool:
    """ListTasks' filter: a name starting with `name_prefix`, addressed to or reported by
    `proplet_id` ("" = any), in `state` (None = any)."""
    return (
        task.name.startswith(name_prefix)
        and (not proplet_id or proplet_id in (task.proplet_id, task.reported_by))
        and (state is None or task.state is state)
    )


class Tasks:
    """The task state machine over a `TaskStore`."""

    def __init__(self, store: TaskStore, clock: Clock = time.time) -> None:
        self.store = store
        self.clock = clock

    def _put(self, task: Task) -> None:
        """Store `task`, counting it into its state when it changed state."""
        before = self.store.get(task.id)
        self.store.put(task)
        if before is None or before.state is not task.state:
            metrics.task_entered(task.state.value)

    def create(
        self,
        name: str,
        *,
        image_url: str = "",
        file: bytes = b"",
        env: Mapping[str, str] | None = None,
        cli_args: Sequence[str] = (),
        proplet_id: str = "",
        task_id: str = "",
    ) -> Task:
        """A new PENDING task; `task_id` "" gets a fresh UUID (an experiment's fan-out gives
        the id it recorded for the task before creating it)."""
        if not name:
            raise InvalidArgument("name: must not be empty")
        if bool(image_url) == bool(file):
            raise InvalidArgument(
                "image_url: exactly one of image_url or file must be set"
                + (" (both given)" if image_url else " (neither given)")
            )
        env = dict(env or {})
        if "" in env:
            raise InvalidArgument("env: variable names must not be empty")
        now = self.clock()
        task = Task(
            id=task_id or str(uuid.uuid4()),
            name=name,
            image_url=image_url,
            file=bytes(file),
            env=env,
            cli_args=list(cli_args),
            proplet_id=proplet_id,
            state=TaskState.PENDING,
            created_at=now,
            updated_at=now,
        )
        self._put(task)
        return task

    def get(self, task_id: str) -> Task:
        return require(self.store, task_id, "task")

    def listed(self) -> list[Task]:
        """Every task in creation order (the store's order, kept across restarts; new tasks
        only ever come at the end, which is what ListTasks' pages count on)."""
        return self.store.list()

    def find(
        self, *, name_prefix: str = "", proplet_id: str = "", state: TaskState | None = None
    ) -> list[Task]:
        return [
            t
            for t in self.listed()
            if matches(t, name_prefix=name_prefix, proplet_id=proplet_id, state=state)
        ]

    def running_on(self, proplet_id: str) -> int:
        """How many tasks are running on `proplet_id` right now."""
        return sum(
            1
            for t in self.store.list()
            if t.state is TaskState.RUNNING and proplet_id in (t.proplet_id, t.reported_by)
        )

    def schedule(self, task_id: str) -> tuple[Task, Task]:
        """Move a startable task to SCHEDULED before its start is published (a fast proplet's
        Running result may otherwise arrive first). Returns (scheduled, previous) so a failed
        publish can be undone with `unschedule`."""
        task = self.get(task_id)
        if task.state not in STARTABLE:
            raise FailedPrecondition(
                f"task_id: task {task_id!r} is {task.state.value}; stop it or wait for it to "
                "finish before starting it again"
            )
        now = self.clock()
        scheduled = replace(
            task,
            state=TaskState.SCHEDULED,
            results="",
            error="",
            started_at=0.0,
            finished_at=0.0,
            reported_by="",
            updated_at=now,
            attempt=task.attempt + 1,
        )
        self._put(scheduled)
        return scheduled, task

    def unschedule(self, previous: Task) -> None:
        """Undo `schedule` after its start could not be published, unless the task moved on.
        The attempt number is kept: the start may have reached a proplet after all, and an
        attempt number is never handed out twice."""
        current = self.store.get(previous.id)
        if current is not None and current.state is TaskState.SCHEDULED:
            self._put(replace(previous, updated_at=self.clock(), attempt=current.attempt))

    def check_stoppable(self, task_id: str) -> Task:
        task = self.get(task_id)
        if task.state not in STOPPABLE:
            raise FailedPrecondition(
                f"task_id: task {task_id!r} is {task.state.value}; only scheduled or running "
                "tasks can be stopped"
            )
        return task

    def overdue(
        self, now: float, *, task_deadline_s: float, grace_s: float
    ) -> list[tuple[Task, str]]:
        """The tasks still SCHEDULED or RUNNING past their deadline, each with why: a round
        task (ROUND_DEADLINE in its env, unix seconds) `grace_s` after that deadline, any
        other `task_deadline_s` after it was started."""
        found: list[tuple[Task, str]] = []
        for task in self.store.list():
            if task.state not in STOPPABLE:
                continue
            round_deadline = _round_deadline(task)
            if round_deadline is not None:
                if now > round_deadline + grace_s:
                    found.append((task, f"by the round's deadline ({grace_s:g} s grace)"))
            elif now > (task.started_at or task.updated_at) + task_deadline_s:
                found.append((task, f"within {task_deadline_s:g} s of its start"))
        return found

    def unstarted(self, scheduled_before: float) -> list[Task]:
        """The tasks SCHEDULED before `scheduled_before` that no proplet has reported on."""
        return [
            t
            for t in self.store.list()
            if t.state is TaskState.SCHEDULED and t.updated_at < scheduled_before
        ]

    def reconcile(self, task_id: str, why: str) -> Task | None:
        """Interrupt a task no proplet reported on in time (see `overdue`), unless it ended
        meanwhile; the task, or None if it had ended."""
        task = self.get(task_id)
        if task.state not in STOPPABLE:
            return None
        now = self.clock()
        who = task.proplet_id or "any proplet"
        error = f"{UNREPORTED} from {who} {why} (task left {task.state.value})"
        task = replace(
            task, state=TaskState.INTERRUPTED, error=error, finished_at=now, updated_at=now
        )
        self._put(task)
        return task

    def interrupt(self, task_id: str) -> Task:
        """Mark a stopped task INTERRUPTED, unless it finished in the meantime."""
        task = self.get(task_id)
        if task.state.final:
            return task
        now = self.clock()
        task = replace(task, state=TaskState.INTERRUPTED, finished_at=now, updated_at=now)
        self._put(task)
        return task

    def fail(self, task_id: str, error: str) -> Task:
        now = self.clock()
        task = replace(
            self.get(task_id), state=TaskState.FAILED, error=error, finished_at=now, updated_at=now
        )
        self._put(task)
        return task

    def apply_result(self, result: messages.TaskResult) -> Task | None:
        """Record a result proplet `result.proplet_id` published (the caller has checked that
        it is the proplet that sent it). Returns the updated task, or None when the result
        was dropped (unknown task, another proplet's task, another attempt, task already
        finished, a repeat)."""
        task = self.store.get(result.task_id)
        if task is None:
            log.warning(
                "[Manager.results] task_id=%s proplet_id=%s: unknown task; dropped",
                result.task_id,
                result.proplet_id,
            )
            return None
        if task.proplet_id and result.proplet_id != task.proplet_id:
            log.warning(
                "[Manager.results] task_id=%s proplet_id=%s: task belongs to %s; dropped",
                task.id,
                result.proplet_id,
                task.proplet_id,
            )
            return None
        if result.attempt != task.attempt:
            log.info(
                "[Manager.results] task_id=%s attempt=%d: result %s of attempt %d is stale; "
                "ignored",
                task.id,
                task.attempt,
                result.state,
                result.attempt,
            )
            return None
        new_state = _RESULT_STATES[result.state]
        late = task.state is TaskState.INTERRUPTED and task.error.startswith(UNREPORTED)
        if (task.state.final and not (late and new_state.final)) or (
            task.state is TaskState.PENDING
        ):
            log.info(
                "[Manager.results] task_id=%s state=%s: result %s ignored",
                task.id,
                task.state.value,
                result.state,
            )
            return None
        if new_state is TaskState.RUNNING and task.state is TaskState.RUNNING:
            return None  # a repeat: nothing to change
        now = self.clock()
        task = replace(
            task,
            state=new_state,
            updated_at=now,
            reported_by=result.proplet_id or task.reported_by,
        )
        if new_state is TaskState.RUNNING:
            task = replace(task, started_at=task.started_at or now)
        else:
            task = replace(
                task,
                results=result.results or task.results,
                error=result.error,
                finished_at=now,
                started_at=task.started_at or now,
            )
        self._put(task)
        log.info(
            "[Manager.results] task_id=%s name=%s state=%s", task.id, task.name, new_state.value
        )
        return task


def _round_deadline(task: Task) -> float | None:
    """A round task's ROUND_DEADLINE (unix seconds), None for another task."""
    raw = task.env.get("ROUND_DEADLINE", "")
    if not raw:
        return None
    try:
        deadline = float(raw)
    except ValueError:
        return None
    return deadline if math.isfinite(deadline) else None
