"""The coordinator's `ModelBackend` over gRPC: the ModelRegistry and the Aggregator, reached
only through their generated stubs. Every call has a timeout; failures come back as our own
errors (`from_rpc_error`), keeping the downstream status code."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc

from propeller.v1 import (
    aggregator_pb2,
    aggregator_pb2_grpc,
    model_registry_pb2,
    model_registry_pb2_grpc,
    tensor_pb2,
)
from server.aggregator.client import METHOD as AGGREGATE_METHOD
from server.aggregator.intake import INLINE_BYTES
from server.coordinator.rounds import Update
from server.coordinator.store import StoredUpdates
from server.errors import InvalidArgument, NotFound, Unavailable, from_rpc_error
from server.models import model_uri
from server.streams import UpdateMeta, model_stream, read_model_stream, update_header
from server.tensors import (
    DEFAULT_CHUNK_SIZE,
    Spec,
    Tensors,
    iter_chunks,
    sha256_of,
    specs_from_proto,
    specs_of,
)

log = logging.getLogger(__name__)


class GrpcModelBackend:
    """`ModelBackend` over a registry channel and an aggregator channel (owned by the caller)."""

    def __init__(
        self,
        registry: grpc.aio.Channel,
        aggregator: grpc.aio.Channel,
        *,
        timeout_s: float,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        self._registry = model_registry_pb2_grpc.ModelRegistryStub(registry)
        self._aggregator = aggregator_pb2_grpc.AggregatorStub(aggregator)
        self._timeout_s = timeout_s
        self._chunk_size = chunk_size

    async def _list_models(self) -> list[model_registry_pb2.ModelVersion]:
        try:
            resp = await self._registry.ListModels(
                model_registry_pb2.ListModelsRequest(), timeout=self._timeout_s
            )
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err, "registry.ListModels") from None
        return list(resp.models)

    async def resolve(self, model_ref: str) -> tuple[str, list[Spec]]:
        if model_ref:
            try:
                info = await self._registry.GetModelInfo(
                    model_registry_pb2.GetModelRequest(model_uri=model_ref),
                    timeout=self._timeout_s,
                )
            except grpc.aio.AioRpcError as err:
                raise from_rpc_error(err, f"model_ref: {model_ref!r}") from None
        else:
            models = await self._list_models()
            if not models:
                raise NotFound("model_ref: empty, and the registry holds no model yet")
            info = max(models, key=lambda m: m.version)
        specs = specs_from_proto(info.tensors, "registry.tensors")
        return info.model_uri or model_uri(info.version), specs

    async def aggregate(self, round_id: str, updates: Sequence[Update]) -> Tensors:
        """Stream the updates to the Aggregator one at a time: stored updates are read from
        the state store just before they are sent, so only one update's arrays are in memory.
        Errors as `server.aggregator.client.aggregate_via`."""
        call = self._aggregator.Aggregate(timeout=self._timeout_s)
        try:
            try:
                await call.write(
                    aggregator_pb2.AggregateChunk(
                        header=aggregator_pb2.AggregateHeader(
                            strategy=aggregator_pb2.STRATEGY_FEDAVG, round_id=round_id
                        )
                    )
                )
                async for u in _each(updates):
                    meta = UpdateMeta(
                        round_id, u.proplet_id, u.base_model_uri, u.num_samples, dict(u.metrics)
                    )
                    await call.write(
                        aggregator_pb2.AggregateChunk(
                            update=update_header(meta, specs_of(u.tensors))
                        )
                    )
                    for data in iter_chunks(u.tensors, self._chunk_size):
                        await call.write(aggregator_pb2.AggregateChunk(data=data))
                    del u
                await call.done_writing()
            except asyncio.InvalidStateError:
                # The aggregator ended the call early (it rejected an update); its status,
                # read below, says why.
                pass
            try:
                header, tensors = await read_model_stream(_responses(call), "aggregate.response")
            except InvalidArgument as exc:
                raise Unavailable(f"{AGGREGATE_METHOD}: malformed response: {exc}") from None
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err, AGGREGATE_METHOD) from None
        finally:
            call.cancel()  # a no-op once the call has finished
        if sum(a.nbytes for a in tensors.values()) <= INLINE_BYTES:
            digest = sha256_of(tensors)  # less work than a thread hand-off
        else:
            digest = await asyncio.to_thread(sha256_of, tensors)
        if header.sha256 and header.sha256 != digest:
            raise Unavailable(
                f"{AGGREGATE_METHOD}: response sha256 {header.sha256} does not match its bytes "
                f"({digest})"
            )
        return tensors

    async def put(self, tensors: Tensors, sha256: str) -> tuple[int, str]:
        # No version in the header: the registry assigns the next one from what it stores.
        try:
            info = await self._registry.PutModel(
                model_stream(tensors, self._chunk_size, sha256=sha256), timeout=self._timeout_s
            )
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err, "registry.PutModel") from None
        return info.version, info.model_uri or model_uri(info.version)

    async def find(self, sha256: str, after_version: int) -> tuple[int, str] | None:
        for m in await self._list_models():
            if m.version > after_version and m.sha256 == sha256:
                return m.version, m.model_uri or model_uri(m.version)
        return None


async def _each(updates: Sequence[Update]) -> AsyncIterator[Update]:
    """The updates in order; stored ones are read off the event loop, one at a time."""
    if isinstance(updates, StoredUpdates):
        async for u in updates:
            yield u
            del u  # not held while the next one is read
    else:
        for u in updates:
            yield u


async def _responses(call: Any) -> AsyncIterator[tensor_pb2.ModelChunk]:
    async for chunk in call:
        yield chunk
