"""ModelRegistry under fuzzed requests: every RPC, at least 1,000 requests each."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import strategies as st

from propeller.v1 import model_registry_pb2, tensor_pb2
from server.models import MAX_VERSION, parse_model_uri
from server.streams import model_stream
from tests.fuzz import strategies as S
from tests.fuzz.harness import FuzzEnv, Outcome, Rpc, all_methods, fuzz_empty_request, fuzz_messages
from tests.fuzz.known import KNOWN_URIS, V1, sha256_of_bytes

INIT = Rpc.of("ModelRegistry.InitModel")
PUT = Rpc.of("ModelRegistry.PutModel")
GET = Rpc.of("ModelRegistry.GetModel")
INFO = Rpc.of("ModelRegistry.GetModelInfo")
LIST = Rpc.of("ModelRegistry.ListModels")
PUT_LINEAGE = Rpc.of("ModelRegistry.PutLineage")
GET_LINEAGE = Rpc.of("ModelRegistry.GetLineage")
FUZZED = (INIT, PUT, GET, INFO, LIST, PUT_LINEAGE, GET_LINEAGE)
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")


def test_every_registry_rpc_is_fuzzed() -> None:
    assert {r.name for r in FUZZED} == all_methods("ModelRegistry")


def get_requests() -> st.SearchStrategy[model_registry_pb2.GetModelRequest]:
    def build(ref: str, version: int, uri: str, chunk: int) -> model_registry_pb2.GetModelRequest:
        req = model_registry_pb2.GetModelRequest(chunk_size=chunk)
        if ref == "version":
            req.version = version
        elif ref == "model_uri":
            req.model_uri = uri
        return req

    return st.builds(
        build,
        st.sampled_from(["version", "version", "model_uri", "model_uri", "none"]),
        S.weighted((3, st.integers(-2, 3)), (2, S.int64s())),
        S.model_refs(KNOWN_URIS),
        S.weighted((4, st.just(0)), (2, S.int32s()), (1, st.integers(1, 64))),
    )


def canonical_when_found(body: Any, outcome: Outcome) -> None:
    """A model found by reference is the one the reference names, canonically spelled."""
    if not outcome.ok or isinstance(body, bytes):
        return
    ref = body.WhichOneof("ref")
    first: Any = outcome.responses[0]
    info = first.header if isinstance(first, tensor_pb2.ModelChunk) else first
    if ref == "model_uri":
        assert info.model_uri == body.model_uri, (body.model_uri, info.model_uri)
        assert parse_model_uri(body.model_uri) == info.version
    elif ref == "version":
        assert info.version == body.version


async def test_list_models(env: FuzzEnv) -> None:
    await fuzz_empty_request(env, LIST)


async def test_get_model_info(env: FuzzEnv) -> None:
    requests = get_requests()
    await fuzz_messages(env, INFO, requests, canonical_when_found)


async def test_get_model(env: FuzzEnv) -> None:
    requests = get_requests()
    await fuzz_messages(env, GET, requests, canonical_when_found)


async def test_init_model(env: FuzzEnv) -> None:
    requests = st.builds(
        lambda d, t: model_registry_pb2.InitModelRequest(dimension=d, dtype=t),
        S.weighted((2, st.integers(-2, 10)), (2, S.int64s()), (1, st.just(10_000_001))),
        S.dtypes(),
    )
    await fuzz_messages(env, INIT, requests)


@st.composite
def valid_put(draw: st.DrawFn) -> list[tensor_pb2.ModelChunk]:
    """A well-formed model stream: only the version (explicit, possibly absurd) varies."""
    values = draw(st.lists(st.floats(-1e3, 1e3), min_size=4, max_size=4))
    tensors = {"w": np.array(values[:3]), "b": np.array(values[3])}
    # Storing MAX_VERSION (legitimately) ends auto-numbering for the rest of the batch
    # (FAILED_PRECONDITION), so it is drawn rarely.
    version = draw(
        S.weighted(
            (12, st.none()),
            (4, st.sampled_from([0, 1])),
            (4, S.int64s().filter(lambda v: not 10**17 < v <= MAX_VERSION)),
            (1, st.sampled_from([MAX_VERSION - 1, MAX_VERSION, MAX_VERSION + 1])),
        )
    )
    size = draw(st.sampled_from([0, 1, 7, 16]))
    return list(model_stream(tensors, size, version=version))


@st.composite
def put_streams(draw: st.DrawFn) -> list[tensor_pb2.ModelChunk]:
    specs = draw(
        S.weighted(
            (3, st.just([S.spec("w", 2, [3]), S.spec("b", 2, [])])),
            (4, S.spec_lists()),
        )
    )  # fmt: skip
    data = draw(S.tensor_bytes(specs))
    header = tensor_pb2.ModelHeader(tensors=specs)
    need = S.matched_nbytes(specs)
    header.total_bytes = draw(S.weighted((3, st.just(need or 0)), (1, st.just(0)), (1, S.int64s())))
    import hashlib

    digest = hashlib.sha256(data).hexdigest()
    header.sha256 = draw(
        S.weighted(
            (3, st.just(digest)),
            (1, st.just(digest.upper())),
            (1, st.just("")),
            (1, S.texts(("0" * 64,))),
        )
    )
    if draw(st.booleans()):
        header.version = draw(S.weighted((2, st.sampled_from([0, 1])), (3, S.int64s())))
        if 10**17 < header.version <= MAX_VERSION and draw(st.integers(0, 9)):
            header.version = MAX_VERSION + 1
    header.model_uri = draw(S.weighted((3, st.just("")), (2, S.model_refs(KNOWN_URIS))))
    return S.chunk_messages(draw(S.mutated_stream(header, data)), tensor_pb2.ModelChunk)


async def test_put_model(env: FuzzEnv) -> None:
    streams = S.weighted((1, valid_put()), (1, put_streams()))
    await fuzz_messages(env, PUT, streams)


async def test_get_lineage(env: FuzzEnv) -> None:
    # No round made a version here: NOT_FOUND, a bad request, or what PutLineage took.
    await fuzz_messages(env, GET_LINEAGE, get_requests())


@st.composite
def lineage_streams(draw: st.DrawFn) -> list[model_registry_pb2.LineageChunk]:
    """A lineage for a stored version or not, naming its sha256 or not, with updates whose
    bytes match their header and sha256, or not."""
    v1_sha = sha256_of_bytes(b"".join(np.ascontiguousarray(a).tobytes() for a in V1.values()))
    lineage = model_registry_pb2.Lineage(
        version=draw(S.weighted((3, st.sampled_from([0, 1, 2])), (1, S.int64s()))),
        model_sha256=draw(S.weighted((3, st.just(v1_sha)), (1, S.texts()))),
        round_id=draw(S.texts(("r-good",))),
        base_model_uri=draw(S.model_refs(KNOWN_URIS)),
    )
    data = b""
    for _ in range(draw(st.integers(0, 3))):
        specs = draw(
            S.weighted((3, st.just([S.spec("w", 2, [3]), S.spec("b", 2, [])])), (1, S.spec_lists()))
        )
        blob = draw(S.tensor_bytes(specs))
        header = tensor_pb2.UpdateHeader(
            tensors=specs, total_bytes=S.matched_nbytes(specs) or 0, proplet_id="p"
        )
        sha = sha256_of_bytes(blob)
        lineage.contributions.append(
            model_registry_pb2.Contribution(
                header=header,
                sha256=draw(S.weighted((4, st.just(sha)), (1, S.texts((sha.upper(),))))),
                clip_scale=1.0,
            )
        )
        data += blob
    return S.chunk_messages(draw(S.mutated_stream(lineage, data)), model_registry_pb2.LineageChunk)


async def test_put_lineage(env: FuzzEnv) -> None:
    await fuzz_messages(env, PUT_LINEAGE, lineage_streams())
