"""Lineages: how each version a round produced was made, kept beside the versions.

The coordinator sends a version's lineage right after the version (`PutLineage`): a
`Lineage` message (the experiment and round, its base model and module, its strategy and
parameters, every contributing update's header as its proplet signed it, its sha256,
certificate, clip scale and weight, and for a stateful strategy the state the round started
from) followed by the updates' bytes and then the state's, so `propeller-fl models verify` can
check every signature and recompute the aggregate from what is stored here.

The registry checks what it can without trusting the sender's arithmetic: the version exists
and has the sha256 the lineage names, every update's bytes (and the state's) hash to the
sha256 listed (and their length matches the header's tensors). It does not judge signatures
(the coordinator did before counting them; `models verify` does again).

Storage: `MemoryLineageStore`, or `SqliteLineageStore` in `lineage.sqlite` beside
`registry.sqlite` (the header as its serialized bytes; the update bytes content-addressed by
their sha256, each one written as it arrives, so a stream holds one update in memory at a
time; the header row last, in its own transaction: a lineage is listed only once all of its
bytes are stored). Reads check each update's bytes against their sha256 (DATA_LOSS otherwise).
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
from collections.abc import AsyncIterable, AsyncIterator
from typing import Protocol

from propeller.v1 import model_registry_pb2, tensor_pb2
from server.errors import (
    AlreadyExists,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PropellerError,
)
from server.models import model_uri
from server.registry.registry import ModelRegistry
from server.sqlite import SqliteStore
from server.streams import checked_total, drain
from server.tensors import DEFAULT_CHUNK_SIZE, specs_from_proto

log = logging.getLogger(__name__)

LINEAGE_DB_FILE = "lineage.sqlite"
# Contributions one lineage may list (a round's updates).
MAX_CONTRIBUTIONS = 100_000


class LineageStore(Protocol):
    async def header(self, version: int) -> bytes | None:
        """The version's serialized Lineage, or None."""
        ...

    async def put_header(self, version: int, header: bytes) -> None:
        """Keep the version's lineage (its update bytes are stored already)."""
        ...

    async def update_bytes(self, sha256: str) -> bytes | None:
        """An update's bytes by their sha256, checked; None if not stored."""
        ...

    async def put_update_bytes(self, sha256: str, data: bytes) -> None:
        """Keep an update's bytes (whose sha256 the caller checked); a repeat is a no-op."""
        ...


class LineageCorrupted(DataLoss):
    """Stored update bytes no longer hash to their sha256."""


def _checked(sha256: str, data: bytes, where: str) -> bytes:
    if hashlib.sha256(data).hexdigest() != sha256:
        raise LineageCorrupted(f"{where}: update bytes {sha256[:12]}... are corrupted in storage")
    return data


class MemoryLineageStore:
    def __init__(self) -> None:
        self._headers: dict[int, bytes] = {}
        self._bytes: dict[str, bytes] = {}

    async def header(self, version: int) -> bytes | None:
        return self._headers.get(version)

    async def put_header(self, version: int, header: bytes) -> None:
        self._headers[version] = header

    async def update_bytes(self, sha256: str) -> bytes | None:
        data = self._bytes.get(sha256)
        return None if data is None else _checked(sha256, data, "memory")

    async def put_update_bytes(self, sha256: str, data: bytes) -> None:
        self._bytes.setdefault(sha256, data)


