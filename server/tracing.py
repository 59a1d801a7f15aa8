"""Traces across a round (OpenTelemetry): one trace per round, from `StartExperiment` through
the task starts on MQTT, each proplet's fetches, WASM run and `SubmitUpdate`, to the
aggregation and the stored version (docs/operations.md, "Traces").

Off unless configured (`configure(env)`: an OTLP endpoint in OpenTelemetry's own variables),
and then free: every hook here is a check of one module variable, no interceptor is put on a
channel or server, and no trace context travels. Tests turn it on with their own span
processor (`enable`).

How a round's spans join one trace though the round runs in many processes:
- gRPC: the caller's span context travels as W3C `traceparent` metadata (`client_interceptors`
  on every channel, `server_interceptors` on every server); a server opens a span for a call
  only when the call carries one, so health checks and operator calls outside a round start no
  trace of their own.
- MQTT: the task start carries `traceparent` in its JSON (`carried`). Not an MQTT 5 user
  property: the sessions speak MQTT 3.1.1, the only version the embedded broker (amqtt) and the
  clustered broker (NATS's MQTT listener) take, and a field in the payload travels the same
  way over all three brokers and through the broker's queue for an offline proplet.
- Within a process the context follows asyncio's contextvars; where the work of a round
  resumes later in another task (the coordinator's aggregation, after the k-th update or at the
  deadline), the round's context is remembered at `ConfigureRound` (`remember_round`) and the
  work is put back into it (`in_round`).
- An experiment of many rounds: round 1 is part of the `StartExperiment` trace; every later
  round is a new trace whose root span links to the experiment's `StartExperiment` span.
Remembered contexts live in memory only: after a restart a round's remaining work starts a
trace of its own.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any, ParamSpec, Protocol, TypeVar

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

if TYPE_CHECKING:  # the SDK is loaded only when tracing is turned on
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

Attributes = Mapping[str, AttributeValue]

# W3C trace context only (not the OTEL_PROPAGATORS list): the one format every hop here speaks.
_PROPAGATOR = TraceContextTextMapPropagator()
TRACEPARENT = "traceparent"
# A longer `traceparent` than any W3C version defines is not one: dropped where it arrives.
MAX_TRACEPARENT = 128
# Remembered round and experiment contexts (an entry is a few hundred bytes); the oldest go
# first, so a coordinator with rounds that never aggregate holds a bounded amount.
MAX_REMEMBERED = 4096

_provider: TracerProvider | None = None
_tracer: Tracer | None = None
_rounds: OrderedDict[str, SpanContext] = OrderedDict()
_experiments: OrderedDict[str, SpanContext] = OrderedDict()


def enabled() -> bool:
    return _tracer is not None


def enable(processor: SpanProcessor, service_name: str = "propeller-fl") -> TracerProvider:
    """Record spans from now on and hand them to `processor`. Our own provider, not the
    global one: OpenTelemetry lets a process set that once, and the tests turn tracing on and
    off. `OTEL_SERVICE_NAME` / `OTEL_RESOURCE_ATTRIBUTES` win over `service_name`."""
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider

    global _provider, _tracer
    disable()
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: service_name}))
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(processor)
    _provider, _tracer = provider, provider.get_tracer("propeller-fl")
    return provider


def disable() -> None:
    """Stop recording; the spans recorded so far are flushed to the processor."""
    global _provider, _tracer
    provider, _provider, _tracer = _provider, None, None
    _rounds.clear()
    _experiments.clear()
    if provider is not None:
        provider.shutdown()


def _truthy(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


def wanted(env: Mapping[str, str]) -> bool:
    """Whether `env` asks for traces: an OTLP endpoint (`OTEL_EXPORTER_OTLP_ENDPOINT` or
    `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`), unless `OTEL_SDK_DISABLED` is true or
    `OTEL_TRACES_EXPORTER` is `none`."""
    if _truthy(env.get("OTEL_SDK_DISABLED", "")):
        return False
    if env.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return False
    return any(
        env.get(name, "").strip()
        for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def configure(env: Mapping[str, str], service_name: str) -> bool:
    """A process's start: export spans with OTLP (gRPC; the exporter reads its endpoint,
    headers, certificates and timeout from OpenTelemetry's variables) when `env` asks for it.
    True when tracing is on. Only a process's `main` calls this, before its servers and
    channels exist (they take the interceptors at creation)."""
    if not wanted(env):
        return False
    # Imported here: a process that does not trace does not load the exporter.
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    enable(BatchSpanProcessor(OTLPSpanExporter()), service_name)
    log.info("[tracing] %s exports spans with OTLP", service_name)
    return True


# ---- spans -----------------------------------------------------------------------------


@contextmanager
def span(
    name: str, attributes: Attributes | None = None, *, kind: SpanKind = SpanKind.INTERNAL
) -> Iterator[None]:
    """A span around the block, a child of the current one (nothing when tracing is off)."""
    if _tracer is None:
        yield
        return
    with _tracer.start_as_current_span(name, kind=kind, attributes=attributes):
        yield


def traced(name: str) -> Callable[[Callable[P, Awaitable[T]]], Callable[P, Coroutine[Any, Any, T]]]:
    """Decorate an async function: each call is a span `name`."""

    def wrap(fn: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
        @functools.wraps(fn)
        async def run(*args: P.args, **kwargs: P.kwargs) -> T:
            if _tracer is None:
                return await fn(*args, **kwargs)
            with _tracer.start_as_current_span(name):
                return await fn(*args, **kwargs)

        return run

    return wrap


def current_ids() -> tuple[str, str]:
    """The current trace and span ids in hex, as OTLP backends show them ("", "" outside a
    span or with tracing off): for log lines that join their trace."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return "", ""
    return trace.format_trace_id(ctx.trace_id), trace.format_span_id(ctx.span_id)


