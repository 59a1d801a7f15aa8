"""The manager's durable state: proplets, tasks and experiments in one SQLite file
(`manager.sqlite` in the state directory).

The domain code (`Proplets`, `Tasks`, `Manager`) reads and writes its stores synchronously, so
these stores keep every record in memory as well (loaded once when the file is opened): reads
never touch the disk. A `put` updates that copy and hands the row to the database thread
(`server.sqlite.Database`, one transaction per put, in call order) without waiting.
`flush()` waits until every write handed over so far is committed; the servicer awaits it
before answering and the MQTT handler after each message, so whatever a client has been told
has reached the disk, and the event loop never blocks on it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from server.manager.experiments import Experiment, ScheduledParticipant
from server.manager.proplets import Proplet, Skipped
from server.manager.tasks import Task, TaskState
from server.round_spec import RoundSpec
from server.sqlite import Database

log = logging.getLogger(__name__)

FILE_NAME = "manager.sqlite"

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS proplets (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        metadata TEXT NOT NULL,
        last_seen REAL NOT NULL,
        registered_at REAL NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS tasks (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        image_url TEXT NOT NULL,
        file BLOB NOT NULL,
        env TEXT NOT NULL,
        cli_args TEXT NOT NULL,
        proplet_id TEXT NOT NULL,
        state TEXT NOT NULL,
        results TEXT NOT NULL,
        error TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        started_at REAL NOT NULL,
        finished_at REAL NOT NULL,
        reported_by TEXT NOT NULL,
        attempt INTEGER NOT NULL DEFAULT 0
    )""",
    """CREATE TABLE IF NOT EXISTS experiments (
        id TEXT PRIMARY KEY,
        record TEXT NOT NULL,
        created_at REAL NOT NULL
    )""",
]

Write = Callable[[sqlite3.Connection], None]


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring a file written by an older manager up to `SCHEMA` (columns added since)."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(tasks)")}
    if "attempt" not in columns:
        conn.execute("ALTER TABLE tasks ADD COLUMN attempt INTEGER NOT NULL DEFAULT 0")
        log.info("[Manager.state] tasks: added column attempt")


class StateWriteFailed(RuntimeError):
    """A write to manager.sqlite failed: what is in memory is no longer what is on disk."""


