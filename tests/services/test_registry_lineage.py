"""The registry's lineages (PutLineage / GetLineage) over real gRPC, in memory and in SQLite:
what it checks before keeping one (the version and its sha256, every update's bytes against
its sha256), that a repeat is idempotent and another lineage is refused, that it survives a
restart, and that damaged bytes are reported, not served."""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from propeller.v1 import model_registry_pb2, model_registry_pb2_grpc, tensor_pb2
from server.grpc_server import channel, serving
from server.registry.app import RegistryApp, RegistryConfig
from server.streams import model_stream
from server.tensors import Tensors, sha256_of, specs_of, tensor_bytes
from tests.services.harness import RPC_TIMEOUT, rpc_error
from tests.support.clients import header_and_data
from tests.support.security import operator_tls, service_tls

MR = model_registry_pb2
V1: Tensors = {"w": np.array([0.5, 1.0, 1.5]), "b": np.array(0.25)}
UPDATES: list[Tensors] = [
    {"w": np.array([0.0, 1.0, 2.0]), "b": np.array(0.0)},
    {"w": np.array([1.0, 1.0, 1.0]), "b": np.array(0.5)},
]


@dataclass
class Registry:
    operator: Any  # ModelRegistryStub as an operator
    coordinator: Any  # ... and as the coordinator (the only one who may PutLineage)


@asynccontextmanager
async def registry(state_dir: Path | None) -> AsyncIterator[Registry]:
    tls = service_tls("registry")
    app = RegistryApp(RegistryConfig("127.0.0.1:0", state_dir=state_dir, tls=tls))
    async with (
        app,
        serving("127.0.0.1:0", app.bindings, tls) as port,
        channel(f"127.0.0.1:{port}", operator_tls()) as op,
        channel(f"127.0.0.1:{port}", service_tls("coordinator")) as coord,
    ):
        yield Registry(
            model_registry_pb2_grpc.ModelRegistryStub(op),
            model_registry_pb2_grpc.ModelRegistryStub(coord),
        )


@pytest.fixture(params=["memory", "sqlite"])
def state_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Path | None:
    return tmp_path if request.param == "sqlite" else None


def lineage(version: int, model_sha: str, updates: list[Tensors] = UPDATES) -> MR.Lineage:
    return MR.Lineage(
        version=version,
        model_sha256=model_sha,
        round_id="r1",
        base_model_uri="fl/models/global_model_v0",
        strategy="fedavg",
        contributions=[
            MR.Contribution(
                header=tensor_pb2.UpdateHeader(
                    round_id="r1",
                    proplet_id=f"p{i}",
                    num_samples=10,
                    tensors=[s.to_proto() for s in specs_of(u)],
                    total_bytes=len(tensor_bytes(u)),
                ),
                sha256=sha256_of(u),
                clip_scale=1.0,
            )
            for i, u in enumerate(updates)
        ],
    )


def chunks(header: MR.Lineage, data: bytes, size: int = 7) -> Iterator[MR.LineageChunk]:
    yield MR.LineageChunk(header=header)
    for i in range(0, len(data), size):
        yield MR.LineageChunk(data=data[i : i + size])


DATA = b"".join(tensor_bytes(u) for u in UPDATES)


async def stored_v1(r: Registry) -> str:
    await r.operator.InitModel(MR.InitModelRequest(dimension=3), timeout=RPC_TIMEOUT)
    v1 = await r.operator.PutModel(model_stream(V1, 1 << 20), timeout=RPC_TIMEOUT)
    sha: str = v1.sha256
    return sha