def _remember(table: OrderedDict[str, SpanContext], key: str, ctx: SpanContext) -> None:
    table[key] = ctx
    table.move_to_end(key)
    while len(table) > MAX_REMEMBERED:
        table.popitem(last=False)


def _parent(ctx: SpanContext | None) -> otel_context.Context:
    """A context whose current span is `ctx`; an empty one (a new trace) for None."""
    if ctx is None:
        return otel_context.Context()
    return trace.set_span_in_context(NonRecordingSpan(ctx), otel_context.Context())


def _current() -> SpanContext | None:
    ctx = trace.get_current_span().get_span_context()
    return ctx if ctx.is_valid else None


async def experiment_started(experiment_id: str, coro: Awaitable[T]) -> T:
    """The manager's `StartExperiment`: a span (the caller's child when it sent a trace
    context, else the root of a trace) that later rounds of the experiment link to."""
    if _tracer is None:
        return await coro
    with _tracer.start_as_current_span(
        "StartExperiment", attributes={"propeller.experiment_id": experiment_id}
    ) as s:
        _remember(_experiments, experiment_id, s.get_span_context())
        return await coro


async def round_fan_out(round_id: str, experiment_id: str, first: bool, coro: Awaitable[T]) -> T:
    """The manager's fan-out of a round, as the span `round` every later step of it descends
    from. The first round of an experiment continues the `StartExperiment` trace it is called
    in; any other round (and a fan-out finished after a restart) starts a trace of its own,
    linked to the experiment's `StartExperiment` span when this process saw it."""
    if _tracer is None:
        return await coro
    attributes = {"propeller.round_id": round_id, "propeller.experiment_id": experiment_id}
    parent = _current() if first else None
    links = []
    if parent is None and (started := _experiments.get(experiment_id)) is not None:
        links.append(Link(started, {"propeller.experiment_id": experiment_id}))
    with _tracer.start_as_current_span(
        "round", context=_parent(parent), links=links, attributes=attributes
    ):
        return await coro


def remember_round(round_id: str) -> None:
    """The coordinator's `ConfigureRound`: the round's context, for `in_round`."""
    if _tracer is not None and (ctx := _current()) is not None:
        _remember(_rounds, round_id, ctx)


async def in_round(round_id: str, name: str, coro: Awaitable[T]) -> T:
    """`coro` as span `name` in round `round_id`'s trace (`remember_round`; a new trace when
    this process does not know it). The round's context is forgotten: this is its last step."""
    if _tracer is None:
        return await coro
    parent = _parent(_rounds.pop(round_id, None))
    attributes = {"propeller.round_id": round_id}
    with _tracer.start_as_current_span(name, context=parent, attributes=attributes):
        return await coro


# ---- MQTT: the task start --------------------------------------------------------------


@contextmanager
def task_start(task_id: str, proplet_id: str) -> Iterator[None]:
    """The manager's publish of a task start: the span the proplet's run descends from."""
    attributes = {"propeller.task_id": task_id, "propeller.proplet_id": proplet_id}
    with span("task start", attributes, kind=SpanKind.PRODUCER):
        yield


class _CarriesTrace(Protocol):
    @property
    def traceparent(self) -> str: ...


C = TypeVar("C", bound=_CarriesTrace)


def carried(message: C) -> C:
    """`message` (a frozen dataclass with a `traceparent` field) carrying the current span's
    context, when there is one."""
    if _tracer is None:
        return message
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    value = carrier.get(TRACEPARENT, "")
    return replace(message, traceparent=value) if value else message  # type: ignore[type-var]


