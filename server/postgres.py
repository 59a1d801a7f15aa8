"""PostgreSQL for durable service state, the backend chosen by one setting
(`PROPELLER_DATABASE_URL`, a libpq DSN; SQLite in the state directory when it is empty).

Every store uses it the same way as `server.sqlite.Database`: `PostgresDatabase(url,
component, migrations)` does no I/O; `await open()` opens a pool of connections (psycopg 3,
async) and applies the component's migrations; `await db.transaction()` is one transaction
(all or nothing) on a pooled connection; `await close()` closes the pool.

Each service keeps its tables in a PostgreSQL schema named after it (`coordinator`,
`manager`, `registry`), so the services can share one database or use one each.

Migrations are versioned per component in `public.schema_migrations` (component, version,
name, applied_at). `open()` applies the ones not yet recorded, each in the transaction that
records it, under a transaction-level advisory lock: concurrent starts (replicas, a restart
racing its predecessor) apply each migration exactly once, and a start against an up-to-date
database changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from server.errors import Unavailable

# A pooled connection; rows come back as tuples.
Connection = psycopg.AsyncConnection[tuple[Any, ...]]

log = logging.getLogger(__name__)

# The advisory lock every migrating start takes (an arbitrary constant: "prop" in ASCII).
MIGRATION_LOCK = 0x70726F70
# Connections per store; a coordinator's deadline task, its RPCs and an aggregation at once.
POOL_MIN = 1
POOL_MAX = 8
# How long `open()` waits for the server before giving up (a start-up ordering race in compose
# or Kubernetes is retried by the container's restart, not here forever).
CONNECT_TIMEOUT_S = 30.0

_MIGRATIONS_TABLE = """CREATE TABLE IF NOT EXISTS public.schema_migrations (
    component TEXT NOT NULL,
    version INTEGER NOT NULL,
    name TEXT NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (component, version)
)"""


@dataclass(frozen=True)
class Migration:
    """One step of a component's schema: `version` (1, 2, ...; never renumbered or edited
    once released), a name for people, and the statements that make it."""

    version: int
    name: str
    statements: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.version < 1:
            raise ValueError(f"version: migrations start at 1, got {self.version}")


def _checked(migrations: Sequence[Migration]) -> tuple[Migration, ...]:
    versions = [m.version for m in migrations]
    if versions != list(range(1, len(versions) + 1)):
        raise ValueError(f"migrations: versions must be 1..n in order, got {versions}")
    return tuple(migrations)


async def migrate(conn: Connection, component: str, migrations: Sequence[Migration]) -> list[int]:
    """Apply `component`'s migrations that `schema_migrations` does not list; the versions
    applied now (none when the database is up to date)."""
    steps = _checked(migrations)
    applied: list[int] = []
    async with conn.transaction():
        # Held until this transaction ends: a second start waits here, then finds every
        # migration recorded. CREATE TABLE IF NOT EXISTS alone races on the catalogue.
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        await conn.execute(_MIGRATIONS_TABLE)
        cur = await conn.execute(
            "SELECT COALESCE(MAX(version), 0) FROM public.schema_migrations WHERE component = %s",
            (component,),
        )
        row = await cur.fetchone()
        current = int(row[0]) if row else 0
        if current > len(steps):
            raise RuntimeError(
                f"{component}: the database is at schema version {current}, newer than this "
                f"code's {len(steps)}; run the newer release"
            )
        for step in steps[current:]:
            for statement in step.statements:
                await conn.execute(statement)
            await conn.execute(
                "INSERT INTO public.schema_migrations (component, version, name) "
                "VALUES (%s, %s, %s)",
                (component, step.version, step.name),
            )
            applied.append(step.version)
    for version in applied:
        log.info("[postgres] %s: applied migration %d", component, version)
    return applied


class PostgresDatabase:
    """A pool of connections to the database `url` names, for one component's tables."""

    def __init__(
        self,
        url: str,
        component: str,
        migrations: Sequence[Migration],
        *,
        max_size: int = POOL_MAX,
    ) -> None:
        if not url:
            raise ValueError("url: a PostgreSQL DSN is required")
        self.url = url
        self.component = component
        self._migrations = _checked(migrations)
        self._max_size = max_size
        self._pool: AsyncConnectionPool[Connection] | None = None

    @property
    def where(self) -> str:
        """host:port/dbname of the DSN, never its password."""
        try:
            info = conninfo_to_dict(self.url)
        except psycopg.ProgrammingError:
            return "(an unparsable DSN)"
        return f"{info.get('host', 'localhost')}:{info.get('port', 5432)}/{info.get('dbname', '')}"

    def __repr__(self) -> str:
        # Never the DSN itself: it may carry a password.
        return f"PostgresDatabase({self.component})"

    async def open(self) -> None:
        if self._pool is not None:
            raise RuntimeError(f"{self!r} is open already")
        pool: AsyncConnectionPool[Connection] = AsyncConnectionPool(
            self.url,
            min_size=POOL_MIN,
            max_size=self._max_size,
            open=False,
            kwargs={"autocommit": True},
            # A connection the server dropped while idle (a restart, a failover) is found
            # when taken and replaced, rather than failing the call that took it.
            check=AsyncConnectionPool.check_connection,
            name=self.component,
        )
        try:
            try:
                await pool.open(wait=True, timeout=CONNECT_TIMEOUT_S)
            except PoolTimeout:
                raise Unavailable(
                    f"{self.component} state store: PostgreSQL at {self.where} accepted no "
                    f"connection within {CONNECT_TIMEOUT_S:g} s (PROPELLER_DATABASE_URL)"
                ) from None
            async with pool.connection() as conn:
                await migrate(conn, self.component, self._migrations)
        except BaseException:
            await pool.close()
            raise
        self._pool = pool

    async def close(self) -> None:
        """Close the pool (idempotent); a transaction still running is rolled back."""
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Connection]:
        """A connection inside one transaction: committed when the block ends, rolled back
        if it raises. A connection lost to the server surfaces as UNAVAILABLE."""
        pool = self._pool
        if pool is None:
            raise RuntimeError(f"{self!r} is not open")
        try:
            async with pool.connection() as conn, conn.transaction():
                yield conn
        except psycopg.OperationalError as exc:
            raise Unavailable(f"{self.component} state store (PostgreSQL): {exc}") from exc