async def refused(call: Any, code: grpc.StatusCode, start: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await call
    got, details = rpc_error(exc)
    assert (got, details[: len(start)]) == (code, start), details


async def read(stub: Any, version: int) -> tuple[MR.Lineage, bytes]:
    call = stub.GetLineage(MR.GetModelRequest(version=version), timeout=RPC_TIMEOUT)
    header, data = await header_and_data(call)
    assert isinstance(header, MR.Lineage)
    return header, data


async def test_a_lineage_is_kept_once_checked_and_read_back(state_dir: Path | None) -> None:
    async with registry(state_dir) as r:
        sha = await stored_v1(r)
        put = r.coordinator.PutLineage
        await refused(
            put(chunks(lineage(7, sha), DATA), timeout=RPC_TIMEOUT),
            grpc.StatusCode.NOT_FOUND,
            "version: 7",
        )
        await refused(
            put(chunks(lineage(1, "0" * 64), DATA), timeout=RPC_TIMEOUT),
            grpc.StatusCode.FAILED_PRECONDITION,
            f"model_sha256: '{'0' * 64}', but version 1 has sha256 {sha}",
        )
        damaged = bytearray(DATA)
        damaged[0] ^= 1
        await refused(
            put(chunks(lineage(1, sha), bytes(damaged)), timeout=RPC_TIMEOUT),
            grpc.StatusCode.INVALID_ARGUMENT,
            "contributions[0].sha256: ",
        )
        await refused(
            put(chunks(lineage(1, sha), DATA + b"x"), timeout=RPC_TIMEOUT),
            grpc.StatusCode.INVALID_ARGUMENT,
            "lineage: more data than its contributions' tensors need",
        )
        await refused(
            r.operator.GetLineage(MR.GetModelRequest(version=1), timeout=RPC_TIMEOUT).read(),
            grpc.StatusCode.NOT_FOUND,
            "version: 1 (fl/models/global_model_v1) has no lineage",
        )
        info = await put(chunks(lineage(1, sha), DATA), timeout=RPC_TIMEOUT)
        assert (info.version, info.round_id, info.contributions, info.total_bytes) == (
            1,
            "r1",
            2,
            len(DATA),
        )
        # The same again is fine (a coordinator retrying); another is not.
        again = await put(chunks(lineage(1, sha), DATA, size=1 << 20), timeout=RPC_TIMEOUT)
        assert again == info
        await refused(
            put(chunks(lineage(1, sha, UPDATES[:1]), DATA[:32]), timeout=RPC_TIMEOUT),
            grpc.StatusCode.ALREADY_EXISTS,
            "version: 1 already has another lineage",
        )
        header, data = await read(r.operator, 1)
        assert header == lineage(1, sha) and data == DATA
        await refused(
            r.operator.GetLineage(MR.GetModelRequest(version=0), timeout=RPC_TIMEOUT).read(),
            grpc.StatusCode.NOT_FOUND,
            "version: 0 (fl/models/global_model_v0) has no lineage",
        )
    if state_dir is None:
        return
    # Kept across a restart; bytes damaged on disk are reported, never served.
    async with registry(state_dir) as r:
        header, data = await read(r.operator, 1)
        assert header == lineage(1, sha) and data == DATA
    first = sha256_of(UPDATES[0])
    with sqlite3.connect(state_dir / "lineage.sqlite") as conn:
        conn.execute(
            "UPDATE update_bytes SET data = ? WHERE sha256 = ?", (bytes(damaged[:32]), first)
        )
    async with registry(state_dir) as r:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await read(r.operator, 1)
        code, details = rpc_error(exc)
        assert code == grpc.StatusCode.DATA_LOSS and "are corrupted in storage" in details
    assert hashlib.sha256(DATA[:32]).hexdigest() == first


STATE: Tensors = {"m.w": np.array([0.1, 0.2, 0.3]), "m.b": np.array(0.05)}


def with_state(header: MR.Lineage, state: Tensors, sha: str | None = None) -> MR.Lineage:
    """`header` of a stateful strategy's round that started from `state`, left by v1."""
    header.state.from_version = 1
    header.state.tensors.extend(s.to_proto() for s in specs_of(state))
    header.state.total_bytes = len(tensor_bytes(state))
    header.state.sha256 = sha if sha is not None else sha256_of(state)
    header.state.result_sha256 = "ab" * 32
    return header


async def test_a_stateful_strategys_start_state_is_kept_checked_and_read_back(
    state_dir: Path | None,
) -> None:
    """The state's bytes follow the contributions' in the stream: checked against the state's
    sha256 like an update's, kept, and streamed back after the updates'."""
    async with registry(state_dir) as r:
        sha = await stored_v1(r)
        put = r.coordinator.PutLineage
        state_bytes = tensor_bytes(STATE)
        await refused(
            put(chunks(with_state(lineage(1, sha), STATE, "0" * 64), DATA + state_bytes)),
            grpc.StatusCode.INVALID_ARGUMENT,
            f"state.sha256: '{'0' * 64}', its bytes hash to {sha256_of(STATE)}",
        )
        await refused(
            put(chunks(with_state(lineage(1, sha), STATE), DATA)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "state: stream ended after 0 of 32 bytes",
        )
        header = with_state(lineage(1, sha), STATE)
        info = await put(chunks(header, DATA + state_bytes), timeout=RPC_TIMEOUT)
        assert info.total_bytes == len(DATA) + len(state_bytes)
        got, data = await read(r.operator, 1)
        assert got == header and data == DATA + state_bytes
