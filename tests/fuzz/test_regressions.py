"""The bugs the fuzzers found, each pinned by one deterministic request over real gRPC."""

from __future__ import annotations

import tracemalloc

import grpc
import numpy as np
import pytest

from propeller.v1 import (
    aggregator_pb2,
    datastore_pb2,
    model_registry_pb2,
    tensor_pb2,
)
from server.errors import MAX_DETAILS_BYTES
from server.models import MAX_VERSION
from server.streams import model_stream
from tests.fuzz import strategies as S
from tests.fuzz.harness import FuzzEnv, Rpc, decodes


@pytest.mark.parametrize("body", [b"\xff", b"\x0a\x05ab", b"\x0a\x02\xff\xfe"])
async def test_an_undecodable_unary_body_is_invalid_argument(env: FuzzEnv, body: bytes) -> None:
    # grpc.aio itself answers UNKNOWN ("Unexpected DecodeError raised by servicer method").
    for name in ("DataStore.GetDataset", "ModelRegistry.ListModels", "ModelRegistry.GetModel"):
        rpc = Rpc.of(name)
        outcome = await env.call(rpc, body)
        if decodes(rpc, body):  # e.g. bad UTF-8 in a field the type does not have
            assert "not a valid message" not in outcome.details, (rpc.name, outcome)
        else:
            assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, (rpc.name, outcome)
            assert "not a valid message" in outcome.details


async def test_an_undecodable_stream_message_is_invalid_argument(env: FuzzEnv) -> None:
    # It used to surface inside the servicer's read loop and come back INTERNAL.
    header = tensor_pb2.ModelChunk(header=tensor_pb2.ModelHeader(tensors=[S.spec("w", 2, [1])]))
    outcome = await env.call("ModelRegistry.PutModel", [header.SerializeToString(), b"\xff"])
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid message" in outcome.details


async def test_a_rejected_stream_is_read_to_its_end_past_undecodable_messages(
    env: FuzzEnv,
) -> None:
    # Rejected at the first (empty) chunk; the rest, with junk in it, is drained. When the
    # junk stopped the draining, the client was still writing and saw INTERNAL from its core.
    rest = [aggregator_pb2.AggregateChunk(data=b"\x00" * 1024).SerializeToString()] * 2000
    body = [b"", b"\xdb\x01r\xae\x01", *rest]
    for _ in range(5):
        outcome = await env.call("Aggregator.Aggregate", body)
        assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, outcome


async def test_a_huge_value_echoed_in_an_error_keeps_its_status(env: FuzzEnv) -> None:
    # Status details over 8 KiB made clients report RESOURCE_EXHAUSTED (at random up to
    # 16 KiB, always beyond) instead of NOT_FOUND. (A huge id is now refused by the id rule,
    # which shows it cut; a model reference is still echoed whole, then cut to the bound.)
    for ch in ("x", "é", "😀"):
        for n in (3000, 16_000, 1 << 20):
            outcome = await env.call(
                "DataStore.GetDataset", datastore_pb2.GetDatasetRequest(proplet_id=ch * n)
            )
            assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT
            assert outcome.details.startswith("proplet_id: ")
            assert len(outcome.details.encode()) <= 300
            outcome = await env.call(
                "ModelRegistry.GetModelInfo", model_registry_pb2.GetModelRequest(model_uri=ch * n)
            )
            assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT
            assert len(outcome.details.encode()) <= MAX_DETAILS_BYTES + 64
            assert "truncated" in outcome.details


async def test_a_tensor_with_a_zero_dimension_is_stored(env: FuzzEnv) -> None:
    # sha256_of / iter_chunks crashed on memoryview.cast of a zero-size 2-d array: INTERNAL.
    tensors = {"w": np.zeros((0, 3), dtype=np.float32), "b": np.zeros((), dtype=np.float32)}
    outcome = await env.call("ModelRegistry.PutModel", list(model_stream(tensors, 16)))
    assert outcome.ok, outcome
    got = await env.call(
        "ModelRegistry.GetModel",
        model_registry_pb2.GetModelRequest(version=outcome.response.version),
    )
    assert got.ok and list(got.response.header.tensors[0].shape) == [0, 3]


@pytest.mark.parametrize("shape", [[2**62, 0], [0, 2**63 - 1], [2**40, 2**40, 0]])
async def test_a_shape_numpy_cannot_hold_is_invalid_argument(
    env: FuzzEnv, shape: list[int]
) -> None:
    # Empty, so it passed the byte-count checks; numpy then raised ValueError: INTERNAL.
    header = tensor_pb2.ModelHeader(tensors=[S.spec("w", 2, shape)])
    outcome = await env.call("ModelRegistry.PutModel", [tensor_pb2.ModelChunk(header=header)])
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, outcome
    dataset = datastore_pb2.Dataset(
        proplet_id="p-zero-shape",
        features=S.tensor(2, shape, b""),
        labels=S.tensor(2, [0], b""),
    )
    outcome = await env.call(
        "DataStore.PutDataset", datastore_pb2.PutDatasetRequest(dataset=dataset)
    )
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, outcome


@pytest.mark.parametrize(
    "uri",
    [
        "fl/models/global_model_v1\n",
        "fl/models/global_model_v\u0661",  # ARABIC-INDIC DIGIT ONE
        "fl/models/global_model_v\uff11",  # FULLWIDTH DIGIT ONE
        "fl/models/global_model_v01",
    ],
)
async def test_a_non_canonical_model_reference_is_invalid_argument(env: FuzzEnv, uri: str) -> None:
    # They named version 1 (\d matches any Unicode digit, $ matches before a final newline).
    outcome = await env.call(
        "ModelRegistry.GetModelInfo", model_registry_pb2.GetModelRequest(model_uri=uri)
    )
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, outcome


async def test_versions_stay_within_what_a_model_reference_can_name(env: FuzzEnv) -> None:
    # Version 2**63-1 was accepted; the next auto-numbered put then stored 2**63, answered
    # INTERNAL, and ListModels failed with INTERNAL from then on.
    w = {"w": np.ones(2)}
    for version in (2**63 - 1, MAX_VERSION + 1):
        outcome = await env.call(
            "ModelRegistry.PutModel", list(model_stream(w, 16, version=version))
        )
        assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, outcome
    outcome = await env.call(
        "ModelRegistry.PutModel", list(model_stream(w, 16, version=MAX_VERSION))
    )
    assert outcome.ok and outcome.response.model_uri == f"fl/models/global_model_v{MAX_VERSION}"
    outcome = await env.call("ModelRegistry.PutModel", list(model_stream(w, 16)))
    assert outcome.code == grpc.StatusCode.FAILED_PRECONDITION, outcome
    listed = await env.call("ModelRegistry.ListModels", model_registry_pb2.ListModelsRequest())
    assert listed.ok and listed.response.models[-1].version == MAX_VERSION


async def test_an_update_header_alone_does_not_allocate_what_it_claims(env: FuzzEnv) -> None:
    # The aggregator pre-allocated (and zeroed) the bytes a header promised, up to 4 GiB,
    # before any data arrived.
    header = aggregator_pb2.AggregateHeader(round_id="r")
    update = tensor_pb2.UpdateHeader(num_samples=1, tensors=[S.spec("w", 2, [2**29])])
    body = [
        aggregator_pb2.AggregateChunk(header=header),
        aggregator_pb2.AggregateChunk(update=update),
    ]
    tracemalloc.start()
    try:
        outcome = await env.call("Aggregator.Aggregate", body)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, outcome
    assert peak < 64 << 20, f"{peak} bytes allocated for a {2**32}-byte claim"
