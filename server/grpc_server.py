"""The grpc.aio server shape shared by every service: health + reflection beside each service.

`create_server` binds and starts; the caller owns `await server.stop(grace)`. Several services
can share one server (embedded mode) or each get its own (one per process, as compose runs).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import signal
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from server.errors import InvalidArgument
from server.tensors import GRPC_OPTIONS

log = logging.getLogger(__name__)

# What every servicer method is handed besides its request.
Context = grpc.aio.ServicerContext[Any, Any]


@dataclass(frozen=True)
class ServiceBinding:
    """One servicer and how to put it on a server."""

    name: str  # full service name, e.g. "propeller.v1.Coordinator"
    servicer: Any
    add: Callable[[Any, grpc.aio.Server], None]


class _Undecodable:
    """Stands in for a request message whose bytes did not parse."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


def _safe_deserializer(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # DecodeError, or whatever a deserializer raises
            return _Undecodable(f"request: not a valid message: {exc}")

    return parse


class _CheckedRequests:
    """A request stream that raises InvalidArgument at the first undecodable message (once;
    a reader draining the rest after that skips any further ones)."""

    def __init__(self, requests: AsyncIterable[Any]) -> None:
        self._requests = aiter(requests)
        self._failed = False

    def __aiter__(self) -> _CheckedRequests:
        return self

    async def __anext__(self) -> Any:
        while True:
            item = await anext(self._requests)
            if not isinstance(item, _Undecodable):
                return item
            if not self._failed:
                self._failed = True
                raise InvalidArgument(item.error)


async def _result(result: Any) -> Any:
    """A unary-response behaviour's result, whether it is a coroutine or a plain function."""
    return await result if inspect.isawaitable(result) else result


async def _responses(result: Any) -> AsyncIterator[Any]:
    """A server-streaming behaviour's result: an async generator, or a coroutine that writes
    through the context."""
    if inspect.isasyncgen(result):
        async with contextlib.aclosing(result):
            async for item in result:
                yield item
    else:
        await result


def _reject_undecodable(handler: Any) -> Any:
    """`handler` with its request deserializer made total: a body that does not parse is
    answered INVALID_ARGUMENT instead of grpc's UNKNOWN (unary requests: grpc.aio treats a
    deserializer exception as a servicer crash) or INTERNAL (request streams: the exception
    surfaces inside the servicer's read loop)."""
    deserialize = handler.request_deserializer
    if deserialize is None:
        return handler
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    serialize = handler.response_serializer
    safe = _safe_deserializer(deserialize)
    if not handler.request_streaming:
        if not handler.response_streaming:
            unary_unary = handler.unary_unary

            async def uu(request: Any, context: Context) -> Any:
                if isinstance(request, _Undecodable):
                    await context.abort(invalid, request.error)
                return await _result(unary_unary(request, context))

            return grpc.unary_unary_rpc_method_handler(uu, safe, serialize)
        unary_stream = handler.unary_stream

        async def us(request: Any, context: Context) -> Any:
            if isinstance(request, _Undecodable):
                await context.abort(invalid, request.error)
            async for item in _responses(unary_stream(request, context)):
                yield item

        return grpc.unary_stream_rpc_method_handler(us, safe, serialize)
    if not handler.response_streaming:
        stream_unary = handler.stream_unary

        async def su(requests: Any, context: Context) -> Any:
            try:
                return await _result(stream_unary(_CheckedRequests(requests), context))
            except InvalidArgument as exc:  # a servicer without grpc_errors
                await context.abort(invalid, str(exc))

        return grpc.stream_unary_rpc_method_handler(su, safe, serialize)
    stream_stream = handler.stream_stream

    async def ss(requests: Any, context: Context) -> Any:
        try:
            async for item in _responses(stream_stream(_CheckedRequests(requests), context)):
                yield item
        except InvalidArgument as exc:  # a servicer without grpc_errors
            await context.abort(invalid, str(exc))

    return grpc.stream_stream_rpc_method_handler(ss, safe, serialize)


class RejectUndecodable(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Server interceptor applying `_reject_undecodable` to every method (wrapped once per
    method and cached)."""

    def __init__(self) -> None:
        self._handlers: dict[str, Any] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        method = handler_call_details.method
        if method in self._handlers:
            return self._handlers[method]
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: grpc answers UNIMPLEMENTED
            return None
        wrapped = self._handlers[method] = _reject_undecodable(handler)
        return wrapped


async def create_server(
    addr: str, bindings: Sequence[ServiceBinding]
) -> tuple[grpc.aio.Server, int, health_aio.HealthServicer]:
    """Bind `addr` (port 0 picks a free port), register services, health and reflection,
    start serving, and return the server, the bound port and the health servicer."""
    # No SO_REUSEPORT: a second server on a taken port must fail, not silently share it.
    server = grpc.aio.server(
        interceptors=[RejectUndecodable()], options=[*GRPC_OPTIONS, ("grpc.so_reuseport", 0)]
    )
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


# In-flight calls get this long after SIGTERM: room for a large upload to finish, and still
# inside Docker's default 10 s between SIGTERM and SIGKILL.
SHUTDOWN_GRACE_S = 8.0


@asynccontextmanager
async def serving(
    addr: str, bindings: Sequence[ServiceBinding], grace: float = 2.0
) -> AsyncIterator[int]:
    """Serve `bindings` on `addr` for the duration of the block; yields the bound port."""
    server, port, health = await create_server(addr, bindings)
    try:
        yield port
    finally:
        await stop_server(server, health, grace)


async def serve_until_signal(addr: str, bindings: Sequence[ServiceBinding]) -> None:
    """Serve until SIGINT or SIGTERM, then stop gracefully (in-flight calls get a grace period)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with serving(addr, bindings, SHUTDOWN_GRACE_S) as port:
        log.info("[serve] %s listening on port %d", ",".join(b.name for b in bindings), port)
        await stop.wait()
