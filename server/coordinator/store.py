"""Where rounds and their accepted updates live.

The coordinator keeps nothing about a round outside a `RoundStore`: the round record (the
immutable `Round`, replaced on every transition) and every accepted update, as arrays, in
arrival order. The methods are async so an implementation may do its I/O off the event loop.
A round's updates come back as `RoundUpdates`: `each_update` reads them in order (one update's
arrays at a time for a stored round), `update_headers` gives their header fields.

The store is also the coordinator's outbox: a round's completion and the notification that
announces it (`Notice`) are written together (`put(rnd, notice)`), the notice stays listed by
`unsent()` until `sent(round_id)` marks it, so one lost between the commit and the publish
(a crash) is published after the restart: at least once.

It also keeps each experiment's strategy state (`StrategyState`: the server-side momentum or
moments the aggregator answered for its last completed round), written in the same atomic
change that completes the round (`put(rnd, notice, state)`): after a kill -9 the state and
the round's completion are either both recorded or neither, so a state is never lost and
never applied twice.

- `MemoryRoundStore`: process memory, lost on restart (tests, the one-process demo).
- `PostgresRoundStore` (`server.coordinator.pg_store`): the same tables in PostgreSQL, chosen
  by `PROPELLER_DATABASE_URL`; the same transactions.
- `SqliteRoundStore`: one SQLite file (`<state_dir>/coordinator.sqlite`, through
  `server.sqlite.Database`: WAL, synchronous=FULL, one transaction per logical change;
  `SqliteRoundStore(path)`, then `await open()` and `await close()`). Every
  change the coordinator makes is one transaction: accepting an update inserts the update row
  (header fields + tensor bytes as one BLOB) *and* rewrites the round record together; a state
  change rewrites the round record. A kill -9 at any moment leaves the last committed state,
  and the coordinator answers an update only after its transaction committed, so an
  acknowledged update is never lost.

What a stored record holds (`Notice`, `StrategyState`, and the rows of rounds, updates and
strategy states that both durable stores write and read back) is `server.coordinator.records`.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Protocol, TypeVar

from server.coordinator.records import (
    ADDED_ROUND_COLUMNS,
    ADDED_UPDATE_COLUMNS,
    ROUND_COLUMNS,
    STATE_COLUMNS,
    UPDATE_HEADER_COLUMNS,
    Notice,
    StrategyState,
    blob_of,
    check_update_count,
    header_from_row,
    readable_round,
    round_values,
    state_from_row,
    state_values,
    stored_update,
    update_values,
    upsert,
)
from server.coordinator.rounds import Round, Update, is_due
from server.errors import PropellerError, ResourceExhausted, Unavailable
from server.sqlite import SqliteStore
from server.tensors import (
    nbytes_of,
    offload_if_big,
    tensor_bytes,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

STATE_FILE = "coordinator.sqlite"


class RoundStore(Protocol):
    async def get(self, round_id: str) -> Round | None:
        """The round's current record, or None."""
        ...

    async def put(
        self, rnd: Round, notice: Notice | None = None, state: StrategyState | None = None
    ) -> None:
        """Insert or replace the round's record, keep `notice` unsent with it, and make
        `state` its experiment's strategy state: one atomic change."""
        ...

    async def strategy_state(self, experiment_id: str) -> StrategyState | None:
        """The experiment's strategy state, if one of its rounds left one."""
        ...

    async def unsent(self) -> list[Notice]:
        """The notices not marked sent, oldest first."""
        ...

    async def sent(self, round_id: str) -> None:
        """Mark the round's notice sent (nothing if there is none)."""
        ...

    async def list(self, experiment_id: str = "") -> list[Round]:
        """All rounds (of one experiment when given), in configuration order."""
        ...

    async def due(self, now: float) -> Sequence[Round]:
        """The open rounds whose deadline has passed at `now` (`rounds.is_due`), in
        configuration order: what the deadline task reads every tick, so it does not read
        the whole history."""
        ...

    async def add_update(self, round_id: str, update: Update) -> None:
        """Keep an accepted update (the caller has checked it is the proplet's first)."""
        ...

    async def accept(self, rnd: Round, update: Update) -> None:
        """Keep an accepted update and the round record after it, atomically: afterwards both
        are stored or neither is. `rnd` is the round with `update.proplet_id` counted."""
        ...

    async def updates(self, round_id: str) -> RoundUpdates:
        """The round's accepted updates in arrival order."""
        ...


