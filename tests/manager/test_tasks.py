"""The task state machine, without MQTT or gRPC."""

from __future__ import annotations

from typing import Any

import pytest

from server.errors import FailedPrecondition, InvalidArgument, NotFound
from server.manager.tasks import InMemoryTaskStore, Task, Tasks, TaskState
from server.messages import COMPLETED, FAILED, INTERRUPTED, RUNNING, TaskResult
from tests.manager.fakes import FakeClock


def make() -> tuple[Tasks, FakeClock]:
    clock = FakeClock()
    return Tasks(InMemoryTaskStore(), clock), clock


def result_of(
    tasks: Tasks, task_id: str, proplet_id: str, state: str, results: str = "", error: str = ""
) -> TaskResult:
    """A result of the task's current attempt, as its proplet would send it."""
    attempt = tasks.get(task_id).attempt
    return TaskResult(task_id, proplet_id, state, results, error, attempt=attempt)


def started(tasks: Tasks, proplet_id: str = "p1") -> Task:
    task = tasks.create("t", image_url="reg/x:1", proplet_id=proplet_id)
    return tasks.schedule(task.id)[0]


def test_create_is_pending_with_uuid_and_timestamps() -> None:
    tasks, clock = make()
    task = tasks.create("hello", image_url="reg/hello:1", env={"A": "1"}, cli_args=["-v"])
    assert task.state is TaskState.PENDING
    assert len(task.id) == 36 and task.id.count("-") == 4
    assert task.created_at == task.updated_at == clock.now
    assert tasks.get(task.id) == task


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"name": "", "image_url": "reg/x:1"}, "name"),
        ({"name": "t"}, "image_url"),
        ({"name": "t", "image_url": "reg/x:1", "file": b"\0asm"}, "image_url"),
    ],
)
def test_create_rejects_bad_requests_naming_the_field(kwargs: dict[str, Any], field: str) -> None:
    tasks, _ = make()
    with pytest.raises(InvalidArgument, match=f"^{field}:"):
        tasks.create(**kwargs)


def test_create_with_inline_file_and_no_proplet() -> None:
    tasks, _ = make()
    task = tasks.create("t", file=b"\0asm")
    assert (task.file, task.proplet_id) == (b"\0asm", "")


def test_unknown_task_is_not_found() -> None:
    tasks, _ = make()
    with pytest.raises(NotFound, match="task_id"):
        tasks.get("nope")
    with pytest.raises(NotFound, match="task_id"):
        tasks.schedule("nope")


def test_full_run_running_then_completed() -> None:
    tasks, clock = make()
    task = started(tasks)
    assert task.state is TaskState.SCHEDULED
    clock.advance(1)
    running = tasks.apply_result(result_of(tasks, task.id, "p1", RUNNING))
    assert running is not None and running.state is TaskState.RUNNING
    assert running.started_at == clock.now
    assert tasks.running_on("p1") == 1
    clock.advance(2)
    done = tasks.apply_result(result_of(tasks, task.id, "p1", COMPLETED, results="42"))
    assert done is not None
    assert (done.state, done.results, done.finished_at) == (TaskState.COMPLETED, "42", clock.now)
    assert done.started_at == clock.now - 2
    assert tasks.running_on("p1") == 0


def test_failed_result_records_error() -> None:
    tasks, _ = make()
    task = started(tasks)
    failed = tasks.apply_result(result_of(tasks, task.id, "p1", FAILED, error="trap: unreachable"))
    assert failed is not None
    assert (failed.state, failed.error) == (TaskState.FAILED, "trap: unreachable")


def test_interrupted_result() -> None:
    tasks, _ = make()
    task = started(tasks)
    out = tasks.apply_result(result_of(tasks, task.id, "p1", INTERRUPTED))
    assert out is not None and out.state is TaskState.INTERRUPTED


