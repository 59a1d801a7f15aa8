"""The coordinator's `ModelBackend` over gRPC: the ModelRegistry through its generated stub and
the Aggregator through its one client (`server.aggregator.client`). Every call has a timeout;
failures come back as our own errors (`rpc_errors`), keeping the downstream status code."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from propeller.v1 import model_registry_pb2, model_registry_pb2_grpc
from server.aggregator.client import AggregatorClient, UpdateInput
from server.coordinator.store import RoundUpdates, each_update
from server.errors import NotFound, rpc_errors
from server.models import model_uri
from server.paging import all_pages
from server.streams import UpdateMeta, model_stream
from server.tensors import DEFAULT_CHUNK_SIZE, Spec, Tensors, specs_from_proto


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
        self._aggregator = AggregatorClient(aggregator, timeout_s=timeout_s, chunk_size=chunk_size)
        self._timeout_s = timeout_s
        self._chunk_size = chunk_size

    async def _list_models(self) -> list[model_registry_pb2.ModelVersion]:
        """Every stored version (all the pages of ListModels)."""

        async def page(
            request: model_registry_pb2.ListModelsRequest,
        ) -> model_registry_pb2.ListModelsResponse:
            with rpc_errors("registry.ListModels"):
                response: model_registry_pb2.ListModelsResponse = await self._registry.ListModels(
                    request, timeout=self._timeout_s
                )
            return response

        request = model_registry_pb2.ListModelsRequest()
        return [m async for m in all_pages(page, request, lambda r: r.models)]

    async def resolve(self, model_ref: str) -> tuple[str, list[Spec]]:
        if model_ref:
            with rpc_errors(f"model_ref: {model_ref!r}"):
                info = await self._registry.GetModelInfo(
                    model_registry_pb2.GetModelRequest(model_uri=model_ref),
                    timeout=self._timeout_s,
                )
        else:
            models = await self._list_models()
            if not models:
                raise NotFound("model_ref: empty, and the registry holds no model yet")
            info = max(models, key=lambda m: m.version)
        specs = specs_from_proto(info.tensors, "registry.tensors")
        return info.model_uri or model_uri(info.version), specs

    async def aggregate(self, round_id: str, updates: RoundUpdates) -> tuple[Tensors, str]:
        """Stream the updates to the Aggregator one at a time: stored updates are read from
        the state store just before they are sent, so only one update's arrays are in memory."""
        return await self._aggregator.aggregate(round_id, _inputs(round_id, updates))

    async def put(self, tensors: Tensors, sha256: str) -> tuple[int, str]:
        # No version in the header: the registry assigns the next one from what it stores.
        with rpc_errors("registry.PutModel"):
            info = await self._registry.PutModel(
                model_stream(tensors, self._chunk_size, sha256=sha256), timeout=self._timeout_s
            )
        return info.version, info.model_uri or model_uri(info.version)

    async def find(self, sha256: str, after_version: int) -> tuple[int, str] | None:
        for m in await self._list_models():
            if m.version > after_version and m.sha256 == sha256:
                return m.version, m.model_uri or model_uri(m.version)
        return None


async def _inputs(round_id: str, updates: RoundUpdates) -> AsyncIterator[UpdateInput]:
    async for u in each_update(updates):
        meta = UpdateMeta(round_id, u.proplet_id, u.base_model_uri, u.num_samples, dict(u.metrics))
        yield meta, u.tensors
        del u  # not held while the next one is read