class MemoryRoundStore:
    """A `RoundStore` in process memory: lost on restart."""

    def __init__(self) -> None:
        self._rounds: dict[str, Round] = {}
        self._updates: dict[str, list[Update]] = {}
        self._unsent: dict[str, Notice] = {}
        self._states: dict[str, StrategyState] = {}

    async def get(self, round_id: str) -> Round | None:
        return self._rounds.get(round_id)

    async def put(
        self, rnd: Round, notice: Notice | None = None, state: StrategyState | None = None
    ) -> None:
        self._rounds[rnd.round_id] = rnd
        if notice is not None:
            self._unsent[notice.round_id] = notice
        if state is not None:
            self._states[state.experiment_id] = state

    async def strategy_state(self, experiment_id: str) -> StrategyState | None:
        return self._states.get(experiment_id)

    async def unsent(self) -> list[Notice]:
        return list(self._unsent.values())

    async def sent(self, round_id: str) -> None:
        self._unsent.pop(round_id, None)

    async def list(self, experiment_id: str = "") -> list[Round]:
        return [
            r
            for r in self._rounds.values()
            if not experiment_id or r.experiment_id == experiment_id
        ]

    async def due(self, now: float) -> Sequence[Round]:
        return [r for r in self._rounds.values() if is_due(r, now)]

    async def add_update(self, round_id: str, update: Update) -> None:
        self._updates.setdefault(round_id, []).append(update)

    async def accept(self, rnd: Round, update: Update) -> None:
        # No await in between: nothing can observe one without the other.
        self._updates.setdefault(rnd.round_id, []).append(update)
        self._rounds[rnd.round_id] = rnd

    async def updates(self, round_id: str) -> Sequence[Update]:
        return tuple(self._updates.get(round_id, ()))


