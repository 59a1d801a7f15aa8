"""The one id rule (`server.ids`) at every edge of a running stack: each gRPC request naming
something by a bad id or name is refused with INVALID_ARGUMENT naming the field, and MQTT
messages with bad ids are dropped by the manager (nothing registered, nothing recorded)."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from propeller.v1 import (
    aggregator_pb2,
    aggregator_pb2_grpc,
    coordinator_pb2,
    datastore_pb2,
    manager_pb2,
    model_registry_pb2,
    tensor_pb2,
)
from server.config import MqttConfig
from server.grpc_server import channel
from server.messages import COMPLETED, PropletAnnounce, TaskResult
from server.mqtt import MqttSession
from server.streams import UpdateMeta, model_stream, update_stream
from server.tensors import tensor_to_proto
from tests.support.cluster import Cluster, cluster
from tests.support.security import proplet_tls, service_tls
from tests.support.waits import eventually

CP, DS, MP, MR = coordinator_pb2, datastore_pb2, manager_pb2, model_registry_pb2
V0 = "fl/models/global_model_v0"
HUGE = "x" * (1 << 20)
ZEROS = {"w": np.zeros(3), "b": np.zeros(())}


@dataclass
class Stack(Cluster):
    """The cluster's clients (as the suite's operator; `coordinator_as(proplet)` as a proplet)
    and an Aggregator stub as the coordinator, the one caller the aggregator takes."""

    aggregator_as_coordinator: Any = field(kw_only=True, default=None)


@pytest.fixture
async def stack(mqtt: MqttConfig, tmp_path: Path) -> AsyncIterator[Stack]:
    async with (
        cluster(mqtt, tmp_path) as c,
        channel(c.endpoints.aggregator, service_tls("coordinator")) as ch,
    ):
        fields = {f.name: getattr(c, f.name) for f in dataclasses.fields(c) if f.init}
        yield Stack(**fields, aggregator_as_coordinator=aggregator_pb2_grpc.AggregatorStub(ch))


def chunks(header: Any, data: bytes = b"") -> Iterator[Any]:
    yield header
    if data:
        yield tensor_pb2.UpdateChunk(data=data)


def bad_update(**header: Any) -> Iterator[tensor_pb2.UpdateChunk]:
    fields = {
        "round_id": "r1",
        "proplet_id": "a",
        "base_model_uri": V0,
        "num_samples": 1,
        **header,
    }
    metrics = fields.pop("metrics", {})
    meta = UpdateMeta(**fields, metrics=metrics)
    return update_stream(meta, ZEROS)


def experiment(**fields: Any) -> MP.StartExperimentRequest:
    request = {
        "round_id": "r-ids",
        "model_ref": V0,
        "participants": ["p1"],
        "task_wasm_image": "file:///x.wasm",
        **fields,
    }
    return MP.StartExperimentRequest(**request)


def dataset(proplet_id: str, schema: str = "") -> DS.PutDatasetRequest:
    return DS.PutDatasetRequest(
        dataset=DS.Dataset(
            proplet_id=proplet_id,
            schema=schema,
            features=tensor_to_proto(np.zeros((1, 2))),
            labels=tensor_to_proto(np.zeros(1)),
        )
    )


# (what, the call on the Stack, the field the status must name first)
Call = Callable[[Stack], Any]
EDGES: list[tuple[str, Call, str]] = [
    ("experiment round id", lambda c: c.manager.StartExperiment(experiment(round_id="r/1")),
     "round_id"),
    ("experiment id", lambda c: c.manager.StartExperiment(experiment(experiment_id="e+")),
     "experiment_id"),
    ("experiment participant", lambda c: c.manager.StartExperiment(
        experiment(participants=["p1", "p#"])), r"participants\[1\]"),
    ("experiment huge participant", lambda c: c.manager.StartExperiment(
        experiment(participants=[HUGE])), r"participants\[0\]"),
    ("too many participants", lambda c: c.manager.StartExperiment(
        experiment(participants=[f"p{i}" for i in range(10_001)])), "participants"),
    ("get experiment", lambda c: c.manager.GetExperiment(
        MP.GetExperimentRequest(experiment_id="a b")), "experiment_id"),
    ("manager round status", lambda c: c.manager.GetRoundStatus(
        CP.GetRoundStatusRequest(round_id="#")), "round_id"),
    ("get proplet", lambda c: c.manager.GetProplet(MP.GetPropletRequest(proplet_id="p/x")),
     "proplet_id"),
    ("task name", lambda c: c.manager.CreateTask(
        MP.CreateTaskRequest(name="my task", image_url="x")), "name"),
    ("task proplet", lambda c: c.manager.CreateTask(
        MP.CreateTaskRequest(name="t", image_url="x", proplet_id="+")), "proplet_id"),
    ("task env", lambda c: c.manager.CreateTask(
        MP.CreateTaskRequest(name="t", image_url="x", env={"A": HUGE})), r"env\[A\]"),
    ("task args", lambda c: c.manager.CreateTask(
        MP.CreateTaskRequest(name="t", image_url="x", cli_args=["a"] * 300)), "cli_args"),
    ("task module", lambda c: c.manager.CreateTask(
        MP.CreateTaskRequest(name="t", file=b"\0" * (16 << 20 | 1))), "file"),
    ("get task", lambda c: c.manager.GetTask(MP.TaskRef(task_id="t\x00")), "task_id"),
    ("start task", lambda c: c.manager.StartTask(MP.TaskRef(task_id="t/1")), "task_id"),
    ("stop task", lambda c: c.manager.StopTask(MP.TaskRef(task_id=HUGE)), "task_id"),
    ("list tasks", lambda c: c.manager.ListTasks(MP.ListTasksRequest(proplet_id="#")),
     "proplet_id"),
    ("configure round", lambda c: c.coordinator.ConfigureRound(
        CP.ConfigureRoundRequest(round_id="r 1", participants=["a"])), "round_id"),
    ("start round", lambda c: c.coordinator.StartRound(CP.StartRoundRequest(round_id="+")),
     "round_id"),
    ("round status", lambda c: c.coordinator.GetRoundStatus(
        CP.GetRoundStatusRequest(round_id=HUGE)), "round_id"),
    ("list rounds", lambda c: c.coordinator.ListRounds(
        CP.ListRoundsRequest(experiment_id="e/1")), "experiment_id"),
    ("update round", lambda c: c.coordinator_as("a").SubmitUpdate(bad_update(round_id="r#")),
     "update.header.round_id"),
    ("update proplet", lambda c: c.coordinator_as("a:b").SubmitUpdate(
        bad_update(proplet_id="a:b")),
     "update.header.proplet_id"),
    ("update metric", lambda c: c.coordinator_as("a").SubmitUpdate(
        bad_update(metrics={"a b": 1.0})), "update.header.metrics"),
    ("update tensor", lambda c: c.coordinator_as("a").SubmitUpdate(chunks(tensor_pb2.UpdateChunk(
        header=tensor_pb2.UpdateHeader(round_id="r1", proplet_id="a", tensors=[
            tensor_pb2.TensorSpec(name="w/x", dtype=tensor_pb2.DTYPE_FLOAT64)]))))
     , r"update.header.tensors\[0\].name"),
    ("model tensor", lambda c: c.registry.PutModel(model_stream({"a b": np.zeros(2)}, 0)),
     r"model.header.tensors\[0\].name"),
    ("get dataset", lambda c: c.datastore.GetDataset(DS.GetDatasetRequest(proplet_id="p+")),
     "proplet_id"),
    ("put dataset", lambda c: c.datastore.PutDataset(dataset("p/1")), "dataset.proplet_id"),
    ("dataset schema", lambda c: c.datastore.PutDataset(dataset("p1", "a schema")),
     "dataset.schema"),
    ("aggregate round", lambda c: c.aggregator_as_coordinator.Aggregate(iter([
        aggregator_pb2.AggregateChunk(header=aggregator_pb2.AggregateHeader(round_id="r+"))])),
     "header.round_id"),
]  # fmt: skip


async def answered(answer: Any) -> None:
    """Wait for a call's answer: a unary one, or every message of a response stream."""
    if hasattr(answer, "__aiter__"):
        async for _ in answer:
            pass
    else:
        await answer


