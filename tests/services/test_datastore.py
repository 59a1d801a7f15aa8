"""DataStore through a real grpc.aio server and the generated stubs, plus the synthetic data."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from propeller.v1 import datastore_pb2, datastore_pb2_grpc, tensor_pb2
from server.datastore.app import DataStoreApp, DataStoreConfig
from server.datastore.datasets import CLASSES_SCHEMA, synthetic_dataset, true_model
from server.tensors import Array, tensor_from_proto, tensor_to_proto
from tests.services.harness import RPC_TIMEOUT, served
from tests.support.security import service_tls

Stub = Any  # generated gRPC stubs carry no type information

SEED_IDS = ("proplet-a", "0d3c9a4e-5b1f-4f8e-9f53-2b3f6c1e7a10", "proplet-c")


@asynccontextmanager
async def datastore(*seed_ids: str, **kw: Any) -> AsyncIterator[Stub]:
    config = DataStoreConfig(
        addr="127.0.0.1:0", seed_proplet_ids=seed_ids, tls=service_tls("datastore"), **kw
    )
    async with DataStoreApp(config) as app, served(app.bindings) as ch:
        yield datastore_pb2_grpc.DataStoreStub(ch)


@pytest.fixture
async def stub() -> AsyncIterator[Stub]:
    async with datastore(*SEED_IDS) as s:
        yield s


async def get_dataset(stub: Stub, proplet_id: str) -> datastore_pb2.Dataset:
    reply: datastore_pb2.Dataset = await stub.GetDataset(
        datastore_pb2.GetDatasetRequest(proplet_id=proplet_id), timeout=RPC_TIMEOUT
    )
    return reply


def arrays(dataset: datastore_pb2.Dataset) -> tuple[Array, Array]:
    return (
        tensor_from_proto(dataset.features, "features"),
        tensor_from_proto(dataset.labels, "labels"),
    )


async def list_ids(stub: Stub) -> list[str]:
    reply = await stub.ListDatasets(datastore_pb2.ListDatasetsRequest(), timeout=RPC_TIMEOUT)
    return [d.proplet_id for d in reply.datasets]


# --- seeding ---------------------------------------------------------------------------


async def test_seeded_datasets_have_the_default_shape(stub: Stub) -> None:
    assert await list_ids(stub) == sorted(SEED_IDS)
    for proplet_id in SEED_IDS:
        dataset = await get_dataset(stub, proplet_id)
        assert dataset.proplet_id == proplet_id
        assert dataset.schema == "fl-demo-dataset-v1"
        assert dataset.features.dtype == tensor_pb2.DTYPE_FLOAT64
        assert dataset.labels.dtype == tensor_pb2.DTYPE_FLOAT64
        features, labels = arrays(dataset)
        assert features.shape == (64, 3)
        assert labels.shape == (64,)
        assert set(np.unique(labels)) <= {0.0, 1.0}
    reply = await stub.ListDatasets(datastore_pb2.ListDatasetsRequest(), timeout=RPC_TIMEOUT)
    assert {(d.size, d.num_features, d.schema) for d in reply.datasets} == {
        (64, 3, "fl-demo-dataset-v1")
    }


async def test_seeding_is_deterministic_per_id_across_instances() -> None:
    async with datastore(*SEED_IDS) as first, datastore(*reversed(SEED_IDS)) as second:
        for proplet_id in SEED_IDS:
            a = await get_dataset(first, proplet_id)
            b = await get_dataset(second, proplet_id)
            assert a.features.data == b.features.data
            assert a.labels.data == b.labels.data
        a0, a1 = (await get_dataset(first, SEED_IDS[0])), (await get_dataset(first, SEED_IDS[1]))
        assert a0.features.data != a1.features.data


async def test_seed_size_is_configurable() -> None:
    async with datastore("p1", num_samples=10, num_features=5) as stub:
        features, labels = arrays(await get_dataset(stub, "p1"))
        assert features.shape == (10, 5)
        assert labels.shape == (10,)
        assert np.array_equal(features, synthetic_dataset("p1", 10, 5)[0])


def test_labels_are_only_zero_or_one_for_any_id() -> None:
    # The original's hash wrapped and a negative modulo gave labels of -1 for ~half of all
    # UUIDs; every id here must yield 0/1 labels and finite features.
    both_classes = 0
    for _ in range(200):
        features, labels = synthetic_dataset(str(uuid.uuid4()))
        assert features.shape == (64, 3)
        assert features.dtype == labels.dtype == np.float64
        assert np.isfinite(features).all()
        assert set(np.unique(labels)) <= {0.0, 1.0}
        both_classes += int(len(np.unique(labels)) == 2)
    # About 98% of proplets see both classes; a far lower count would mean broken labels.
    assert both_classes > 150


def test_synthetic_data_is_learnable_and_not_identically_distributed() -> None:
    """One logistic model explains every proplet's labels, so training on the pooled data
    beats guessing the majority class; the proplets' feature means differ (non-IID)."""
    ids = [f"edge-{i}" for i in range(10)]
    data = [synthetic_dataset(i) for i in ids]
    x = np.vstack([f for f, _ in data])
    y = np.concatenate([labels for _, labels in data])
    w, b = true_model(3)
    accuracy = float(((x @ w + b > 0) == (y == 1.0)).mean())
    majority = max(float(y.mean()), 1.0 - float(y.mean()))
    assert accuracy > majority + 0.1
    means = np.array([f.mean(axis=0) for f, _ in data])
    assert means.std(axis=0).min() > 0.3


