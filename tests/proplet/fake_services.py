"""In-test gRPC services for the round: the model registry, the data store and the coordinator
as seen from a proplet. They implement only what a proplet calls, over real gRPC (fakes at
the network boundary; the real services are exercised end to end elsewhere)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from propeller.v1 import (
    coordinator_pb2,
    coordinator_pb2_grpc,
    datastore_pb2,
    datastore_pb2_grpc,
    model_registry_pb2,
    model_registry_pb2_grpc,
    tensor_pb2,
)
from server.datastore.datasets import Dataset, check_split, dataset_split
from server.grpc_server import ServiceBinding, serving
from server.models import model_uri
from server.streams import model_stream, read_update_stream
from server.tensors import Tensors, tensor_to_proto
from tests.support.security import service_tls


@dataclass
class Received:
    header: tensor_pb2.UpdateHeader
    tensors: Tensors


@dataclass
class RoundWorld:
    """What the fakes serve and what they were sent."""

    models: dict[str, Tensors] = field(default_factory=dict)
    datasets: dict[str, tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]] = field(
        default_factory=dict
    )
    model_requests: list[str] = field(default_factory=list)
    dataset_requests: list[str] = field(default_factory=list)
    # The split each GetDataset asked for ("" = all), in order.
    split_requests: list[str] = field(default_factory=list)
    updates: list[Received] = field(default_factory=list)
    reject: tuple[grpc.StatusCode, str] | None = None
    k_of_n: int = 3
    port: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


class FakeModelRegistry(model_registry_pb2_grpc.ModelRegistryServicer):  # type: ignore[misc]
    def __init__(self, world: RoundWorld) -> None:
        self.world = world

    async def GetModel(
        self,
        request: model_registry_pb2.GetModelRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[tensor_pb2.ModelChunk]:
        uri = request.model_uri or model_uri(request.version)
        self.world.model_requests.append(uri)
        tensors = self.world.models.get(uri)
        if tensors is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model_uri: {uri!r} not stored")
        assert tensors is not None
        # Small chunks so the proplet has to reassemble a real stream.
        for chunk in model_stream(tensors, chunk_size=7, model_uri=uri):
            yield chunk


class FakeDataStore(datastore_pb2_grpc.DataStoreServicer):  # type: ignore[misc]
    def __init__(self, world: RoundWorld) -> None:
        self.world = world

    async def GetDataset(
        self, request: datastore_pb2.GetDatasetRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> datastore_pb2.Dataset:
        self.world.dataset_requests.append(request.proplet_id)
        self.world.split_requests.append(request.split)
        found = self.world.datasets.get(request.proplet_id)
        if found is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"proplet_id: {request.proplet_id}")
        assert found is not None
        # The data store's own split rule (server/datastore/datasets.py).
        part = dataset_split(Dataset(request.proplet_id, *found), check_split(request.split))
        return datastore_pb2.Dataset(
            proplet_id=request.proplet_id,
            schema="fl-demo-dataset-v1",
            features=tensor_to_proto(part.features),
            labels=tensor_to_proto(part.labels),
        )


class FakeCoordinator(coordinator_pb2_grpc.CoordinatorServicer):  # type: ignore[misc]
    def __init__(self, world: RoundWorld) -> None:
        self.world = world

    async def SubmitUpdate(
        self,
        request_iterator: AsyncIterator[tensor_pb2.UpdateChunk],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> coordinator_pb2.SubmitUpdateResponse:
        header, tensors = await read_update_stream(request_iterator)
        if self.world.reject is not None:
            await context.abort(*self.world.reject)
        duplicate = any(u.header.proplet_id == header.proplet_id for u in self.world.updates)
        if not duplicate:
            self.world.updates.append(Received(header, tensors))
        return coordinator_pb2.SubmitUpdateResponse(
            round_id=header.round_id,
            proplet_id=header.proplet_id,
            accepted=True,
            duplicate=duplicate,
            num_updates=len(self.world.updates),
            k_of_n=self.world.k_of_n,
            state=coordinator_pb2.ROUND_STATE_OPEN,
        )


@asynccontextmanager
async def round_services(world: RoundWorld) -> AsyncIterator[RoundWorld]:
    """The three fakes on one real gRPC server on a free loopback port."""
    bindings = [
        ServiceBinding(
            "propeller.v1.ModelRegistry",
            FakeModelRegistry(world),
            model_registry_pb2_grpc.add_ModelRegistryServicer_to_server,
        ),
        ServiceBinding(
            "propeller.v1.DataStore",
            FakeDataStore(world),
            datastore_pb2_grpc.add_DataStoreServicer_to_server,
        ),
        ServiceBinding(
            "propeller.v1.Coordinator",
            FakeCoordinator(world),
            coordinator_pb2_grpc.add_CoordinatorServicer_to_server,
        ),
    ]
    async with serving("127.0.0.1:0", bindings, service_tls("round-services")) as port:
        world.port = port
        yield world