class ManagerDatabase:
    """manager.sqlite and the three stores over it. `await open()` before use (it loads every
    record), `await close()` after (it waits for pending writes)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / FILE_NAME
        self._db: Database | None = None
        self._pending: list[asyncio.Future[None]] = []
        self._failure: BaseException | None = None
        self.proplets = SqlitePropletStore(self)
        self.tasks = SqliteTaskStore(self)
        self.experiments = SqliteExperimentStore(self)

    async def open(self) -> None:
        db = Database(self.path, SCHEMA)
        await db.open()
        try:
            await db.write(_migrate)
            proplets, tasks, experiments = await db.read(_load_all)
        except BaseException:
            await db.close()
            raise
        self.proplets._records = {p.id: p for p in proplets}
        self.tasks._records = {t.id: t for t in tasks}
        self.experiments._records = {e.experiment_id: e for e in experiments}
        self._db = db
        log.info(
            "[Manager.state] path=%s proplets=%d tasks=%d experiments=%d",
            self.path,
            len(proplets),
            len(tasks),
            len(experiments),
        )

    async def close(self) -> None:
        db, self._db = self._db, None
        if db is None:
            return
        try:
            await self._wait_pending()
        finally:
            await db.close()

    def submit(self, write: Write) -> None:
        """Commit `write` on the database thread, after every write submitted before it."""
        db = self._db
        if db is None:
            raise RuntimeError(f"{self.path}: the manager's state is not open")
        # Tasks start in creation order and each hands its write to the one database thread
        # at once, so writes commit in the order they were submitted.
        future = asyncio.get_running_loop().create_task(db.write(write))
        self._pending.append(future)
        future.add_done_callback(self._written)

    def _written(self, future: asyncio.Future[None]) -> None:
        self._pending.remove(future)
        if future.cancelled():
            exc: BaseException | None = asyncio.CancelledError()
        else:
            exc = future.exception()
        if exc is not None and self._failure is None:
            self._failure = exc
            log.error("[Manager.state] write to %s failed", self.path, exc_info=exc)

    async def _wait_pending(self) -> None:
        if self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)
        if self._failure is not None:
            raise StateWriteFailed(
                f"{self.path}: a state write failed ({self._failure!r}); restart the manager"
            ) from self._failure

    async def flush(self) -> None:
        """Wait until every write submitted so far is committed; raise if one failed."""
        await self._wait_pending()


class _Store:
    def __init__(self, owner: ManagerDatabase) -> None:
        self._owner = owner
        self._records: dict[str, Any] = {}


class SqlitePropletStore(_Store):
    def get(self, proplet_id: str) -> Proplet | None:
        proplet: Proplet | None = self._records.get(proplet_id)
        return proplet

    def put(self, proplet: Proplet) -> None:
        row = (
            proplet.id,
            proplet.name,
            json.dumps(proplet.metadata),
            proplet.last_seen,
            proplet.registered_at,
        )

        def write(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO proplets (id, name, metadata, last_seen, registered_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET name = excluded.name, "
                "metadata = excluded.metadata, last_seen = excluded.last_seen, "
                "registered_at = excluded.registered_at",
                row,
            )

        self._owner.submit(write)
        self._records[proplet.id] = proplet

    def list(self) -> list[Proplet]:
        return list(self._records.values())


_TASK_COLUMNS = (
    "id, name, image_url, env, cli_args, proplet_id, state, results, error, "
    "created_at, updated_at, started_at, finished_at, reported_by, attempt"
)


class SqliteTaskStore(_Store):
    """Tasks; `list` is in creation order (the rows' insertion order)."""

    def get(self, task_id: str) -> Task | None:
        task: Task | None = self._records.get(task_id)
        return task

    def put(self, task: Task) -> None:
        previous: Task | None = self._records.get(task.id)
        row = (
            task.id,
            task.name,
            task.image_url,
            json.dumps(task.env),
            json.dumps(task.cli_args),
            task.proplet_id,
            task.state.value,
            task.results,
            task.error,
            task.created_at,
            task.updated_at,
            task.started_at,
            task.finished_at,
            task.reported_by,
            task.attempt,
        )
        # The inline module never changes after creation: rewrite it only when it does.
        file = None if previous is not None and previous.file == task.file else task.file

        def write(conn: sqlite3.Connection) -> None:
            conn.execute(
                f"INSERT INTO tasks ({_TASK_COLUMNS}, file) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET name = excluded.name, "
                "image_url = excluded.image_url, env = excluded.env, "
                "cli_args = excluded.cli_args, proplet_id = excluded.proplet_id, "
                "state = excluded.state, results = excluded.results, error = excluded.error, "
                "created_at = excluded.created_at, updated_at = excluded.updated_at, "
                "started_at = excluded.started_at, finished_at = excluded.finished_at, "
                "reported_by = excluded.reported_by, attempt = excluded.attempt",
                (*row, file if file is not None else b""),
            )
            if file is not None and previous is not None:
                conn.execute("UPDATE tasks SET file = ? WHERE id = ?", (file, task.id))

        self._owner.submit(write)
        self._records[task.id] = task

    def list(self) -> list[Task]:
        return list(self._records.values())


class SqliteExperimentStore(_Store):
    """Experiments; `list` is in creation order."""

    def get(self, experiment_id: str) -> Experiment | None:
        experiment: Experiment | None = self._records.get(experiment_id)
        return experiment

    def put(self, experiment: Experiment) -> None:
        row = (
            experiment.experiment_id,
            json.dumps(experiment_to_json(experiment)),
            experiment.created_at,
        )

        def write(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO experiments (id, record, created_at) VALUES (?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET record = excluded.record, "
                "created_at = excluded.created_at",
                row,
            )

        self._owner.submit(write)
        self._records[experiment.experiment_id] = experiment

    def list(self) -> list[Experiment]:
        return list(self._records.values())


# --- rows <-> records -----------------------------------------------------------------------


def experiment_to_json(e: Experiment) -> dict[str, Any]:
    return {
        "experiment_id": e.experiment_id,
        "config": e.config.to_dict(),
        "scheduled": [
            {"proplet_id": s.proplet_id, "task_id": s.task_id, "task_name": s.task_name}
            for s in e.scheduled
        ],
        "skipped": [{"proplet_id": s.proplet_id, "reason": s.reason} for s in e.skipped],
        "created_at": e.created_at,
    }


def experiment_from_json(d: dict[str, Any]) -> Experiment:
    return Experiment(
        experiment_id=str(d["experiment_id"]),
        config=RoundSpec.from_dict(d["config"]),
        scheduled=[
            ScheduledParticipant(str(s["proplet_id"]), str(s["task_id"]), str(s["task_name"]))
            for s in d["scheduled"]
        ],
        skipped=[Skipped(str(s["proplet_id"]), str(s["reason"])) for s in d["skipped"]],
        created_at=float(d["created_at"]),
    )


def _load_all(
    conn: sqlite3.Connection,
) -> tuple[list[Proplet], list[Task], list[Experiment]]:
    proplets = [
        Proplet(
            id=row[0],
            name=row[1],
            metadata={str(k): str(v) for k, v in json.loads(row[2]).items()},
            last_seen=float(row[3]),
            registered_at=float(row[4]),
        )
        for row in conn.execute(
            "SELECT id, name, metadata, last_seen, registered_at FROM proplets ORDER BY rowid"
        )
    ]
    tasks = [
        Task(
            id=row[0],
            name=row[1],
            image_url=row[2],
            env={str(k): str(v) for k, v in json.loads(row[3]).items()},
            cli_args=[str(a) for a in json.loads(row[4])],
            proplet_id=row[5],
            state=TaskState(row[6]),
            results=row[7],
            error=row[8],
            created_at=float(row[9]),
            updated_at=float(row[10]),
            started_at=float(row[11]),
            finished_at=float(row[12]),
            reported_by=row[13],
            attempt=int(row[14]),
            file=bytes(row[15]),
        )
        for row in conn.execute(f"SELECT {_TASK_COLUMNS}, file FROM tasks ORDER BY rowid")
    ]
    experiments = [
        experiment_from_json(json.loads(row[0]))
        for row in conn.execute("SELECT record FROM experiments ORDER BY rowid")
    ]
    return proplets, tasks, experiments
