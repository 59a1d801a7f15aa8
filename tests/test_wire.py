"""A domain value into its gRPC message by field name (`server.wire.message_from`), and the
translations built on it: every field the two share arrives, what the call writes out wins,
and a field the message does not have stays behind."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from propeller.v1 import datastore_pb2, manager_pb2
from server.datastore.service import dataset_info_proto
from server.datastore.store import DatasetSummary
from server.manager.service import task_to_proto
from server.manager.tasks import Task, TaskState
from server.streams import UpdateMeta, update_header
from server.tensors import Spec
from server.wire import message_from


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
