"""The manager's durable state: proplets, tasks and experiments in one SQLite file
(`manager.sqlite` in the state directory).

The domain code (`Proplets`, `Tasks`, `Manager`) reads and writes its stores synchronously, so
these stores keep every record in memory as well (loaded once when the file is opened): reads
never touch the disk. A `put` updates that copy and hands its write (a new row, or the
columns that changed) to the database thread (`server.sqlite.Database`, one transaction per
put, in call order) without waiting.
`flush()` waits until every write handed over so far is committed; the servicer awaits it
before answering and the MQTT handler after each message, so whatever a client has been told
has reached the disk, and the event loop never blocks on it.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import IO, Any, Generic, Protocol, TypeVar

from server.coordinator.rounds import RoundState
from server.errors import FailedPrecondition
from server.manager.experiments import (
    End,
    Experiment,
    ExperimentState,
    FanOut,
    RoundRecord,
    ScheduledParticipant,
)
from server.manager.plan import EndReason, ExperimentPlan
from server.manager.proplets import Proplet, Skipped
from server.manager.records import InMemoryStore, Keyed
from server.manager.tasks import Task, TaskState
from server.round_spec import RoundSpec
from server.sqlite import Database

log = logging.getLogger(__name__)

FILE_NAME = "manager.sqlite"

# The tables' columns as schema version 1 made them, in order (the first is the key), each
# with its kind; SQLite's schema and PostgreSQL's first migration are both written from
# these (`column_definitions`). A column added later goes into `_migrate` and into a new
# PostgreSQL migration, not here.
TEXT, REAL, BLOB, COUNT = "text", "real", "blob", "count"
COLUMNS: dict[str, tuple[tuple[str, str], ...]] = {
    "proplets": (
        ("id", TEXT),
        ("name", TEXT),
        ("metadata", TEXT),
        ("last_seen", REAL),
        ("registered_at", REAL),
    ),
    "tasks": (
        ("id", TEXT),
        ("name", TEXT),
        ("image_url", TEXT),
        ("file", BLOB),
        ("env", TEXT),
        ("cli_args", TEXT),
        ("proplet_id", TEXT),
        ("state", TEXT),
        ("results", TEXT),
        ("error", TEXT),
        ("created_at", REAL),
        ("updated_at", REAL),
        ("started_at", REAL),
        ("finished_at", REAL),
        ("reported_by", TEXT),
        ("attempt", COUNT),
    ),
    "experiments": (("id", TEXT), ("record", TEXT), ("created_at", REAL)),  # record: JSON
}
SQLITE_TYPES = {TEXT: "TEXT", REAL: "REAL", BLOB: "BLOB", COUNT: "INTEGER"}


def column_definitions(table: str, types: dict[str, str]) -> str:
    """`table`'s column definitions in a dialect whose type for each kind `types` gives."""
    (key, key_kind), *rest = COLUMNS[table]
    defs = [f"{key} {types[key_kind]} PRIMARY KEY"]
    defs += [
        f"{name} {types[kind]} NOT NULL" + (" DEFAULT 0" if kind == COUNT else "")
        for name, kind in rest
    ]
    return ",\n    ".join(defs)


SCHEMA = [
    f"CREATE TABLE IF NOT EXISTS {table} (\n    {column_definitions(table, SQLITE_TYPES)}\n)"
    for table in COLUMNS
]

Write = Callable[[sqlite3.Connection], None]
Row = tuple[Any, ...]
T = TypeVar("T", bound=Keyed)


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring a file written by an older manager up to `SCHEMA` (columns added since)."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(tasks)")}
    if "attempt" not in columns:
        conn.execute("ALTER TABLE tasks ADD COLUMN attempt INTEGER NOT NULL DEFAULT 0")
        log.info("[Manager.state] tasks: added column attempt")


