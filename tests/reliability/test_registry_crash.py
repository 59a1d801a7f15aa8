"""The model registry killed with SIGKILL while a 200 MB version is being written: after a
restart over the same state directory that version is absent or complete (its bytes hash to
the listed sha256), never torn; ListModels is consistent and numbering carries on from the
highest stored version."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from propeller.v1 import model_registry_pb2, model_registry_pb2_grpc, tensor_pb2
from server.grpc_server import channel
from server.streams import model_stream, read_model_stream
from server.tensors import Tensors, sha256_of
from tests.support.processes import RPC_S, ServiceProcess, service_process

log = logging.getLogger(__name__)

Stub = Any  # generated gRPC stubs carry no type information

BIG_ELEMENTS = 50_000_000  # float32: 200 MB
CHUNK = 1 << 20
BIG_BYTES = BIG_ELEMENTS * 4 + 4  # w and the scalar b
# The header, then each tensor's bytes in chunks (its last one partial): w's, then b's one.
BIG_CHUNKS = 1 + -(-BIG_ELEMENTS * 4 // CHUNK) + 1
# Kill while the transaction is being written: the write-ahead log past this size can only be
# the big version's pages (the file is trimmed to 64 MB after each checkpoint).
WAL_KILL_BYTES = 128 << 20


def big_model(seed: int) -> Tensors:
    """200 MB of float32 that differs from every other seed's in every element."""
    w = np.arange(BIG_ELEMENTS, dtype=np.float32)
    w += np.float32(seed * 0.5)
    return {"w": w, "b": np.asarray(seed, dtype=np.float32)}


def small_model(seed: int) -> Tensors:
    return {"w": np.full(3, seed, dtype="<f8"), "b": np.asarray(float(seed))}


async def put(stub: Stub, tensors: Tensors) -> model_registry_pb2.ModelVersion:
    reply: model_registry_pb2.ModelVersion = await stub.PutModel(
        iter(model_stream(tensors, CHUNK)), timeout=RPC_S
    )
    return reply


async def listed(stub: Stub) -> list[model_registry_pb2.ModelVersion]:
    reply = await stub.ListModels(model_registry_pb2.ListModelsRequest(), timeout=RPC_S)
    return list(reply.models)


async def fetched_sha256(stub: Stub, version: int) -> str:
    header, tensors = await read_model_stream(
        stub.GetModel(model_registry_pb2.GetModelRequest(version=version), timeout=RPC_S)
    )
    assert header.version == version
    digest = await asyncio.to_thread(sha256_of, tensors)
    assert digest == header.sha256, f"v{version}: served bytes do not match the header"
    return digest


@dataclass
class Attempt:
    kill_point: str
    expected_version: int
    sha256: str
    acknowledged: bool = False


async def streaming(
    tensors: Tensors, on_chunk: Callable[[int], None]
) -> AsyncIterator[tensor_pb2.ModelChunk]:
    """The model's chunks, calling `on_chunk(n)` after the n-th one was handed to gRPC."""
    for n, chunk in enumerate(model_stream(tensors, CHUNK), start=1):
        yield chunk
        on_chunk(n)


def wal_size(state_dir: Path) -> int:
    try:
        return (state_dir / "registry.sqlite-wal").stat().st_size
    except FileNotFoundError:
        return 0


