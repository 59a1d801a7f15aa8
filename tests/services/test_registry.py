"""ModelRegistry through a real grpc.aio server and the generated stubs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import grpc
import numpy as np
import pytest

from propeller.v1 import model_registry_pb2, model_registry_pb2_grpc, tensor_pb2
from server.config import TlsConfig
from server.downloads import model_download_call, read_model_download
from server.registry.app import RegistryApp, RegistryConfig
from server.streams import model_stream, read_model_stream
from server.tensors import Tensors, blake3_of, sha256_of, tensor_bytes
from tests.services.harness import RPC_TIMEOUT, served
from tests.support.security import service_tls

Stub = Any  # generated gRPC stubs carry no type information


@asynccontextmanager
async def registry(state_dir: Path | None = None) -> AsyncIterator[Stub]:
    config = RegistryConfig(addr="127.0.0.1:0", state_dir=state_dir, tls=service_tls("registry"))
    async with RegistryApp(config) as app, served(app.bindings) as ch:
        yield model_registry_pb2_grpc.ModelRegistryStub(ch)


@pytest.fixture
async def stub() -> AsyncIterator[Stub]:
    async with registry() as s:
        yield s


@pytest.fixture(params=["memory", "sqlite"])
async def any_stub(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Stub]:
    """The same behaviour is expected from both stores."""
    async with registry(None if request.param == "memory" else tmp_path / "state") as s:
        yield s


def model(w: list[float], b: float, dtype: str = "<f8") -> Tensors:
    return {"w": np.asarray(w, dtype=dtype), "b": np.asarray(b, dtype=dtype)}


def chunks(
    tensors: Tensors,
    *,
    version: int | None = None,
    sha256: str | None = None,
    model_uri: str = "",
    chunk_size: int = 0,
) -> list[tensor_pb2.ModelChunk]:
    return list(
        model_stream(tensors, chunk_size, version=version, sha256=sha256, model_uri=model_uri)
    )


async def put(
    stub: Stub, tensors: Tensors, version: int | None = None, **kw: Any
) -> model_registry_pb2.ModelVersion:
    reply: model_registry_pb2.ModelVersion = await stub.PutModel(
        iter(chunks(tensors, version=version, **kw)), timeout=RPC_TIMEOUT
    )
    return reply


async def get(stub: Stub, **ref: Any) -> tuple[tensor_pb2.ModelHeader, Tensors]:
    call = stub.GetModel(model_registry_pb2.GetModelRequest(**ref), timeout=RPC_TIMEOUT)
    return await read_model_stream(call)


async def get_chunks(stub: Stub, **ref: Any) -> list[tensor_pb2.ModelChunk]:
    call = stub.GetModel(model_registry_pb2.GetModelRequest(**ref), timeout=RPC_TIMEOUT)
    return [c async for c in call]


async def versions(stub: Stub) -> list[int]:
    reply = await stub.ListModels(model_registry_pb2.ListModelsRequest(), timeout=RPC_TIMEOUT)
    return [m.version for m in reply.models]


def assert_same(got: Tensors, want: Tensors) -> None:
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert got[name].shape == want[name].shape, name
        assert got[name].tobytes() == want[name].tobytes(), name


async def expect_error(code: grpc.StatusCode, *words: str, call: Any) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        await call
    assert excinfo.value.code() == code, excinfo.value.details()
    details = excinfo.value.details() or ""
    for word in words:
        assert word in details, details
    return details


# --- InitModel -------------------------------------------------------------------------


async def test_init_model_creates_v0_as_zeros(any_stub: Stub) -> None:
    reply = await any_stub.InitModel(
        model_registry_pb2.InitModelRequest(dimension=3), timeout=RPC_TIMEOUT
    )
    assert reply.version == 0
    assert reply.model_uri == "fl/models/global_model_v0"
    assert [(t.name, list(t.shape), t.dtype) for t in reply.tensors] == [
        ("w", [3], tensor_pb2.DTYPE_FLOAT64),
        ("b", [], tensor_pb2.DTYPE_FLOAT64),
    ]
    assert reply.total_bytes == 4 * 8
    header, tensors = await get(any_stub, version=0)
    assert header.version == 0
    assert header.model_uri == "fl/models/global_model_v0"
    assert header.sha256 == reply.sha256 == sha256_of(tensors)
    assert_same(tensors, model([0.0, 0.0, 0.0], 0.0))


async def test_init_model_honours_float32(stub: Stub) -> None:
    await stub.InitModel(
        model_registry_pb2.InitModelRequest(dimension=5, dtype=tensor_pb2.DTYPE_FLOAT32),
        timeout=RPC_TIMEOUT,
    )
    _, tensors = await get(stub, version=0)
    assert_same(tensors, model([0.0] * 5, 0.0, "<f4"))


@pytest.mark.parametrize("dimension", [0, -3, 10_000_001])
async def test_init_model_rejects_a_bad_dimension(stub: Stub, dimension: int) -> None:
    await expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        "dimension",
        str(dimension),
        call=stub.InitModel(
            model_registry_pb2.InitModelRequest(dimension=dimension), timeout=RPC_TIMEOUT
        ),
    )
    assert await versions(stub) == []


async def test_init_model_rejects_an_unknown_dtype(stub: Stub) -> None:
    await expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        "dtype",
        call=stub.InitModel(
            model_registry_pb2.InitModelRequest(
                dimension=2,
                dtype=cast(tensor_pb2.DType, 7),  # a value this server does not know
            ),
            timeout=RPC_TIMEOUT,
        ),
    )


async def test_second_init_is_already_exists_and_v0_stays(any_stub: Stub) -> None:
    first = await any_stub.InitModel(
        model_registry_pb2.InitModelRequest(dimension=3), timeout=RPC_TIMEOUT
    )
    await expect_error(
        grpc.StatusCode.ALREADY_EXISTS,
        "global_model_v0",
        call=any_stub.InitModel(
            model_registry_pb2.InitModelRequest(dimension=7), timeout=RPC_TIMEOUT
        ),
    )
    header, tensors = await get(any_stub, version=0)
    assert header.sha256 == first.sha256
    assert tensors["w"].shape == (3,)


# --- PutModel: versions ----------------------------------------------------------------


async def test_put_of_an_existing_version_is_already_exists_and_changes_nothing(
    any_stub: Stub,
) -> None:
    original = model([1.0, 2.0], 0.5)
    stored = await put(any_stub, original, version=4)
    assert stored.version == 4
    assert stored.model_uri == "fl/models/global_model_v4"
    await expect_error(
        grpc.StatusCode.ALREADY_EXISTS,
        "4",
        call=put(any_stub, model([9.0, 9.0], 9.0), version=4),
    )
    header, tensors = await get(any_stub, version=4)
    assert header.sha256 == stored.sha256
    assert_same(tensors, original)
    assert await versions(any_stub) == [4]


async def test_put_without_a_version_takes_highest_stored_plus_one(any_stub: Stub) -> None:
    first = await put(any_stub, model([1.0], 0.0))
    assert first.version == 0
    await put(any_stub, model([2.0], 0.0), version=1)
    third = await put(any_stub, model([3.0], 0.0))
    assert third.version == 2
    # Gaps are not refilled: the next version is always above everything stored.
    await put(any_stub, model([10.0], 0.0), version=10)
    assert (await put(any_stub, model([11.0], 0.0))).version == 11
    assert await versions(any_stub) == [0, 1, 2, 10, 11]


async def test_a_restarted_registry_continues_at_the_next_stored_version(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    async with registry(state_dir) as stub:
        await stub.InitModel(model_registry_pb2.InitModelRequest(dimension=2), timeout=60)
        v1 = await put(stub, model([1.0, 1.0], 1.0))
        assert v1.version == 1
    # A new process over the same state file: no counter survives, only the stored rows do.
    async with registry(state_dir) as stub:
        assert await versions(stub) == [0, 1]
        v2 = await put(stub, model([2.0, 2.0], 2.0))
        assert v2.version == 2
        header, tensors = await get(stub, model_uri="fl/models/global_model_v1")
        assert header.sha256 == v1.sha256
        assert_same(tensors, model([1.0, 1.0], 1.0))
        info = await stub.GetModelInfo(
            model_registry_pb2.GetModelRequest(version=1), timeout=RPC_TIMEOUT
        )
        assert info == v1  # created_at and sha256 survive the restart


async def test_concurrent_puts_get_distinct_versions(any_stub: Stub) -> None:
    sent = [model([float(i)] * 4, float(i)) for i in range(12)]
    replies = await asyncio.gather(*(put(any_stub, m) for m in sent))
    assert sorted(r.version for r in replies) == list(range(12))
    for reply, tensors in zip(replies, sent, strict=True):
        _, stored = await get(any_stub, version=reply.version)
        assert_same(stored, tensors)


async def test_put_returns_the_version_description(stub: Stub) -> None:
    tensors = model([1.0, 2.0, 3.0], 4.0, "<f4")
    reply = await put(stub, tensors)
    assert reply.sha256 == sha256_of(tensors)
    assert reply.total_bytes == 16
    assert [(t.name, list(t.shape), t.dtype) for t in reply.tensors] == [
        ("w", [3], tensor_pb2.DTYPE_FLOAT32),
        ("b", [], tensor_pb2.DTYPE_FLOAT32),
    ]
    assert reply.created_at > 0
    info = await stub.GetModelInfo(
        model_registry_pb2.GetModelRequest(model_uri=reply.model_uri), timeout=RPC_TIMEOUT
    )
    assert info == reply


async def test_put_by_model_uri_in_the_header(stub: Stub) -> None:
    reply = await put(stub, model([1.0], 1.0), model_uri="fl/models/global_model_v7")
    assert reply.version == 7
    await expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        "model_uri",
        call=put(stub, model([1.0], 1.0), version=8, model_uri="fl/models/global_model_v9"),
    )


# --- PutModel: bad input stores nothing -------------------------------------------------


def truncated(tensors: Tensors) -> list[tensor_pb2.ModelChunk]:
    parts = chunks(tensors, chunk_size=8)
    return parts[:-1]


def with_extra_bytes(tensors: Tensors) -> list[tensor_pb2.ModelChunk]:
    return [*chunks(tensors), tensor_pb2.ModelChunk(data=b"\0" * 8)]


def without_header(tensors: Tensors) -> list[tensor_pb2.ModelChunk]:
    return chunks(tensors)[1:]


def with_wrong_sha(tensors: Tensors) -> list[tensor_pb2.ModelChunk]:
    return chunks(tensors, sha256="0" * 64)


def with_nan(tensors: Tensors) -> list[tensor_pb2.ModelChunk]:
    return chunks(model([1.0, float("nan"), 3.0], 0.0))


def with_inf(tensors: Tensors) -> list[tensor_pb2.ModelChunk]:
    return chunks(model([1.0, 2.0, 3.0], float("-inf")))


def negative_version(tensors: Tensors) -> list[tensor_pb2.ModelChunk]:
    return chunks(tensors, version=-1)


def wrong_total_bytes(tensors: Tensors) -> list[tensor_pb2.ModelChunk]:
    parts = chunks(tensors)
    parts[0].header.total_bytes += 8
    return parts


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (truncated, ["model", "stream ended"]),
        (with_extra_bytes, ["model", "more tensor bytes"]),
        (without_header, ["model", "header"]),
        (with_wrong_sha, ["sha256"]),
        (with_nan, ["model.w", "NaN"]),
        (with_inf, ["model.b", "Inf"]),
        (negative_version, ["version", "-1"]),
        (wrong_total_bytes, ["total_bytes"]),
    ],
)
async def test_a_bad_put_is_invalid_argument_and_stores_nothing(
    any_stub: Stub, make: Any, words: list[str]
) -> None:
    tensors = model([1.0, 2.0, 3.0], 0.5)
    await expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        *words,
        call=any_stub.PutModel(iter(make(tensors)), timeout=RPC_TIMEOUT),
    )
    assert await versions(any_stub) == []


async def test_a_big_stream_rejected_early_reports_the_real_error(stub: Stub) -> None:
    # The server sees the problem at the first chunk while 32 MB are still on their way;
    # the client must get INVALID_ARGUMENT, not a transport-level INTERNAL.
    big: Tensors = {"w": np.ones(4_000_000)}
    parts = chunks(big)
    parts[0].header.tensors[0].shape[:] = [-1]
    await expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        "model.header.tensors[0].shape",
        call=stub.PutModel(iter(parts), timeout=RPC_TIMEOUT),
    )
    assert await versions(stub) == []


# --- GetModel / GetModelInfo / ListModels ----------------------------------------------


async def test_large_model_round_trips_byte_identical(any_stub: Stub) -> None:
    # 54 MB: far above gRPC's 4 MB default message limit, so it only works chunked.
    rng = np.random.default_rng(7)
    big = {
        "w": rng.standard_normal(13_500_000, dtype=np.float32),
        "b": np.asarray(0.25, dtype=np.float32),
    }
    assert big["w"].nbytes >= 50_000_000
    want_sha = sha256_of(big)
    stored = await put(any_stub, big)
    assert stored.sha256 == want_sha
    assert stored.total_bytes == big["w"].nbytes + 4
    header, tensors = await get(any_stub, version=stored.version, chunk_size=4 << 20)
    assert header.sha256 == want_sha
    assert sha256_of(tensors) == want_sha
    assert tensor_bytes(tensors) == tensor_bytes(big)


async def test_model_uri_refs_resolve(stub: Stub) -> None:
    await put(stub, model([1.0], 1.0))
    v1 = await put(stub, model([2.0], 2.0))
    header, tensors = await get(stub, model_uri="fl/models/global_model_v1")
    assert header.version == 1
    assert header.model_uri == "fl/models/global_model_v1"
    assert header.sha256 == v1.sha256
    assert_same(tensors, model([2.0], 2.0))


@pytest.mark.parametrize(
    ("ref", "code", "words"),
    [
        ({"model_uri": "fl/models/v1"}, grpc.StatusCode.INVALID_ARGUMENT, ["model_uri"]),
        ({"model_uri": ""}, grpc.StatusCode.INVALID_ARGUMENT, ["model_uri"]),
        ({"model_uri": "global_model_v1"}, grpc.StatusCode.INVALID_ARGUMENT, ["model_uri"]),
        ({"version": -2}, grpc.StatusCode.INVALID_ARGUMENT, ["version", "-2"]),
        ({}, grpc.StatusCode.INVALID_ARGUMENT, ["ref"]),
        ({"version": 5}, grpc.StatusCode.NOT_FOUND, ["5", "global_model_v5"]),
        (
            {"model_uri": "fl/models/global_model_v9"},
            grpc.StatusCode.NOT_FOUND,
            ["9", "global_model_v9"],
        ),
        ({"version": 0, "chunk_size": -1}, grpc.StatusCode.INVALID_ARGUMENT, ["chunk_size"]),
    ],
)
async def test_bad_refs(
    stub: Stub, ref: dict[str, Any], code: grpc.StatusCode, words: list[str]
) -> None:
    await put(stub, model([1.0], 1.0))
    await expect_error(code, *words, call=get(stub, **ref))
    if "chunk_size" not in ref:
        await expect_error(
            code,
            *words,
            call=stub.GetModelInfo(model_registry_pb2.GetModelRequest(**ref), timeout=60),
        )


@pytest.mark.parametrize(
    ("chunk_size", "elements", "largest"),
    [(0, 3_000_000, 1 << 20), (1000, 10_000, 1000), (64 << 20, 3_000_000, 4 << 20)],
)
async def test_chunk_size_default_and_cap(
    stub: Stub, chunk_size: int, elements: int, largest: int
) -> None:
    await put(stub, {"w": np.zeros(elements, dtype=np.float64)})
    parts = await get_chunks(stub, version=0, chunk_size=chunk_size)
    assert parts[0].WhichOneof("part") == "header"
    sizes = [len(p.data) for p in parts[1:]]
    assert max(sizes) == largest
    assert sum(sizes) == elements * 8


async def test_list_models_oldest_first(any_stub: Stub) -> None:
    for v in (3, 1, 2):
        await put(any_stub, model([float(v)], 0.0), version=v)
    reply = await any_stub.ListModels(model_registry_pb2.ListModelsRequest(), timeout=RPC_TIMEOUT)
    assert [m.version for m in reply.models] == [1, 2, 3]
    assert [m.model_uri for m in reply.models] == [
        f"fl/models/global_model_v{v}" for v in (1, 2, 3)
    ]
    assert all(m.sha256 and m.total_bytes == 16 for m in reply.models)


def test_config_from_env(tmp_path: Path) -> None:
    assert RegistryConfig.from_env({"PROPELLER_INSECURE": "1"}) == RegistryConfig(tls=None)
    bundle = service_tls("registry").cert.parent
    config = RegistryConfig.from_env(
        {
            "PROPELLER_REGISTRY_LISTEN": "0.0.0.0:9000",
            "PROPELLER_STATE_DIR": str(tmp_path),
            "PROPELLER_TLS_DIR": str(bundle),
        }
    )
    tls = TlsConfig.bundle(bundle)
    assert config == RegistryConfig(addr="0.0.0.0:9000", state_dir=tmp_path, tls=tls)


async def test_a_proplets_download_reads_the_registrys_bytes_and_their_sha256(
    tmp_path: Path,
) -> None:
    """`model_download_call` + `read_model_download` (the proplet's base-model fetch) against
    the real registry: the stored arrays, and the sha256 the registry states for them."""
    rng = np.random.default_rng(12)
    big = {"w": rng.standard_normal((3, 1 << 20)).astype("<f4"), "b": np.asarray(0.25)}
    small = model([1.0, -2.0, 3.0], 0.5)
    config = RegistryConfig(addr="127.0.0.1:0", state_dir=tmp_path, tls=service_tls("registry"))
    async with RegistryApp(config) as app, served(app.bindings) as ch:
        stub = model_registry_pb2_grpc.ModelRegistryStub(ch)
        for tensors in (small, big):
            mv = await put(stub, tensors)
            request = model_registry_pb2.GetModelRequest(model_uri=mv.model_uri)
            call = model_download_call(ch, request, timeout=RPC_TIMEOUT)
            header, got = await read_model_download(call)
            assert header.version == mv.version and header.sha256 == mv.sha256
            assert sha256_of(got) == sha256_of(tensors) == mv.sha256
            # The registry states the BLAKE3 of the same bytes: what the download checked.
            assert header.blake3 == blake3_of(tensors)
            assert_same(got, tensors)
        # An unknown model is the registry's NOT_FOUND, as through the generated stub.
        with pytest.raises(grpc.aio.AioRpcError) as excinfo:
            missing = model_registry_pb2.GetModelRequest(version=99)
            await read_model_download(model_download_call(ch, missing, timeout=RPC_TIMEOUT))
        assert excinfo.value.code() == grpc.StatusCode.NOT_FOUND
