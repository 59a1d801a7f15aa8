"""Where datasets live: a small async `DatasetStore` protocol, an in-memory implementation and
`SqliteDatasetStore` (`datastore.sqlite` in the state directory: datasets survive restarts).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from server.datastore.datasets import Dataset
from server.sqlite import Database
from server.streams import PIECE_BYTES
from server.tensors import Array, Spec, tensors_from_bytes

DATASTORE_DB_FILE = "datastore.sqlite"


@dataclass(frozen=True)
class DatasetSummary:
    """What ListDatasets shows of a dataset, without its arrays."""

    proplet_id: str
    schema: str
    size: int
    num_features: int
    num_classes: int = 2


def summary_of(dataset: Dataset) -> DatasetSummary:
    return DatasetSummary(
        dataset.proplet_id,
        dataset.schema,
        dataset.size,
        dataset.num_features,
        dataset.num_classes,
    )


class DatasetStore(Protocol):
    async def get(self, proplet_id: str) -> Dataset | None: ...

    async def put(self, dataset: Dataset, *, replace: bool = True) -> bool:
        """Store `dataset`. With `replace` (the default) it replaces any dataset of the same
        proplet; without, an existing one is kept. True if `dataset` was stored."""
        ...

    async def list(self) -> list[DatasetSummary]:
        """Every dataset, sorted by proplet id."""
        ...

    async def summaries(self, proplet_ids: Collection[str]) -> Sequence[DatasetSummary]:
        """The summaries of these proplets' datasets (those that have one), in no order."""
        ...


class InMemoryDatasetStore:
    """Datasets in a dict. Arrays are frozen on the way in so nobody mutates stored data."""

    def __init__(self) -> None:
        self._datasets: dict[str, Dataset] = {}

    async def get(self, proplet_id: str) -> Dataset | None:
        return self._datasets.get(proplet_id)

    async def put(self, dataset: Dataset, *, replace: bool = True) -> bool:
        if not replace and dataset.proplet_id in self._datasets:
            return False
        dataset.features.setflags(write=False)
        dataset.labels.setflags(write=False)
        self._datasets[dataset.proplet_id] = dataset
        return True

    async def list(self) -> list[DatasetSummary]:
        return [summary_of(self._datasets[k]) for k in sorted(self._datasets)]

    async def summaries(self, proplet_ids: Collection[str]) -> Sequence[DatasetSummary]:
        found = (self._datasets.get(p) for p in set(proplet_ids))
        return [summary_of(d) for d in found if d is not None]


_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS datasets (
        proplet_id TEXT PRIMARY KEY,
        schema TEXT NOT NULL,
        size INTEGER NOT NULL,
        num_features INTEGER NOT NULL,
        features_dtype TEXT NOT NULL,
        features_shape TEXT NOT NULL,
        features BLOB NOT NULL,
        labels_dtype TEXT NOT NULL,
        labels_shape TEXT NOT NULL,
        labels BLOB NOT NULL,
        updated_at REAL NOT NULL,
        num_classes INTEGER NOT NULL DEFAULT 2
    )""",
]
# Columns added since the first datastore.sqlite: name -> definition (ALTER TABLE on open).
_ADDED_COLUMNS = {"num_classes": "INTEGER NOT NULL DEFAULT 2"}


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring a file written by an older data store up to `_SCHEMA`: its datasets are all of
    the binary schema, which the column's default (2 classes) describes."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(datasets)")}
    for name, definition in _ADDED_COLUMNS.items():
        if name not in columns:
            conn.execute(f"ALTER TABLE datasets ADD COLUMN {name} {definition}")


def _array_columns(arr: Array) -> tuple[str, str, int]:
    """An array's columns but its bytes: its dtype ("<f8"), its shape (JSON), its size."""
    dtype = arr.dtype.newbyteorder("<")
    return dtype.str, json.dumps(list(arr.shape)), int(arr.nbytes)