# --- GetDataset ------------------------------------------------------------------------


async def test_get_unknown_id_is_not_found(stub: Stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        await get_dataset(stub, "nobody")
    assert excinfo.value.code() == grpc.StatusCode.NOT_FOUND
    assert "proplet_id" in (excinfo.value.details() or "")
    assert "nobody" in (excinfo.value.details() or "")


async def test_get_empty_id_is_invalid_argument(stub: Stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        await get_dataset(stub, "")
    assert excinfo.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "proplet_id" in (excinfo.value.details() or "")


# --- PutDataset ------------------------------------------------------------------------


def dataset(
    proplet_id: str = "new-proplet",
    features: Array | None = None,
    labels: Array | None = None,
    schema: str = "",
) -> datastore_pb2.Dataset:
    features = np.arange(12, dtype=np.float64).reshape(4, 3) if features is None else features
    labels = np.array([0.0, 1.0, 1.0, 0.0]) if labels is None else labels
    return datastore_pb2.Dataset(
        proplet_id=proplet_id,
        schema=schema,
        features=tensor_to_proto(features),
        labels=tensor_to_proto(labels),
    )


async def put_dataset(stub: Stub, msg: datastore_pb2.Dataset) -> datastore_pb2.DatasetInfo:
    reply: datastore_pb2.DatasetInfo = await stub.PutDataset(
        datastore_pb2.PutDatasetRequest(dataset=msg), timeout=RPC_TIMEOUT
    )
    return reply


async def test_put_get_list_round_trip(stub: Stub) -> None:
    features = np.random.default_rng(1).normal(size=(5, 2)).astype(np.float32)
    labels = np.array([1, 0, 0, 1, 1], dtype=np.float32)
    info = await put_dataset(stub, dataset("zz-new", features, labels))
    assert (info.proplet_id, info.schema, info.size, info.num_features) == (
        "zz-new",
        "fl-demo-dataset-v1",
        5,
        2,
    )
    got = await get_dataset(stub, "zz-new")
    got_features, got_labels = arrays(got)
    assert got_features.dtype == np.float32
    assert np.array_equal(got_features, features)
    assert np.array_equal(got_labels, labels)
    assert await list_ids(stub) == sorted([*SEED_IDS, "zz-new"])


async def test_put_replaces_the_existing_dataset(stub: Stub) -> None:
    await put_dataset(stub, dataset(SEED_IDS[0], schema="my-schema"))
    got = await get_dataset(stub, SEED_IDS[0])
    assert got.schema == "my-schema"
    assert arrays(got)[0].shape == (4, 3)
    assert await list_ids(stub) == sorted(SEED_IDS)


def _set(field: str, value: Any) -> Callable[[datastore_pb2.Dataset], None]:
    def mutate(msg: datastore_pb2.Dataset) -> None:
        setattr(msg, field, value)

    return mutate


def _features(arr: Array) -> Callable[[datastore_pb2.Dataset], None]:
    return lambda msg: msg.features.CopyFrom(tensor_to_proto(arr))


def _labels(arr: Array) -> Callable[[datastore_pb2.Dataset], None]:
    return lambda msg: msg.labels.CopyFrom(tensor_to_proto(arr))


def _clear(field: str) -> Callable[[datastore_pb2.Dataset], None]:
    return lambda msg: msg.ClearField(field)


def _features_dtype_unset(msg: datastore_pb2.Dataset) -> None:
    msg.features.dtype = tensor_pb2.DTYPE_UNSPECIFIED


def _features_short_bytes(msg: datastore_pb2.Dataset) -> None:
    msg.features.data = msg.features.data[:-8]


BAD_PUTS: list[tuple[str, Callable[[datastore_pb2.Dataset], None], str]] = [
    ("empty proplet_id", _set("proplet_id", ""), "dataset.proplet_id"),
    ("features missing", _clear("features"), "dataset.features"),
    ("labels missing", _clear("labels"), "dataset.labels"),
    ("features 1-D", _features(np.zeros(4)), "dataset.features.shape"),
    ("features 3-D", _features(np.zeros((4, 3, 1))), "dataset.features.shape"),
    ("no samples", _features(np.zeros((0, 3))), "dataset.features.shape"),
    ("no features", _features(np.zeros((4, 0))), "dataset.features.shape"),
    ("features NaN", _features(np.array([[1.0, np.nan]] * 4)), "dataset.features"),
    ("features Inf", _features(np.array([[1.0, np.inf]] * 4)), "dataset.features"),
    ("features dtype unset", _features_dtype_unset, "dataset.features.dtype"),
    ("features bytes short", _features_short_bytes, "dataset.features"),
    ("labels too few", _labels(np.array([0.0, 1.0, 1.0])), "dataset.labels.shape"),
    ("labels 2-D", _labels(np.zeros((4, 1))), "dataset.labels.shape"),
    ("label 0.5", _labels(np.array([0.0, 0.5, 1.0, 0.0])), "dataset.labels"),
    ("label -1", _labels(np.array([0.0, -1.0, 1.0, 0.0])), "dataset.labels"),
    ("label 2", _labels(np.array([2.0, 1.0, 1.0, 0.0])), "dataset.labels"),
    ("label NaN", _labels(np.array([0.0, np.nan, 1.0, 0.0])), "dataset.labels"),
]


@pytest.mark.parametrize(
    ("mutate", "field"), [(m, f) for _, m, f in BAD_PUTS], ids=[n for n, _, _ in BAD_PUTS]
)
async def test_a_bad_put_is_invalid_argument_and_changes_nothing(
    stub: Stub, mutate: Callable[[datastore_pb2.Dataset], None], field: str
) -> None:
    target = SEED_IDS[1]
    before = await get_dataset(stub, target)
    msg = dataset(target)
    mutate(msg)
    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        await put_dataset(stub, msg)
    assert excinfo.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (excinfo.value.details() or ""), excinfo.value.details()
    assert await get_dataset(stub, target) == before
    assert await list_ids(stub) == sorted(SEED_IDS)


async def test_put_without_a_dataset_is_invalid_argument(stub: Stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        await stub.PutDataset(datastore_pb2.PutDatasetRequest(), timeout=RPC_TIMEOUT)
    assert excinfo.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "dataset" in (excinfo.value.details() or "")


# --- configuration ---------------------------------------------------------------------


# --- train/test split (issue 11) ---------------------------------------------------------


async def get_split(stub: Stub, proplet_id: str, split: str) -> datastore_pb2.Dataset:
    reply: datastore_pb2.Dataset = await stub.GetDataset(
        datastore_pb2.GetDatasetRequest(proplet_id=proplet_id, split=split), timeout=RPC_TIMEOUT
    )
    return reply


async def get_info(stub: Stub, proplet_id: str, split: str) -> datastore_pb2.DatasetInfo:
    reply: datastore_pb2.DatasetInfo = await stub.GetDatasetInfo(
        datastore_pb2.GetDatasetRequest(proplet_id=proplet_id, split=split), timeout=RPC_TIMEOUT
    )
    return reply


def documented_split(proplet_id: str, size: int) -> tuple[list[int], list[int]]:
    """docs/architecture.md's rule, written out: a permutation seeded by sha256("split:" + id),
    its last size // 5 entries held out, each part in data order."""
    digest = hashlib.sha256(f"split:{proplet_id}".encode()).digest()
    order = [int(i) for i in np.random.default_rng(int.from_bytes(digest, "big")).permutation(size)]
    cut = size - size // 5
    return sorted(order[:cut]), sorted(order[cut:])


async def test_all_and_empty_split_are_the_whole_dataset(stub: Stub) -> None:
    whole = await get_dataset(stub, SEED_IDS[0])
    for split in ("", "all"):
        assert await get_split(stub, SEED_IDS[0], split) == whole
        assert (await get_info(stub, SEED_IDS[0], split)).size == 64


@pytest.mark.parametrize("proplet_id", SEED_IDS)
async def test_train_and_test_are_the_documented_seeded_split(stub: Stub, proplet_id: str) -> None:
    features, labels = arrays(await get_dataset(stub, proplet_id))
    train_idx, test_idx = documented_split(proplet_id, 64)
    assert (len(train_idx), len(test_idx)) == (52, 12)
    for split, idx in (("train", train_idx), ("test", test_idx)):
        part = await get_split(stub, proplet_id, split)
        f, y = arrays(part)
        assert np.array_equal(f, features[idx]) and np.array_equal(y, labels[idx])
        assert (part.proplet_id, part.schema) == (proplet_id, "fl-demo-dataset-v1")
        info = await get_info(stub, proplet_id, split)
        assert (info.size, info.num_features) == (len(idx), 3)
    # Disjoint, together the whole, and not simply the first and last rows.
    assert sorted(train_idx + test_idx) == list(range(64))
    assert test_idx != list(range(52, 64))


async def test_the_split_is_the_same_in_every_process_and_for_uploaded_data() -> None:
    async with datastore(SEED_IDS[0]) as first:
        test_a = await get_split(first, SEED_IDS[0], "test")
    async with datastore(SEED_IDS[0]) as second:
        assert await get_split(second, SEED_IDS[0], "test") == test_a
        # An uploaded dataset splits by the same rule: its own rows at the same positions.
        features = np.arange(30 * 2, dtype=np.float64).reshape(30, 2)
        labels = (np.arange(30) % 2).astype(np.float64)
        await put_dataset(second, dataset("up-1", features, labels))
        _, test_idx = documented_split("up-1", 30)
        got, got_labels = arrays(await get_split(second, "up-1", "test"))
        assert np.array_equal(got, features[test_idx])
        assert np.array_equal(got_labels, labels[test_idx])
        assert len(test_idx) == 6
        assert (await get_info(second, "up-1", "train")).size == 24


async def test_a_bad_split_is_invalid_argument(stub: Stub) -> None:
    for call in (stub.GetDataset, stub.GetDatasetInfo):
        with pytest.raises(grpc.aio.AioRpcError) as excinfo:
            await call(
                datastore_pb2.GetDatasetRequest(proplet_id=SEED_IDS[0], split="validation"),
                timeout=RPC_TIMEOUT,
            )
        assert excinfo.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (excinfo.value.details() or "").startswith("split:")


async def test_a_dataset_too_small_for_a_test_part_says_so(stub: Stub) -> None:
    await put_dataset(stub, dataset("tiny"))  # 4 samples: 4 // 5 = 0 held out
    train, _ = arrays(await get_split(stub, "tiny", "train"))
    assert train.shape == (4, 3)
    for call in (stub.GetDataset, stub.GetDatasetInfo):
        with pytest.raises(grpc.aio.AioRpcError) as excinfo:
            await call(
                datastore_pb2.GetDatasetRequest(proplet_id="tiny", split="test"),
                timeout=RPC_TIMEOUT,
            )
        assert excinfo.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert (excinfo.value.details() or "").startswith("split:")


def test_config_from_env() -> None:
    assert DataStoreConfig.from_env({"PROPELLER_INSECURE": "1"}) == DataStoreConfig(tls=None)
    assert DataStoreConfig.from_env(
        {
            "PROPELLER_INSECURE": "1",
            "PROPELLER_DATASTORE_LISTEN": "0.0.0.0:9083",
            "PROPELLER_DATASTORE_SEED_IDS": " a, b ,,a",
            "PROPELLER_DATASTORE_SAMPLES": "32",
            "PROPELLER_DATASTORE_FEATURES": "4",
        }
    ) == DataStoreConfig("0.0.0.0:9083", ("a", "b"), 32, 4, tls=None)
    assert DataStoreConfig.from_env(
        {"PROPELLER_INSECURE": "1", "PROPLET_IDS": "x,y"}
    ).seed_proplet_ids == ("x", "y")
    with pytest.raises(ValueError, match="num_samples"):
        DataStoreConfig(num_samples=0, tls=None)


# --- k classes (issue 12) ------------------------------------------------------------------


def classes_dataset(
    proplet_id: str = "digits-part", num_classes: int = 10, labels: Array | None = None
) -> datastore_pb2.Dataset:
    size = 25
    msg = dataset(
        proplet_id,
        np.random.default_rng(5).random((size, 4)),
        np.arange(size, dtype=np.float64) % 10 if labels is None else labels,
        schema=CLASSES_SCHEMA,
    )
    msg.num_classes = num_classes
    return msg


async def test_a_k_class_dataset_round_trips_with_its_class_count(stub: Stub) -> None:
    # Only classes 0..4 present: k is what the dataset says, not what its labels show.
    labels = np.arange(25, dtype=np.float64) % 5
    sent = classes_dataset("part-1", 10, labels)
    info = await put_dataset(stub, sent)
    assert (info.schema, info.size, info.num_features, info.num_classes) == (
        CLASSES_SCHEMA,
        25,
        4,
        10,
    )
    assert await get_dataset(stub, "part-1") == sent
    listed = await stub.ListDatasets(datastore_pb2.ListDatasetsRequest(), timeout=RPC_TIMEOUT)
    assert {d.proplet_id: d.num_classes for d in listed.datasets}["part-1"] == 10
    # The per-proplet held-out split works on a k-class part as on any dataset.
    _, test_idx = documented_split("part-1", 25)
    test = await get_split(stub, "part-1", "test")
    assert (test.schema, test.num_classes) == (CLASSES_SCHEMA, 10)
    np.testing.assert_array_equal(arrays(test)[1], labels[test_idx])
    info = await get_info(stub, "part-1", "train")
    assert (info.size, info.num_classes) == (20, 10)


async def test_binary_datasets_have_two_classes(stub: Stub) -> None:
    assert (await get_dataset(stub, SEED_IDS[0])).num_classes == 2
    # A client that predates num_classes sends 0: the binary schema's 2 classes.
    assert (await put_dataset(stub, dataset("bin"))).num_classes == 2
    assert (await get_dataset(stub, "bin")).num_classes == 2


BAD_CLASSES: list[tuple[str, datastore_pb2.Dataset, str]] = [
    ("label k", classes_dataset(labels=np.full(25, 10.0)), "dataset.labels: must be integers 0..9"),
    ("label -1", classes_dataset(labels=np.full(25, -1.0)), "labels[0] is -1.0"),
    ("label 2.5", classes_dataset(labels=np.full(25, 2.5)), "labels[0] is 2.5"),
    ("label NaN", classes_dataset(labels=np.full(25, np.nan)), "dataset.labels"),
    ("no class count", classes_dataset(num_classes=0), "dataset.num_classes: must be 2..1000"),
    ("one class", classes_dataset(num_classes=1), "dataset.num_classes: must be 2..1000"),
    ("too many", classes_dataset(num_classes=1001), "dataset.num_classes: must be 2..1000"),
]


@pytest.mark.parametrize(
    ("msg", "needle"), [(m, n) for _, m, n in BAD_CLASSES], ids=[n for n, _, _ in BAD_CLASSES]
)
async def test_a_bad_k_class_put_is_invalid_argument(
    stub: Stub, msg: datastore_pb2.Dataset, needle: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        await put_dataset(stub, msg)
    assert excinfo.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in (excinfo.value.details() or ""), excinfo.value.details()
    assert await list_ids(stub) == sorted(SEED_IDS)


async def test_a_binary_dataset_cannot_claim_k_classes(stub: Stub) -> None:
    msg = dataset("bin")
    msg.num_classes = 10
    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        await put_dataset(stub, msg)
    assert excinfo.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (excinfo.value.details() or "").startswith(
        "dataset.num_classes: schema 'fl-demo-dataset-v1' has 2 classes"
    )


# --- many sizes at once (the coordinator's num_samples caps) ----------------------------


async def infos(stub: Stub, ids: list[str]) -> dict[str, int]:
    reply = await stub.GetDatasetInfos(
        datastore_pb2.GetDatasetInfosRequest(proplet_ids=ids), timeout=RPC_TIMEOUT
    )
    named = [d.proplet_id for d in reply.datasets]
    assert len(named) == len(set(named))
    return {d.proplet_id: d.size for d in reply.datasets}


@pytest.mark.parametrize("persistent", [False, True], ids=["memory", "sqlite"])
async def test_many_sizes_at_once_are_each_one_as_get_dataset_info_gives_it(
    persistent: bool, tmp_path: Path
) -> None:
    async with datastore(*SEED_IDS, state_dir=tmp_path if persistent else None) as stub:
        await put_dataset(stub, dataset("tiny"))
        asked = [*SEED_IDS, "tiny", SEED_IDS[0], "nobody", *(f"x{i}" for i in range(900))]
        one_by_one = {p: (await get_info(stub, p, "")).size for p in (*SEED_IDS, "tiny")}
        assert await infos(stub, asked) == one_by_one


@pytest.mark.parametrize(
    ("ids", "field"),
    [
        ([], "proplet_ids"),
        ([f"p{i}" for i in range(1001)], "proplet_ids"),
        (["ok", "no/slash"], "proplet_ids[1]"),
    ],
    ids=["none", "1001", "bad-id"],
)
async def test_many_sizes_refuses_what_is_not_a_list_of_ids(
    stub: Stub, ids: list[str], field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        await infos(stub, ids)
    assert excinfo.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (excinfo.value.details() or "").startswith(f"{field}:")