def test_final_state_is_not_left_by_late_results() -> None:
    tasks, _ = make()
    task = started(tasks)
    tasks.apply_result(result_of(tasks, task.id, "p1", COMPLETED, results="ok"))
    assert tasks.apply_result(result_of(tasks, task.id, "p1", RUNNING)) is None
    assert tasks.apply_result(result_of(tasks, task.id, "p1", FAILED, error="late")) is None
    final = tasks.get(task.id)
    assert (final.state, final.results, final.error) == (TaskState.COMPLETED, "ok", "")


def test_results_for_unknown_tasks_or_other_proplets_are_dropped() -> None:
    tasks, _ = make()
    task = started(tasks, proplet_id="p1")
    assert tasks.apply_result(TaskResult("nope", "p1", RUNNING)) is None
    assert tasks.apply_result(result_of(tasks, task.id, "intruder", COMPLETED)) is None
    assert tasks.get(task.id).state is TaskState.SCHEDULED


def test_result_for_pending_task_is_ignored() -> None:
    tasks, _ = make()
    task = tasks.create("t", image_url="reg/x:1")
    assert tasks.apply_result(result_of(tasks, task.id, "p1", RUNNING)) is None
    assert tasks.get(task.id).state is TaskState.PENDING


def test_broadcast_task_counts_on_the_proplet_that_runs_it() -> None:
    tasks, _ = make()
    task = started(tasks, proplet_id="")
    tasks.apply_result(result_of(tasks, task.id, "p7", RUNNING))
    assert tasks.running_on("p7") == 1
    assert [t.id for t in tasks.find(proplet_id="p7")] == [task.id]


@pytest.mark.parametrize("state", [TaskState.SCHEDULED, TaskState.RUNNING])
def test_start_refused_while_scheduled_or_running(state: TaskState) -> None:
    tasks, _ = make()
    task = started(tasks)
    if state is TaskState.RUNNING:
        tasks.apply_result(result_of(tasks, task.id, "p1", RUNNING))
    with pytest.raises(FailedPrecondition, match="task_id"):
        tasks.schedule(task.id)


@pytest.mark.parametrize("result", [COMPLETED, FAILED, INTERRUPTED])
def test_finished_task_can_be_started_again_with_a_clean_slate(result: str) -> None:
    tasks, _ = make()
    task = started(tasks)
    tasks.apply_result(result_of(tasks, task.id, "p1", result, results="r", error="e"))
    again, previous = tasks.schedule(task.id)
    assert previous.state.final
    assert (again.state, again.results, again.error, again.finished_at) == (
        TaskState.SCHEDULED,
        "",
        "",
        0.0,
    )


def test_unschedule_restores_previous_state_unless_task_moved_on() -> None:
    tasks, _ = make()
    task = tasks.create("t", image_url="reg/x:1", proplet_id="p1")
    _, previous = tasks.schedule(task.id)
    tasks.unschedule(previous)
    assert tasks.get(task.id).state is TaskState.PENDING

    _, previous = tasks.schedule(task.id)
    tasks.apply_result(result_of(tasks, task.id, "p1", RUNNING))
    tasks.unschedule(previous)
    assert tasks.get(task.id).state is TaskState.RUNNING


def test_stop_only_scheduled_or_running_tasks() -> None:
    tasks, _ = make()
    pending = tasks.create("t", image_url="reg/x:1")
    with pytest.raises(FailedPrecondition, match="PENDING"):
        tasks.check_stoppable(pending.id)
    task = started(tasks)
    assert tasks.check_stoppable(task.id).state is TaskState.SCHEDULED
    stopped = tasks.interrupt(task.id)
    assert stopped.state is TaskState.INTERRUPTED and stopped.finished_at > 0
    with pytest.raises(FailedPrecondition, match="INTERRUPTED"):
        tasks.check_stoppable(task.id)


def test_interrupt_does_not_overwrite_a_task_that_finished_meanwhile() -> None:
    tasks, _ = make()
    task = started(tasks)
    tasks.apply_result(result_of(tasks, task.id, "p1", COMPLETED, results="ok"))
    assert tasks.interrupt(task.id).state is TaskState.COMPLETED


