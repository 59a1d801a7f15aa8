"""Traces exported with OTLP (docs/operations.md, "Traces"): a service process started the way
compose starts it (`propeller-fl serve`), with OpenTelemetry's own variable naming an OTLP
endpoint, sends its spans there; a call that carries a W3C trace context is served in a span of
that trace, under the service's name. The endpoint is a real OTLP/gRPC trace receiver in this
test (OpenTelemetry's own service definition)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import (
    trace_service_pb2,
    trace_service_pb2_grpc,
)
from opentelemetry.proto.trace.v1 import trace_pb2

from server.grpc_server import channel
from tests.support.processes import service_process
from tests.support.waits import eventually

pytestmark = pytest.mark.process

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.batches: list[trace_service_pb2.ExportTraceServiceRequest] = []

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: object
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.batches.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> list[tuple[str, trace_pb2.Span]]:
        """(service.name, span) of every span received."""
        out: list[tuple[str, trace_pb2.Span]] = []
        for batch in self.batches:
            for resource_spans in batch.resource_spans:
                names = [
                    a.value.string_value
                    for a in resource_spans.resource.attributes
                    if a.key == "service.name"
                ]
                for scope in resource_spans.scope_spans:
                    out.extend((names[0] if names else "", s) for s in scope.spans)
        return out


async def test_a_service_exports_its_spans_with_otlp_when_configured(tmp_path: Path) -> None:
    receiver = Receiver()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
            # Export within a tenth of a second instead of the default five.
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }
        with service_process("aggregator", env, tmp_path) as aggregator:
            aggregator.start()
            await aggregator.ready()
            async with channel(aggregator.addr, aggregator.tls) as chan:
                await health_pb2_grpc.HealthStub(chan).Check(
                    health_pb2.HealthCheckRequest(service="propeller.v1.Aggregator"),
                    metadata=(("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"),),
                    timeout=10,
                )

            async def ours() -> list[tuple[str, trace_pb2.Span]]:
                return [(n, s) for n, s in receiver.spans() if s.trace_id.hex() == TRACE_ID]

            received = await eventually(ours, timeout=20, what="the span reached the receiver")
        # The readiness checks carried no trace context: they started no trace.
        assert len(receiver.spans()) == 1
        ((service, span),) = received
        assert service == "propeller-fl-aggregator"
        assert span.name == "grpc.health.v1.Health/Check"
        assert span.parent_span_id.hex() == PARENT_ID
        assert span.kind == trace_pb2.Span.SPAN_KIND_SERVER
    finally:
        await server.stop(0)
