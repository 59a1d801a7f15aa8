"""Every inbound stream is refused from its header when it cannot be taken (issue 10, item 5):
SubmitUpdate for an unknown round, from a proplet that is not a participant, or bigger than
the round's base model; Aggregate and SubmitUpdate above the payload limit; PutDataset above
the message limit. Each client stops sending long before its (generated, never stored)
upload's end, and nothing is counted. The registry's side, with the server's memory measured,
is tests/reliability/test_upload_limits.py.

Refusals go through grpc's synchronous client, which reports the server's status when the
server answers before the upload ended (grpc.aio may say INTERNAL instead: grpc/grpc#36066).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from propeller.v1 import (
    aggregator_pb2,
    aggregator_pb2_grpc,
    coordinator_pb2_grpc,
    datastore_pb2,
    datastore_pb2_grpc,
    tensor_pb2,
)
from server.config import Endpoints, MqttConfig
from server.streams import MAX_PAYLOAD_BYTES
from server.tensors import MAX_MESSAGE_BYTES
from tests.support.clients import Clients, clients, sync_channel
from tests.support.cluster import cluster, round_services
from tests.support.security import operator_tls, proplet_tls, service_tls

MIB = 1 << 20
GIB = 1 << 30
# What a client may have sent before it is answered: the server reads on for at most 64 MiB
# so that the client sees the status, plus flow-control windows.
EARLY = 256 * MIB
V0 = "fl/models/global_model_v0"
ZEROS = bytes(MIB)


class Counted:
    def __init__(self) -> None:
        self.bytes = 0


def spec(nbytes: int) -> tensor_pb2.TensorSpec:
    return tensor_pb2.TensorSpec(name="w", dtype=tensor_pb2.DTYPE_FLOAT64, shape=[nbytes // 8])


def update(round_id: str, proplet_id: str, declared: int, sent: Counted) -> Iterator[Any]:
    """An update whose header says `declared` bytes, followed by 1 GiB of zeros (made as sent)."""
    header = tensor_pb2.UpdateHeader(
        round_id=round_id,
        proplet_id=proplet_id,
        base_model_uri=V0,
        num_samples=1,
        tensors=[spec(declared)],
    )
    yield tensor_pb2.UpdateChunk(header=header)
    for _ in range(GIB // MIB):
        sent.bytes += MIB
        yield tensor_pb2.UpdateChunk(data=ZEROS)


def aggregate(declared: int, sent: Counted) -> Iterator[Any]:
    yield aggregator_pb2.AggregateChunk(header=aggregator_pb2.AggregateHeader(round_id="r1"))
    yield aggregator_pb2.AggregateChunk(
        update=tensor_pb2.UpdateHeader(round_id="r1", num_samples=1, tensors=[spec(declared)])
    )
    for _ in range(GIB // MIB):
        sent.bytes += MIB
        yield aggregator_pb2.AggregateChunk(data=ZEROS)


def refused(call: Any, request: Any) -> grpc.RpcError:
    try:
        result = call(request, timeout=120)
        for _ in result if hasattr(result, "__iter__") else ():
            pass
    except grpc.RpcError as err:
        return err
    raise AssertionError("accepted")


def submit(addr: str, proplet_id: str, chunks: Iterator[Any]) -> grpc.RpcError:
    """SubmitUpdate as proplet `proplet_id` (its own certificate)."""
    with sync_channel(addr, proplet_tls(proplet_id)) as ch:
        return refused(coordinator_pb2_grpc.CoordinatorStub(ch).SubmitUpdate, chunks)


@pytest.fixture
async def services(mqtt: MqttConfig) -> AsyncIterator[tuple[Endpoints, Clients]]:
    async with round_services(mqtt) as endpoints, clients(endpoints) as c:
        await c.configure("r1", participants=["a", "b"])
        yield endpoints, c


@pytest.mark.parametrize(
    ("round_id", "proplet_id", "declared", "code", "details"),
    [
        ("nope", "a", 100 * MIB, grpc.StatusCode.NOT_FOUND, "round_id: no round 'nope'"),
        ("r1", "x", 100 * MIB, grpc.StatusCode.PERMISSION_DENIED, "SubmitUpdate: proplet 'x'"),
        (
            "r1",
            "a",
            100 * MIB,
            grpc.StatusCode.INVALID_ARGUMENT,
            f"update.header.tensors: {100 * MIB} bytes, but round 'r1''s base model {V0} has 32",
        ),
        (
            "r1",
            "a",
            2 * GIB,
            grpc.StatusCode.INVALID_ARGUMENT,
            f"update.header.tensors: {2 * GIB} bytes, more than the {MAX_PAYLOAD_BYTES} this",
        ),
    ],
    ids=["unknown round", "not a participant", "bigger than the model", "above the limit"],
)
async def test_an_update_is_refused_from_its_header(
    services: tuple[Endpoints, Clients],
    round_id: str,
    proplet_id: str,
    declared: int,
    code: grpc.StatusCode,
    details: str,
) -> None:
    endpoints, c = services
    sent = Counted()
    chunks = update(round_id, proplet_id, declared, sent)
    err = await asyncio.to_thread(submit, endpoints.coordinator, proplet_id, chunks)
    assert err.code() == code, err.details()
    assert (err.details() or "").startswith(details), err.details()
    assert sent.bytes < EARLY, f"{sent.bytes} bytes sent before the refusal"
    assert (await c.status("r1")).num_updates == 0


async def test_an_aggregation_is_refused_from_its_update_header(
    services: tuple[Endpoints, Clients],
) -> None:
    endpoints, _ = services
    sent = Counted()

    def call() -> grpc.RpcError:
        with sync_channel(endpoints.aggregator, service_tls("coordinator")) as ch:
            stub = aggregator_pb2_grpc.AggregatorStub(ch)
            return refused(stub.Aggregate, aggregate(2 * GIB, sent))

    err = await asyncio.to_thread(call)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert (err.details() or "").startswith(f"updates[0].tensors: {2 * GIB} bytes, more than")
    assert sent.bytes < EARLY, f"{sent.bytes} bytes sent before the refusal"


async def test_a_dataset_above_the_message_limit_is_refused_by_its_length(
    mqtt: MqttConfig, tmp_path: Path
) -> None:
    async with cluster(mqtt, tmp_path, dimension=None) as c:
        rows = MAX_MESSAGE_BYTES // 16 + 1
        request = datastore_pb2.PutDatasetRequest(
            dataset=datastore_pb2.Dataset(
                proplet_id="p1",
                features=tensor_pb2.Tensor(
                    dtype=tensor_pb2.DTYPE_FLOAT64, shape=[rows, 2], data=bytes(rows * 16)
                ),
                labels=tensor_pb2.Tensor(
                    dtype=tensor_pb2.DTYPE_FLOAT64, shape=[rows], data=bytes(rows * 8)
                ),
            )
        )

        def call() -> grpc.RpcError:
            # A client that sends it: what the data store does with it is the point.
            options = [("grpc.max_send_message_length", 1 << 30)]
            with sync_channel(c.endpoints.datastore, operator_tls(), options) as ch:
                return refused(datastore_pb2_grpc.DataStoreStub(ch).PutDataset, request)

        err = await asyncio.to_thread(call)
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
        assert "Received message larger than max" in (err.details() or "")
        listed = await c.datastore.ListDatasets(datastore_pb2.ListDatasetsRequest())
        assert list(listed.datasets) == []