@pytest.mark.parametrize(("call", "field"), [e[1:] for e in EDGES], ids=[e[0] for e in EDGES])
async def test_bad_ids_refused_naming_the_field(stack: Stack, call: Call, field: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await answered(call(stack))
    details = exc.value.details() or ""
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT, details
    assert details.startswith(field.replace("\\", "")), details


async def test_nothing_was_stored_by_refused_requests(stack: Stack) -> None:
    for _, call, _ in EDGES:
        with pytest.raises(grpc.aio.AioRpcError):
            await answered(call(stack))
    assert (await stack.manager.ListTasks(MP.ListTasksRequest())).tasks == []
    assert (await stack.manager.ListExperiments(MP.ListExperimentsRequest())).experiments == []
    assert (await stack.coordinator.ListRounds(CP.ListRoundsRequest())).rounds == []
    assert await stack.versions() == [0]
    listed = await stack.datastore.ListDatasets(DS.ListDatasetsRequest())
    assert [d.proplet_id for d in listed.datasets] == []


async def test_mqtt_messages_with_bad_ids_are_dropped(stack: Stack) -> None:
    topics = stack.topics
    task = await stack.manager.CreateTask(MP.CreateTaskRequest(name="t", image_url="x"))
    await stack.manager.StartTask(MP.TaskRef(task_id=task.id))
    # A proplet (the only kind that may publish reports) naming bad ids in its payloads; the
    # topics themselves cannot carry one (its own id is the last level).
    mqtt = stack.mqtt.as_identity(proplet_tls("p-ok"))
    async with MqttSession(mqtt, f"ids-{uuid.uuid4().hex[:8]}") as s:
        for bad in ("p/x", "p+", "#", "a b", "svc:manager", "x" * 129):
            await s.publish(topics.proplet_create_for("p-ok"), PropletAnnounce(bad).to_json())
            await s.publish(topics.proplet_alive_for("p-ok"), PropletAnnounce(bad).to_json())
            result = TaskResult(task.id, bad, COMPLETED, results="forged")
            await s.publish(topics.proplet_results_for("p-ok"), result.to_json())
        # A good one after them: once it is listed, every message before it was handled.
        await s.publish(topics.proplet_create_for("p-ok"), PropletAnnounce("p-ok").to_json())
        await eventually(
            stack.proplets, lambda ps: any(p.id == "p-ok" for p in ps), what="p-ok registered"
        )
    assert [p.id for p in await stack.proplets()] == ["p-ok"]
    assert (await stack.task(task.id)).state == MP.TASK_STATE_SCHEDULED
