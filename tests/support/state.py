"""The two durable state backends the store contract tests run against: SQLite files in a
state directory and a PostgreSQL database of the test's own (`tests.support.postgres`).

`StateBackend` is what a parametrised test holds (the `state_backend` fixture in
tests/conftest.py): which backend, where its state is, the stores over it, and `raw` /
`execute` to look at or damage the tables with a connection of their own, as another process
would. SQL given to `raw` and `execute` is written once for both: `?` placeholders and the
unqualified table names of the component (PostgreSQL's connection searches the component's
schema).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import psycopg

from server.coordinator.pg_store import PostgresRoundStore
from server.coordinator.store import STATE_FILE, SqliteRoundStore
from server.manager.pg_store import PostgresManagerDatabase
from server.manager.sqlite_store import FILE_NAME as MANAGER_FILE
from server.manager.sqlite_store import ManagerDatabase
from server.registry.pg_store import PostgresModelStore
from server.registry.store import REGISTRY_DB_FILE, SqliteModelStore

Kind = Literal["sqlite", "postgres"]
Component = Literal["coordinator", "manager", "registry"]
DurableRoundStore = SqliteRoundStore | PostgresRoundStore
DurableModelStore = SqliteModelStore | PostgresModelStore

_FILES: dict[Component, str] = {
    "coordinator": STATE_FILE,
    "manager": MANAGER_FILE,
    "registry": REGISTRY_DB_FILE,
}


@dataclass(frozen=True)
class StateBackend:
    kind: Kind
    state_dir: Path
    url: str = ""  # the DSN, for "postgres"

    def __str__(self) -> str:
        return self.kind

    def env(self) -> dict[str, str]:
        """The variables that put a service process's state on this backend."""
        env = {"PROPELLER_STATE_DIR": str(self.state_dir)}
        if self.kind == "postgres":
            env["PROPELLER_DATABASE_URL"] = self.url
        return env

    def round_store(self) -> DurableRoundStore:
        if self.kind == "postgres":
            return PostgresRoundStore(self.url)
        return SqliteRoundStore(self.state_dir / STATE_FILE)

    async def opened_round_store(self) -> DurableRoundStore:
        store = self.round_store()
        await store.open()
        return store

    def manager_database(self) -> ManagerDatabase:
        if self.kind == "postgres":
            return PostgresManagerDatabase(self.url)
        return ManagerDatabase(self.state_dir)

    def model_store(self, cache_size: int = 2) -> DurableModelStore:
        if self.kind == "postgres":
            return PostgresModelStore(self.url, cache_size=cache_size)
        return SqliteModelStore(self.state_dir / REGISTRY_DB_FILE, cache_size=cache_size)

    def raw(self, component: Component, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        """Rows of `sql`, read with a connection of its own."""
        if self.kind == "postgres":
            with psycopg.connect(self.url, autocommit=True) as pg:
                pg.execute(f"SET search_path TO {component}")
                cur = pg.execute(sql.replace("?", "%s"), args)
                return list(cur.fetchall()) if cur.description else []
        lite = sqlite3.connect(self.state_dir / _FILES[component])
        try:
            with lite:
                return lite.execute(sql, args).fetchall()
        finally:
            lite.close()

    def execute(self, component: Component, sql: str, *args: Any) -> None:
        """Run `sql` (committed) with a connection of its own."""
        self.raw(component, sql, *args)