def _write_blob(conn: sqlite3.Connection, column: str, rowid: int, arr: Array) -> None:
    """The array's bytes (C order, little-endian) into the row's zero-filled BLOB, piece by
    piece: no copy of the whole array on its way in."""
    if not arr.nbytes:
        return
    data = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).reshape(-1).view(np.uint8)
    with conn.blobopen("datasets", column, rowid) as blob:
        for start in range(0, len(data), PIECE_BYTES):
            blob.write(data[start : start + PIECE_BYTES].data)


def _array_from_row(dtype: str, shape: str, data: bytes) -> Array:
    """A read-only array over the row's bytes (no copy)."""
    spec = Spec("", np.dtype(dtype), tuple(json.loads(shape)))
    return tensors_from_bytes(data, [spec])[""]


class SqliteDatasetStore:
    """Datasets in one SQLite file, one row (both arrays as BLOBs) per proplet; each put is
    one transaction. `SqliteDatasetStore(path)`, then `await open()`, `await close()`."""

    def __init__(self, path: Path) -> None:
        self.db = Database(path, _SCHEMA)

    async def open(self) -> None:
        await self.db.open()
        await self.db.write(_migrate)

    async def close(self) -> None:
        await self.db.close()

    async def get(self, proplet_id: str) -> Dataset | None:
        row = await self.db.read(
            lambda c: c.execute(
                "SELECT schema, features_dtype, features_shape, features, labels_dtype, "
                "labels_shape, labels, num_classes FROM datasets WHERE proplet_id = ?",
                (proplet_id,),
            ).fetchone()
        )
        if row is None:
            return None
        return Dataset(
            proplet_id=proplet_id,
            features=_array_from_row(row[1], row[2], row[3]),
            labels=_array_from_row(row[4], row[5], row[6]),
            schema=row[0],
            num_classes=int(row[7]),
        )

    async def put(self, dataset: Dataset, *, replace: bool = True) -> bool:
        values = (
            dataset.proplet_id,
            dataset.schema,
            dataset.size,
            dataset.num_features,
            *_array_columns(dataset.features),
            *_array_columns(dataset.labels),
            time.time(),
            dataset.num_classes,
        )
        verb = "INSERT OR REPLACE" if replace else "INSERT OR IGNORE"

        def write(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                f"{verb} INTO datasets (proplet_id, schema, size, num_features, "
                "features_dtype, features_shape, features, labels_dtype, labels_shape, labels, "
                "updated_at, num_classes) "
                "VALUES (?, ?, ?, ?, ?, ?, zeroblob(?), ?, ?, zeroblob(?), ?, ?)",
                values,
            )
            if cur.rowcount != 1:
                return False
            assert cur.lastrowid is not None
            # In the same transaction: the row and its bytes commit together or not at all.
            _write_blob(conn, "features", cur.lastrowid, dataset.features)
            _write_blob(conn, "labels", cur.lastrowid, dataset.labels)
            return True

        stored: bool = await self.db.write(write)
        return stored

    async def list(self) -> list[DatasetSummary]:
        rows = await self.db.read(
            lambda c: c.execute(
                "SELECT proplet_id, schema, size, num_features, num_classes FROM datasets "
                "ORDER BY proplet_id"
            ).fetchall()
        )
        return [DatasetSummary(r[0], r[1], int(r[2]), int(r[3]), int(r[4])) for r in rows]

    async def summaries(self, proplet_ids: Collection[str]) -> Sequence[DatasetSummary]:
        wanted = sorted(set(proplet_ids))

        def read(conn: sqlite3.Connection) -> list[Any]:
            rows: list[Any] = []
            # Within the 999 parameters of a statement an older SQLite allows.
            for at in range(0, len(wanted), 500):
                part = wanted[at : at + 500]
                rows += conn.execute(
                    "SELECT proplet_id, schema, size, num_features, num_classes FROM datasets "
                    f"WHERE proplet_id IN ({','.join('?' * len(part))})",
                    part,
                ).fetchall()
            return rows

        rows = await self.db.read(read)
        return [DatasetSummary(r[0], r[1], int(r[2]), int(r[3]), int(r[4])) for r in rows]
