"""Model transfer: `ModelRegistry.GetModel` of a 100 MB model against a bare grpc.aio server
stream of the same bytes in the same 1 MiB chunks (`bench.Bare/Source`; the client only
counts what arrives). Two clients of GetModel: the stream alone (chunk messages parsed, bytes
counted), and the whole download as a proplet does it (`read_model_download`: chunks placed
into one buffer and hashed as they arrive, then checked against the header's digest: BLAKE3,
which the registry states). A third GetModel client is the proplet's path before issue 12
(`read_model_stream`, then `sha256_of` over the arrays), measured in the same run for the A/B.

The registry runs as `propeller-fl serve` runs it (SQLite state directory; the model is read
and verified once, then served from its cache of recent versions), each server in its own
child process; subject and baseline alternate, and the ratio of the medians is reported.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

from benchmarks.common import Child, Recorder, median
from propeller.v1 import model_registry_pb2, model_registry_pb2_grpc
from server.downloads import model_download_call, read_model_download
from server.streams import read_model_stream
from server.tensors import DEFAULT_CHUNK_SIZE, GRPC_OPTIONS, sha256_of

NAME = "transfer"
# The GetModel stream against bare (issue 10); the proplet's whole download (issue 12).
TARGET_RATIO = 0.5
DOWNLOAD_TARGET_RATIO = 0.8
SOURCE = "/bench.Bare/Source"


async def get_model(channel: grpc.aio.Channel, uri: str) -> int:
    """As `proplet.federated` downloads the base model."""
    request = model_registry_pb2.GetModelRequest(model_uri=uri)
    call = model_download_call(channel, request, timeout=600)
    _, tensors = await read_model_download(call, "model")  # checked against the header
    return int(sum(a.nbytes for a in tensors.values()))


async def get_model_before(stub: model_registry_pb2_grpc.ModelRegistryStub, uri: str) -> int:
    """The proplet's download before issue 12: assembled by `read_model_stream`, then hashed."""
    call = stub.GetModel(model_registry_pb2.GetModelRequest(model_uri=uri), timeout=600)
    header, tensors = await read_model_stream(call, "model")
    if header.sha256 != sha256_of(tensors):
        raise RuntimeError(f"{uri} arrived with a wrong sha256")
    return int(sum(a.nbytes for a in tensors.values()))


async def get_model_stream(stub: model_registry_pb2_grpc.ModelRegistryStub, uri: str) -> int:
    """The GetModel stream alone: chunk messages parsed, their bytes counted."""
    total = 0
    call = stub.GetModel(model_registry_pb2.GetModelRequest(model_uri=uri), timeout=600)
    async for chunk in call:
        total += len(chunk.data)
    return total


async def bare_stream(channel: grpc.aio.Channel) -> int:
    total = 0
    async for chunk in channel.unary_stream(SOURCE, None, None)(b"", timeout=600):
        total += len(chunk)
    return total


async def run(rec: Recorder, smoke: bool) -> None:
    size = 10_000_000 if smoke else 100_000_000
    reps = 2 if smoke else 9
    with tempfile.TemporaryDirectory(prefix="bench-transfer-") as tmp:
        workdir = Path(tmp)
        registry = Child(
            "registry",
            {"state_dir": str(workdir / "state"), "model_bytes": size},
            log_path=workdir / "registry.log",
        )
        bare = Child("bare", {"source_bytes": size}, log_path=workdir / "bare.log")
        try:
            async with (
                grpc.aio.insecure_channel(registry.ready["addr"], options=GRPC_OPTIONS) as rch,
                grpc.aio.insecure_channel(bare.ready["addr"], options=GRPC_OPTIONS) as bch,
            ):
                stub = model_registry_pb2_grpc.ModelRegistryStub(rch)
                uri = registry.ready["uri"]
                rates: dict[str, list[float]] = {
                    "bare": [],
                    "stream": [],
                    "proplet": [],
                    "proplet-before": [],
                }
                for r in range(reps + 1):
                    fetches: list[tuple[str, Callable[[], Awaitable[int]]]] = [
                        ("bare", lambda: bare_stream(bch)),
                        ("stream", lambda: get_model_stream(stub, uri)),
                        ("proplet", lambda: get_model(rch, uri)),
                        ("proplet-before", lambda: get_model_before(stub, uri)),
                    ]
                    for name, fetch in fetches:
                        started = time.perf_counter()
                        got = await fetch()
                        seconds = time.perf_counter() - started
                        if got != size:
                            raise RuntimeError(f"{name}: received {got} of {size} bytes")
                        if r:  # the first round warms up connections and the registry's cache
                            rates[name].append(size / 1e6 / seconds)
        finally:
            registry.stop()
            bare.stop()
    b_rate = median(rates["bare"])
    for name, what, target in (
        (
            "proplet",
            "GetModel as a proplet reads it (arrays assembled, BLAKE3 checked)",
            DOWNLOAD_TARGET_RATIO,
        ),
        (
            "proplet-before",
            "GetModel as a proplet read it before issue 12 (assembled, then hashed)",
            None,
        ),
        ("stream", "GetModel stream alone (chunk messages parsed)", TARGET_RATIO),
    ):
        s_rate = median(rates[name])
        ratio = s_rate / b_rate
        rec.record(
            NAME,
            {
                "model_mb": size / 1e6,
                "client": name,
                "chunk": DEFAULT_CHUNK_SIZE,
                "reps": reps,
                "store": "sqlite",
            },
            {
                "mb_per_s": round(s_rate, 1),
                "bare_mb_per_s": round(b_rate, 1),
                "ratio": round(ratio, 3),
            },
            targets={} if target is None else {f">= {target} of bare": ratio >= target},
            summary=(
                f"{what}, {size / 1e6:.0f} MB: {s_rate:7.1f} MB/s, bare {b_rate:7.1f} MB/s, "
                f"ratio {ratio:.2f}"
            ),
        )