def _only_manager(path: Path) -> IO[bytes]:
    """An exclusive lock beside manager.sqlite, held while the manager runs: a manager on
    SQLite is one process (it keeps its records in memory), so a second one on the same state
    directory is refused at start instead of both writing over each other. The kernel
    releases the lock when the process ends, also by kill -9. Blocking (a thread)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = (path.parent / f"{path.name}.lock").open("wb")
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise FailedPrecondition(
            f"{path}: another manager is running on this state directory; a manager on SQLite "
            "is one process (replicas share PostgreSQL: PROPELLER_DATABASE_URL)"
        ) from None
    return lock


class StateWriteFailed(RuntimeError):
    """A write to manager.sqlite failed: what is in memory is no longer what is on disk."""


class ManagerDatabase:
    """manager.sqlite and the three stores over it. `await open()` before use (it loads every
    record), `await close()` after (it waits for pending writes)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / FILE_NAME
        self._db: Database | None = None
        # manager.sqlite's lock (`_only_manager`), held while open.
        self._lock: IO[bytes] | None = None
        self._pending: list[asyncio.Future[None]] = []
        self._failure: BaseException | None = None
        self.proplets = TableStore(self, PROPLETS)
        self.tasks = TableStore(self, TASKS)
        self.experiments = TableStore(self, EXPERIMENTS)

    async def open(self) -> None:
        self._lock = await asyncio.to_thread(_only_manager, self.path)
        db = Database(self.path, SCHEMA)
        try:
            await db.open()
            try:
                await db.write(_migrate)
                loaded = await db.read(lambda conn: [s.table.load(conn) for s in self.stores])
            except BaseException:
                await db.close()
                raise
        except BaseException:
            self._unlock()
            raise
        self._db = db
        self.loaded(loaded, f"path={self.path}")

    def _unlock(self) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.close()  # closing the file releases its lock

    @property
    def stores(self) -> tuple[TableStore[Any], ...]:
        return (self.proplets, self.tasks, self.experiments)

    def loaded(
        self, loaded: list[list[Any]], where: str, seqs: list[list[int]] | None = None
    ) -> None:
        """Take each store's records as read at open (in `stores` order), with their
        positions in the database when it numbers them (`seqs`)."""
        for i, (store, records) in enumerate(zip(self.stores, loaded, strict=True)):
            store.loaded(records, None if seqs is None else seqs[i])
        counts = " ".join(
            f"{s.table.name}={len(r)}" for s, r in zip(self.stores, loaded, strict=True)
        )
        log.info("[Manager.state] %s %s", where, counts)

    async def close(self) -> None:
        db, self._db = self._db, None
        if db is None:
            return
        try:
            await self._wait_pending()
        finally:
            await db.close()
            self._unlock()

    # Table stores' SQL: tables by their own name, values marked `?`.
    schema = ""
    mark = "?"

    def submit_statement(self, statement: tuple[str, Row]) -> None:
        """Commit one statement of a table store, in submission order."""
        sql, values = statement

        def write(conn: sqlite3.Connection) -> None:
            conn.execute(sql, values)

        self.submit(write)

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
            # `wait`, not `gather`: a waiter that is cancelled (a call or an MQTT handler cut
            # off by shutdown) must not cancel the writes themselves.
            await asyncio.wait(list(self._pending))
        if self._failure is not None:
            raise StateWriteFailed(
                f"{self.path}: a state write failed ({self._failure!r}); restart the manager"
            ) from self._failure

    async def flush(self) -> None:
        """Wait until every write submitted so far is committed; raise if one failed."""
        await self._wait_pending()


# --- tables ---------------------------------------------------------------------------------


class StatementSink(Protocol):
    """Where a table store hands its writes: the SQLite or the PostgreSQL manager database,
    whose SQL names a table as `schema` + its name and marks a value with `mark`."""

    schema: str
    mark: str

    def submit_statement(self, statement: tuple[str, Row]) -> None: ...


@dataclass(frozen=True)
class Table(Generic[T]):
    """One table of manager.sqlite: its columns (the first is the key, `id`) and how a record
    becomes a row (values in column order) and back. Rows are read in insertion order, so
    `list` keeps the records' creation order across restarts."""

    name: str
    columns: tuple[str, ...]
    to_row: Callable[[T], Row]
    from_row: Callable[[Row], T]

    def load(self, conn: sqlite3.Connection) -> list[T]:
        sql = f"SELECT {', '.join(self.columns)} FROM {self.name} ORDER BY rowid"
        return [self.from_row(tuple(row)) for row in conn.execute(sql)]

    def statement(
        self, record: T, previous: T | None, *, table: str = "", mark: str = "?"
    ) -> tuple[str, Row] | None:
        """The statement (SQL with `mark` placeholders, into `table`, by default this one's
        name) and its values that store `record` over `previous` (the record as stored, None
        for a new one): the whole row for a new record, else only the columns whose value
        changed (a task's inline module is written once, not with every change of state);
        None when nothing changed."""
        table = table or self.name
        row = self.to_row(record)
        if previous is None:
            # An upsert: with manager replicas (`server.manager.replicas`) another one may
            # have stored the same record first (a proplet's announcement reaches them all).
            marks = ", ".join([mark] * len(row))
            sets = ", ".join(f"{c} = excluded.{c}" for c in self.columns[1:])
            return (
                f"INSERT INTO {table} ({', '.join(self.columns)}) VALUES ({marks}) "
                f"ON CONFLICT ({self.columns[0]}) DO UPDATE SET {sets}"
            ), row
        old = self.to_row(previous)
        changed = [i for i in range(1, len(row)) if row[i] != old[i]]
        if not changed:
            return None
        sets = ", ".join(f"{self.columns[i]} = {mark}" for i in changed)
        sql = f"UPDATE {table} SET {sets} WHERE {self.columns[0]} = {mark}"
        return sql, (*(row[i] for i in changed), row[0])

    def delete_statement(self, key: str, *, table: str = "", mark: str = "?") -> tuple[str, Row]:
        return f"DELETE FROM {table or self.name} WHERE {self.columns[0]} = {mark}", (key,)