def test_find_filters_and_keeps_creation_order() -> None:
    tasks, clock = make()
    a = tasks.create("fl-round-r1-p1", image_url="x", proplet_id="p1")
    clock.advance(1)
    b = tasks.create("other", image_url="x", proplet_id="p2")
    clock.advance(1)
    c = tasks.create("fl-round-r1-p2", image_url="x", proplet_id="p2")
    tasks.schedule(c.id)
    assert [t.id for t in tasks.find()] == [a.id, b.id, c.id]
    assert [t.id for t in tasks.find(name_prefix="fl-round-r1")] == [a.id, c.id]
    assert [t.id for t in tasks.find(proplet_id="p2")] == [b.id, c.id]
    assert [t.id for t in tasks.find(state=TaskState.SCHEDULED)] == [c.id]
    assert tasks.find(name_prefix="fl-round-r1", state=TaskState.RUNNING) == []


def test_every_start_is_a_new_attempt_and_stale_results_are_ignored() -> None:
    tasks, _ = make()
    task = started(tasks)
    assert (task.attempt, task.start_message().attempt) == (1, 1)
    assert tasks.apply_result(TaskResult(task.id, "p1", RUNNING, attempt=1)) is not None
    tasks.interrupt(task.id)  # StopTask
    again, _ = tasks.schedule(task.id)  # StartTask again
    assert (again.attempt, again.start_message().attempt) == (2, 2)

    # The first run's late reports do not touch the second run, whatever they say.
    for state in (RUNNING, COMPLETED, FAILED):
        assert tasks.apply_result(TaskResult(task.id, "p1", state, "old", attempt=1)) is None
    assert tasks.apply_result(TaskResult(task.id, "p1", COMPLETED, attempt=0)) is None
    current = tasks.get(task.id)
    assert (current.state, current.results, current.attempt) == (TaskState.SCHEDULED, "", 2)

    running = tasks.apply_result(TaskResult(task.id, "p1", RUNNING, attempt=2))
    assert running is not None and running.state is TaskState.RUNNING
    done = tasks.apply_result(TaskResult(task.id, "p1", COMPLETED, "new", attempt=2))
    assert done is not None and (done.state, done.results) == (TaskState.COMPLETED, "new")


def test_unschedule_keeps_the_attempt_number() -> None:
    tasks, _ = make()
    task = tasks.create("t", image_url="reg/x:1", proplet_id="p1")
    _, previous = tasks.schedule(task.id)
    tasks.unschedule(previous)
    assert (tasks.get(task.id).state, tasks.get(task.id).attempt) == (TaskState.PENDING, 1)
    assert tasks.schedule(task.id)[0].attempt == 2


# --- results sent again, and tasks nobody reports on (issue 10, item 1) -----------------


def test_a_result_applied_twice_changes_nothing() -> None:
    tasks, clock = make()
    task = started(tasks)
    assert tasks.apply_result(result_of(tasks, task.id, "p1", RUNNING)) is not None
    running = tasks.get(task.id)
    clock.advance(5)
    assert tasks.apply_result(result_of(tasks, task.id, "p1", RUNNING)) is None
    assert tasks.get(task.id) == running
    assert tasks.apply_result(result_of(tasks, task.id, "p1", COMPLETED, "ok")) is not None
    done = tasks.get(task.id)
    clock.advance(5)
    for state in (COMPLETED, RUNNING):  # the same result again, and an earlier one late
        assert tasks.apply_result(result_of(tasks, task.id, "p1", state, "ok")) is None
    assert tasks.get(task.id) == done


def test_a_result_without_its_proplet_is_not_taken_for_an_assigned_task() -> None:
    tasks, _ = make()
    task = started(tasks, proplet_id="p1")
    assert tasks.apply_result(result_of(tasks, task.id, "", COMPLETED)) is None
    assert tasks.get(task.id).state is TaskState.SCHEDULED


