"""Where model versions live: a small `ModelStore` protocol and three implementations.

`SqliteModelStore` is the default whenever there is a state directory: `registry.sqlite`, one
row per version (specs, sha256, created_at and the bytes as a BLOB) inserted in one
transaction, so a crash at any moment leaves the version either absent or complete. The
version is the primary key: a second write of it fails with ALREADY_EXISTS.

`InMemoryModelStore` serves tests and the one-process mode. `DirectoryModelStore` (the
older format, still used when `PROPELLER_REGISTRY_DATA_DIR` is given without a state
directory) keeps one file per version (`v{N}.model`: one JSON meta line, then the raw tensor
bytes). A version is written to a temporary file, flushed to disk and then published under its
final name in one atomic step, so a crash leaves either no version or the whole version, never
a torn one. Publishing never replaces an existing file: versions are immutable even when several
processes share the directory. Reads verify the stored sha256 before serving anything.

Store methods are blocking; async callers run them through `asyncio.to_thread`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import sqlite3
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import grpc
import numpy as np

from server.errors import AlreadyExists, PropellerError, ResourceExhausted
from server.models import model_uri
from server.sqlite import Database
from server.tensors import Array, Spec, Tensors, specs_of, total_bytes

log = logging.getLogger(__name__)

FILE_FORMAT = "propeller-fl-model-v1"
# The meta line lists tensor specs only; anything longer than this is not a meta line.
_MAX_META_BYTES = 1 << 20
_DTYPE_NAMES: dict[str, np.dtype[np.floating]] = {
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
}


class ModelCorrupted(PropellerError):
    """A stored version failed its integrity check; it is reported, never served."""

    code = grpc.StatusCode.DATA_LOSS


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

    @property
    def version(self) -> int:
        return self.info.version

    @property
    def sha256(self) -> str:
        return self.info.sha256


class ModelStore(Protocol):
    def get(self, version: int) -> StoredModel | None:
        """The stored version, or None if there is none. Raises ModelCorrupted."""
        ...

    def info(self, version: int) -> ModelInfo | None:
        """Metadata of a stored version without reading its bytes, or None."""
        ...

    def put(
        self,
        version: int,
        tensors: Mapping[str, Array],
        sha256: str,
        *,
        abandoned: threading.Event | None = None,
    ) -> ModelInfo:
        """Store a new version; AlreadyExists if that version is stored (it stays unchanged).
        `sha256` is the hex digest of the tensors' concatenated bytes, computed by the caller.
        Once `abandoned` is set (the caller gave up: its call was cancelled), a write still in
        progress stops before it commits and raises WriteAbandoned, storing nothing."""
        ...

    def versions(self) -> list[int]:
        """Every stored version, ascending."""
        ...


class WriteAbandoned(Exception):
    """A put stopped before committing because its caller gave up; nothing was stored."""


def _check_abandoned(abandoned: threading.Event | None, version: int) -> None:
    if abandoned is not None and abandoned.is_set():
        raise WriteAbandoned(f"version: {version} not stored: the call was abandoned")


def _already_exists(version: int) -> AlreadyExists:
    return AlreadyExists(f"version: {version} ({model_uri(version)}) already exists")


def _frozen_copy(tensors: Mapping[str, Array]) -> Tensors:
    out: Tensors = {}
    for name, arr in tensors.items():
        copy = np.array(arr, copy=True, order="C")
        copy.setflags(write=False)
        out[name] = copy
    return out


class InMemoryModelStore:
    """Versions in a dict; gone when the process ends."""

    def __init__(self) -> None:
        self._models: dict[int, StoredModel] = {}
        self._lock = threading.Lock()

    def get(self, version: int) -> StoredModel | None:
        with self._lock:
            return self._models.get(version)

    def cached(self, version: int) -> StoredModel | None:
        """`get` without blocking (all versions are in memory)."""
        return self._models.get(version)  # one dict lookup: atomic under the GIL

    def info(self, version: int) -> ModelInfo | None:
        with self._lock:
            model = self._models.get(version)
        return None if model is None else model.info

    def put(
        self,
        version: int,
        tensors: Mapping[str, Array],
        sha256: str,
        *,
        abandoned: threading.Event | None = None,
    ) -> ModelInfo:
        frozen = _frozen_copy(tensors)
        info = ModelInfo(version, sha256, tuple(specs_of(frozen)), time.time())
        with self._lock:
            if version in self._models:
                raise _already_exists(version)
            _check_abandoned(abandoned, version)
            self._models[version] = StoredModel(info, frozen)
        return info

    def versions(self) -> list[int]:
        with self._lock:
            return sorted(self._models)


_FILE_NAME = re.compile(r"^v(\d{1,18})\.model$")


class _VerifiedReads:
    """The last few versions read and verified, kept because versions never change: without
    it every proplet of a round would re-read and re-hash the same version. One read at a time
    (`_lock`), so concurrent requests for one version share a single read."""

    def __init__(self, load: Callable[[int], StoredModel | None], size: int) -> None:
        self._load = load
        self._size = size
        self._lock = threading.Lock()
        self._cache: OrderedDict[int, StoredModel] = OrderedDict()

    def cached(self, version: int) -> StoredModel | None:
        """A version already read and verified, without blocking (None when it would have to
        be read). Never waits for `_lock`, which a big read may hold for a while."""
        return self._cache.get(version)  # one dict lookup: atomic under the GIL

    def get(self, version: int) -> StoredModel | None:
        with self._lock:
            model = self._cache.get(version)
            if model is None:
                model = self._load(version)
                if model is None:
                    return None
                self._cache[version] = model
                while len(self._cache) > self._size:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(version)
            return model


class DirectoryModelStore:
    """One file per version in `root`: `v{N}.model` = JSON meta line + raw tensor bytes.

    Temporary files (`.v{N}.*.tmp`) left behind by a crash are never read as versions.
    The last `cache_size` versions read are kept in memory once verified: versions are
    immutable, and a round's participants all fetch the same one.
    """

    def __init__(self, root: Path, cache_size: int = 2) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        # Serialises publishing within this process; across processes the atomic
        # no-overwrite publish below is what keeps versions immutable.
        self._lock = threading.Lock()
        # Serialises loads, so many concurrent first reads of one version read it once.
        self._reads = _VerifiedReads(self._load, cache_size)

    def path_of(self, version: int) -> Path:
        return self.root / f"v{version}.model"

    def versions(self) -> list[int]:
        found: list[int] = []
        for entry in os.scandir(self.root):
            m = _FILE_NAME.match(entry.name)
            if m is not None and entry.is_file():
                found.append(int(m.group(1)))
        return sorted(found)

    def info(self, version: int) -> ModelInfo | None:
        path = self.path_of(version)
        try:
            with path.open("rb") as f:
                line = f.readline(_MAX_META_BYTES + 1)
                size = os.fstat(f.fileno()).st_size
        except FileNotFoundError:
            return None
        info = self._parse_meta(version, line)
        if size != len(line) + info.total_bytes:
            raise ModelCorrupted(
                f"version: {version} is corrupted in storage ({path.name} holds "
                f"{size - len(line)} tensor bytes, its header promises {info.total_bytes})"
            )
        return info

    def cached(self, version: int) -> StoredModel | None:
        return self._reads.cached(version)

    def get(self, version: int) -> StoredModel | None:
        return self._reads.get(version)

    def _load(self, version: int) -> StoredModel | None:
        path = self.path_of(version)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        newline = raw.find(b"\n", 0, _MAX_META_BYTES + 1)
        if newline < 0:
            raise ModelCorrupted(f"version: {version} is corrupted in storage ({path.name})")
        info = self._parse_meta(version, raw[: newline + 1])
        payload = memoryview(raw)[newline + 1 :]
        if len(payload) != info.total_bytes:
            raise ModelCorrupted(
                f"version: {version} is corrupted in storage ({path.name} holds "
                f"{len(payload)} tensor bytes, its header promises {info.total_bytes})"
            )
        digest = hashlib.sha256(payload).hexdigest()
        if digest != info.sha256:
            raise ModelCorrupted(
                f"version: {version} is corrupted in storage ({path.name}: sha256 of the "
                f"stored bytes is {digest}, recorded {info.sha256})"
            )
        # Read-only views onto the file's bytes: no second copy of the model.
        tensors: Tensors = {}
        offset = 0
        for spec in info.specs:
            count = spec.nbytes // spec.dtype.itemsize
            arr = np.frombuffer(payload, dtype=spec.dtype, count=count, offset=offset)
            tensors[spec.name] = arr.reshape(spec.shape)
            offset += spec.nbytes
        return StoredModel(info, tensors)

    def put(
        self,
        version: int,
        tensors: Mapping[str, Array],
        sha256: str,
        *,
        abandoned: threading.Event | None = None,
    ) -> ModelInfo:
        if version < 0:
            raise ValueError(f"version must be >= 0, got {version}")
        info = ModelInfo(version, sha256, tuple(specs_of(tensors)), time.time())
        final = self.path_of(version)
        with self._lock:
            if final.exists():
                raise _already_exists(version)
            fd, tmp_name = tempfile.mkstemp(prefix=f".v{version}.", suffix=".tmp", dir=self.root)
            tmp = Path(tmp_name)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(_meta_line(info))
                    for arr in tensors.values():
                        _check_abandoned(abandoned, version)
                        if arr.size:  # memoryview cannot cast a view with a zero in its shape
                            f.write(np.ascontiguousarray(arr).data.cast("B"))
                    f.flush()
                    os.fsync(f.fileno())
                _check_abandoned(abandoned, version)
                self._publish(tmp, final, version)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
        log.info("[ModelRegistry.store] stored version=%d file=%s", version, final.name)
        return info

    def _publish(self, tmp: Path, final: Path, version: int) -> None:
        """Give the fully written temp file its final name, atomically, never overwriting."""
        try:
            # link() fails if `final` exists, even if another process created it a moment ago.
            os.link(tmp, final)
        except FileExistsError:
            raise _already_exists(version) from None
        except OSError:
            # A filesystem without hard links: rename is still atomic; the exists() check
            # above under the lock covers this process.
            if final.exists():
                raise _already_exists(version) from None
            os.replace(tmp, final)
        _fsync_dir(self.root)

    def _parse_meta(self, version: int, line: bytes) -> ModelInfo:
        name = self.path_of(version).name
        try:
            if not line.endswith(b"\n"):
                raise ValueError("no meta line")
            meta = json.loads(line)
            if meta["format"] != FILE_FORMAT or meta["version"] != version:
                raise ValueError("format or version mismatch")
            specs = tuple(
                Spec(
                    str(t["name"]),
                    _DTYPE_NAMES[t["dtype"]],
                    tuple(_non_negative_int(d) for d in t["shape"]),
                )
                for t in meta["tensors"]
            )
            sha256 = str(meta["sha256"])
            created_at = float(meta["created_at"])
            if not math.isfinite(created_at) or len(sha256) != 64:
                raise ValueError("bad sha256 or created_at")
            if total_bytes(specs) != meta["total_bytes"]:
                raise ValueError("total_bytes does not match the tensors")
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelCorrupted(
                f"version: {version} is corrupted in storage ({name}: unreadable header: {exc})"
            ) from None
        return ModelInfo(version, sha256, specs, created_at)


def _non_negative_int(value: object) -> int:
    if not isinstance(value, int) or value < 0:
        raise ValueError(f"bad dimension {value!r}")
    return value


def _meta_line(info: ModelInfo) -> bytes:
    meta = {
        "format": FILE_FORMAT,
        "version": info.version,
        "sha256": info.sha256,
        "created_at": info.created_at,
        "total_bytes": info.total_bytes,
        "tensors": [
            {"name": s.name, "dtype": s.dtype.name, "shape": list(s.shape)} for s in info.specs
        ],
    }
    # json.dumps escapes newlines inside strings, so the meta is exactly one line.
    return json.dumps(meta, separators=(",", ":")).encode() + b"\n"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- SQLite

REGISTRY_DB_FILE = "registry.sqlite"

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
# Bytes written into a BLOB between two looks at `abandoned`.
_BLOB_PIECE = 16 << 20


def _specs_json(specs: tuple[Spec, ...]) -> str:
    return json.dumps(
        [{"name": s.name, "dtype": s.dtype.name, "shape": list(s.shape)} for s in specs],
        separators=(",", ":"),
    )


def _specs_from_json(text: str) -> tuple[Spec, ...]:
    return tuple(
        Spec(
            str(t["name"]),
            _DTYPE_NAMES[t["dtype"]],
            tuple(_non_negative_int(d) for d in t["shape"]),
        )
        for t in json.loads(text)
    )


class SqliteModelStore:
    """Versions in one SQLite file (`registry.sqlite`), each inserted in one transaction.

    The bytes are written into the row's BLOB tensor by tensor (no concatenated copy) inside
    the inserting transaction. Reads check the BLOB's length and sha256 against the row
    before serving anything (DATA_LOSS otherwise); the last `cache_size` versions read are
    kept in memory once verified. Methods block: callers run them via `asyncio.to_thread`.
    """

    def __init__(self, path: Path, cache_size: int = 2) -> None:
        self.path = path
        self.db = Database(path, _SQLITE_SCHEMA)
        self.db.read_sync(lambda c: c.execute(f"PRAGMA journal_size_limit={_WAL_SIZE_LIMIT}"))
        self.max_bytes: int = self.db.read_sync(lambda c: c.getlimit(sqlite3.SQLITE_LIMIT_LENGTH))
        self._reads = _VerifiedReads(self._load, cache_size)

    def close(self) -> None:
        self.db.close()

    def versions(self) -> list[int]:
        rows: list[tuple[int]] = self.db.read_sync(
            lambda c: c.execute("SELECT version FROM models ORDER BY version").fetchall()
        )
        return [r[0] for r in rows]

    def info(self, version: int) -> ModelInfo | None:
        row = self.db.read_sync(
            lambda c: c.execute(
                "SELECT sha256, tensors, total_bytes, created_at, length(data) FROM models "
                "WHERE version = ?",
                (version,),
            ).fetchone()
        )
        if row is None:
            return None
        info = self._info(version, row[:4])
        if row[4] != info.total_bytes:
            raise ModelCorrupted(
                f"version: {version} is corrupted in storage ({self.path.name} holds {row[4]} "
                f"tensor bytes, its row promises {info.total_bytes})"
            )
        return info

    def cached(self, version: int) -> StoredModel | None:
        return self._reads.cached(version)

    def get(self, version: int) -> StoredModel | None:
        return self._reads.get(version)

    def _load(self, version: int) -> StoredModel | None:
        row = self.db.read_sync(
            lambda c: c.execute(
                "SELECT sha256, tensors, total_bytes, created_at, data FROM models "
                "WHERE version = ?",
                (version,),
            ).fetchone()
        )
        if row is None:
            return None
        info = self._info(version, row[:4])
        payload: bytes = row[4]
        if len(payload) != info.total_bytes:
            raise ModelCorrupted(
                f"version: {version} is corrupted in storage ({self.path.name} holds "
                f"{len(payload)} tensor bytes, its row promises {info.total_bytes})"
            )
        # Hashing a big model takes a while: here, in the caller's thread, not the database's.
        digest = hashlib.sha256(payload).hexdigest()
        if digest != info.sha256:
            raise ModelCorrupted(
                f"version: {version} is corrupted in storage ({self.path.name}: sha256 of the "
                f"stored bytes is {digest}, recorded {info.sha256})"
            )
        tensors: Tensors = {}
        offset = 0
        for spec in info.specs:
            count = spec.nbytes // spec.dtype.itemsize
            arr = np.frombuffer(payload, dtype=spec.dtype, count=count, offset=offset)
            tensors[spec.name] = arr.reshape(spec.shape)
            offset += spec.nbytes
        return StoredModel(info, tensors)

    def _info(self, version: int, row: tuple[object, ...]) -> ModelInfo:
        sha256, tensors, total, created_at = row
        try:
            specs = _specs_from_json(str(tensors))
            info = ModelInfo(version, str(sha256), specs, float(str(created_at)))
            if len(info.sha256) != 64 or not math.isfinite(info.created_at):
                raise ValueError("bad sha256 or created_at")
            if info.total_bytes != total:
                raise ValueError("total_bytes does not match the tensors")
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelCorrupted(
                f"version: {version} is corrupted in storage ({self.path.name}: unreadable "
                f"row: {exc})"
            ) from None
        return info

    def put(
        self,
        version: int,
        tensors: Mapping[str, Array],
        sha256: str,
        *,
        abandoned: threading.Event | None = None,
    ) -> ModelInfo:
        info = ModelInfo(version, sha256, tuple(specs_of(tensors)), time.time())
        return self.insert(info, tensors, abandoned=abandoned)

    def insert(
        self,
        info: ModelInfo,
        tensors: Mapping[str, Array],
        *,
        abandoned: threading.Event | None = None,
    ) -> ModelInfo:
        """Store `tensors` under `info` (its version, sha256 and created_at as given)."""
        if info.version < 0:
            raise ValueError(f"version must be >= 0, got {info.version}")
        size = info.total_bytes
        if size > self.max_bytes:
            raise ResourceExhausted(
                f"model: {size} bytes exceed the registry's limit of {self.max_bytes} bytes "
                "per version"
            )
        arrays = [np.ascontiguousarray(a) for a in tensors.values()]

        def insert(conn: sqlite3.Connection) -> None:
            _check_abandoned(abandoned, info.version)
            try:
                conn.execute(
                    "INSERT INTO models (version, sha256, tensors, total_bytes, created_at, "
                    "data) VALUES (?, ?, ?, ?, ?, zeroblob(?))",
                    (
                        info.version,
                        info.sha256,
                        _specs_json(info.specs),
                        size,
                        info.created_at,
                        size,
                    ),
                )
            except sqlite3.IntegrityError:
                raise _already_exists(info.version) from None
            if size:
                with conn.blobopen("models", "data", info.version) as blob:
                    for arr in arrays:
                        if not arr.nbytes:
                            continue
                        data = arr.data.cast("B")
                        for start in range(0, len(data), _BLOB_PIECE):
                            _check_abandoned(abandoned, info.version)
                            blob.write(data[start : start + _BLOB_PIECE])
            _check_abandoned(abandoned, info.version)

        # One transaction: the row and all of its bytes commit together or not at all.
        self.db.write_sync(insert)
        log.info(
            "[ModelRegistry.store] stored version=%d bytes=%d in %s",
            info.version,
            size,
            self.path.name,
        )
        return info


def import_versions(source: DirectoryModelStore, target: SqliteModelStore) -> list[int]:
    """Copy the versions `source` (the directory format) holds and `target` lacks into
    `target`, checksums verified and created_at kept. A corrupted file is logged and left out;
    a version both hold is left as `target` has it. Returns the versions imported."""
    have = set(target.versions())
    imported: list[int] = []
    for version in source.versions():
        if version in have:
            continue
        try:
            model = source.get(version)
        except ModelCorrupted as exc:
            log.error("[ModelRegistry.import] skipping version=%d: %s", version, exc)
            continue
        if model is None:
            continue
        target.insert(model.info, model.tensors)
        imported.append(version)
    if imported:
        log.info(
            "[ModelRegistry.import] versions=%s from %s into %s",
            imported,
            source.root,
            target.path,
        )
    return imported
