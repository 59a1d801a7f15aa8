"""ModelRegistry servicer: proto <-> domain translation around `ModelRegistry`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from propeller.v1 import model_registry_pb2, model_registry_pb2_grpc, tensor_pb2
from server.errors import InvalidArgument, grpc_errors
from server.grpc_server import ServiceBinding
from server.models import parse_model_uri
from server.registry.registry import ModelRegistry
from server.registry.store import ModelInfo
from server.streams import model_stream, read_model_stream
from server.tensors import DEFAULT_CHUNK_SIZE, dtype_from_proto

SERVICE_NAME = "propeller.v1.ModelRegistry"
MAX_CHUNK_SIZE = 4 << 20

Context = grpc.aio.ServicerContext[Any, Any]


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


class ModelRegistryServicer:
    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry

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
            header, tensors = await read_model_stream(request_iterator, "model")
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
            info = await self.registry.put_model(tensors, version=version, sha256=header.sha256)
            return model_version_proto(info)

    async def GetModel(
        self, request: model_registry_pb2.GetModelRequest, context: Context
    ) -> AsyncIterator[tensor_pb2.ModelChunk]:
        async with grpc_errors(context, "ModelRegistry.GetModel"):
            version = requested_version(request)
            chunk_size = chunk_size_of(request)
            model = await self.registry.get_model(version)
            for chunk in model_stream(
                model.tensors,
                chunk_size,
                version=model.version,
                model_uri=model.info.model_uri,
                sha256=model.sha256,
            ):
                yield chunk

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
            infos = await self.registry.list_models()
            return model_registry_pb2.ListModelsResponse(
                models=[model_version_proto(i) for i in infos]
            )


def binding(registry: ModelRegistry) -> ServiceBinding:
    return ServiceBinding(
        SERVICE_NAME,
        ModelRegistryServicer(registry),
        model_registry_pb2_grpc.add_ModelRegistryServicer_to_server,
    )
