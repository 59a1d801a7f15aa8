"""Inbound streams are checked against their limit from the header and as they arrive, and
memory stays bounded (issue 10, item 5), on a real `propeller-fl serve registry` process over
SQLite: a 2 GiB upload (generated, never stored) is refused from its header, one whose header
lies as soon as it sends more than it promised; the server's peak RSS (VmHWM) stays under
300 MB throughout; and a 384 MiB upload it takes (spooled to a temporary file, then written
into SQLite piece by piece) round-trips byte-identical, the peak still under 300 MB.

The refusals are sent with grpc's synchronous client: grpc.aio clients can report "INTERNAL:
Internal error from Core" instead of the server's status when a server answers an upload
before the client finished sending (grpc/grpc#36066), which this server does on purpose.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from propeller.v1 import model_registry_pb2, model_registry_pb2_grpc, tensor_pb2
from tests.support.clients import sync_channel
from tests.support.processes import ServiceProcess, service_process

MIB = 1 << 20
RSS_BOUND = 300 * 1000 * 1000
TWO_GIB = 2 << 30
ALLOWED = 384 * MIB  # above the spool threshold, above what the RSS bound leaves room for
# Refused early: what a client can have sent before the answer (the server reads on for at
# most 64 MiB so the client sees the status; flow-control windows and the chunk in hand).
EARLY = 256 * MIB


@dataclass
class Sent:
    bytes: int = 0

    def __post_init__(self) -> None:
        self.sha256 = hashlib.sha256()


def generated(
    size: int, sent: Sent, declared: int | None = None
) -> Iterator[tensor_pb2.ModelChunk]:
    """A float32 model `w` of `size` bytes (its header says `declared`), made chunk by chunk:
    the values 0, 1, 2, ... (as float32), never held whole."""
    n = (declared or size) // 4
    spec = tensor_pb2.TensorSpec(name="w", dtype=tensor_pb2.DTYPE_FLOAT32, shape=[n])
    yield tensor_pb2.ModelChunk(header=tensor_pb2.ModelHeader(tensors=[spec]))
    per_chunk = MIB // 4
    for start in range(0, size // 4, per_chunk):
        data = np.arange(start, min(start + per_chunk, size // 4), dtype="<f4").tobytes()
        sent.bytes += len(data)
        sent.sha256.update(data)
        yield tensor_pb2.ModelChunk(data=data)


def put(
    registry: ServiceProcess, chunks: Iterator[tensor_pb2.ModelChunk]
) -> model_registry_pb2.ModelVersion:
    with sync_channel(registry.addr, registry.tls) as ch:
        stub = model_registry_pb2_grpc.ModelRegistryStub(ch)
        reply: model_registry_pb2.ModelVersion = stub.PutModel(chunks, timeout=300)
        return reply


def refused(registry: ServiceProcess, chunks: Iterator[tensor_pb2.ModelChunk]) -> grpc.RpcError:
    try:
        put(registry, chunks)
    except grpc.RpcError as err:
        return err
    raise AssertionError("the upload was accepted")


def peak_rss(process: ServiceProcess) -> int:
    """The process's peak resident set size so far (VmHWM), in bytes."""
    assert process.proc is not None
    for line in Path(f"/proc/{process.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def open_deleted_files(process: ServiceProcess) -> list[str]:
    """Files the process holds open that are gone from the file system (spool files)."""
    assert process.proc is not None
    fds = Path(f"/proc/{process.proc.pid}/fd")
    targets = []
    for fd in fds.iterdir():
        try:
            targets.append(os.readlink(fd))
        except FileNotFoundError:
            continue
    return [t for t in targets if t.endswith("(deleted)")]


def fetched_sha256(registry: ServiceProcess, version: int) -> tuple[str, int]:
    """The sha256 and size of a version's bytes as GetModel streams them (never held whole)."""
    digest = hashlib.sha256()
    size = 0
    with sync_channel(registry.addr, registry.tls) as ch:
        stub = model_registry_pb2_grpc.ModelRegistryStub(ch)
        request = model_registry_pb2.GetModelRequest(version=version)
        for chunk in stub.GetModel(request, timeout=300):
            if chunk.WhichOneof("part") == "data":
                digest.update(chunk.data)
                size += len(chunk.data)
    return digest.hexdigest(), size


async def test_uploads_are_bounded_from_the_header_and_as_they_arrive(tmp_path: Path) -> None:
    env = {"PROPELLER_STATE_DIR": str(tmp_path / "state")}
    with service_process("registry", env, tmp_path) as registry:
        await registry.restart()

        sent = Sent()
        err = await asyncio.to_thread(refused, registry, generated(TWO_GIB, sent))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
        assert (err.details() or "").startswith("model.header.tensors: 2147483648 bytes, more ")
        assert sent.bytes < EARLY, f"{sent.bytes} bytes sent before the refusal"

        # A header that promises 64 MiB, then 2 GiB: refused at the first byte too many.
        sent = Sent()
        lying = generated(TWO_GIB, sent, declared=64 * MIB)
        err = await asyncio.to_thread(refused, registry, lying)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
        assert "more tensor bytes than the header's 67108864" in (err.details() or "")
        assert sent.bytes < 64 * MIB + EARLY, f"{sent.bytes} bytes sent before the refusal"
        assert peak_rss(registry) < RSS_BOUND, f"peak RSS {peak_rss(registry)}"

        sent = Sent()
        stored = await asyncio.to_thread(put, registry, generated(ALLOWED, sent))
        assert stored.total_bytes == ALLOWED == sent.bytes
        assert stored.sha256 == sent.sha256.hexdigest()
        assert peak_rss(registry) < RSS_BOUND, f"peak RSS {peak_rss(registry)}"
        assert open_deleted_files(registry) == []  # no spool file left open

        digest, size = await asyncio.to_thread(fetched_sha256, registry, stored.version)
        assert (digest, size) == (sent.sha256.hexdigest(), ALLOWED)
