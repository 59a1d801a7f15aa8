"""The manager's durable state in PostgreSQL: proplets, tasks and experiments in the schema
`manager` of the database `PROPELLER_DATABASE_URL` names, with the same tables, columns and
meaning as manager.sqlite (`server.manager.sqlite_store`).

The same shape as the SQLite store: every record is in memory as well (loaded at `open()`), a
`put` hands its statement to the database without waiting, statements commit one
transaction each in the order they were submitted (one writer at a time, first come first
served), and `flush()` -- the `persisted()` barrier the servicer and the MQTT handler await
before answering -- waits until every statement submitted so far has committed, and raises if
one failed (then the manager must restart: memory is ahead of the database).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from server.manager.experiments import Experiment
from server.manager.sqlite_store import (
    BLOB,
    COLUMNS,
    COUNT,
    REAL,
    TEXT,
    ManagerDatabase,
    Row,
    Table,
    column_definitions,
)
from server.postgres import AdvisoryLocks, Connection, Migration, PostgresDatabase

log = logging.getLogger(__name__)


COMPONENT = "manager"

POSTGRES_TYPES = {TEXT: "TEXT", REAL: "DOUBLE PRECISION", BLOB: "BYTEA", COUNT: "INTEGER"}

MIGRATIONS = (
    Migration(
        1,
        "proplets, tasks, experiments",
        (
            "CREATE SCHEMA IF NOT EXISTS manager",
            # `seq`: creation order, which `list` keeps across restarts (SQLite's rowid).
            *(
                f"CREATE TABLE manager.{table} (\n    seq BIGINT GENERATED ALWAYS AS IDENTITY,"
                f"\n    {column_definitions(table, POSTGRES_TYPES)}\n)"
                for table in COLUMNS
            ),
        ),
    ),
    Migration(
        2,
        "replicas: change numbers, removals, experiment leases",
        (
            "CREATE SEQUENCE manager.changes",
            # Every insert or update takes the next change number; a delete is written down
            # in `removals` with one. A replica reads what changed since the last it read.
            """CREATE FUNCTION manager.mark_changed() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN NEW.changed := nextval('manager.changes'); RETURN NEW; END $$""",
            """CREATE FUNCTION manager.mark_removed() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                INSERT INTO manager.removals
                    VALUES (nextval('manager.changes'), TG_TABLE_NAME, OLD.id);
                RETURN OLD;
            END $$""",
            """CREATE TABLE manager.removals (
                changed BIGINT PRIMARY KEY,
                tbl TEXT NOT NULL,
                id TEXT NOT NULL
            )""",
            *(
                statement
                for table in COLUMNS
                for statement in (
                    f"ALTER TABLE manager.{table} ADD COLUMN changed BIGINT NOT NULL DEFAULT 0",
                    f"CREATE INDEX {table}_changed ON manager.{table} (changed)",
                    f"CREATE TRIGGER changed BEFORE INSERT OR UPDATE ON manager.{table} "
                    "FOR EACH ROW EXECUTE FUNCTION manager.mark_changed()",
                    f"CREATE TRIGGER removed AFTER DELETE ON manager.{table} "
                    "FOR EACH ROW EXECUTE FUNCTION manager.mark_removed()",
                )
            ),
            # Who drives each experiment (`owner`, until when) and whether an operator asked,
            # on another replica, for it to stop.
            """CREATE TABLE manager.experiment_leases (
                experiment_id TEXT PRIMARY KEY,
                owner TEXT NOT NULL DEFAULT '',
                until DOUBLE PRECISION NOT NULL DEFAULT 0,
                stop_requested BOOLEAN NOT NULL DEFAULT FALSE
            )""",
        ),
    ),
)

# The lock every write shares and a refresh takes alone ("mchg" in ASCII).
CHANGES_LOCK = 0x6D636867


class PostgresManagerDatabase(ManagerDatabase):
    """The manager's three stores over PostgreSQL. `await open()` before use (it applies the
    migrations and loads every record), `await close()` after (it waits for pending writes)."""

    # Table stores' SQL: tables in the `manager` schema, values marked as psycopg's.
    schema = "manager."
    mark = "%s"

    def __init__(self, url: str) -> None:
        super().__init__(Path("postgresql"))
        self.path = Path("postgresql:manager")  # what log lines and errors name
        self._pg = PostgresDatabase(url, COMPONENT, MIGRATIONS)
        self._open = False
        # Held by one statement at a time; asyncio's lock wakes waiters in arrival order, so
        # statements commit in the order they were submitted.
        self._writer = asyncio.Lock()
        # Replicas (`server.manager.replicas`): task locks across processes, the highest
        # change number read so far, and refreshes asked for / done (one refresh serves
        # every caller that asked before it began).
        self._locks = AdvisoryLocks(url, COMPONENT)
        self._seen = 0
        self._refresh_asked = 0
        self._refresh_done = 0
        self._refreshing = asyncio.Lock()
        # The experiments refreshes found changed, until `refresh` hands them out.
        self._experiments_changed: list[tuple[Experiment | None, Experiment]] = []

    async def open(self) -> None:
        await self._pg.open()
        try:
            async with self._pg.transaction() as conn:
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (CHANGES_LOCK,))
                rows = [await self._rows(s.table, -1, conn) for s in self.stores]
                cur = await conn.execute("SELECT COALESCE(MAX(changed), 0) FROM manager.removals")
                removed = await cur.fetchone()
        except BaseException:
            await self._pg.close()
            raise
        self._seen = max(
            [int(removed[0]) if removed else 0, *(c for table in rows for _, c, _ in table)]
        )
        self._open = True
        self.loaded(
            [[r for _, _, r in table] for table in rows],
            "postgres",
            seqs=[[seq for seq, _, _ in table] for table in rows],
        )

    async def _rows(
        self, table: Table[Any], after: int, conn: Connection
    ) -> list[tuple[int, int, Any]]:
        """(seq, change number, record) of the rows changed after change `after` (-1: all)."""
        cur = await conn.execute(
            f"SELECT seq, changed, {', '.join(table.columns)} FROM manager.{table.name} "
            "WHERE changed > %s ORDER BY seq",
            (after,),
        )
        fetched = await cur.fetchall()
        return [(int(r[0]), int(r[1]), table.from_row(tuple(r[2:]))) for r in fetched]

    async def close(self) -> None:
        if not self._open:
            return
        self._open = False
        try:
            await self._wait_pending()
        finally:
            await self._locks.close()
            await self._pg.close()

    def submit_statement(self, statement: tuple[str, Row]) -> None:
        """Commit `statement` after every statement submitted before it."""
        if not self._open:
            raise RuntimeError(f"{self.path}: the manager's state is not open")
        task = asyncio.get_running_loop().create_task(self._commit(*statement))
        self._pending.append(task)
        task.add_done_callback(self._written)

    async def _commit(self, sql: str, values: Row) -> None:
        async with self._writer, self._pg.transaction() as conn:
            # Shared with every other write; a refresh takes it alone, so it never reads
            # past a change number whose transaction has not committed yet.
            await conn.execute("SELECT pg_advisory_xact_lock_shared(%s)", (CHANGES_LOCK,))
            await conn.execute(sql, values)

    # ---- replicas (`server.manager.replicas.ReplicaStore`) ---------------------------------

    async def refresh(self) -> list[tuple[Experiment | None, Experiment]]:
        """Take every row changed elsewhere since the last refresh (after this replica's own
        writes so far are committed); the experiments that changed, before and after, since
        the last call of this (a task lock's refresh keeps them for it), each change once."""
        await self._read_changes()
        changed, self._experiments_changed = self._experiments_changed, []
        return changed

    async def _read_changes(self) -> None:
        self._refresh_asked += 1
        asked = self._refresh_asked
        async with self._refreshing:
            if self._refresh_done >= asked:
                return  # a refresh that began after this call was made has run
            target = self._refresh_asked
            await self.flush()
            since = [s.changes for s in self.stores]
            async with self._pg.transaction() as conn:
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (CHANGES_LOCK,))
                rows = [await self._rows(s.table, self._seen, conn) for s in self.stores]
                cur = await conn.execute(
                    "SELECT changed, tbl, id FROM manager.removals WHERE changed > %s",
                    (self._seen,),
                )
                removals = await cur.fetchall()
            seen = max(
                [self._seen, *(c for table in rows for _, c, _ in table)]
                + [int(r[0]) for r in removals]
            )
            taken: list[list[tuple[Any, Any]]] = []
            for store, table, mark in zip(self.stores, rows, since, strict=True):
                removed = [str(r[2]) for r in removals if r[1] == store.table.name]
                taken.append(store.refreshed([(q, r) for q, _, r in table], removed, mark))
            self._seen = seen
            self._refresh_done = target
            self._experiments_changed += taken[2]

    @asynccontextmanager
    async def task_lock(self, task_id: str) -> AsyncIterator[None]:
        async with self._locks.held(f"manager.task:{task_id}"):
            await self._read_changes()
            try:
                yield
            finally:
                await self.flush()

    async def _row(self, sql: str, values: Row) -> Row | None:
        """The first row `sql` returns (None: none), in a transaction of its own."""
        async with self._pg.transaction() as conn:
            cur = await conn.execute(sql, values)
            row = await cur.fetchone() if cur.description else None
            return None if row is None else tuple(row)

    async def claim(self, experiment_id: str, owner: str, now: float, lease_s: float) -> bool:
        values = (experiment_id, owner, now + lease_s, owner, now)
        return await self._row(_CLAIM, values) is not None

    async def renew(
        self, experiment_id: str, owner: str, now: float, lease_s: float
    ) -> tuple[bool, bool]:
        row = await self._row(
            "UPDATE manager.experiment_leases SET until = %s "
            "WHERE experiment_id = %s AND owner = %s RETURNING stop_requested",
            (now + lease_s, experiment_id, owner),
        )
        return (row is not None, bool(row[0]) if row is not None else False)

    async def claim_due(self, owner: str, now: float, lease_s: float) -> list[str]:
        async with self._pg.transaction() as conn:
            cur = await conn.execute(
                "SELECT e.id FROM manager.experiments e "
                "LEFT JOIN manager.experiment_leases l ON l.experiment_id = e.id "
                "WHERE COALESCE(e.record::jsonb ->> 'state', 'running') = 'running' "
                "AND (l.experiment_id IS NULL OR l.owner = %s OR l.until < %s) "
                "ORDER BY e.seq FOR UPDATE OF e SKIP LOCKED",
                (owner, now),
            )
            taken: list[str] = []
            for (eid,) in await cur.fetchall():
                claimed = await conn.execute(_CLAIM, (eid, owner, now + lease_s, owner, now))
                if await claimed.fetchone() is not None:
                    taken.append(str(eid))
            return taken

    async def request_stop(self, experiment_id: str) -> None:
        await self._row(
            "INSERT INTO manager.experiment_leases (experiment_id, stop_requested) "
            "VALUES (%s, TRUE) ON CONFLICT (experiment_id) DO UPDATE SET stop_requested = TRUE",
            (experiment_id,),
        )


# Take an experiment's lease when there is none, or it is `owner`'s, or it expired (the row is
# locked by the upsert, so two replicas never both take it).
_CLAIM = (
    "INSERT INTO manager.experiment_leases AS l (experiment_id, owner, until) "
    "VALUES (%s, %s, %s) ON CONFLICT (experiment_id) DO UPDATE "
    "SET owner = EXCLUDED.owner, until = EXCLUDED.until "
    "WHERE l.owner = %s OR l.until < %s RETURNING l.experiment_id"
)