class AdvisoryLocks:
    """Session-level advisory locks across processes, named by text, held on one connection
    of their own: a process that dies (even by kill -9) releases its locks with that
    connection. Tried rather than waited for, so the one connection is never blocked behind
    another process: a section elsewhere lasts a transaction or two."""

    def __init__(self, url: str, component: str) -> None:
        self.url = url
        self.component = component
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._opening = asyncio.Lock()
        # Per key: the local lock and how many tasks hold or wait for it.
        self._local: dict[str, tuple[asyncio.Lock, list[int]]] = {}

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        async with self._opening:
            if self._conn is None or self._conn.closed:
                try:
                    self._conn = await psycopg.AsyncConnection.connect(self.url, autocommit=True)
                except psycopg.OperationalError as exc:
                    raise Unavailable(f"{self.component} state store (locks): {exc}") from exc
            return self._conn

    @asynccontextmanager
    async def held(self, key: str) -> AsyncIterator[None]:
        """The lock `key` names, held for the block. A session's advisory locks are
        re-entrant, so the tasks of this process take turns on a local lock first."""
        entry = self._local.setdefault(key, (asyncio.Lock(), [0]))
        entry[1][0] += 1
        try:
            async with entry[0], self._held(key):
                yield
        finally:
            entry[1][0] -= 1
            if not entry[1][0]:
                del self._local[key]

    @asynccontextmanager
    async def _held(self, key: str) -> AsyncIterator[None]:
        delay = 0.005
        while True:
            conn = await self._connection()
            try:
                cur = await conn.execute(
                    "SELECT pg_try_advisory_lock(hashtextextended(%s, 0))", (key,)
                )
                row = await cur.fetchone()
            except psycopg.OperationalError as exc:
                raise Unavailable(f"{self.component} state store (locks): {exc}") from exc
            if row is not None and row[0]:
                break
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
        try:
            yield
        finally:
            # A connection lost meanwhile took its locks with it.
            if not conn.closed:
                try:
                    await conn.execute("SELECT pg_advisory_unlock(hashtextextended(%s, 0))", (key,))
                except psycopg.OperationalError as exc:
                    log.warning("[postgres] %s: lock %s not released: %s", self.component, key, exc)

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()
