"""A domain value into its gRPC message by field name (`server.wire.message_from`), and the
translations built on it: every field the two share arrives, what the call writes out wins,
and a field the message does not have stays behind."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from propeller.v1 import coordinator_pb2, datastore_pb2, manager_pb2
from server.coordinator.rounds import ParticipantFailure, Round, RoundState
from server.coordinator.wire import spec_from_proto, status_from_proto, status_to_proto
from server.datastore.service import dataset_info_proto
from server.datastore.store import DatasetSummary
from server.manager.service import task_to_proto
from server.manager.tasks import Task, TaskState
from server.round_spec import Hyperparams, RoundSpec
from server.streams import UpdateMeta, update_header
from server.tensors import Spec
from server.wire import message_from, value_from


@dataclass(frozen=True)
class Summary:
    proplet_id: str
    size: int
    # Not a DatasetInfo field: never copied.
    secret: str = "kept here"


def test_shared_fields_are_copied_and_the_call_wins() -> None:
    info = message_from(datastore_pb2.DatasetInfo, Summary("p1", 7), schema="iris")
    assert info.proplet_id == "p1"
    assert info.size == 7
    assert info.schema == "iris"
    assert not hasattr(info, "secret")
    overridden = message_from(datastore_pb2.DatasetInfo, Summary("p1", 7), size=9)
    assert overridden.size == 9


def test_a_dataset_summary_arrives_whole() -> None:
    info = dataset_info_proto(DatasetSummary("p1", "iris", 150, 4, 3))
    assert (info.proplet_id, info.schema, info.size, info.num_features, info.num_classes) == (
        "p1",
        "iris",
        150,
        4,
        3,
    )


def test_an_update_header_carries_every_field_of_its_meta() -> None:
    meta = UpdateMeta(
        "r1",
        "p1",
        "registry://models/v1",
        12,
        {"loss": 0.5},
        base_model_sha256="ab" * 32,
        module_digest="sha256:" + "cd" * 32,
        signature=b"sig",
        contributors=("p1", "p2"),
    )
    header = update_header(meta, [Spec("w", np.dtype(np.float64), (2, 3))])
    assert header.round_id == "r1"
    assert header.proplet_id == "p1"
    assert header.base_model_uri == "registry://models/v1"
    assert header.num_samples == 12
    assert dict(header.metrics) == {"loss": 0.5}
    assert header.base_model_sha256 == "ab" * 32
    assert header.module_digest == "sha256:" + "cd" * 32
    assert header.signature == b"sig"
    assert list(header.contributors) == ["p1", "p2"]
    assert [t.name for t in header.tensors] == ["w"]
    assert header.total_bytes == 2 * 3 * 8


def test_a_task_carries_its_spec_outcome_and_times_but_not_its_bookkeeping() -> None:
    task = Task(
        id="t1",
        name="train",
        image_url="localhost:5000/fl:v1",
        env={"K": "V"},
        cli_args=["--x"],
        proplet_id="p1",
        state=TaskState.RUNNING,
        results='{"ok": 1}',
        error="",
        created_at=1.0,
        updated_at=2.0,
        started_at=3.0,
        finished_at=4.0,
        reported_by="p1",
        attempt=2,
    )
    msg = task_to_proto(task)
    assert (msg.id, msg.name, msg.image_url, msg.proplet_id) == (
        "t1",
        "train",
        "localhost:5000/fl:v1",
        "p1",
    )
    assert dict(msg.env) == {"K": "V"}
    assert list(msg.cli_args) == ["--x"]
    assert msg.state == manager_pb2.TASK_STATE_RUNNING
    assert msg.results == '{"ok": 1}'
    assert (msg.created_at, msg.updated_at, msg.started_at, msg.finished_at) == (1, 2, 3, 4)
    assert "attempt" not in manager_pb2.Task.DESCRIPTOR.fields_by_name


def test_a_message_into_a_value_takes_what_the_value_has() -> None:
    msg = datastore_pb2.DatasetInfo(proplet_id="p1", schema="iris", size=7, num_features=4)
    summary = value_from(DatasetSummary, msg, num_classes=5)
    assert summary == DatasetSummary("p1", "iris", 7, 4, 5)
    assert value_from(Summary, msg) == Summary("p1", 7)  # `secret`: its own default


def test_a_round_status_round_trips_every_field_it_carries() -> None:
    rnd = Round(
        round_id="r1",
        experiment_id="e1",
        participants=("p1", "p2", "p3"),
        k_of_n=2,
        timeout_s=30.0,
        model_ref="fl/models/global_model_v1",
        specs=(),
        hyperparams=Hyperparams(epochs=2, lr=0.5, batch_size=8, extra_json='{"mu":0.1}'),
        task_wasm_image="localhost:5000/fl:v1",
        state=RoundState.COMPLETED,
        started_at=1.0,
        deadline=31.0,
        completed_at=5.0,
        reported=("p1", "p2"),
        metrics={"loss": 0.25},
        new_model_version=2,
        new_model_uri="fl/models/global_model_v2",
        failure_reason="",
        closed_by="k_of_n",
        min_k_of_n=1,
        failed=(ParticipantFailure("p3", "task failed"),),
        module_digest="sha256:" + "ab" * 32,
        base_model_sha256="cd" * 32,
        strategy_name="fedadam",
        strategy_params_json='{"eta":0.1}',
    )
    status = status_to_proto(rnd)
    assert status.state == coordinator_pb2.ROUND_STATE_COMPLETED
    assert status.completed
    assert status.num_updates == 2
    assert status_from_proto(status) == rnd


def test_a_spec_reads_the_same_from_either_request() -> None:
    fields: dict[str, Any] = {
        "round_id": "r1",
        "experiment_id": "e1",
        "participants": ["p1", "p2"],
        "k_of_n": 2,
        "timeout_s": 30.0,
        "model_ref": "fl/models/global_model_v0",
        "hyperparams": coordinator_pb2.Hyperparams(epochs=3, lr=0.1, batch_size=4),
        "task_wasm_image": "localhost:5000/fl:v1",
        "min_k_of_n": 1,
        "module_digest": "sha256:" + "ab" * 32,
        "strategy_name": "fedavgm",
        "strategy_params_json": '{"server_momentum":0.9}',
    }
    want = RoundSpec(
        round_id="r1",
        participants=("p1", "p2"),
        experiment_id="e1",
        k_of_n=2,
        timeout_s=30.0,
        model_ref="fl/models/global_model_v0",
        hyperparams=Hyperparams(epochs=3, lr=0.1, batch_size=4),
        task_wasm_image="localhost:5000/fl:v1",
        min_k_of_n=1,
        module_digest="sha256:" + "ab" * 32,
        strategy_name="fedavgm",
        strategy_params_json='{"server_momentum":0.9}',
    )
    assert spec_from_proto(coordinator_pb2.ConfigureRoundRequest(**fields)) == want
    assert spec_from_proto(manager_pb2.StartExperimentRequest(**fields)) == want