# ---- SQLite ------------------------------------------------------------------------------

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS rounds (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- configuration order
        round_id TEXT NOT NULL UNIQUE,
        experiment_id TEXT NOT NULL,
        state TEXT NOT NULL,
        participants TEXT NOT NULL,             -- JSON list
        k_of_n INTEGER NOT NULL,
        timeout_s REAL NOT NULL,
        model_ref TEXT NOT NULL,                -- the resolved base model
        requested_model_ref TEXT NOT NULL,
        specs TEXT NOT NULL,                    -- JSON: the base model's tensor specs
        hyperparams TEXT NOT NULL,              -- JSON
        task_wasm_image TEXT NOT NULL,
        configured_at REAL NOT NULL,
        started_at REAL NOT NULL,
        deadline REAL NOT NULL,                 -- absolute wall time (0 until started)
        completed_at REAL NOT NULL,
        reported TEXT NOT NULL,                 -- JSON list, arrival order
        metrics TEXT NOT NULL,                  -- JSON
        new_model_version INTEGER,
        new_model_uri TEXT NOT NULL,
        failure_reason TEXT NOT NULL,
        closed_by TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS updates (
        round_id TEXT NOT NULL REFERENCES rounds(round_id),
        proplet_id TEXT NOT NULL,
        seq INTEGER NOT NULL,                   -- arrival order within the round
        base_model_uri TEXT NOT NULL,
        num_samples INTEGER NOT NULL,
        metrics TEXT NOT NULL,                  -- JSON
        specs TEXT NOT NULL,                    -- JSON: the tensors in BLOB order
        received_at REAL NOT NULL,
        sha256 TEXT NOT NULL,                   -- of the BLOB, checked on every read
        tensors BLOB NOT NULL,                  -- concatenated C-order little-endian bytes
        PRIMARY KEY (round_id, proplet_id),
        UNIQUE (round_id, seq)
    )""",
    # The outbox: a round's notification, written with the change it announces.
    # Each experiment's strategy state, replaced with the completion of each of its rounds.
    """CREATE TABLE IF NOT EXISTS strategy_states (
        experiment_id TEXT PRIMARY KEY,
        round_id TEXT NOT NULL REFERENCES rounds(round_id),  -- the round that left it
        strategy_name TEXT NOT NULL,
        specs TEXT NOT NULL,                    -- JSON: the tensors in BLOB order
        sha256 TEXT NOT NULL,                   -- of the BLOB, checked on every read
        tensors BLOB NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS notices (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- the order to publish in
        round_id TEXT NOT NULL UNIQUE REFERENCES rounds(round_id),
        topic TEXT NOT NULL,
        payload BLOB NOT NULL,
        sent INTEGER NOT NULL DEFAULT 0         -- 1 once published (and acknowledged)
    )""",
)

_UPSERT_ROUND = upsert("rounds", ROUND_COLUMNS, "?")
_UPSERT_STATE = upsert("strategy_states", ("experiment_id", *STATE_COLUMNS), "?")


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring a file written by an older coordinator up to `SCHEMA` (columns added since)."""
    for table, added in (("rounds", ADDED_ROUND_COLUMNS), ("updates", ADDED_UPDATE_COLUMNS)):
        columns = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        for name, definition in added.items():
            if name not in columns:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {definition}")
                log.info("[Coordinator.store] %s: added column %s", table, name)


class UpdateLoader(Protocol):
    """A durable store that reads one stored update's tensors (SQLite's or PostgreSQL's)."""

    async def _load_update(self, round_id: str, header: Update) -> Update: ...


class StoredUpdates:
    """A round's accepted updates as stored, in arrival order. The header fields are in memory
    (`headers`, with empty tensors); an update's tensors are read from the database only when
    that update is asked for (`load`, `async for`) and are not kept, so aggregating a round
    holds one update's arrays at a time."""

    def __init__(self, store: UpdateLoader, round_id: str, headers: Sequence[Update]) -> None:
        self._store = store
        self.round_id = round_id
        self.headers: tuple[Update, ...] = tuple(headers)

    def __len__(self) -> int:
        return len(self.headers)

    async def load(self, index: int) -> Update:
        return await self._store._load_update(self.round_id, self.headers[index])

    async def __aiter__(self) -> AsyncIterator[Update]:
        for i in range(len(self.headers)):
            yield await self.load(i)


class UpdateSource(Protocol):
    """Updates read one at a time (`StoredUpdates`, or the coordinator's clipped view of a
    round's): their header fields at hand, their tensors as they are iterated (each iteration
    starts from the first)."""

    @property
    def headers(self) -> Sequence[Update]: ...

    def __aiter__(self) -> AsyncIterator[Update]: ...


# What `RoundStore.updates` returns: the updates themselves (in memory) or a stored round's.
RoundUpdates = Sequence[Update] | UpdateSource


async def each_update(updates: RoundUpdates) -> AsyncIterator[Update]:
    """The updates in arrival order; stored ones are read off the event loop, one at a time."""
    if isinstance(updates, Sequence):
        for u in updates:
            yield u
    else:
        async for u in updates:
            yield u
            del u  # not held while the next one is read


def update_headers(updates: RoundUpdates) -> Sequence[Update]:
    """The updates' header fields without reading stored tensors (for the round's metrics)."""
    return updates if isinstance(updates, Sequence) else updates.headers


class SqliteRoundStore(SqliteStore):
    """A durable `RoundStore` in one SQLite file.

    Round records are also kept in a dict (they are small; the deadline task lists them every
    tick). That dict is only touched on the database's own thread: a write changes it as the
    last step of its transaction, and reads are queued behind every write already submitted,
    so a reader always sees the effect of every write issued before it (even one whose caller
    was cancelled while waiting). Update tensors are never kept in memory once stored.
    """

    schema = SCHEMA

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._rounds: dict[str, Round] = {}
        self._failed: str = ""

    @classmethod
    def in_dir(cls, state_dir: Path) -> SqliteRoundStore:
        return cls(state_dir / STATE_FILE)

    async def _opened(self) -> None:
        """Bring the state file's tables up to date and load the round records."""
        await self.db.write(_migrate)
        await self.db.read(self._load)
        log.info("[Coordinator.store] path=%s rounds=%d", self.path, len(self._rounds))

    # -- on the database thread --

    def _load(self, conn: sqlite3.Connection) -> None:
        rows = conn.execute(
            f"SELECT {', '.join(ROUND_COLUMNS)} FROM rounds ORDER BY seq"
        ).fetchall()
        rounds: dict[str, Round] = {}
        for row in rows:
            rnd = readable_round(row, str(self.path))
            rounds[rnd.round_id] = rnd
        self._rounds = rounds

    def _put_row(self, conn: sqlite3.Connection, rnd: Round) -> None:
        conn.execute(_UPSERT_ROUND, round_values(rnd))

    def _insert_update(self, conn: sqlite3.Connection, round_id: str, update: Update) -> None:
        # The tensors as one BLOB in the wire's layout, written into one buffer.
        blob = tensor_bytes(update.tensors)
        limit = conn.getlimit(sqlite3.SQLITE_LIMIT_LENGTH)
        if len(blob) > limit:
            raise ResourceExhausted(
                f"tensors: update of {len(blob)} bytes exceeds the coordinator's state store "
                f"limit of {limit} bytes"
            )
        (seq,) = conn.execute(
            "SELECT COALESCE(MAX(seq), -1) + 1 FROM updates WHERE round_id = ?", (round_id,)
        ).fetchone()
        columns = ("round_id", "seq", "tensors", *UPDATE_HEADER_COLUMNS)
        conn.execute(
            f"INSERT INTO updates ({', '.join(columns)}) "
            f"VALUES ({', '.join('?' for _ in columns)})",
            (
                round_id,
                seq,
                blob,
                *update_values(update, blob),
            ),
        )

    # -- async API --

    def _check(self) -> None:
        if self._failed:
            raise Unavailable(
                f"coordinator state store {self.path}: a commit failed ({self._failed}); "
                "restart the coordinator to reload its state"
            )

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        self._check()
        return await self.db.read(fn)

    async def _write(self, fn: Callable[[sqlite3.Connection], None], rnd: Round | None) -> None:
        """Run `fn` in one transaction; then (still inside it, on the database thread) record
        `rnd` in the dict. If the transaction fails after `fn` ran (the COMMIT itself), the dict
        may be ahead of the file: the store refuses further work until restarted."""
        self._check()
        ran = False

        def tx(conn: sqlite3.Connection) -> None:
            nonlocal ran
            fn(conn)
            if rnd is not None:
                self._rounds[rnd.round_id] = rnd
            ran = True

        try:
            await self.db.write(tx)
        except PropellerError:
            raise
        except Exception as exc:
            if ran:
                self._failed = str(exc) or type(exc).__name__
                log.error("[Coordinator.store] commit failed: %s", self._failed)
            raise Unavailable(f"coordinator state store: {exc}") from exc

    async def get(self, round_id: str) -> Round | None:
        return await self._read(lambda _conn: self._rounds.get(round_id))

    async def put(
        self, rnd: Round, notice: Notice | None = None, state: StrategyState | None = None
    ) -> None:
        # The state's bytes and digest are made before the transaction (in a thread if big).
        blob, digest = bytearray(), ""
        if state is not None:
            blob, digest = await offload_if_big(nbytes_of(state.tensors), blob_of, state.tensors)

        def together(conn: sqlite3.Connection) -> None:
            self._put_row(conn, rnd)
            if notice is not None:
                conn.execute(
                    "INSERT INTO notices (round_id, topic, payload) VALUES (?, ?, ?) "
                    "ON CONFLICT(round_id) DO UPDATE SET topic = excluded.topic, "
                    "payload = excluded.payload, sent = 0",
                    (notice.round_id, notice.topic, notice.payload),
                )
            if state is not None:
                limit = conn.getlimit(sqlite3.SQLITE_LIMIT_LENGTH)
                if len(blob) > limit:
                    raise ResourceExhausted(
                        f"state: strategy state of {len(blob)} bytes exceeds the "
                        f"coordinator's state store limit of {limit} bytes"
                    )
                conn.execute(_UPSERT_STATE, state_values(state, digest, blob))

        await self._write(together, rnd)

    async def strategy_state(self, experiment_id: str) -> StrategyState | None:
        def load(conn: sqlite3.Connection) -> StrategyState | None:
            row = conn.execute(
                f"SELECT {', '.join(STATE_COLUMNS)} FROM strategy_states WHERE experiment_id = ?",
                (experiment_id,),
            ).fetchone()
            return None if row is None else state_from_row(experiment_id, row)

        return await self._read(load)

    async def unsent(self) -> list[Notice]:
        def select(conn: sqlite3.Connection) -> list[Notice]:
            rows = conn.execute(
                "SELECT round_id, topic, payload FROM notices WHERE sent = 0 ORDER BY seq"
            ).fetchall()
            return [Notice(str(r), str(t), bytes(p)) for r, t, p in rows]

        return await self._read(select)

    async def sent(self, round_id: str) -> None:
        def mark(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE notices SET sent = 1 WHERE round_id = ?", (round_id,))

        await self._write(mark, None)

    async def list(self, experiment_id: str = "") -> list[Round]:
        def select(_conn: sqlite3.Connection) -> list[Round]:
            return [
                r
                for r in self._rounds.values()
                if not experiment_id or r.experiment_id == experiment_id
            ]

        return await self._read(select)

    async def due(self, now: float) -> Sequence[Round]:
        def select(_conn: sqlite3.Connection) -> list[Round]:
            return [r for r in self._rounds.values() if is_due(r, now)]

        return await self._read(select)

    async def add_update(self, round_id: str, update: Update) -> None:
        await self._write(lambda conn: self._insert_update(conn, round_id, update), None)

    async def accept(self, rnd: Round, update: Update) -> None:
        def both(conn: sqlite3.Connection) -> None:
            self._insert_update(conn, rnd.round_id, update)
            self._put_row(conn, rnd)
            (count,) = conn.execute(
                "SELECT COUNT(*) FROM updates WHERE round_id = ?", (rnd.round_id,)
            ).fetchone()
            check_update_count(rnd, count)

        await self._write(both, rnd)

    async def updates(self, round_id: str) -> StoredUpdates:
        def headers(conn: sqlite3.Connection) -> list[Update]:
            rows = conn.execute(
                f"SELECT {', '.join(UPDATE_HEADER_COLUMNS)} FROM updates "
                "WHERE round_id = ? ORDER BY seq",
                (round_id,),
            ).fetchall()
            return [header_from_row(row)[0] for row in rows]

        return StoredUpdates(self, round_id, await self._read(headers))

    async def _load_update(self, round_id: str, header: Update) -> Update:
        def load(conn: sqlite3.Connection) -> Update:
            row = conn.execute(
                "SELECT specs, sha256, tensors FROM updates WHERE round_id = ? AND proplet_id = ?",
                (round_id, header.proplet_id),
            ).fetchone()
            return stored_update(round_id, header, row)

        return await self._read(load)
