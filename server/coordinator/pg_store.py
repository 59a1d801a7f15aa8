"""The coordinator's rounds in PostgreSQL: `PostgresRoundStore`, a `RoundStore` with the same
tables and the same transactions as `SqliteRoundStore`, in the schema `coordinator` of the
database `PROPELLER_DATABASE_URL` names.

- Accepting an update is one transaction: the round's row is locked (`SELECT ... FOR
  UPDATE`), the update row inserted (the next arrival number of the round) and the round
  record rewritten; the count of the round's update rows must equal the record's, or all of it
  rolls back. The coordinator answers the update only after the commit.
- A round's completion, its notice (the outbox) and its experiment's strategy state are one
  transaction (`put(rnd, notice, state)`).
- Nothing is cached: every read asks the database, so what one process committed is what the
  next read sees, from any process (the ground a second coordinator replica stands on).

Replicas (`server.coordinator.replicas`): the store is also their `RoundLeases`. A round's
lock is a session-level advisory lock taken on a connection of the store's own (so it goes
with the process that holds it, even on kill -9); rounds carry a lease (`lease_owner`,
`lease_until`, empty and 0 until a replica takes one) and are indexed by (state, deadline),
so a replica claims the rounds that are due with `SELECT ... FOR UPDATE SKIP LOCKED`.

Update and state tensors are `bytea` (the wire's layout, sha256 checked on every read): a row
is at most MAX_PAYLOAD_BYTES, under PostgreSQL's 1 GiB per value.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from server.coordinator import records
from server.coordinator.records import Notice, StrategyState
from server.coordinator.rounds import Round, Update
from server.coordinator.store import StoredUpdates
from server.errors import PropellerError, ResourceExhausted, Unavailable
from server.postgres import AdvisoryLocks, Connection, Migration, PostgresDatabase
from server.streams import MAX_PAYLOAD_BYTES
from server.tensors import (
    nbytes_of,
    offload_if_big,
    tensor_bytes,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

COMPONENT = "coordinator"

MIGRATIONS = (
    Migration(
        1,
        "rounds, updates, strategy states, notices",
        (
            "CREATE SCHEMA IF NOT EXISTS coordinator",
            """CREATE TABLE coordinator.rounds (
                seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- configuration order
                round_id TEXT NOT NULL UNIQUE,
                experiment_id TEXT NOT NULL,
                state TEXT NOT NULL,
                participants TEXT NOT NULL,             -- JSON list
                k_of_n INTEGER NOT NULL,
                timeout_s DOUBLE PRECISION NOT NULL,
                model_ref TEXT NOT NULL,
                requested_model_ref TEXT NOT NULL,
                specs TEXT NOT NULL,                    -- JSON: the base model's tensor specs
                hyperparams TEXT NOT NULL,              -- JSON
                task_wasm_image TEXT NOT NULL,
                configured_at DOUBLE PRECISION NOT NULL,
                started_at DOUBLE PRECISION NOT NULL,
                deadline DOUBLE PRECISION NOT NULL,     -- absolute wall time (0 until started)
                completed_at DOUBLE PRECISION NOT NULL,
                reported TEXT NOT NULL,                 -- JSON list, arrival order
                metrics TEXT NOT NULL,                  -- JSON
                new_model_version BIGINT,
                new_model_uri TEXT NOT NULL,
                failure_reason TEXT NOT NULL,
                closed_by TEXT NOT NULL,
                min_k_of_n INTEGER NOT NULL,
                failed TEXT NOT NULL,                   -- JSON list of [proplet_id, reason]
                module_digest TEXT NOT NULL,
                base_model_sha256 TEXT NOT NULL,
                strategy_name TEXT NOT NULL,
                strategy_params_json TEXT NOT NULL,
                -- Which replica holds the round's deadline or aggregation, and until when
                -- (wall time); never written by a single coordinator.
                lease_owner TEXT NOT NULL DEFAULT '',
                lease_until DOUBLE PRECISION NOT NULL DEFAULT 0
            )""",
            "CREATE INDEX rounds_due ON coordinator.rounds (state, deadline)",
            "CREATE INDEX rounds_experiment ON coordinator.rounds (experiment_id, seq)",
            """CREATE TABLE coordinator.updates (
                round_id TEXT NOT NULL REFERENCES coordinator.rounds(round_id),
                proplet_id TEXT NOT NULL,
                seq INTEGER NOT NULL,                   -- arrival order within the round
                base_model_uri TEXT NOT NULL,
                num_samples BIGINT NOT NULL,
                metrics TEXT NOT NULL,                  -- JSON
                specs TEXT NOT NULL,                    -- JSON: the tensors in bytea order
                received_at DOUBLE PRECISION NOT NULL,
                sha256 TEXT NOT NULL,                   -- of the bytes, checked on every read
                base_model_sha256 TEXT NOT NULL,
                module_digest TEXT NOT NULL,
                signature BYTEA NOT NULL,
                certificate BYTEA NOT NULL,
                distance DOUBLE PRECISION NOT NULL,
                clip_scale DOUBLE PRECISION NOT NULL,
                tensors BYTEA NOT NULL,                 -- concatenated C-order little-endian
                PRIMARY KEY (round_id, proplet_id),
                UNIQUE (round_id, seq)
            )""",
            """CREATE TABLE coordinator.strategy_states (
                experiment_id TEXT PRIMARY KEY,
                round_id TEXT NOT NULL REFERENCES coordinator.rounds(round_id),
                strategy_name TEXT NOT NULL,
                specs TEXT NOT NULL,
                sha256 TEXT NOT NULL,
                tensors BYTEA NOT NULL
            )""",
            """CREATE TABLE coordinator.notices (
                seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- the order to publish
                round_id TEXT NOT NULL UNIQUE REFERENCES coordinator.rounds(round_id),
                topic TEXT NOT NULL,
                payload BYTEA NOT NULL,
                sent INTEGER NOT NULL DEFAULT 0         -- 1 once published (and acknowledged)
            )""",
        ),
    ),
    Migration(
        2,
        "the re-execution audit of a round: its configuration and outcomes",
        (
            # JSON object: fraction, seed, policy, and the seed in use (docs/verifiability.md)
            "ALTER TABLE coordinator.rounds ADD COLUMN audit TEXT NOT NULL DEFAULT '{}'",
            # JSON list of the audited updates' outcomes
            "ALTER TABLE coordinator.rounds ADD COLUMN audits TEXT NOT NULL DEFAULT '[]'",
        ),
    ),
    Migration(
        3,
        "fuel receipts: rounds' fuel budget and plausibility rule, updates' fuel",
        (
            "ALTER TABLE coordinator.rounds ADD COLUMN fuel_budget BIGINT NOT NULL DEFAULT 0",
            "ALTER TABLE coordinator.rounds "
            "ADD COLUMN min_fuel_ratio DOUBLE PRECISION NOT NULL DEFAULT 0",
            "ALTER TABLE coordinator.updates ADD COLUMN fuel_consumed BIGINT NOT NULL DEFAULT 0",
        ),
    ),
)

_SELECT_ROUNDS = f"SELECT {', '.join(records.ROUND_COLUMNS)} FROM coordinator.rounds"
# The lease columns are not in the record: rewriting a round leaves them as they are.
_UPSERT_ROUND = records.upsert("coordinator.rounds", records.ROUND_COLUMNS, "%s")
_UPSERT_STATE = records.upsert(
    "coordinator.strategy_states", ("experiment_id", *records.STATE_COLUMNS), "%s"
)
# A replica's rewrite: a round that goes AGGREGATING in it is leased to the replica in the same
# statement, so no other replica's claim loop can take it between the commit and the claim.
_UPSERT_ROUND_LEASED = (
    _UPSERT_ROUND + ", lease_owner = CASE WHEN EXCLUDED.state = 'aggregating' AND "
    "coordinator.rounds.state <> 'aggregating' THEN %s ELSE coordinator.rounds.lease_owner END"
    ", lease_until = CASE WHEN EXCLUDED.state = 'aggregating' AND "
    "coordinator.rounds.state <> 'aggregating' THEN %s ELSE coordinator.rounds.lease_until END"
)
_INSERT_UPDATE_COLUMNS = ("round_id", "seq", "tensors", *records.UPDATE_HEADER_COLUMNS)
_INSERT_UPDATE = (
    f"INSERT INTO coordinator.updates ({', '.join(_INSERT_UPDATE_COLUMNS)}) "
    # The round's next arrival number, counted under the round's row lock.
    f"SELECT %s, COALESCE(MAX(seq), -1) + 1, {', '.join('%s' for _ in _INSERT_UPDATE_COLUMNS[2:])} "
    "FROM coordinator.updates WHERE round_id = %s"
)


class PostgresRoundStore:
    """A durable `RoundStore` in PostgreSQL. `PostgresRoundStore(url)` does no I/O; `await
    open()` connects and applies the migrations; `await close()` closes the pool."""

    def __init__(self, url: str, *, max_bytes: int = MAX_PAYLOAD_BYTES) -> None:
        self.url = url
        self.db = PostgresDatabase(url, COMPONENT, MIGRATIONS)
        self.max_bytes = max_bytes
        # The replica that rounds going AGGREGATING here are leased to (`lease_aggregations`).
        self._holder: tuple[str, float, Callable[[], float]] | None = None
        # This process's round locks, on a connection of their own (opened at the first).
        self._locks = AdvisoryLocks(url, "coordinator")

    async def open(self) -> None:
        await self.db.open()
        async with self.db.transaction() as conn:
            cur = await conn.execute("SELECT count(*) FROM coordinator.rounds")
            row = await cur.fetchone()
        log.info("[Coordinator.store] postgres rounds=%d", row[0] if row else 0)

    async def close(self) -> None:
        await self._locks.close()
        await self.db.close()

    async def _upsert(self, conn: Connection, rnd: Round) -> None:
        if self._holder is None:
            await conn.execute(_UPSERT_ROUND, records.round_values(rnd))
            return
        owner, lease_s, clock = self._holder
        await conn.execute(
            _UPSERT_ROUND_LEASED, (*records.round_values(rnd), owner, clock() + lease_s)
        )

    # ---- replicas (`server.coordinator.replicas.RoundLeases`) ------------------------------

    def lease_aggregations(self, owner: str, lease_s: float, clock: Callable[[], float]) -> None:
        """From now on a round this store turns AGGREGATING is leased to `owner`, for
        `lease_s` from `clock()`, in the transaction that does it."""
        self._holder = (owner, lease_s, clock)

    @asynccontextmanager
    async def round_lock(self, round_id: str) -> AsyncIterator[None]:
        """The round's advisory lock, across processes (`server.postgres.AdvisoryLocks`)."""
        async with self._locks.held(f"coordinator.round:{round_id}"):
            yield

    async def claim(self, round_id: str, owner: str, now: float, lease_s: float) -> bool:
        async def take(conn: Connection) -> bool:
            cur = await conn.execute(
                "UPDATE coordinator.rounds SET lease_owner = %s, lease_until = %s "
                "WHERE round_id = %s AND (lease_owner = %s OR lease_until < %s) "
                "RETURNING round_id",
                (owner, now + lease_s, round_id, owner, now),
            )
            return await cur.fetchone() is not None

        return await self._tx(take)

    async def renew(self, round_id: str, owner: str, now: float, lease_s: float) -> bool:
        async def extend(conn: Connection) -> bool:
            cur = await conn.execute(
                "UPDATE coordinator.rounds SET lease_until = %s "
                "WHERE round_id = %s AND lease_owner = %s RETURNING round_id",
                (now + lease_s, round_id, owner),
            )
            return await cur.fetchone() is not None

        return await self._tx(extend)

    async def claim_due(self, owner: str, now: float, lease_s: float) -> list[str]:
        async def take(conn: Connection) -> list[str]:
            cur = await conn.execute(
                "SELECT round_id FROM coordinator.rounds WHERE "
                "(state = 'open' AND deadline > 0 AND deadline <= %s "
                " AND (lease_owner = %s OR lease_until < %s)) "
                "OR (state = 'aggregating' AND lease_until < %s) "
                "ORDER BY seq FOR UPDATE SKIP LOCKED",
                (now, owner, now, now),
            )
            ids = [str(r[0]) for r in await cur.fetchall()]
            if ids:
                await conn.execute(
                    "UPDATE coordinator.rounds SET lease_owner = %s, lease_until = %s "
                    "WHERE round_id = ANY(%s)",
                    (owner, now + lease_s, ids),
                )
            return ids

        return await self._tx(take)

    async def _tx(self, fn: Callable[[Connection], Awaitable[T]]) -> T:
        """`fn` in one transaction; a failure of the database itself is UNAVAILABLE (nothing
        of the transaction stays), a domain error passes as it is."""
        try:
            async with self.db.transaction() as conn:
                return await fn(conn)
        except PropellerError:
            raise
        except Exception as exc:
            raise Unavailable(f"coordinator state store: {exc}") from exc

    def _check_size(self, what: str, size: int) -> None:
        if size > self.max_bytes:
            raise ResourceExhausted(
                f"{what} of {size} bytes exceeds the coordinator's state store limit of "
                f"{self.max_bytes} bytes"
            )

    async def get(self, round_id: str) -> Round | None:
        async def select(conn: Connection) -> Round | None:
            cur = await conn.execute(f"{_SELECT_ROUNDS} WHERE round_id = %s", (round_id,))
            row = await cur.fetchone()
            return None if row is None else records.readable_round(row, "coordinator.rounds")

        return await self._tx(select)

    async def put(
        self, rnd: Round, notice: Notice | None = None, state: StrategyState | None = None
    ) -> None:
        blob, digest = bytearray(), ""
        if state is not None:
            blob, digest = await offload_if_big(
                nbytes_of(state.tensors), records.blob_of, state.tensors
            )
            self._check_size("state: strategy state", len(blob))

        async def together(conn: Connection) -> None:
            await self._upsert(conn, rnd)
            if notice is not None:
                await conn.execute(
                    "INSERT INTO coordinator.notices (round_id, topic, payload) "
                    "VALUES (%s, %s, %s) ON CONFLICT (round_id) DO UPDATE SET "
                    "topic = EXCLUDED.topic, payload = EXCLUDED.payload, sent = 0",
                    (notice.round_id, notice.topic, notice.payload),
                )
            if state is not None:
                await conn.execute(_UPSERT_STATE, records.state_values(state, digest, blob))

        await self._tx(together)

    async def strategy_state(self, experiment_id: str) -> StrategyState | None:
        async def load(conn: Connection) -> StrategyState | None:
            cur = await conn.execute(
                f"SELECT {', '.join(records.STATE_COLUMNS)} FROM coordinator.strategy_states "
                "WHERE experiment_id = %s",
                (experiment_id,),
            )
            row = await cur.fetchone()
            return None if row is None else records.state_from_row(experiment_id, row)

        return await self._tx(load)

    async def unsent(self) -> list[Notice]:
        async def select(conn: Connection) -> list[Notice]:
            cur = await conn.execute(
                "SELECT round_id, topic, payload FROM coordinator.notices WHERE sent = 0 "
                "ORDER BY seq"
            )
            return [Notice(str(r), str(t), bytes(p)) for r, t, p in await cur.fetchall()]

        return await self._tx(select)

    async def sent(self, round_id: str) -> None:
        async def mark(conn: Connection) -> None:
            await conn.execute(
                "UPDATE coordinator.notices SET sent = 1 WHERE round_id = %s", (round_id,)
            )

        await self._tx(mark)

    async def _insert_update(self, conn: Connection, round_id: str, update: Update) -> None:
        blob = await offload_if_big(nbytes_of(update.tensors), tensor_bytes, update.tensors)
        self._check_size("tensors: update", len(blob))
        values = (round_id, blob, *records.update_values(update, blob), round_id)
        await conn.execute(_INSERT_UPDATE, values)

    async def add_update(self, round_id: str, update: Update) -> None:
        async def insert(conn: Connection) -> None:
            await _lock_round(conn, round_id)
            await self._insert_update(conn, round_id, update)

        await self._tx(insert)

    async def accept(self, rnd: Round, update: Update) -> None:
        async def both(conn: Connection) -> None:
            # The round's row lock orders concurrent accepts of one round (their arrival
            # numbers), from this process or another.
            await _lock_round(conn, rnd.round_id)
            await self._insert_update(conn, rnd.round_id, update)
            await self._upsert(conn, rnd)
            cur = await conn.execute(
                "SELECT count(*) FROM coordinator.updates WHERE round_id = %s", (rnd.round_id,)
            )
            row = await cur.fetchone()
            records.check_update_count(rnd, row[0] if row else 0)

        await self._tx(both)

    async def updates(self, round_id: str) -> StoredUpdates:
        async def headers(conn: Connection) -> Sequence[Update]:
            cur = await conn.execute(
                f"SELECT {', '.join(records.UPDATE_HEADER_COLUMNS)} FROM coordinator.updates "
                "WHERE round_id = %s ORDER BY seq",
                (round_id,),
            )
            return [records.header_from_row(row)[0] for row in await cur.fetchall()]

        return StoredUpdates(self, round_id, await self._tx(headers))

    async def _load_update(self, round_id: str, header: Update) -> Update:
        async def load(conn: Connection) -> tuple[Any, ...] | None:
            cur = await conn.execute(
                "SELECT specs, sha256, tensors FROM coordinator.updates "
                "WHERE round_id = %s AND proplet_id = %s",
                (round_id, header.proplet_id),
            )
            return await cur.fetchone()

        row = await self._tx(load)
        # Hashing a big update is CPU work: in a worker thread when big.
        nbytes = 0 if row is None else len(row[2])
        return await offload_if_big(nbytes, records.stored_update, round_id, header, row)

    # Last: inside the class body, `list` names this method from here on.
    async def list(self, experiment_id: str = "") -> list[Round]:
        async def select(conn: Connection) -> list[Round]:
            if experiment_id:
                cur = await conn.execute(
                    f"{_SELECT_ROUNDS} WHERE experiment_id = %s ORDER BY seq", (experiment_id,)
                )
            else:
                cur = await conn.execute(f"{_SELECT_ROUNDS} ORDER BY seq")
            return [
                records.readable_round(row, "coordinator.rounds") for row in await cur.fetchall()
            ]

        return await self._tx(select)

    async def due(self, now: float) -> Sequence[Round]:
        async def select(conn: Connection) -> list[Round]:
            cur = await conn.execute(  # the (state, deadline) index
                f"{_SELECT_ROUNDS} WHERE state = 'open' AND deadline <= %s ORDER BY seq", (now,)
            )
            return [
                records.readable_round(row, "coordinator.rounds") for row in await cur.fetchall()
            ]

        return await self._tx(select)


async def _lock_round(conn: Connection, round_id: str) -> None:
    await conn.execute(
        "SELECT 1 FROM coordinator.rounds WHERE round_id = %s FOR UPDATE", (round_id,)
    )
