"""Model versions in PostgreSQL: `PostgresModelStore`, the registry's `ModelStore` in the schema
`registry` of the database `PROPELLER_DATABASE_URL` names.

One row per version in `registry.models` (specs, sha256, total_bytes, created_at) and its
bytes in `registry.model_pieces`, one row per piece (at most PIECE_BYTES each, in order). A
put inserts the version's row and every piece in one transaction: a crash at any moment
leaves the version absent or complete, and the version's primary key makes a second write of
it ALREADY_EXISTS, from this process or another replica (the second insert waits for the
first's commit, then fails). Pieces, not one value: no statement carries a whole model (a
single `bytea` value is capped at 1 GiB and would be built in memory whole on both sides),
a spooled upload goes in piece by piece, and a read streams the pieces into one buffer.
Reads check the length and sha256 before serving anything (DATA_LOSS otherwise), and the last
`cache_size` versions read are kept in memory once verified, as in `SqliteModelStore`.

Why the bytes are in PostgreSQL at all (docs/architecture.md, "State on PostgreSQL"): one
transaction covers a version's metadata and bytes, registry replicas need no shared disk, and
one backup holds everything. Models of a federated round are megabytes to a few hundred
megabytes, written once per round; that is well within what PostgreSQL's TOAST storage serves.
"""

from __future__ import annotations

import logging
from threading import Event

import psycopg

from server.errors import Unavailable
from server.postgres import Connection, Migration, PostgresDatabase
from server.registry.store import (
    ModelInfo,
    StoredModel,
    _already_exists,
    _check_abandoned,
    _check_put,
    _check_size,
    _info_of_row,
    _verified_model,
    _VerifiedReads,
)
from server.streams import MAX_PAYLOAD_BYTES, PIECE_BYTES, Payload
from server.tensors import offload_if_big, specs_to_json

log = logging.getLogger(__name__)

COMPONENT = "registry"
WHERE = "postgresql registry.models"

MIGRATIONS = (
    Migration(
        1,
        "models and their pieces",
        (
            "CREATE SCHEMA IF NOT EXISTS registry",
            """CREATE TABLE registry.models (
                version BIGINT PRIMARY KEY CHECK (version >= 0),
                sha256 TEXT NOT NULL,
                tensors TEXT NOT NULL,                  -- JSON: the tensor specs
                total_bytes BIGINT NOT NULL,
                created_at DOUBLE PRECISION NOT NULL
            )""",
            """CREATE TABLE registry.model_pieces (
                version BIGINT NOT NULL REFERENCES registry.models(version),
                seq INTEGER NOT NULL,                   -- the pieces' order
                data BYTEA NOT NULL,
                PRIMARY KEY (version, seq)
            )""",
        ),
    ),
)


class PostgresModelStore:
    """Versions in PostgreSQL. `PostgresModelStore(url)` does no I/O: `await open()` before
    use, `await close()` after."""

    def __init__(
        self, url: str, cache_size: int = 2, *, max_bytes: int = MAX_PAYLOAD_BYTES
    ) -> None:
        self.db = PostgresDatabase(url, COMPONENT, MIGRATIONS)
        self.max_bytes = max_bytes
        self._reads = _VerifiedReads(self._load, cache_size)

    async def open(self) -> None:
        await self.db.open()

    async def close(self) -> None:
        await self.db.close()

    async def versions(self) -> list[int]:
        async with self.db.transaction() as conn:
            cur = await conn.execute("SELECT version FROM registry.models ORDER BY version")
            return [int(r[0]) for r in await cur.fetchall()]

    async def _info_row(self, conn: Connection, version: int) -> tuple[ModelInfo, int] | None:
        """The version's checked metadata and how many bytes its pieces hold."""
        cur = await conn.execute(
            "SELECT sha256, tensors, total_bytes, created_at, "
            "(SELECT COALESCE(sum(length(data)), 0) FROM registry.model_pieces p "
            "WHERE p.version = m.version) FROM registry.models m WHERE version = %s",
            (version,),
        )
        row = await cur.fetchone()
        if row is None:
            return None
        info, size = _info_of_row(version, row[:4], WHERE), int(row[4])
        _check_size(info, size, WHERE)
        return info, size

    async def info(self, version: int) -> ModelInfo | None:
        async with self.db.transaction() as conn:
            found = await self._info_row(conn, version)
        return None if found is None else found[0]

    def cached(self, version: int) -> StoredModel | None:
        return self._reads.cached(version)

    async def get(self, version: int) -> StoredModel | None:
        return await self._reads.get(version)

    async def _load(self, version: int) -> StoredModel | None:
        async with self.db.transaction() as conn:
            found = await self._info_row(conn, version)
            if found is None:
                return None
            info, size = found
            # One buffer of the model's size, filled piece by piece from a server-side cursor:
            # never the pieces and the whole at once.
            data = bytearray(size)
            offset = 0
            async with conn.cursor(name=f"model_v{version}") as cur:
                await cur.execute(
                    "SELECT data FROM registry.model_pieces WHERE version = %s ORDER BY seq",
                    (version,),
                )
                async for (piece,) in cur:
                    data[offset : offset + len(piece)] = piece
                    offset += len(piece)
        # Read-only arrays, no copy.
        return await _verified_model(info, memoryview(data).toreadonly(), WHERE)

    async def put(self, info: ModelInfo, payload: Payload, abandoned: Event) -> None:
        version, size = info.version, info.total_bytes
        _check_put(info, self.max_bytes)
        # One transaction: the row and all of its pieces commit together or not at all.
        try:
            async with self.db.transaction() as conn:
                _check_abandoned(abandoned, version)
                try:
                    await conn.execute(
                        "INSERT INTO registry.models (version, sha256, tensors, total_bytes, "
                        "created_at) VALUES (%s, %s, %s, %s, %s)",
                        (version, info.sha256, specs_to_json(info.specs), size, info.created_at),
                    )
                except psycopg.errors.UniqueViolation:
                    raise _already_exists(version) from None
                pieces = payload.pieces(PIECE_BYTES)
                seq = 0
                while True:
                    # A spooled payload is read from its file: off the event loop when big.
                    item = await offload_if_big(payload.nbytes, next, pieces, None)
                    if item is None:
                        break
                    _check_abandoned(abandoned, version)
                    await conn.execute(
                        "INSERT INTO registry.model_pieces (version, seq, data) "
                        "VALUES (%s, %s, %s)",
                        (version, seq, item[1]),
                    )
                    seq += 1
                _check_abandoned(abandoned, version)
        except psycopg.Error as exc:
            raise Unavailable(f"registry state store (PostgreSQL): {exc}") from exc
        log.info("[ModelRegistry.store] stored version=%d bytes=%d in %s", version, size, WHERE)
