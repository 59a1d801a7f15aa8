"""Where model versions live: a small async `ModelStore` protocol and two implementations.

`SqliteModelStore` is the store whenever there is a state directory: `registry.sqlite`, one
row per version (specs, sha256, created_at and the bytes as a BLOB) inserted in one
transaction, so a crash at any moment leaves the version either absent or complete. The
version is the primary key: a second write of it fails with ALREADY_EXISTS, also when another
process over the same file wrote it. Reads verify the stored length and sha256 before serving
anything (DATA_LOSS otherwise). `InMemoryModelStore` serves tests and the one-process mode.

The file I/O runs on the database's own thread (`server.sqlite.Database`); hashing and copying
big arrays run in a worker thread (`server.tensors.offload_if_big`): nothing here blocks the
event loop.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sqlite3
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from threading import Event
from typing import Protocol

import numpy as np

from server.errors import AlreadyExists, DataLoss, ResourceExhausted
from server.models import model_uri
from server.sqlite import SqliteStore
from server.streams import MAX_PAYLOAD_BYTES, PIECE_BYTES, Payload
from server.tensors import (
    Spec,
    Tensors,
    offload_if_big,
    specs_from_json,
    specs_to_json,
    total_bytes,
    verified_tensors,
)

log = logging.getLogger(__name__)

REGISTRY_DB_FILE = "registry.sqlite"


class ModelCorrupted(DataLoss):
    """A stored version failed its integrity check; it is reported, never served."""


@dataclass(frozen=True)
class ModelInfo:
    """What is known about a stored version without its bytes."""

    version: int
    sha256: str
    specs: tuple[Spec, ...]
    created_at: float

    @property
    def total_bytes(self) -> int:
        return total_bytes(self.specs)

    @property
    def model_uri(self) -> str:
        return model_uri(self.version)


@dataclass(frozen=True)
class StoredModel:
    """One stored version with its tensors (read-only arrays)."""

    info: ModelInfo
    tensors: Tensors


class ModelStore(Protocol):
    # The most bytes one version may have here.
    max_bytes: int

    def cached(self, version: int) -> StoredModel | None:
        """The version if it is in memory already (verified), without waiting; else None."""
        ...

    async def get(self, version: int) -> StoredModel | None:
        """The stored version, or None if there is none. Raises ModelCorrupted."""
        ...

    async def info(self, version: int) -> ModelInfo | None:
        """Metadata of a stored version without reading its bytes, or None."""
        ...

    async def put(self, info: ModelInfo, payload: Payload, abandoned: Event) -> None:
        """Store `payload` (the tensors' bytes, in memory or spooled to a file) as the new
        version `info` describes (its sha256 is the digest of those bytes, computed by the
        caller); AlreadyExists if that version is stored (it stays unchanged). Once
        `abandoned` is set (the caller gave up: its call was cancelled), a write still in
        progress stops before it commits and raises WriteAbandoned, storing nothing."""
        ...

    async def versions(self) -> list[int]:
        """Every stored version, ascending."""
        ...


class WriteAbandoned(Exception):
    """A put stopped before committing because its caller gave up; nothing was stored."""


def _check_abandoned(abandoned: Event, version: int) -> None:
    if abandoned.is_set():
        raise WriteAbandoned(f"version: {version} not stored: the call was abandoned")


def _already_exists(version: int) -> AlreadyExists:
    return AlreadyExists(f"version: {version} ({model_uri(version)}) already exists")


def _info_of_row(version: int, row: tuple[object, ...], where: str) -> ModelInfo:
    """A version's metadata from its row (sha256, tensors JSON, total_bytes, created_at) as
    both backends store it; ModelCorrupted naming `where` if the row does not hold together."""
    sha256, tensors, total, created_at = row
    try:
        specs = specs_from_json(str(tensors))
        info = ModelInfo(version, str(sha256), specs, float(str(created_at)))
        if len(info.sha256) != 64 or not math.isfinite(info.created_at):
            raise ValueError("bad sha256 or created_at")
        if info.total_bytes != total:
            raise ValueError("total_bytes does not match the tensors")
    except ValueError as exc:
        raise ModelCorrupted(
            f"version: {version} is corrupted in storage ({where}: unreadable row: {exc})"
        ) from None
    return info


def _check_size(info: ModelInfo, size: object, where: str) -> None:
    """The tensor bytes stored (`size`) must be the ones the row promises."""
    if size != info.total_bytes:
        raise ModelCorrupted(
            f"version: {info.version} is corrupted in storage ({where} holds {size} tensor "
            f"bytes, its row promises {info.total_bytes})"
        )


async def _verified_model(info: ModelInfo, data: bytes | memoryview, where: str) -> StoredModel:
    """The stored bytes of `info`'s version as read-only arrays, their sha256 checked against
    the row's (ModelCorrupted naming `where` if not). Hashing a big model takes a while: in a
    worker thread, not the database's or the event loop's."""
    tensors = await offload_if_big(
        len(data),
        verified_tensors,
        data,
        info.specs,
        info.sha256,
        f"version: {info.version} ({where})",
        ModelCorrupted,
    )
    return StoredModel(info, tensors)


def _check_put(info: ModelInfo, max_bytes: int) -> None:
    """What every backend refuses before it writes anything."""
    if info.version < 0:
        raise ValueError(f"version must be >= 0, got {info.version}")
    if info.total_bytes > max_bytes:
        raise ResourceExhausted(
            f"model: {info.total_bytes} bytes exceed the registry's limit of {max_bytes} bytes "
            "per version"
        )


def _frozen_copy(payload: Payload) -> Tensors:
    out: Tensors = {}
    for name, arr in payload.tensors().items():
        copy = np.array(arr, copy=True, order="C")
        copy.setflags(write=False)
        out[name] = copy
    return out


class InMemoryModelStore:
    """Versions in a dict; gone when the process ends."""

    def __init__(self, max_bytes: int = MAX_PAYLOAD_BYTES) -> None:
        self.max_bytes = max_bytes
        self._models: dict[int, StoredModel] = {}

    def cached(self, version: int) -> StoredModel | None:
        return self._models.get(version)

    async def get(self, version: int) -> StoredModel | None:
        return self._models.get(version)

    async def info(self, version: int) -> ModelInfo | None:
        model = self._models.get(version)
        return None if model is None else model.info

    async def put(self, info: ModelInfo, payload: Payload, abandoned: Event) -> None:
        frozen = await offload_if_big(payload.nbytes, _frozen_copy, payload)
        # No await from here on: the check and the insert are one step.
        if info.version in self._models:
            raise _already_exists(info.version)
        _check_abandoned(abandoned, info.version)
        self._models[info.version] = StoredModel(info, frozen)

    async def versions(self) -> list[int]:
        return sorted(self._models)


class _VerifiedReads:
    """The last few versions read and verified, kept because versions never change: without
    it every proplet of a round would re-read and re-hash the same version. One read at a time
    (`_lock`), so concurrent requests for one version share a single read."""

    def __init__(self, load: Callable[[int], Awaitable[StoredModel | None]], size: int) -> None:
        self._load = load
        self._size = size
        self._lock = asyncio.Lock()
        self._cache: OrderedDict[int, StoredModel] = OrderedDict()

    def cached(self, version: int) -> StoredModel | None:
        """A version already read and verified, without waiting (None when it would have to
        be read). Never waits for `_lock`, which a big read may hold for a while."""
        return self._cache.get(version)

    async def get(self, version: int) -> StoredModel | None:
        async with self._lock:
            model = self._cache.get(version)
            if model is None:
                model = await self._load(version)
                if model is None:
                    return None
                self._cache[version] = model
                while len(self._cache) > self._size:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(version)
            return model


_SQLITE_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS models (
        version INTEGER PRIMARY KEY CHECK (version >= 0),
        sha256 TEXT NOT NULL,
        tensors TEXT NOT NULL,
        total_bytes INTEGER NOT NULL,
        created_at REAL NOT NULL,
        data BLOB NOT NULL
    )""",
]
# A big version passes through the write-ahead log once; do not keep a log that size around.
_WAL_SIZE_LIMIT = 64 << 20


