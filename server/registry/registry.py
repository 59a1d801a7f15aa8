"""The model registry's rules: immutable versions, numbered from what is stored.

The next version is always derived from the store (highest stored + 1), never from a counter
in memory, so a restart (or a second registry process over the same state file) can never hand
out a version twice or overwrite one.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import threading
import time
from collections.abc import AsyncIterator

import numpy as np

from server.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from server.models import MAX_VERSION, model_uri
from server.registry.store import ModelCorrupted, ModelInfo, ModelStore, StoredModel
from server.streams import MAX_PAYLOAD_BYTES, Payload
from server.tensors import Tensors, digest_of, nbytes_of, offload_if_big

log = logging.getLogger(__name__)

MAX_DIMENSION = 10_000_000
# How often an auto-numbered put retries when another process took the version it derived.
_PUT_ATTEMPTS = 8


def initial_model(dimension: int, dtype: np.dtype[np.floating]) -> Tensors:
    """Version 0: zeros, `w` of shape [dimension] and a scalar `b`."""
    if not 1 <= dimension <= MAX_DIMENSION:
        raise InvalidArgument(f"dimension: must be between 1 and {MAX_DIMENSION}, got {dimension}")
    return {"w": np.zeros(dimension, dtype=dtype), "b": np.zeros((), dtype=dtype)}


def _checked_digest(payload: Payload, field: str) -> str:
    """The payload's sha256, once it has tensors and every value is finite (read piece by
    piece: a spooled payload is never loaded whole)."""
    if not payload.specs:
        raise InvalidArgument(f"{field}.tensors: must list at least one tensor")
    return payload.sha256(finite_field=field)


def not_found(version: int) -> NotFound:
    return NotFound(f"version: {version} ({model_uri(version)}) not found")


class ModelRegistry:
    """Versioned, immutable global models on top of a `ModelStore`."""

    def __init__(self, store: ModelStore) -> None:
        self.store = store
        # Serialises puts so that two concurrent auto-numbered puts derive distinct versions.
        self._put_lock = asyncio.Lock()

    async def init_model(
        self, dimension: int, dtype: np.dtype[np.floating] | None = None
    ) -> ModelInfo:
        tensors = initial_model(dimension, np.dtype("<f8") if dtype is None else dtype)
        digest = await digest_of(tensors)
        payload = await offload_if_big(nbytes_of(tensors), Payload.of, tensors)
        async with self._put_lock:
            if await self.store.info(0) is not None:
                raise AlreadyExists(f"version: 0 ({model_uri(0)}) already exists")
            info = await self._store_put(0, payload, digest)
        log.info("[ModelRegistry.InitModel] version=0 dimension=%d", dimension)
        return info

    @property
    def max_bytes(self) -> int:
        """The most bytes a version may have (what the store holds, at most
        `MAX_PAYLOAD_BYTES`): PutModel refuses a bigger one from its header."""
        return min(MAX_PAYLOAD_BYTES, self.store.max_bytes)

    async def put_model(
        self,
        payload: Payload,
        *,
        version: int | None = None,
        sha256: str = "",
        field: str = "model",
    ) -> ModelInfo:
        """Store `payload` (the tensors' bytes, in memory or spooled) as `version`, or as the
        next version when `version` is None.

        `sha256`, if given, must be the digest of the tensors' bytes as the sender computed it.
        """
        if version is not None and not 0 <= version <= MAX_VERSION:
            raise InvalidArgument(f"version: must be between 0 and {MAX_VERSION}, got {version}")
        digest = await offload_if_big(payload.nbytes, _checked_digest, payload, field)
        if sha256 and sha256.lower() != digest:
            raise InvalidArgument(
                f"sha256: header says {sha256}, the received bytes hash to {digest}"
            )
        async with self._put_lock:
            if version is not None:
                info = await self._store_put(version, payload, digest)
            else:
                info = await self._put_next(payload, digest)
        log.info(
            "[ModelRegistry.PutModel] version=%d bytes=%d sha256=%s",
            info.version,
            info.total_bytes,
            info.sha256[:12],
        )
        return info

    async def _put_next(self, payload: Payload, digest: str) -> ModelInfo:
        for _ in range(_PUT_ATTEMPTS):
            versions = await self.store.versions()
            candidate = versions[-1] + 1 if versions else 0
            if candidate > MAX_VERSION:
                raise FailedPrecondition(
                    f"version: {versions[-1]} is stored, the highest a model reference can name"
                )
            try:
                return await self._store_put(candidate, payload, digest)
            except AlreadyExists:
                # Another process sharing the store published this version first.
                continue
        raise AlreadyExists(
            f"version: could not claim a new version after {_PUT_ATTEMPTS} attempts"
        )

    async def _store_put(self, version: int, payload: Payload, digest: str) -> ModelInfo:
        """`store.put`. If this call is cancelled (a client that went away, a server stop whose
        grace period ran out) the write, which goes on in the store's thread, stops before it
        commits: a version is stored only by a put that can still be acknowledged (bar the
        moment of the commit itself), and never torn either way."""
        info = ModelInfo(version, digest, payload.specs, time.time())
        abandoned = threading.Event()
        try:
            await self.store.put(info, payload, abandoned)
            return info
        except asyncio.CancelledError:
            abandoned.set()
            log.warning(
                "[ModelRegistry.PutModel] version=%d: call cancelled; write abandoned", version
            )
            raise

    async def get_model(self, version: int) -> StoredModel:
        # A version the store holds in memory (verified) is served without waiting for a
        # read: every participant of a round asks for the same model at once.
        model = self.store.cached(self._checked(version))
        if model is None:
            model = await self.store.get(version)
        if model is None:
            raise not_found(version)
        return model

    async def model_info(self, version: int) -> ModelInfo:
        info = await self.store.info(self._checked(version))
        if info is None:
            raise not_found(version)
        return info

    async def list_models(self, after: int | None = None) -> AsyncIterator[ModelInfo]:
        """Every readable version (after version `after`, when given), oldest first, read as
        they are asked for; a corrupted one is logged and left out."""
        versions = await self.store.versions()
        start = 0 if after is None else bisect.bisect_right(versions, after)
        for version in versions[start:]:
            try:
                info = await self.store.info(version)
            except ModelCorrupted as exc:
                log.error("[ModelRegistry.ListModels] skipping version=%d: %s", version, exc)
                continue
            if info is not None:
                yield info

    async def next_version(self) -> int:
        versions = await self.store.versions()
        return versions[-1] + 1 if versions else 0

    @staticmethod
    def _checked(version: int) -> int:
        if version < 0:
            raise InvalidArgument(f"version: must be >= 0, got {version}")
        return version