async def put_and_kill(
    stub: Stub, registry: ServiceProcess, state_dir: Path, tensors: Tensors, kill_point: str
) -> bool:
    """Stream `tensors` and SIGKILL the registry at `kill_point`; True if the PutModel was
    acknowledged before the kill."""
    killed = False

    def kill() -> None:
        nonlocal killed
        if not killed:
            killed = True
            registry.kill()

    sent_all = asyncio.Event()

    # Chunk numbers: the header is chunk 1, so "after 1 chunk" is after one data chunk.
    kill_at = {"after 1 chunk": 2, "halfway": BIG_CHUNKS // 2}.get(kill_point)

    def on_chunk(n: int) -> None:
        if n == kill_at:
            kill()
        elif n == BIG_CHUNKS:
            sent_all.set()
            if kill_point == "after the last chunk":
                kill()

    call = stub.PutModel(streaming(tensors, on_chunk), timeout=RPC_S)
    acknowledged = False
    if kill_point == "while committing":
        task = asyncio.ensure_future(call)
        await asyncio.wait_for(sent_all.wait(), RPC_S)
        # Poll the write-ahead log: kill as soon as the transaction is big in it, or after
        # the call returned if the write was quicker than this loop.
        deadline = time.monotonic() + RPC_S
        while not task.done() and wal_size(state_dir) < WAL_KILL_BYTES:
            assert time.monotonic() < deadline, "PutModel neither wrote nor returned"
            await asyncio.sleep(0.001)
        log.info("kill while committing: wal=%d done=%s", wal_size(state_dir), task.done())
        kill()
        with contextlib.suppress(grpc.aio.AioRpcError):
            await task
            acknowledged = True
    else:
        try:
            await call
            acknowledged = True
        except grpc.aio.AioRpcError as err:
            assert killed, f"PutModel failed without a kill: {err.code()} {err.details()}"
            # A server that vanishes mid-stream reaches the client as a closed socket
            # (UNAVAILABLE), a cancelled call, or a reset stream (INTERNAL), by timing.
            assert err.code() in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.CANCELLED,
                grpc.StatusCode.INTERNAL,
            ), f"{kill_point}: {err.code()} {err.details()}"
        if kill_point == "after the call returned":
            assert acknowledged
            kill()
    assert killed
    return acknowledged


async def test_a_killed_registry_never_keeps_a_torn_version(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    kill_points = [
        "after 1 chunk",
        "halfway",
        "after the last chunk",
        "while committing",
        "after the call returned",
    ]
    with service_process("registry", {"PROPELLER_STATE_DIR": str(state_dir)}, tmp_path) as reg:
        await reg.restart()
        async with channel(reg.addr, reg.tls) as chan:
            stub = model_registry_pb2_grpc.ModelRegistryStub(chan)
            v0 = await stub.InitModel(
                model_registry_pb2.InitModelRequest(dimension=3), timeout=RPC_S
            )
            assert v0.version == 0
            expected_next = 1
            outcomes: dict[str, str] = {}
            for seed, kill_point in enumerate(kill_points, start=1):
                tensors = big_model(seed)
                digest = await asyncio.to_thread(sha256_of, tensors)
                acknowledged = await put_and_kill(stub, reg, state_dir, tensors, kill_point)
                await reg.restart()

                models = await listed(stub)
                versions = [m.version for m in models]
                # Consistent: contiguous from 0, nothing half-listed.
                assert versions == list(range(len(versions))), versions
                if acknowledged:
                    assert versions[-1] == expected_next, (kill_point, versions)
                if kill_point in ("after 1 chunk", "halfway"):
                    # The registry stores nothing before the whole stream has arrived.
                    assert versions[-1] == expected_next - 1, (kill_point, versions)
                if versions[-1] == expected_next:
                    info = models[-1]
                    assert info.sha256 == digest, kill_point
                    assert info.total_bytes == BIG_BYTES
                    assert await fetched_sha256(stub, expected_next) == digest, kill_point
                    outcomes[kill_point] = "complete"
                    expected_next += 1
                else:
                    assert versions[-1] == expected_next - 1, (kill_point, versions)
                    outcomes[kill_point] = "absent"
                log.info("kill %s: version %s", kill_point, outcomes[kill_point])

            # Numbering carries on from the highest stored version, and every version
            # listed is served intact.
            after = await put(stub, small_model(99))
            assert after.version == expected_next
            models = await listed(stub)
            assert [m.version for m in models] == list(range(expected_next + 1))
            for m in models:
                assert await fetched_sha256(stub, m.version) == m.sha256
            assert outcomes["after the call returned"] == "complete"
        assert await reg.terminate_async() == 0, reg.tail()