_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS lineages (
        version INTEGER PRIMARY KEY,
        header BLOB NOT NULL            -- a serialized propeller.v1.Lineage
    )""",
    """CREATE TABLE IF NOT EXISTS update_bytes (
        sha256 TEXT PRIMARY KEY,        -- hex, of `data`
        data BLOB NOT NULL              -- the update's tensors, base model order
    )""",
)

# Each table's key and value columns (both tables keep bytes under a key, written once).
_COLUMNS = {"lineages": ("version", "header"), "update_bytes": ("sha256", "data")}


class SqliteLineageStore(SqliteStore):
    """`LineageStore` in one SQLite file; `open()` before use, `close()` after."""

    schema = _SCHEMA

    async def header(self, version: int) -> bytes | None:
        return await self._get("lineages", version)

    async def put_header(self, version: int, header: bytes) -> None:
        await self._put_once("lineages", version, header)

    async def update_bytes(self, sha256: str) -> bytes | None:
        data = await self._get("update_bytes", sha256)
        return None if data is None else _checked(sha256, data, self.path.name)

    async def put_update_bytes(self, sha256: str, data: bytes) -> None:
        await self._put_once("update_bytes", sha256, data)

    async def _get(self, table: str, key: int | str) -> bytes | None:
        key_column, value_column = _COLUMNS[table]
        query = f"SELECT {value_column} FROM {table} WHERE {key_column} = ?"
        row = await self.db.read(lambda c: c.execute(query, (key,)).fetchone())
        return None if row is None else bytes(row[0])

    async def _put_once(self, table: str, key: int | str, value: bytes) -> None:
        """Keep the first value stored under `key`: a key always names the same bytes (a
        version's lineage, a sha256's data), so a repeat changes nothing."""
        key_column, value_column = _COLUMNS[table]
        query = (
            f"INSERT INTO {table} ({key_column}, {value_column}) VALUES (?, ?) "
            f"ON CONFLICT({key_column}) DO NOTHING"
        )

        def insert(conn: sqlite3.Connection) -> None:
            conn.execute(query, (key, value))

        await self.db.write(insert)


class LineageBytes:
    """The data chunks of a lineage stream as one run of bytes, taken a contribution at a time
    (a chunk need not end where a contribution does). Used by the registry and by
    `models verify`."""

    def __init__(self, stream: AsyncIterator[model_registry_pb2.LineageChunk]) -> None:
        self._stream = stream
        self._rest = b""

    async def take(self, index: int, contribution: model_registry_pb2.Contribution) -> bytes:
        """Contribution `index`'s bytes: exactly what its header's tensors need."""
        header = contribution.header
        return await self._take(f"contributions[{index}]", ".header", header)

    async def take_state(self, state: model_registry_pb2.LineageState) -> bytes | None:
        """The bytes of the state the round started from (after the contributions'); None
        when the lineage records none."""
        if not state.tensors:
            return None
        return await self._take("state", "", state)

    async def _take(
        self,
        field: str,
        sub: str,
        part: tensor_pb2.UpdateHeader | model_registry_pb2.LineageState,
    ) -> bytes:
        specs = specs_from_proto(part.tensors, f"{field}{sub}.tensors")
        if not specs:
            raise InvalidArgument(f"{field}{sub}.tensors: must list at least one tensor")
        need = checked_total(specs, part.total_bytes, f"{field}{sub}")
        buf = bytearray()
        while len(buf) < need:
            if not self._rest:
                chunk = await anext(self._stream, None)
                if chunk is None:
                    raise InvalidArgument(f"{field}: stream ended after {len(buf)} of {need} bytes")
                if chunk.WhichOneof("part") != "data":
                    raise InvalidArgument(f"{field}: a second header in one stream")
                self._rest = chunk.data
            room = need - len(buf)
            buf += self._rest[:room]
            self._rest = self._rest[room:]
        return bytes(buf)

    async def end(self) -> None:
        """Nothing may follow the last contribution's bytes."""
        if self._rest or await anext(self._stream, None) is not None:
            raise InvalidArgument("lineage: more data than its contributions' tensors need")


def _no_lineage(version: int) -> NotFound:
    return NotFound(
        f"version: {version} ({model_uri(version)}) has no lineage (v0, or a version not "
        "produced by a round)"
    )


class Lineages:
    """The lineage rules over a `LineageStore` and the registry's versions."""

    def __init__(self, store: LineageStore, registry: ModelRegistry) -> None:
        self.store = store
        self.registry = registry

    async def put(
        self, chunks: AsyncIterable[model_registry_pb2.LineageChunk]
    ) -> model_registry_pb2.LineageInfo:
        """Take a PutLineage stream (see the module docstring); on a refusal the rest of the
        stream is read and dropped, so the client sees the status."""
        stream = aiter(chunks)
        try:
            return await self._put(stream)
        except PropellerError:
            await drain(stream)
            raise

    async def _put(
        self, stream: AsyncIterator[model_registry_pb2.LineageChunk]
    ) -> model_registry_pb2.LineageInfo:
        first = await anext(stream, None)
        if first is None or first.WhichOneof("part") != "header":
            raise InvalidArgument("lineage: the stream must start with a Lineage header")
        lineage = first.header
        version = lineage.version
        if len(lineage.contributions) > MAX_CONTRIBUTIONS:
            raise InvalidArgument(
                f"contributions: {len(lineage.contributions)} exceeds {MAX_CONTRIBUTIONS}"
            )
        serialized = lineage.SerializeToString(deterministic=True)
        # A lineage the version does not take is refused after the stream was read (a
        # malformed stream is INVALID_ARGUMENT whatever else is wrong), keeping nothing.
        refusal: PropellerError | None = None
        stored: bytes | None = None
        try:
            info = await self.registry.model_info(version)
            if lineage.model_sha256 != info.sha256:
                raise FailedPrecondition(
                    f"model_sha256: {lineage.model_sha256[:80]!r}, but version {version} has "
                    f"sha256 {info.sha256}"
                )
            stored = await self.store.header(version)
            if stored is not None and stored != serialized:
                raise AlreadyExists(f"version: {version} already has another lineage")
        except (NotFound, FailedPrecondition, AlreadyExists) as exc:
            refusal = exc
        total = 0
        data = LineageBytes(stream)
        for i, contribution in enumerate(lineage.contributions):
            update = await data.take(i, contribution)
            digest = hashlib.sha256(update).hexdigest()
            if digest != contribution.sha256:
                raise InvalidArgument(
                    f"contributions[{i}].sha256: {contribution.sha256[:80]!r}, its bytes hash "
                    f"to {digest}"
                )
            if refusal is None:
                await self.store.put_update_bytes(digest, update)
            total += len(update)
        state = await data.take_state(lineage.state)
        if state is not None:
            digest = hashlib.sha256(state).hexdigest()
            if digest != lineage.state.sha256:
                raise InvalidArgument(
                    f"state.sha256: {lineage.state.sha256[:80]!r}, its bytes hash to {digest}"
                )
            if refusal is None:
                await self.store.put_update_bytes(digest, state)
            total += len(state)
        await data.end()
        if refusal is not None:
            raise refusal
        if stored is None:
            await self.store.put_header(version, serialized)
            log.info(
                "[ModelRegistry.PutLineage] version=%d round_id=%s contributions=%d bytes=%d",
                version,
                lineage.round_id,
                len(lineage.contributions),
                total,
            )
        return model_registry_pb2.LineageInfo(
            version=version,
            round_id=lineage.round_id,
            contributions=len(lineage.contributions),
            total_bytes=total,
        )

    async def get(
        self, version: int, chunk_size: int = DEFAULT_CHUNK_SIZE
    ) -> AsyncIterator[model_registry_pb2.LineageChunk]:
        """A GetLineage stream: the header, then each contribution's bytes (checked)."""
        serialized = await self.store.header(version)
        if serialized is None:
            await self.registry.model_info(version)  # NOT_FOUND for an unknown version
            raise _no_lineage(version)
        lineage = model_registry_pb2.Lineage.FromString(serialized)
        yield model_registry_pb2.LineageChunk(header=lineage)
        for i, contribution in enumerate(lineage.contributions):
            data = await self.store.update_bytes(contribution.sha256)
            if data is None:
                raise LineageCorrupted(
                    f"version: {version}: the bytes of contributions[{i}] are not stored"
                )
            for start in range(0, len(data), chunk_size):
                yield model_registry_pb2.LineageChunk(data=data[start : start + chunk_size])
        if lineage.state.tensors:
            data = await self.store.update_bytes(lineage.state.sha256)
            if data is None:
                raise LineageCorrupted(f"version: {version}: the bytes of its state are not stored")
            for start in range(0, len(data), chunk_size):
                yield model_registry_pb2.LineageChunk(data=data[start : start + chunk_size])
