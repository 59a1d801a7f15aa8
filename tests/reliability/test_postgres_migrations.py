"""PostgreSQL under the stores (`server.postgres`): schema migrations applied at start, each
recorded in `schema_migrations` once; a start against an up-to-date database changes nothing;
many services starting at once over one empty database apply every migration exactly once (the
advisory lock); a database newer than the code is refused rather than used; an unreachable
server is a clear error, not a hang; connections the server dropped are replaced."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from server.coordinator.app import CoordinatorConfig
from server.coordinator.pg_store import MIGRATIONS as COORDINATOR_MIGRATIONS
from server.coordinator.pg_store import PostgresRoundStore
from server.errors import Unavailable
from server.manager.app import ManagerConfig
from server.manager.pg_store import MIGRATIONS as MANAGER_MIGRATIONS
from server.manager.pg_store import PostgresManagerDatabase
from server.postgres import Migration, PostgresDatabase
from server.registry.app import RegistryConfig
from server.registry.pg_store import MIGRATIONS as REGISTRY_MIGRATIONS
from server.registry.pg_store import PostgresModelStore
from tests.support.ports import free_port

FUEL_MIGRATION = "fuel receipts: rounds' fuel budget and plausibility rule, updates' fuel"
STEPS = (
    Migration(1, "a table", ("CREATE SCHEMA demo", "CREATE TABLE demo.things (id INT)")),
    Migration(2, "a column", ("ALTER TABLE demo.things ADD COLUMN name TEXT",)),
)


def recorded(url: str) -> list[tuple[str, int, str]]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT component, version, name FROM schema_migrations ORDER BY component, version"
        ).fetchall()
    return [(str(c), int(v), str(n)) for c, v, n in rows]


async def test_migrations_are_applied_once_and_in_order(database_url: str) -> None:
    first = PostgresDatabase(database_url, "demo", STEPS[:1])
    await first.open()
    await first.close()
    assert recorded(database_url) == [("demo", 1, "a table")]
    # A newer release adds step 2; starting it again changes nothing more.
    for _ in range(2):
        db = PostgresDatabase(database_url, "demo", STEPS)
        await db.open()
        async with db.transaction() as conn:
            await conn.execute("INSERT INTO demo.things (id, name) VALUES (1, 'x')")
        await db.close()
    assert recorded(database_url) == [("demo", 1, "a table"), ("demo", 2, "a column")]
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT id, name FROM demo.things").fetchall() == [(1, "x")] * 2


async def test_concurrent_starts_on_an_empty_database_migrate_once(database_url: str) -> None:
    """Every service and a second replica of each, all starting at once."""
    stores: list[PostgresRoundStore | PostgresModelStore | PostgresManagerDatabase] = [
        *(PostgresRoundStore(database_url) for _ in range(3)),
        *(PostgresModelStore(database_url) for _ in range(3)),
        *(PostgresManagerDatabase(database_url) for _ in range(3)),
    ]
    await asyncio.gather(*(s.open() for s in stores))
    try:
        assert recorded(database_url) == [
            (component, m.version, m.name)
            for component, steps in (
                ("coordinator", COORDINATOR_MIGRATIONS),
                ("manager", MANAGER_MIGRATIONS),
                ("registry", REGISTRY_MIGRATIONS),
            )
            for m in steps
        ]
        assert ("coordinator", 3, FUEL_MIGRATION) in recorded(database_url)
        assert (
            "manager",
            2,
            "replicas: change numbers, removals, experiment leases",
        ) in recorded(database_url)
    finally:
        await asyncio.gather(*(s.close() for s in stores))


async def test_a_coordinator_database_from_before_fuel_receipts_is_brought_up_to_date(
    database_url: str,
) -> None:
    # A database at the audit's migration (2), from before fuel receipts (3).
    older = PostgresDatabase(database_url, "coordinator", COORDINATOR_MIGRATIONS[:2])
    await older.open()
    await older.close()
    store = PostgresRoundStore(database_url)
    await store.open()
    try:
        assert recorded(database_url)[-1] == ("coordinator", 3, FUEL_MIGRATION)
        with psycopg.connect(database_url) as conn:
            columns = conn.execute(
                "SELECT table_name, column_name FROM information_schema.columns "
                "WHERE table_schema = 'coordinator' AND column_name LIKE '%fuel%' "
                "ORDER BY table_name, column_name"
            ).fetchall()
        assert columns == [
            ("rounds", "fuel_budget"),
            ("rounds", "min_fuel_ratio"),
            ("updates", "fuel_consumed"),
        ]
    finally:
        await store.close()


async def test_a_database_newer_than_the_code_is_refused(database_url: str) -> None:
    newer = PostgresDatabase(database_url, "demo", STEPS)
    await newer.open()
    await newer.close()
    older = PostgresDatabase(database_url, "demo", STEPS[:1])
    with pytest.raises(RuntimeError, match="schema version 2, newer than this code's 1"):
        await older.open()


def test_migrations_must_be_numbered_from_one() -> None:
    with pytest.raises(ValueError, match=r"versions must be 1\.\.n"):
        PostgresDatabase("postgresql://x@127.0.0.1/x", "demo", STEPS[1:])
    with pytest.raises(ValueError, match="url"):
        PostgresDatabase("", "demo", STEPS)


async def test_an_unreachable_server_is_an_error_not_a_hang(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("server.postgres.CONNECT_TIMEOUT_S", 1.0)
    port = free_port()
    url = f"postgresql://nobody:secret@127.0.0.1:{port}/x"
    db = PostgresDatabase(url, "demo", STEPS)
    with pytest.raises(Unavailable) as exc:
        await db.open()
    assert f"PostgreSQL at 127.0.0.1:{port}/x accepted no connection" in str(exc.value)
    assert "secret" not in str(exc.value)


async def test_connections_the_server_dropped_are_replaced(database_url: str) -> None:
    store = PostgresRoundStore(database_url)
    await store.open()
    try:
        assert await store.list() == []
        with psycopg.connect(database_url, autocommit=True) as admin:
            dropped = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ).fetchall()
        assert dropped[0][0] >= 1  # the store's idle connection
        # The next call takes a fresh connection instead of failing on the dead one.
        assert await store.list() == []
        assert await store.unsent() == []
    finally:
        await store.close()


def test_a_dsn_s_password_is_not_in_the_logged_config() -> None:
    """`serve` logs each service's config at start: the DSN is left out of it."""
    env = {"PROPELLER_INSECURE": "1", "PROPELLER_DATABASE_URL": "postgresql://u:hunter2@db/x"}
    for config in (
        CoordinatorConfig.from_env(env),
        ManagerConfig.from_env(env),
        RegistryConfig.from_env(env),
    ):
        assert config.database_url == env["PROPELLER_DATABASE_URL"]
        assert "hunter2" not in repr(config) and "hunter2" not in str(config)
