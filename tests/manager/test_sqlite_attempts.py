"""A task's attempt number in the manager's database: it survives reopening (on both backends,
tests.support.state), and a manager.sqlite written before the column existed still opens (its
tasks at attempt 0) and then keeps attempts."""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from pathlib import Path

from server.manager.sqlite_store import FILE_NAME, ManagerDatabase
from server.manager.tasks import Task, Tasks, TaskState
from server.messages import COMPLETED, TaskResult
from tests.manager.fakes import FakeClock
from tests.support.state import StateBackend

TASK = Task(
    id="t-1",
    name="train",
    image_url="reg/x:1",
    proplet_id="p1",
    state=TaskState.RUNNING,
    created_at=1000.0,
    updated_at=1001.0,
    started_at=1001.0,
    reported_by="p1",
    attempt=3,
)

# The tasks table as managers wrote it before attempts were numbered.
OLD_TASKS_TABLE = """CREATE TABLE tasks (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, image_url TEXT NOT NULL, file BLOB NOT NULL,
    env TEXT NOT NULL, cli_args TEXT NOT NULL, proplet_id TEXT NOT NULL, state TEXT NOT NULL,
    results TEXT NOT NULL, error TEXT NOT NULL, created_at REAL NOT NULL,
    updated_at REAL NOT NULL, started_at REAL NOT NULL, finished_at REAL NOT NULL,
    reported_by TEXT NOT NULL
)"""


async def reopened(db: ManagerDatabase) -> ManagerDatabase:
    await db.close()
    again = ManagerDatabase(db.path.parent)
    await again.open()
    return again


async def test_attempt_survives_reopening_and_stale_results_stay_stale(
    state_backend: StateBackend,
) -> None:
    db = state_backend.manager_database()
    await db.open()
    db.tasks.put(TASK)
    db.tasks.put(replace(TASK, attempt=4, state=TaskState.SCHEDULED))
    await db.close()
    db = state_backend.manager_database()
    await db.open()
    try:
        assert db.tasks.get(TASK.id) == replace(TASK, attempt=4, state=TaskState.SCHEDULED)
        tasks = Tasks(db.tasks, FakeClock())
        assert tasks.apply_result(TaskResult(TASK.id, "p1", COMPLETED, attempt=3)) is None
        done = tasks.apply_result(TaskResult(TASK.id, "p1", COMPLETED, "ok", attempt=4))
        assert done is not None and done.state is TaskState.COMPLETED
        assert tasks.schedule(TASK.id)[0].attempt == 5
        await db.flush()
    finally:
        await db.close()


async def test_a_file_from_before_attempts_opens(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / FILE_NAME)
    try:
        conn.execute(OLD_TASKS_TABLE)
        conn.execute(
            "INSERT INTO tasks VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            ("old", "t", "reg/x:1", b"", "{}", "[]", "p1", "COMPLETED", "r", "", 1, 2, 1, 2, "p1"),
        )
        conn.commit()
    finally:
        conn.close()

    db = ManagerDatabase(tmp_path)
    await db.open()
    try:
        old = db.tasks.get("old")
        assert old is not None and (old.state, old.attempt) == (TaskState.COMPLETED, 0)
        db.tasks.put(replace(old, attempt=1, state=TaskState.SCHEDULED))
        db = await reopened(db)
        again = db.tasks.get("old")
        assert again is not None and (again.state, again.attempt) == (TaskState.SCHEDULED, 1)
    finally:
        await db.close()
