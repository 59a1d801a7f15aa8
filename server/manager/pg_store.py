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
from pathlib import Path
from typing import Any

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
from server.postgres import Migration, PostgresDatabase

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
)


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

    async def open(self) -> None:
        await self._pg.open()
        try:
            loaded = [await self._load(s.table) for s in self.stores]
        except BaseException:
            await self._pg.close()
            raise
        self._open = True
        self.loaded(loaded, "postgres")

    async def _load(self, table: Table[Any]) -> list[Any]:
        async with self._pg.transaction() as conn:
            cur = await conn.execute(
                f"SELECT {', '.join(table.columns)} FROM manager.{table.name} ORDER BY seq"
            )
            return [table.from_row(tuple(row)) for row in await cur.fetchall()]

    async def close(self) -> None:
        if not self._open:
            return
        self._open = False
        try:
            await self._wait_pending()
        finally:
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
            await conn.execute(sql, values)