def round_task(tasks: Tasks, deadline: float, proplet_id: str = "p1") -> Task:
    task = tasks.create(
        "fl-round-r1-p1",
        image_url="reg/x:1",
        env={"ROUND_DEADLINE": repr(deadline)},
        proplet_id=proplet_id,
    )
    return tasks.schedule(task.id)[0]


def test_overdue_round_tasks_after_their_deadline_and_a_grace() -> None:
    tasks, clock = make()
    task = round_task(tasks, clock.now + 60)
    clock.advance(60 + 30)
    assert tasks.overdue(clock.now, task_deadline_s=900, grace_s=30) == []
    clock.advance(1)
    [(found, why)] = tasks.overdue(clock.now, task_deadline_s=900, grace_s=30)
    assert found.id == task.id and why == "by the round's deadline (30 s grace)"
    # Running, too; finished ones never.
    tasks.apply_result(result_of(tasks, task.id, "p1", RUNNING))
    assert [t.id for t, _ in tasks.overdue(clock.now, task_deadline_s=900, grace_s=30)] == [task.id]
    tasks.apply_result(result_of(tasks, task.id, "p1", COMPLETED))
    assert tasks.overdue(clock.now, task_deadline_s=900, grace_s=30) == []


@pytest.mark.parametrize("deadline", ["soon", "nan", "inf"])
def test_a_task_without_a_usable_round_deadline_has_the_general_bound(deadline: str) -> None:
    tasks, clock = make()
    task = tasks.create("t", image_url="reg/x:1", env={"ROUND_DEADLINE": deadline})
    tasks.schedule(task.id)
    clock.advance(900)
    assert tasks.overdue(clock.now, task_deadline_s=900, grace_s=30) == []
    clock.advance(1)
    [(_, why)] = tasks.overdue(clock.now, task_deadline_s=900, grace_s=30)
    assert why == "within 900 s of its start"


def test_reconcile_interrupts_with_a_reason_and_a_late_final_result_still_counts() -> None:
    tasks, clock = make()
    task = round_task(tasks, clock.now)
    clock.advance(31)
    [(found, why)] = tasks.overdue(clock.now, task_deadline_s=900, grace_s=30)
    ended = tasks.reconcile(found.id, why)
    assert ended is not None and ended.state is TaskState.INTERRUPTED
    assert ended.error == (
        "interrupted: no result from p1 by the round's deadline (30 s grace) (task left SCHEDULED)"
    )
    assert tasks.reconcile(task.id, why) is None  # already ended: nothing to do
    # A late Running changes nothing; a late result of another attempt neither.
    assert tasks.apply_result(result_of(tasks, task.id, "p1", RUNNING)) is None
    stale = TaskResult(task.id, "p1", COMPLETED, attempt=task.attempt + 1)
    assert tasks.apply_result(stale) is None
    # The proplet's real outcome, sent again after a broker outage, replaces the guess.
    late = tasks.apply_result(result_of(tasks, task.id, "p1", COMPLETED, "ok"))
    assert late is not None and (late.state, late.results, late.error) == (
        TaskState.COMPLETED,
        "ok",
        "",
    )


def test_a_stopped_task_stays_interrupted_whatever_arrives_late() -> None:
    tasks, _ = make()
    task = started(tasks)
    tasks.interrupt(task.id)
    assert tasks.apply_result(result_of(tasks, task.id, "p1", COMPLETED)) is None
    assert tasks.get(task.id).state is TaskState.INTERRUPTED


def test_unstarted_lists_scheduled_tasks_nobody_reported_on() -> None:
    tasks, clock = make()
    old = started(tasks)
    clock.advance(20)
    fresh = started(tasks)
    reported = started(tasks)
    tasks.apply_result(result_of(tasks, reported.id, "p1", RUNNING))
    assert [t.id for t in tasks.unstarted(clock.now - 10)] == [old.id]
    assert {t.id for t in tasks.unstarted(clock.now + 1)} == {old.id, fresh.id}
