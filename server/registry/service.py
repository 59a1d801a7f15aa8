"""ModelRegistry servicer: proto <-> domain translation around `ModelRegistry`."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc

from propeller.v1 import model_registry_pb2, model_registry_pb2_grpc, tensor_pb2
from server.errors import InvalidArgument, grpc_errors
from server.grpc_server import Context, ServiceBinding
from server.models import parse_model_uri
from server.paging import Page, PageRequest
from server.registry.lineage import Lineages, MemoryLineageStore
from server.registry.registry import ModelRegistry
from server.registry.store import ModelInfo, StoredModel
from server.streams import Payload, model_stream, read_model_payload
from server.tensors import DEFAULT_CHUNK_SIZE, blake3_of, dtype_from_proto, offload_if_big

SERVICE_NAME = "propeller.v1.ModelRegistry"
MAX_CHUNK_SIZE = 4 << 20
# GetModel answers from serialized chunk messages kept for the most recently served versions
# (every participant of a round downloads the same model): at most this many models, and
# only models of at most this many bytes.
CHUNK_CACHE_ENTRIES = 2
CHUNK_CACHE_MAX_MODEL_BYTES = 256 << 20


def model_version_proto(info: ModelInfo) -> model_registry_pb2.ModelVersion:
    return model_registry_pb2.ModelVersion(
        version=info.version,
        model_uri=info.model_uri,
        sha256=info.sha256,
        tensors=[s.to_proto() for s in info.specs],
        total_bytes=info.total_bytes,
        created_at=info.created_at,
    )


def requested_version(request: model_registry_pb2.GetModelRequest) -> int:
    """The version a GetModelRequest refers to (by number or by model_uri)."""
    kind = request.WhichOneof("ref")
    if kind == "version":
        if request.version < 0:
            raise InvalidArgument(f"version: must be >= 0, got {request.version}")
        return request.version
    if kind == "model_uri":
        return parse_model_uri(request.model_uri, "model_uri")
    raise InvalidArgument("ref: set either version or model_uri")


def chunk_size_of(request: model_registry_pb2.GetModelRequest) -> int:
    if request.chunk_size < 0:
        raise InvalidArgument(f"chunk_size: must be >= 0, got {request.chunk_size}")
    if request.chunk_size == 0:
        return DEFAULT_CHUNK_SIZE
    return min(request.chunk_size, MAX_CHUNK_SIZE)


def answer_chunks(
    model: StoredModel, chunk_size: int, blake3: str
) -> Iterator[tensor_pb2.ModelChunk]:
    """A version's GetModel answer: its header (with the stored sha256, and the BLAKE3 of the
    same bytes that a downloader checks), then its bytes. The model's tensors were checked
    against its sha256 when they were read (`verified_tensors`), so `blake3` (`blake3_of`
    them) states the same bytes."""
    return model_stream(
        model.tensors,
        chunk_size,
        version=model.info.version,
        model_uri=model.info.model_uri,
        sha256=model.info.sha256,
        blake3=blake3,
    )


def serialized_chunks(model: StoredModel, chunk_size: int) -> list[bytes]:
    """A version's whole GetModel answer as serialized ModelChunk messages."""
    answer = answer_chunks(model, chunk_size, blake3_of(model.tensors))
    return [chunk.SerializeToString() for chunk in answer]


class ChunkCache:
    """Serialized GetModel answers by (version, chunk size), least recently used dropped
    first. Versions are immutable, so an entry never goes stale. Concurrent requests for the
    same answer wait for one serialization, which a requester going away does not cancel."""

    def __init__(self, entries: int = CHUNK_CACHE_ENTRIES) -> None:
        self.entries = entries
        self._answers: OrderedDict[tuple[int, int], asyncio.Task[list[bytes]]] = OrderedDict()

    async def get(self, model: StoredModel, chunk_size: int) -> list[bytes]:
        key = (model.info.version, chunk_size)
        answer = self._answers.get(key)
        if answer is None:
            answer = asyncio.create_task(
                offload_if_big(model.info.total_bytes, serialized_chunks, model, chunk_size)
            )
            self._answers[key] = answer
            answer.add_done_callback(lambda t: self._forget(key, t))
            while len(self._answers) > self.entries:
                self._answers.popitem(last=False)
        else:
            self._answers.move_to_end(key)
        return await asyncio.shield(answer)

    def _forget(self, key: tuple[int, int], task: asyncio.Task[list[bytes]]) -> None:
        """A failed serialization is not kept (its requesters got the error)."""
        if (task.cancelled() or task.exception() is not None) and self._answers.get(key) is task:
            del self._answers[key]


def _serialize_chunk(message: tensor_pb2.ModelChunk | bytes) -> bytes:
    """GetModel's response serializer: chunk messages, or chunks serialized already."""
    return message if isinstance(message, bytes) else message.SerializeToString()


