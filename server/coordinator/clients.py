"""The coordinator's `ModelBackend` over gRPC: the ModelRegistry and the Aggregator, reached
only through their generated stubs. Every call has a timeout; failures come back as our own
errors (`from_rpc_error`), keeping the downstream status code."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import grpc

from propeller.v1 import aggregator_pb2_grpc, model_registry_pb2, model_registry_pb2_grpc
from server.aggregator.client import aggregate_via
from server.coordinator.rounds import Update
from server.errors import NotFound, from_rpc_error
from server.models import model_uri
from server.streams import UpdateMeta, model_stream
from server.tensors import DEFAULT_CHUNK_SIZE, Spec, Tensors, specs_from_proto

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
        pairs = (
            (
                UpdateMeta(
                    round_id, u.proplet_id, u.base_model_uri, u.num_samples, dict(u.metrics)
                ),
                u.tensors,
            )
            for u in updates
        )
        return await aggregate_via(
            self._aggregator, pairs, round_id, self._timeout_s, chunk_size=self._chunk_size
        )

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