async def task_run(traceparent: str, attributes: Attributes, coro: Awaitable[T]) -> T:
    """A proplet's run of a task, as the span `proplet task`: the child of the task start's
    span when the start carried a trace context, else a trace of its own."""
    if _tracer is None:
        return await coro
    parent = _PROPAGATOR.extract({TRACEPARENT: traceparent}) if traceparent else None
    with _tracer.start_as_current_span(
        "proplet task",
        context=parent if parent is not None else otel_context.Context(),
        kind=SpanKind.CONSUMER,
        attributes=attributes,
    ):
        return await coro


# ---- gRPC ------------------------------------------------------------------------------


def _with_trace(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    if not carrier:
        return details
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    for key, value in carrier.items():
        metadata[key] = value
    return details._replace(metadata=metadata)  # type: ignore[attr-defined, no-any-return]


async def _inject(_self: Any, continuation: Any, details: Any, request: Any) -> Any:
    """Any kind of call, carrying the caller's trace context in its metadata."""
    return await continuation(_with_trace(details), request)


# grpc.aio sorts a channel's interceptors by their first matching kind: one class per kind,
# whose one method is `_inject`.
_INJECTORS: tuple[type, ...] = tuple(
    type(f"_Inject{kind}", (base,), {f"intercept_{method}": _inject})
    for kind, base, method in (
        ("UnaryUnary", grpc.aio.UnaryUnaryClientInterceptor, "unary_unary"),
        ("UnaryStream", grpc.aio.UnaryStreamClientInterceptor, "unary_stream"),
        ("StreamUnary", grpc.aio.StreamUnaryClientInterceptor, "stream_unary"),
        ("StreamStream", grpc.aio.StreamStreamClientInterceptor, "stream_stream"),
    )
)


def client_interceptors() -> list[Any]:
    """For `server.grpc_server.channel`: every call carries the caller's current span context
    (`traceparent` metadata); none when tracing is off."""
    if _tracer is None:
        return []
    return [injector() for injector in _INJECTORS]


def _incoming(metadata: Any) -> otel_context.Context | None:
    """The caller's trace context from a call's metadata; None when it sent none (or a bad
    one)."""
    for key, value in metadata or ():
        if key == TRACEPARENT and isinstance(value, str) and len(value) <= MAX_TRACEPARENT:
            ctx = _PROPAGATOR.extract({TRACEPARENT: value})
            if trace.get_current_span(ctx).get_span_context().is_valid:
                return ctx
    return None


def _server_span(handler: Any, method: str, parent: otel_context.Context) -> Any:
    """`handler` with each call in a SERVER span named after the method, child of `parent`."""
    assert _tracer is not None
    tracer = _tracer
    service, _, rpc = method.lstrip("/").rpartition("/")
    name = method.lstrip("/")
    attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": rpc}

    def opened() -> Any:
        return tracer.start_as_current_span(
            name, context=parent, kind=SpanKind.SERVER, attributes=attributes
        )

    # grpc.aio tells coroutine behaviours from plain ones by the function: no lambdas here.
    def once(behaviour: Any) -> Any:
        async def call(request: Any, context: Any) -> Any:
            with opened():
                result = behaviour(request, context)
                return await result if inspect.isawaitable(result) else result

        return call

    def each(behaviour: Any) -> Any:
        async def call(request: Any, context: Any) -> Any:
            with opened():
                result = behaviour(request, context)
                if inspect.isasyncgen(result):
                    async for item in result:
                        yield item
                elif inspect.isawaitable(result):
                    await result

        return call

    de, se = handler.request_deserializer, handler.response_serializer
    if not handler.request_streaming and not handler.response_streaming:
        return grpc.unary_unary_rpc_method_handler(once(handler.unary_unary), de, se)
    if not handler.request_streaming:
        return grpc.unary_stream_rpc_method_handler(each(handler.unary_stream), de, se)
    if not handler.response_streaming:
        return grpc.stream_unary_rpc_method_handler(once(handler.stream_unary), de, se)
    return grpc.stream_stream_rpc_method_handler(each(handler.stream_stream), de, se)


class _Extract(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """A call that carries a trace context runs in a SERVER span, child of the caller's."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        parent = _incoming(handler_call_details.invocation_metadata)
        if handler is None or parent is None or _tracer is None:
            return handler
        return _server_span(handler, handler_call_details.method, parent)


def server_interceptors() -> list[grpc.aio.ServerInterceptor]:  # type: ignore[type-arg]
    """For `server.grpc_server.create_server`: none when tracing is off."""
    return [] if _tracer is None else [_Extract()]
