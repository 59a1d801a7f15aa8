"""Every List RPC pages (issue 10, item 5): more than a page stored, with maximum-length ids,
is listed through the pages with nothing missing or repeated, every page within a default
client's 4 MB message limit; requests without paging fields get the first page; bad paging
fields are INVALID_ARGUMENT naming the field; the CLI's client follows the pages."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from propeller.v1 import coordinator_pb2, datastore_pb2, manager_pb2, model_registry_pb2
from server.cli.client import Client
from server.config import MqttConfig
from server.ids import MAX_ID_LENGTH
from server.messages import PropletAnnounce
from server.mqtt import MqttSession
from server.paging import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from server.streams import model_stream
from server.tensors import tensor_to_proto
from tests.support.cluster import Cluster, cluster
from tests.support.security import operator_tls, proplet_tls
from tests.support.waits import eventually

CP, DS, MP, MR = coordinator_pb2, datastore_pb2, manager_pb2, model_registry_pb2
# What a gRPC client accepts by default (grpcurl too): every page must fit in it.
DEFAULT_CLIENT_LIMIT = 4 << 20
V0 = "fl/models/global_model_v0"


def long_id(prefix: str, i: int) -> str:
    """A maximum-length id, distinct per `i`."""
    head = f"{prefix}-{i:05d}-"
    return head + "x" * (MAX_ID_LENGTH - len(head))


@pytest.fixture
async def stack(mqtt: MqttConfig, tmp_path: Path) -> AsyncIterator[Cluster]:
    async with cluster(mqtt, tmp_path, stack={"alive_window_s": 3600.0}) as c:
        yield c


async def pages(
    method: Any, request: Any, entries: Callable[[Any], Any]
) -> tuple[list[Any], list[int]]:
    """Every entry through the pages, and how many entries each page held; each page checked
    to fit a default client."""
    got: list[Any] = []
    sizes: list[int] = []
    while True:
        response = await method(request, timeout=30)
        assert response.ByteSize() <= DEFAULT_CLIENT_LIMIT
        got += list(entries(response))
        sizes.append(len(entries(response)))
        if not response.next_page_token:
            return got, sizes
        request.page_token = response.next_page_token


async def test_rounds_with_maximum_ids_page_and_stay_small(stack: Cluster) -> None:
    # The red team's case: 70 rounds with huge ids made ListRounds fail for good. Now ids are
    # at most 64 characters, and a round of 2,000 such participants is ~130 KB: 70 of them
    # would be 9 MB in one answer.
    participants = [long_id("p", i) for i in range(2000)]
    rounds = [long_id("r", i) for i in range(70)]
    for i, rid in enumerate(rounds):
        await stack.coordinator.ConfigureRound(
            CP.ConfigureRoundRequest(
                round_id=rid,
                experiment_id="e-odd" if i % 2 else "e-even",
                participants=participants,
                model_ref=V0,
            ),
            timeout=30,
        )
    got, sizes = await pages(
        stack.coordinator.ListRounds, CP.ListRoundsRequest(), lambda r: r.rounds
    )
    assert [r.round_id for r in got] == rounds
    assert len(sizes) > 2 and all(s >= 1 for s in sizes)
    odd, _ = await pages(
        stack.coordinator.ListRounds,
        CP.ListRoundsRequest(experiment_id="e-odd", page_size=4),
        lambda r: r.rounds,
    )
    assert [r.round_id for r in odd] == rounds[1::2]
    # Without paging fields: the first page, as before.
    first = await stack.coordinator.ListRounds(CP.ListRoundsRequest(), timeout=30)
    assert [r.round_id for r in first.rounds] == rounds[: len(first.rounds)]
    assert first.next_page_token


async def test_proplets_announced_over_mqtt_page(stack: Cluster, plain_mqtt: MqttConfig) -> None:
    ids = [long_id("p", i) for i in range(DEFAULT_PAGE_SIZE + 50)]
    # Each on its own topic, through the broker's plaintext listener (no ACL): one announcer
    # stands in for 150 proplets, which over TLS would need 150 certificates.
    async with MqttSession(plain_mqtt, f"announcer-{uuid.uuid4().hex[:8]}") as s:
        for pid in ids:
            announce = PropletAnnounce(pid, name="n" * 4096, metadata={"k": "v" * 4096})
            await s.publish(stack.topics.proplet_create_for(pid), announce.to_json())
    await eventually(stack.proplets, lambda ps: len(ps) == len(ids), what="all registered")
    got, sizes = await pages(
        stack.manager.ListProplets, MP.ListPropletsRequest(), lambda r: r.proplets
    )
    assert [p.id for p in got] == ids
    assert sizes == [DEFAULT_PAGE_SIZE, 50]


async def test_tasks_page_by_creation_whatever_changes_between_pages(stack: Cluster) -> None:
    module = b"\0asm" + b"\0" * (1 << 20)  # 1 MiB inline modules: pages stop at the bytes
    made = []
    for i in range(130):
        big = i % 13 == 0
        task = await stack.manager.CreateTask(
            MP.CreateTaskRequest(
                name=f"fl-round-{long_id('r', i)}-{long_id('p', i)}",
                image_url="" if big else "x",
                file=module if big else b"",
            ),
            timeout=30,
        )
        made.append(task.id)
    # A page, then every listed task changes state: the next page goes on where it stopped.
    first = await stack.manager.ListTasks(MP.ListTasksRequest(page_size=60), timeout=30)
    for t in first.tasks:
        await stack.manager.StartTask(MP.TaskRef(task_id=t.id), timeout=30)
    rest, _ = await pages(
        stack.manager.ListTasks,
        MP.ListTasksRequest(page_size=60, page_token=first.next_page_token),
        lambda r: r.tasks,
    )
    assert [t.id for t in [*first.tasks, *rest]] == made
    pending, sizes = await pages(
        stack.manager.ListTasks,
        MP.ListTasksRequest(state=MP.TASK_STATE_PENDING, page_size=MAX_PAGE_SIZE),
        lambda r: r.tasks,
    )
    assert [t.id for t in pending] == made[len(first.tasks) :]
    assert len(sizes) > 1  # the inline modules did not fit one page of 4 MB


async def test_experiments_page(stack: Cluster, trainer_wasm: Path) -> None:
    async with MqttSession(stack.mqtt.as_identity(proplet_tls("p1")), "p1") as s:
        await s.publish(stack.topics.proplet_create_for("p1"), PropletAnnounce("p1").to_json())
    await stack.wait_alive(["p1"])
    rounds = [f"r{i}" for i in range(45)]
    for rid in rounds:
        # A module the manager can read: it pins its digest (nothing runs it here).
        await stack.start_experiment(rid, ["p1"], f"file://{trainer_wasm}", model_ref=V0)
    got, sizes = await pages(
        stack.manager.ListExperiments,
        MP.ListExperimentsRequest(page_size=20),
        lambda r: r.experiments,
    )
    assert [e.config.round_id for e in got] == rounds and sizes == [20, 20, 5]


async def test_models_and_datasets_page(stack: Cluster) -> None:
    for i in range(1, 31):
        await stack.registry.PutModel(model_stream({"w": np.full(3, i * 1.0)}, 0), timeout=30)
    got, sizes = await pages(
        stack.registry.ListModels, MR.ListModelsRequest(page_size=7), lambda r: r.models
    )
    assert [m.version for m in got] == list(range(31)) and sizes == [7, 7, 7, 7, 3]

    async def put(pid: str) -> None:
        dataset = DS.Dataset(
            proplet_id=pid,
            features=tensor_to_proto(np.zeros((1, 2))),
            labels=tensor_to_proto(np.zeros(1)),
        )
        await stack.datastore.PutDataset(DS.PutDatasetRequest(dataset=dataset), timeout=30)

    ids = sorted(f"d{i:03d}" for i in range(0, 60, 2))
    for pid in ids:
        await put(pid)
    first = await stack.datastore.ListDatasets(DS.ListDatasetsRequest(page_size=10), timeout=30)
    # One before the cursor (not listed again) and one after it (listed) arrive meanwhile.
    await put("d001")
    await put("d041")
    rest, _ = await pages(
        stack.datastore.ListDatasets,
        DS.ListDatasetsRequest(page_size=10, page_token=first.next_page_token),
        lambda r: r.datasets,
    )
    listed = [d.proplet_id for d in [*first.datasets, *rest]]
    assert listed == sorted([*ids, "d041"])


LISTS: list[tuple[str, str, Any]] = [
    ("coordinator", "ListRounds", CP.ListRoundsRequest),
    ("manager", "ListProplets", MP.ListPropletsRequest),
    ("manager", "ListTasks", MP.ListTasksRequest),
    ("manager", "ListExperiments", MP.ListExperimentsRequest),
    ("registry", "ListModels", MR.ListModelsRequest),
    ("datastore", "ListDatasets", DS.ListDatasetsRequest),
]


@pytest.mark.parametrize(("service", "method", "message"), LISTS, ids=[x[1] for x in LISTS])
async def test_bad_paging_fields_are_invalid_argument(
    stack: Cluster, service: str, method: str, message: Any
) -> None:
    call = getattr(getattr(stack, service), method)
    bad: list[tuple[dict[str, Any], str]] = [
        ({"page_token": "not-a-token"}, "page_token"),
        ({"page_size": -1}, "page_size"),
    ]
    for fields, field in bad:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await call(message(**fields), timeout=30)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (exc.value.details() or "").startswith(f"{field}: ")


async def test_a_token_of_another_list_is_refused(stack: Cluster) -> None:
    for i in range(3):
        await stack.coordinator.ConfigureRound(
            CP.ConfigureRoundRequest(round_id=f"r{i}", participants=["a"], model_ref=V0),
            timeout=30,
        )
    token = (
        await stack.coordinator.ListRounds(CP.ListRoundsRequest(page_size=1), timeout=30)
    ).next_page_token
    assert token
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await stack.manager.ListTasks(MP.ListTasksRequest(page_token=token), timeout=30)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (exc.value.details() or "").startswith("page_token: ")


async def test_the_cli_client_lists_everything(stack: Cluster) -> None:
    made = []
    for i in range(DEFAULT_PAGE_SIZE * 2 + 5):
        task = await stack.manager.CreateTask(
            MP.CreateTaskRequest(name=f"t-{i}", image_url="x"), timeout=30
        )
        made.append(task.id)
    async with Client(stack.endpoints, tls=operator_tls()) as client:
        listed = await client.list_tasks()
        assert [t.id for t in listed.tasks] == made
        assert listed.next_page_token == ""
        assert [m.version for m in (await client.list_models()).models] == [0]
