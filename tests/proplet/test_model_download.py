"""The proplet's base-model download (`FederatedClient.fetch_model`) over real gRPC and mutual
TLS: the model a registry sends is used only when the bytes that came have the digest its header
states (BLAKE3 when stated, as the registry does, else sha256)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
import pytest

from propeller.v1 import model_registry_pb2, model_registry_pb2_grpc, tensor_pb2
from proplet.errors import TaskFailed
from proplet.federated import FederatedClient, FlTask
from server.grpc_server import ServiceBinding, serving
from server.streams import model_stream
from server.tensors import Tensors, blake3_of, sha256_of
from tests.support.security import proplet_tls, service_tls

URI = "fl/models/global_model_v3"
MODELS: dict[str, Tensors] = {
    "small": {"w": np.arange(5, dtype="<f8"), "b": np.asarray(0.5)},
    "big": {"w": np.random.default_rng(3).standard_normal((1 << 20,)).astype("<f4")},
}


class Registry(model_registry_pb2_grpc.ModelRegistryServicer):  # type: ignore[misc]
    """Serves one model; `tamper` flips a bit of the data on its way out."""

    def __init__(self, tensors: Tensors, *, tamper: bool, blake3: bool = True) -> None:
        self.tensors = tensors
        self.tamper = tamper
        self.blake3 = blake3_of(tensors) if blake3 else ""

    async def GetModel(
        self, request: model_registry_pb2.GetModelRequest, context: Any
    ) -> AsyncIterator[tensor_pb2.ModelChunk]:
        chunks = list(
            model_stream(self.tensors, chunk_size=64 << 10, model_uri=URI, blake3=self.blake3)
        )
        if self.tamper:
            last = bytearray(chunks[-1].data)
            last[0] ^= 0x80
            chunks[-1] = tensor_pb2.ModelChunk(data=bytes(last))
        for chunk in chunks:
            yield chunk


async def fetch(tensors: Tensors, *, tamper: bool, blake3: bool = True) -> tuple[Tensors, str]:
    binding = ServiceBinding(
        "propeller.v1.ModelRegistry",
        Registry(tensors, tamper=tamper, blake3=blake3),
        model_registry_pb2_grpc.add_ModelRegistryServicer_to_server,
    )
    async with serving("127.0.0.1:0", [binding], service_tls("registry")) as port:
        address = f"127.0.0.1:{port}"
        client = FederatedClient("p1", 20.0, tls=proplet_tls("p1"))
        task = FlTask("r1", URI, "{}", address, address, address)
        try:
            return await client.fetch_model(task)
        finally:
            await client.close()


@pytest.mark.parametrize("blake3", [True, False], ids=["blake3", "sha256-only"])
@pytest.mark.parametrize("size", list(MODELS))
async def test_the_model_is_used_when_its_bytes_have_the_stated_digest(
    size: str, blake3: bool
) -> None:
    tensors = MODELS[size]
    got, sha256 = await fetch(tensors, tamper=False, blake3=blake3)
    assert sha256 == sha256_of(tensors)
    assert list(got) == list(tensors)
    for name, arr in tensors.items():
        np.testing.assert_array_equal(got[name], arr)


@pytest.mark.parametrize("blake3", [True, False], ids=["blake3", "sha256-only"])
@pytest.mark.parametrize("size", list(MODELS))
async def test_a_model_whose_bytes_differ_from_its_digest_fails_the_task(
    size: str, blake3: bool
) -> None:
    stated = "blake3" if blake3 else "sha256"
    with pytest.raises(
        TaskFailed, match=f"model registry: {URI} arrived damaged: model: the bytes .* {stated} "
    ):
        await fetch(MODELS[size], tamper=True, blake3=blake3)


async def test_a_registry_error_is_the_tasks_reason() -> None:
    class Missing(Registry):
        async def GetModel(
            self, request: model_registry_pb2.GetModelRequest, context: Any
        ) -> AsyncIterator[tensor_pb2.ModelChunk]:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model_uri: {URI!r} not stored")
            yield tensor_pb2.ModelChunk()  # pragma: no cover - abort raises

    binding = ServiceBinding(
        "propeller.v1.ModelRegistry",
        Missing(MODELS["small"], tamper=False),
        model_registry_pb2_grpc.add_ModelRegistryServicer_to_server,
    )
    async with serving("127.0.0.1:0", [binding], service_tls("registry")) as port:
        address = f"127.0.0.1:{port}"
        client = FederatedClient("p1", 20.0, tls=proplet_tls("p1"))
        try:
            with pytest.raises(TaskFailed, match="NOT_FOUND"):
                await client.fetch_model(FlTask("r1", URI, "{}", address, address, address))
        finally:
            await client.close()