class TableStore(InMemoryStore[T]):
    """A table's records, all in memory (loaded when the file is opened); a `put` also hands
    its write to the database thread without waiting (`ManagerDatabase.flush` waits)."""

    def __init__(self, owner: StatementSink, table: Table[T]) -> None:
        super().__init__()
        self._owner = owner
        self.table = table
        # For replicas (`refreshed`): how many puts and deletes so far, the count at each
        # key's latest one, and each key's creation position in the database (its `seq`).
        self.changes = 0
        self._changed_at: dict[str, int] = {}
        self._seq: dict[str, int] = {}

    def loaded(self, records: list[T], seqs: list[int] | None = None) -> None:
        """Take the records read from the file (in creation order), with their positions
        there when the database numbers them (`seqs`)."""
        self._records = {r.key: r for r in records}
        if seqs is not None:
            self._seq = {r.key: seq for r, seq in zip(records, seqs, strict=True)}

    def put(self, record: T) -> None:
        owner = self._owner
        table = owner.schema + self.table.name
        statement = self.table.statement(record, self.get(record.key), table=table, mark=owner.mark)
        if statement is not None:
            self._owner.submit_statement(statement)
            self._changed(record.key)
        super().put(record)

    def delete(self, key: str) -> None:
        if self.get(key) is None:
            return
        owner = self._owner
        table = owner.schema + self.table.name
        owner.submit_statement(self.table.delete_statement(key, table=table, mark=owner.mark))
        self._changed(key)
        super().delete(key)

    def _changed(self, key: str) -> None:
        self.changes += 1
        self._changed_at[key] = self.changes

    def refreshed(
        self, rows: list[tuple[int, T]], removed: list[str], since: int
    ) -> list[tuple[T | None, T]]:
        """Take what another replica wrote: `rows` (each with its creation position) and the
        keys `removed`, as read after this store's change number was `since` -- except for
        the keys changed here since (this replica's write is newer than what was read).
        Keeps the records in creation order. Returns the records taken, each with the one it
        replaced (None: new here)."""
        taken: list[tuple[T | None, T]] = []
        reorder = False
        for seq, record in rows:
            key = record.key
            if self._changed_at.get(key, 0) > since:
                continue
            before = self._records.get(key)
            if before is None:
                reorder = True
            self._seq[key] = seq
            if before != record:
                self._records[key] = record
                taken.append((before, record))
        for key in removed:
            if self._changed_at.get(key, 0) <= since:
                self._records.pop(key, None)
        if reorder:
            # Records written here and not read back yet (no position) stay at the end.
            last = max(self._seq.values(), default=0) + 1
            ordered = sorted(self._records.items(), key=lambda kv: self._seq.get(kv[0], last))
            self._records = dict(ordered)
        return taken


# --- rows <-> records -----------------------------------------------------------------------


# How a field that is not stored as it is goes into its column and comes back.
Codec = tuple[Callable[[Any], Any], Callable[[Any], Any]]


def _str_map(text: str) -> dict[str, str]:
    return {str(k): str(v) for k, v in json.loads(text).items()}


def _str_list(text: str) -> list[str]:
    return [str(a) for a in json.loads(text)]


STR_MAP: Codec = (json.dumps, _str_map)
STR_LIST: Codec = (json.dumps, _str_list)