class ModelRegistryServicer:
    def __init__(self, registry: ModelRegistry, lineages: Lineages | None = None) -> None:
        self.registry = registry
        self.lineages = lineages or Lineages(MemoryLineageStore(), registry)
        self.chunks = ChunkCache()

    async def InitModel(
        self, request: model_registry_pb2.InitModelRequest, context: Context
    ) -> model_registry_pb2.ModelVersion:
        async with grpc_errors(context, "ModelRegistry.InitModel"):
            dtype = (
                None
                if request.dtype == tensor_pb2.DTYPE_UNSPECIFIED
                else dtype_from_proto(request.dtype, "dtype")
            )
            info = await self.registry.init_model(request.dimension, dtype)
            return model_version_proto(info)

    async def PutModel(
        self, request_iterator: AsyncIterator[tensor_pb2.ModelChunk], context: Context
    ) -> model_registry_pb2.ModelVersion:
        async with grpc_errors(context, "ModelRegistry.PutModel"):
            header, payload = await read_model_payload(
                request_iterator, "model", max_bytes=self.registry.max_bytes
            )
            try:
                return model_version_proto(await self._put(header, payload))
            finally:
                payload.close()

    async def _put(self, header: tensor_pb2.ModelHeader, payload: Payload) -> ModelInfo:
        """Store an upload: as the version its header names, else as the next one."""
        version: int | None = None
        if header.HasField("version"):
            version = header.version
        if header.model_uri:
            named = parse_model_uri(header.model_uri, "model_uri")
            if version is not None and version != named:
                raise InvalidArgument(
                    f"model_uri: {header.model_uri!r} names version {named}, "
                    f"header.version is {version}"
                )
            version = named
        return await self.registry.put_model(payload, version=version, sha256=header.sha256)

    async def GetModel(
        self, request: model_registry_pb2.GetModelRequest, context: Context
    ) -> AsyncIterator[tensor_pb2.ModelChunk]:
        async with grpc_errors(context, "ModelRegistry.GetModel"):
            version = requested_version(request)
            chunk_size = chunk_size_of(request)
            model = await self.registry.get_model(version)
            if model.info.total_bytes > CHUNK_CACHE_MAX_MODEL_BYTES:
                digest = await offload_if_big(model.info.total_bytes, blake3_of, model.tensors)
                for chunk in answer_chunks(model, chunk_size, digest):
                    yield chunk
                return
            # Serialized already (see `_serialize_chunk`): sent as they are.
            for data in await self.chunks.get(model, chunk_size):
                yield data  # type: ignore[misc]

    async def GetModelInfo(
        self, request: model_registry_pb2.GetModelRequest, context: Context
    ) -> model_registry_pb2.ModelVersion:
        async with grpc_errors(context, "ModelRegistry.GetModelInfo"):
            info = await self.registry.model_info(requested_version(request))
            return model_version_proto(info)

    async def ListModels(
        self, request: model_registry_pb2.ListModelsRequest, context: Context
    ) -> model_registry_pb2.ListModelsResponse:
        async with grpc_errors(context, "ModelRegistry.ListModels"):
            wanted = PageRequest.of(request, "ListModels", int)
            page: Page[model_registry_pb2.ModelVersion] = Page(wanted)
            after = None if wanted.after is None else int(wanted.after)
            async for info in self.registry.list_models(after=after):
                if not page.offer(info.version, model_version_proto(info)):
                    break
            return model_registry_pb2.ListModelsResponse(
                models=page.items, next_page_token=page.next_page_token
            )

    async def PutLineage(
        self, request_iterator: AsyncIterator[model_registry_pb2.LineageChunk], context: Context
    ) -> model_registry_pb2.LineageInfo:
        async with grpc_errors(context, "ModelRegistry.PutLineage"):
            return await self.lineages.put(request_iterator)

    async def GetLineage(
        self, request: model_registry_pb2.GetModelRequest, context: Context
    ) -> AsyncIterator[model_registry_pb2.LineageChunk]:
        async with grpc_errors(context, "ModelRegistry.GetLineage"):
            version = requested_version(request)
            async for chunk in self.lineages.get(version, chunk_size_of(request)):
                yield chunk


class _PassSerializedChunks:
    """Stands in for the server while the generated code registers the handlers, and
    registers them on the real server with GetModel's response serializer replaced by
    `_serialize_chunk` (everything else as generated)."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self.server = server

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass  # added by add_registered_method_handlers, from the same handlers

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        get = handlers["GetModel"]
        handlers = {
            **handlers,
            "GetModel": grpc.unary_stream_rpc_method_handler(
                get.unary_stream,
                request_deserializer=get.request_deserializer,
                response_serializer=_serialize_chunk,
            ),
        }
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, handlers),)
        )
        # (missing from grpc-stubs; the generated code calls it too)
        self.server.add_registered_method_handlers(service, handlers)  # type: ignore[attr-defined]


def _add(servicer: ModelRegistryServicer, server: grpc.aio.Server) -> None:
    model_registry_pb2_grpc.add_ModelRegistryServicer_to_server(
        servicer, _PassSerializedChunks(server)
    )


def binding(registry: ModelRegistry, lineages: Lineages | None = None) -> ServiceBinding:
    return ServiceBinding(SERVICE_NAME, ModelRegistryServicer(registry, lineages), _add)