class SqliteModelStore(SqliteStore):
    """Versions in one SQLite file (`registry.sqlite`), each inserted in one transaction.
    `SqliteModelStore(path)` does no I/O: `await open()` before use, `await close()` after.

    The bytes are written into the row's BLOB piece by piece (from memory, or from the file
    an upload was spooled to) inside the inserting transaction. Reads check the BLOB's length
    and sha256 against the row before serving anything (DATA_LOSS otherwise); the last
    `cache_size` versions read are kept in memory once verified.
    """

    schema = _SQLITE_SCHEMA

    def __init__(self, path: Path, cache_size: int = 2) -> None:
        super().__init__(path)
        self.max_bytes = 0
        self._reads = _VerifiedReads(self._load, cache_size)

    async def _opened(self) -> None:
        self.max_bytes = await self.db.read(_configure)

    async def versions(self) -> list[int]:
        rows: list[tuple[int]] = await self.db.read(
            lambda c: c.execute("SELECT version FROM models ORDER BY version").fetchall()
        )
        return [r[0] for r in rows]

    async def _row(self, version: int, data: str) -> tuple[ModelInfo, object] | None:
        """The version's row: its checked metadata and the column expression `data`."""
        row = await self.db.read(
            lambda c: c.execute(
                f"SELECT sha256, tensors, total_bytes, created_at, {data} FROM models "
                "WHERE version = ?",
                (version,),
            ).fetchone()
        )
        return None if row is None else (_info_of_row(version, row[:4], self.path.name), row[4])

    async def info(self, version: int) -> ModelInfo | None:
        row = await self._row(version, "length(data)")
        if row is None:
            return None
        info, size = row
        _check_size(info, size, self.path.name)
        return info

    def cached(self, version: int) -> StoredModel | None:
        return self._reads.cached(version)

    async def get(self, version: int) -> StoredModel | None:
        return await self._reads.get(version)

    async def _load(self, version: int) -> StoredModel | None:
        row = await self._row(version, "data")
        if row is None:
            return None
        info, payload = row
        assert isinstance(payload, bytes)
        # Read-only arrays over the row's bytes: no second copy of the model.
        return await _verified_model(info, payload, self.path.name)

    async def put(self, info: ModelInfo, payload: Payload, abandoned: Event) -> None:
        version, size = info.version, info.total_bytes
        _check_put(info, self.max_bytes)

        def insert(conn: sqlite3.Connection) -> None:
            _check_abandoned(abandoned, version)
            try:
                conn.execute(
                    "INSERT INTO models (version, sha256, tensors, total_bytes, created_at, "
                    "data) VALUES (?, ?, ?, ?, ?, zeroblob(?))",
                    (version, info.sha256, specs_to_json(info.specs), size, info.created_at, size),
                )
            except sqlite3.IntegrityError:
                raise _already_exists(version) from None
            if size:
                # Piece by piece from memory or the spool file: a big version is never
                # held whole in memory on its way in.
                with conn.blobopen("models", "data", version) as blob:
                    for _spec, piece in payload.pieces(PIECE_BYTES):
                        _check_abandoned(abandoned, version)
                        blob.write(piece)
            _check_abandoned(abandoned, version)

        # One transaction: the row and all of its bytes commit together or not at all.
        await self.db.write(insert)
        log.info(
            "[ModelRegistry.store] stored version=%d bytes=%d in %s", version, size, self.path.name
        )


def _configure(conn: sqlite3.Connection) -> int:
    """Set the write-ahead log's size limit; the largest BLOB this SQLite takes."""
    conn.execute(f"PRAGMA journal_size_limit={_WAL_SIZE_LIMIT}")
    return conn.getlimit(sqlite3.SQLITE_LIMIT_LENGTH)