def field_table(name: str, cls: type[T], codecs: dict[str, Codec]) -> Table[T]:
    """The table `name` with one column per field of the dataclass `cls`, by the same name:
    the value as it is, or through its codec. A field added to `cls` without its column (see
    `_migrate`) fails at once (no such column) instead of going unsaved."""
    columns = tuple(f.name for f in fields(cls))  # type: ignore[arg-type]
    plain: Codec = (lambda v: v, lambda v: v)
    coding = [(c, *codecs.get(c, plain)) for c in columns]

    def to_row(record: T) -> Row:
        return tuple(encode(getattr(record, c)) for c, encode, _ in coding)

    def from_row(row: Row) -> T:
        return cls(**{c: decode(v) for (c, _, decode), v in zip(coding, row, strict=True)})

    return Table(name, columns, to_row, from_row)


PROPLETS = field_table("proplets", Proplet, {"metadata": STR_MAP})
TASKS = field_table(
    "tasks",
    Task,
    {"env": STR_MAP, "cli_args": STR_LIST, "state": (lambda s: s.value, TaskState)},
)


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
        "fan_out": e.fan_out.value,
        "image": e.image,
        "module_digest": e.module_digest,
        "plan": e.plan.to_dict(),
        "current": e.current.to_dict() if e.current else None,
        "rounds": [_round_to_json(r) for r in e.rounds],
        "state": e.state.value,
        "end": _end_to_json(e.end),
    }


def _skipped_list(items: Any) -> tuple[Skipped, ...]:
    return tuple(Skipped(str(s["proplet_id"]), str(s["reason"])) for s in items)


def _round_to_json(r: RoundRecord) -> dict[str, Any]:
    d = {f.name: getattr(r, f.name) for f in fields(r)}
    d["state"] = r.state.value if r.state else None
    d["train_metrics"] = dict(r.train_metrics)
    d["eval_metrics"] = dict(r.eval_metrics)
    d["eval_missing"] = [{"proplet_id": s.proplet_id, "reason": s.reason} for s in r.eval_missing]
    d["eval_tasks"] = [
        {"proplet_id": s.proplet_id, "task_id": s.task_id, "task_name": s.task_name}
        for s in r.eval_tasks
    ]
    return d


def _round_from_json(d: dict[str, Any]) -> RoundRecord:
    plain: dict[str, Any] = {
        k: tuple(v) if isinstance(v, list) else v
        for k, v in d.items()
        if k not in ("state", "eval_missing", "eval_tasks")
    }
    return RoundRecord(
        **plain,
        state=RoundState(d["state"]) if d["state"] else None,
        eval_missing=_skipped_list(d["eval_missing"]),
        eval_tasks=tuple(
            ScheduledParticipant(str(s["proplet_id"]), str(s["task_id"]), str(s["task_name"]))
            for s in d.get("eval_tasks", ())
        ),
    )


def _end_to_json(end: End | None) -> dict[str, Any] | None:
    if end is None:
        return None
    return {
        "reason": end.reason.value,
        "round": end.round,
        "round_id": end.round_id,
        "detail": end.detail,
        "ended_at": end.ended_at,
    }


def _end_from_json(d: dict[str, Any] | None) -> End | None:
    if d is None:
        return None
    return End(
        EndReason(d["reason"]),
        int(d["round"]),
        str(d["round_id"]),
        str(d["detail"]),
        float(d["ended_at"]),
    )


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
        # Older versions recorded an experiment only once its fan-out was done.
        fan_out=FanOut(d.get("fan_out", FanOut.DONE.value)),
        # Absent in records older than module pinning.
        image=str(d.get("image", "")),
        module_digest=str(d.get("module_digest", "")),
        # Absent in records older than experiments of many rounds: one round, running.
        plan=ExperimentPlan.from_dict(d["plan"]) if "plan" in d else ExperimentPlan(),
        current=RoundSpec.from_dict(d["current"]) if d.get("current") else None,
        rounds=tuple(_round_from_json(r) for r in d.get("rounds", ())),
        state=ExperimentState(d.get("state", ExperimentState.RUNNING.value)),
        end=_end_from_json(d.get("end")),
    )


# An experiment is one JSON document (with its creation time beside it, for reading by eye).
EXPERIMENTS = Table[Experiment](
    "experiments",
    ("id", "record", "created_at"),
    to_row=lambda e: (e.experiment_id, json.dumps(experiment_to_json(e)), e.created_at),
    from_row=lambda row: experiment_from_json(json.loads(row[1])),
)
