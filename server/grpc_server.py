"""The grpc.aio server shape shared by every service: health + reflection beside each service.

`create_server` binds and starts; the caller owns `await server.stop(grace)`. Several services
can share one server (embedded mode) or each get its own (one per process, as compose runs).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from server.tensors import GRPC_OPTIONS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceBinding:
    """One servicer and how to put it on a server."""

    name: str  # full service name, e.g. "propeller.v1.Coordinator"
    servicer: Any
    add: Callable[[Any, grpc.aio.Server], None]


async def create_server(
    addr: str, bindings: Sequence[ServiceBinding]
) -> tuple[grpc.aio.Server, int, health_aio.HealthServicer]:
    """Bind `addr` (port 0 picks a free port), register services, health and reflection,
    start serving, and return the server, the bound port and the health servicer."""
    # No SO_REUSEPORT: a second server on a taken port must fail, not silently share it.
    server = grpc.aio.server(options=[*GRPC_OPTIONS, ("grpc.so_reuseport", 0)])
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    for b in bindings:
        b.add(b.servicer, server)
    names = [b.name for b in bindings]
    reflection.enable_server_reflection(
        [
            *names,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    port = server.add_insecure_port(addr)
    if port == 0:
        raise OSError(f"could not bind gRPC server to {addr}")
    await server.start()
    for name in names:
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, port, health


async def stop_server(
    server: grpc.aio.Server, health: health_aio.HealthServicer, grace: float = 2.0
) -> None:
    await health.enter_graceful_shutdown()
    await server.stop(grace)


def channel(target: str) -> grpc.aio.Channel:
    """A client channel without the 4 MB ceiling."""
    return grpc.aio.insecure_channel(target, options=GRPC_OPTIONS)


@asynccontextmanager
async def serving(addr: str, bindings: Sequence[ServiceBinding]) -> AsyncIterator[int]:
    """Serve `bindings` on `addr` for the duration of the block; yields the bound port."""
    server, port, health = await create_server(addr, bindings)
    try:
        yield port
    finally:
        await stop_server(server, health)


async def serve_until_signal(addr: str, bindings: Sequence[ServiceBinding]) -> None:
    """Serve until SIGINT or SIGTERM, then stop gracefully (in-flight calls get a grace period)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with serving(addr, bindings) as port:
        log.info("[serve] %s listening on port %d", ",".join(b.name for b in bindings), port)
        await stop.wait()
