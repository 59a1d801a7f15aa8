"""Traces across a round (docs/operations.md, "Traces"): the five services and real proplets in
this process, mutual TLS and mosquitto, and one in-memory exporter that sees every span. An
experiment of two rounds: each round is one trace, from StartExperiment (round 1) or the
round's own root (round 2, linked to the experiment's StartExperiment) through the task starts
on MQTT, each proplet's fetches, WASM run and SubmitUpdate, to the coordinator's acceptance,
the aggregation and the registry's PutModel."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from propeller.v1 import manager_pb2
from server import tracing
from server.config import MqttConfig
from server.log_format import JsonFormatter
from server.messages import TaskStart
from tests.support.clients import HYPER, V0
from tests.support.cluster import Cluster, cluster
from tests.support.waits import eventually

PROPLETS = 2


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    spans = InMemorySpanExporter()
    tracing.enable(SimpleSpanProcessor(spans), "propeller-fl-test")
    try:
        yield spans
    finally:
        tracing.disable()


@pytest.fixture
async def stack(
    exporter: InMemorySpanExporter,
    mqtt: MqttConfig,
    trainer_image: str,
    tmp_path: Path,
) -> AsyncIterator[Cluster]:
    async with cluster(mqtt, tmp_path, proplets=PROPLETS, image=trainer_image) as c:
        yield c


def attr(span: ReadableSpan, key: str) -> str:
    return str((span.attributes or {}).get(key, ""))


def ends(span: ReadableSpan) -> int:
    assert span.end_time is not None
    return span.end_time


def begins(span: ReadableSpan) -> int:
    assert span.start_time is not None
    return span.start_time


def parent_of(span: ReadableSpan, by_id: dict[int, ReadableSpan]) -> ReadableSpan | None:
    return None if span.parent is None else by_id.get(span.parent.span_id)


def children(
    of: ReadableSpan, name: str, spans: list[ReadableSpan], by_id: dict[int, ReadableSpan]
) -> list[ReadableSpan]:
    return [
        s for s in spans if s.name == name and (p := parent_of(s, by_id)) is not None and p is of
    ]


async def test_each_round_is_one_trace_from_start_to_stored_version(
    stack: Cluster, exporter: InMemorySpanExporter
) -> None:
    c = stack
    started = await c.manager.StartExperiment(
        manager_pb2.StartExperimentRequest(
            experiment_id="traced",
            model_ref=V0,
            hyperparams=HYPER,
            timeout_s=60,
            task_wasm_image=c.image,
            participants=c.proplet_ids,
            rounds=2,
        ),
        timeout=60,
    )
    assert started.round_id == "traced-r1"

    def finished() -> list[ReadableSpan]:
        return [s for s in exporter.get_finished_spans() if s.name == "aggregate"]

    async def both_aggregated() -> list[ReadableSpan]:
        return finished()

    await eventually(
        both_aggregated, lambda a: len(a) == 2, timeout=90, what="both rounds aggregated"
    )
    # The second aggregation's PutModel / PutLineage end before "aggregate" does.
    spans = list(exporter.get_finished_spans())
    by_id = {s.context.span_id: s for s in spans}

    (experiment,) = [s for s in spans if s.name == "StartExperiment"]
    rounds = sorted(
        (s for s in spans if s.name == "round"), key=lambda s: attr(s, "propeller.round_id")
    )
    assert [attr(r, "propeller.round_id") for r in rounds] == ["traced-r1", "traced-r2"]
    first, second = rounds
    # Round 1 continues the StartExperiment trace; round 2 is a trace of its own, linked to it.
    assert experiment.parent is None
    assert parent_of(first, by_id) is experiment
    assert second.parent is None
    assert second.context.trace_id != first.context.trace_id
    assert [link.context.span_id for link in second.links] == [experiment.context.span_id]

    for rnd in rounds:
        trace_id = rnd.context.trace_id
        round_id = attr(rnd, "propeller.round_id")
        in_trace = [s for s in spans if s.context.trace_id == trace_id]
        # Everything of this round is in its trace, nothing of the other round is.
        assert all(attr(s, "propeller.round_id") in ("", round_id) for s in in_trace), [
            (s.name, dict(s.attributes or {})) for s in in_trace
        ]
        assert children(rnd, "propeller.v1.Coordinator/ConfigureRound", in_trace, by_id)
        assert children(rnd, "propeller.v1.Coordinator/StartRound", in_trace, by_id)
        starts = children(rnd, "task start", in_trace, by_id)
        assert len(starts) == PROPLETS
        proplets = set()
        for start in starts:
            (task,) = children(start, "proplet task", in_trace, by_id)
            assert attr(task, "propeller.round_id") == round_id
            proplets.add(attr(task, "propeller.proplet_id"))
            (model,) = children(task, "fetch model", in_trace, by_id)
            assert children(model, "propeller.v1.ModelRegistry/GetModel", in_trace, by_id)
            (dataset,) = children(task, "fetch dataset", in_trace, by_id)
            assert children(dataset, "propeller.v1.DataStore/GetDataset", in_trace, by_id)
            assert len(children(task, "wasm run", in_trace, by_id)) == 1
            (submit,) = children(task, "SubmitUpdate", in_trace, by_id)
            (served,) = children(submit, "propeller.v1.Coordinator/SubmitUpdate", in_trace, by_id)
            assert len(children(served, "accept update", in_trace, by_id)) == 1
            # The run happens in order: fetches, then the module, then the upload.
            (run,) = children(task, "wasm run", in_trace, by_id)
            assert ends(model) <= begins(run) and ends(dataset) <= begins(run)
            assert ends(run) <= begins(submit)
        assert proplets == set(c.proplet_ids)
        # The aggregation is in the round's trace (a child of its ConfigureRound), and it is
        # what stores the new version.
        (aggregate,) = [s for s in in_trace if s.name == "aggregate"]
        configured = parent_of(aggregate, by_id)
        assert configured is not None
        assert configured.name == "propeller.v1.Coordinator/ConfigureRound"
        assert parent_of(configured, by_id) is rnd
        assert children(aggregate, "propeller.v1.Aggregator/Aggregate", in_trace, by_id)
        assert len(children(aggregate, "propeller.v1.ModelRegistry/PutModel", in_trace, by_id)) == 1
        assert children(aggregate, "propeller.v1.ModelRegistry/PutLineage", in_trace, by_id)


def test_task_start_carries_the_trace_context_in_its_json() -> None:
    start = TaskStart(id="t1", name="t", traceparent="00-" + "a" * 32 + "-" + "b" * 16 + "-01")
    assert TaskStart.from_json(start.to_json()) == start
    # A trace context never costs a task: one that is not a short string is dropped.
    assert TaskStart.from_json(b'{"id": "t1", "name": "t", "traceparent": 7}').traceparent == ""
    assert TaskStart.from_json(
        b'{"id": "t1", "name": "t", "traceparent": "' + b"0" * 500 + b'"}'
    ) == TaskStart(id="t1", name="t")


def test_off_unless_an_otlp_endpoint_is_configured() -> None:
    assert not tracing.wanted({})
    assert not tracing.wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": ""})
    assert tracing.wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"})
    assert tracing.wanted({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4317"})
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}
    assert not tracing.wanted({**endpoint, "OTEL_SDK_DISABLED": "true"})
    assert not tracing.wanted({**endpoint, "OTEL_TRACES_EXPORTER": "none"})
    assert not tracing.enabled()
    assert tracing.client_interceptors() == [] and tracing.server_interceptors() == []


def test_log_lines_can_name_the_current_trace(exporter: InMemorySpanExporter) -> None:
    assert tracing.current_ids() == ("", "")
    with tracing.span("a step"):
        trace_id, span_id = tracing.current_ids()
    (step,) = exporter.get_finished_spans()
    assert (trace_id, span_id) == (f"{step.context.trace_id:032x}", f"{step.context.span_id:016x}")
    assert tracing.current_ids() == ("", "")


def test_json_log_lines_name_the_span_they_were_logged_in(exporter: InMemorySpanExporter) -> None:
    formatter = JsonFormatter()

    def line(message: str) -> dict[str, Any]:
        record = logging.LogRecord("t", logging.INFO, __file__, 1, message, None, None)
        return dict(json.loads(formatter.format(record)))

    outside = line("[Test.step] round_id=r1")
    with tracing.span("a step"):
        inside = line("[Test.step] round_id=r1")
    (step,) = exporter.get_finished_spans()
    assert (outside["trace_id"], outside["span_id"]) == ("", "")
    assert (inside["trace_id"], inside["span_id"]) == (
        f"{step.context.trace_id:032x}",
        f"{step.context.span_id:016x}",
    )
    assert inside["round_id"] == "r1"


async def test_a_failed_step_ends_its_span_with_the_error(exporter: InMemorySpanExporter) -> None:
    @tracing.traced("a step")
    async def step() -> None:
        raise ValueError("no such thing")

    with pytest.raises(ValueError):
        await step()
    (span,) = exporter.get_finished_spans()
    assert span.status.status_code is StatusCode.ERROR
    assert [e.name for e in span.events] == ["exception"]
