"""The grpc.aio server shape shared by every service: health + reflection beside each service,
mutual TLS, and the authorization check in front of every handler.

`create_server` binds and starts; the caller owns `await server.stop(grace)`. Several services
can share one server (embedded mode) or each get its own (one per process, as compose runs).
Given a `TlsConfig`, a server requires and verifies a client certificate from the deployment
CA and admits each call through `server.authz.Gate`; `channel(target, tls)` is every client's
channel, with its own certificate. `tls=None` is plaintext, logged as a warning.
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
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from server.authz import Caller, Gate, set_caller
from server.config import TlsConfig
from server.errors import InvalidArgument, PropellerError
from server.tensors import GRPC_OPTIONS
from server.tracing import client_interceptors, server_interceptors

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


async def _drain(requests: AsyncIterable[Any]) -> None:
    """Read a refused request stream to its end: a grpc.aio client that is still sending when
    the status comes sees "INTERNAL" instead of it."""
    async for _ in requests:
        pass


def _guard(handler: Any, method: str, gate: Gate | None) -> Any:
    """`handler` behind the gate and with its request deserializer made total.

    The gate first: the caller is authenticated and authorized (`server.authz`) before any
    of its request is looked at, else UNAUTHENTICATED / PERMISSION_DENIED; a unary request's
    "as itself" field is checked next. A body that does not parse is answered
    INVALID_ARGUMENT instead of grpc's UNKNOWN (unary requests: grpc.aio treats a deserializer
    exception as a servicer crash) or INTERNAL (request streams: the exception surfaces inside
    the servicer's read loop)."""
    deserialize = handler.request_deserializer
    if deserialize is None:
        return handler
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    serialize = handler.response_serializer
    safe = _safe_deserializer(deserialize)

    async def admit(context: Context, request: Any = None, stream: Any = None) -> None:
        try:
            caller = (
                Caller(None, method, None)
                if gate is None
                else gate.admit(context.auth_context(), method)
            )
            set_caller(caller)
            if isinstance(request, _Undecodable):
                raise InvalidArgument(request.error)
            if request is not None:
                Gate.check_request(caller, request)
        except PropellerError as exc:
            if not isinstance(exc, InvalidArgument):
                log.warning("[authz] %s refused: %s (%s)", context.peer(), exc, method)
            if stream is not None:
                await _drain(stream)
            await context.abort(exc.code, str(exc))

    if not handler.request_streaming:
        if not handler.response_streaming:
            unary_unary = handler.unary_unary

            async def uu(request: Any, context: Context) -> Any:
                await admit(context, request)
                return await _result(unary_unary(request, context))

            return grpc.unary_unary_rpc_method_handler(uu, safe, serialize)
        unary_stream = handler.unary_stream

        async def us(request: Any, context: Context) -> Any:
            await admit(context, request)
            async for item in _responses(unary_stream(request, context)):
                yield item

        return grpc.unary_stream_rpc_method_handler(us, safe, serialize)
    if not handler.response_streaming:
        stream_unary = handler.stream_unary

        async def su(requests: Any, context: Context) -> Any:
            await admit(context, stream=requests)
            try:
                return await _result(stream_unary(_CheckedRequests(requests), context))
            except InvalidArgument as exc:  # a servicer without grpc_errors
                await context.abort(invalid, str(exc))

        return grpc.stream_unary_rpc_method_handler(su, safe, serialize)
    stream_stream = handler.stream_stream

    async def ss(requests: Any, context: Context) -> Any:
        await admit(context, stream=requests)
        try:
            async for item in _responses(stream_stream(_CheckedRequests(requests), context)):
                yield item
        except InvalidArgument as exc:  # a servicer without grpc_errors
            await context.abort(invalid, str(exc))

    return grpc.stream_stream_rpc_method_handler(ss, safe, serialize)


class Guard(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Server interceptor applying `_guard` to every method (wrapped once per method and
    cached). `gate` None: a plaintext server, which authenticates nobody."""

    def __init__(self, gate: Gate | None) -> None:
        self._gate = gate
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
        wrapped = self._handlers[method] = _guard(handler, method, self._gate)
        return wrapped


def _read(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"TLS: cannot read {path}: {exc.strerror or exc}") from None
    return data


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    """The server's certificate, and client certificates required and verified against the
    deployment CA."""
    return grpc.ssl_server_credentials(
        [(_read(tls.key), _read(tls.cert))],
        root_certificates=_read(tls.ca),
        require_client_auth=True,
    )


def channel_credentials(tls: TlsConfig) -> grpc.ChannelCredentials:
    """The server verified against the deployment CA; our own certificate shown to it."""
    return grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca),
        private_key=_read(tls.key),
        certificate_chain=_read(tls.cert),
    )


PLAINTEXT_WARNING = (
    "plaintext gRPC (--insecure / PROPELLER_INSECURE=1): no encryption, no authentication, "
    "no authorization"
)


async def create_server(
    addr: str, bindings: Sequence[ServiceBinding], tls: TlsConfig | None
) -> tuple[grpc.aio.Server, int, health_aio.HealthServicer]:
    """Bind `addr` (port 0 picks a free port) with mutual TLS (`tls`; None: plaintext),
    register services, health and reflection, start serving, and return the server, the
    bound port and the health servicer."""
    gate = None if tls is None else Gate(tls)
    credentials = None if tls is None else server_credentials(tls)
    # No SO_REUSEPORT: a second server on a taken port must fail, not silently share it.
    server = grpc.aio.server(
        interceptors=[*server_interceptors(), Guard(gate)],
        options=[*GRPC_OPTIONS, ("grpc.so_reuseport", 0)],
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
    if credentials is None:
        log.warning("[serve] %s: %s", addr, PLAINTEXT_WARNING)
        port = server.add_insecure_port(addr)
    else:
        port = server.add_secure_port(addr, credentials)
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


_warned_plaintext = False


def channel(
    target: str, tls: TlsConfig | None, options: Sequence[tuple[str, Any]] = GRPC_OPTIONS
) -> grpc.aio.Channel:
    """A client channel without the 4 MB ceiling: mutual TLS with `tls` (None: plaintext,
    warned about once per process)."""
    if tls is None:
        global _warned_plaintext
        if not _warned_plaintext:
            _warned_plaintext = True
            log.warning("[channel] %s", PLAINTEXT_WARNING)
        return grpc.aio.insecure_channel(
            target, options=list(options), interceptors=client_interceptors()
        )
    return grpc.aio.secure_channel(
        target,
        channel_credentials(tls),
        options=list(options),
        interceptors=client_interceptors(),
    )


# In-flight calls get this long after SIGTERM: room for a large upload to finish, and still
# inside Docker's default 10 s between SIGTERM and SIGKILL.
SHUTDOWN_GRACE_S = 8.0


@asynccontextmanager
async def serving(
    addr: str, bindings: Sequence[ServiceBinding], tls: TlsConfig | None, grace: float = 2.0
) -> AsyncIterator[int]:
    """Serve `bindings` on `addr` (mutual TLS with `tls`; None: plaintext) for the duration
    of the block; yields the bound port."""
    server, port, health = await create_server(addr, bindings, tls)
    try:
        yield port
    finally:
        await stop_server(server, health, grace)


async def serve_until_signal(
    addr: str, bindings: Sequence[ServiceBinding], tls: TlsConfig | None
) -> None:
    """Serve until SIGINT or SIGTERM, then stop gracefully (in-flight calls get a grace period)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with serving(addr, bindings, tls, SHUTDOWN_GRACE_S) as port:
        log.info("[serve] %s listening on port %d", ",".join(b.name for b in bindings), port)
        await stop.wait()
