"""The data store's SQLite state (`datastore.sqlite`): datasets survive a restart bit for bit;
seeding at start-up only fills the seed ids without a dataset; an import replaces. The crash
test with a real process is test_datastore_crash.py."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from propeller.v1 import datastore_pb2, datastore_pb2_grpc
from server.datastore.app import DataStoreApp, DataStoreConfig
from server.datastore.datasets import CLASSES_SCHEMA, Dataset, synthetic_dataset
from server.datastore.store import (
    DATASTORE_DB_FILE,
    DatasetSummary,
    InMemoryDatasetStore,
    SqliteDatasetStore,
)
from server.tensors import tensor_from_proto, tensor_to_proto
from tests.services.harness import RPC_TIMEOUT, served
from tests.support.security import service_tls

Stub = Any  # generated gRPC stubs carry no type information


@asynccontextmanager
async def datastore(state_dir: Path | None, *seed_ids: str) -> AsyncIterator[Stub]:
    config = DataStoreConfig(
        addr="127.0.0.1:0",
        seed_proplet_ids=seed_ids,
        num_samples=8,
        state_dir=state_dir,
        tls=service_tls("datastore"),
    )
    async with DataStoreApp(config) as app, served(app.bindings) as ch:
        yield datastore_pb2_grpc.DataStoreStub(ch)


def dataset(proplet_id: str, n: int, d: int, dtype: str = "<f8") -> Dataset:
    rng = np.random.default_rng(n * 100 + d)
    return Dataset(
        proplet_id,
        rng.normal(size=(n, d)).astype(dtype),
        (rng.random(n) < 0.5).astype(dtype),
        schema="imported-v1",
    )


def same(a: Dataset | None, b: Dataset) -> bool:
    assert a is not None
    return (
        a.proplet_id == b.proplet_id
        and a.schema == b.schema
        and a.features.dtype == b.features.dtype
        and np.array_equal(a.features, b.features)
        and a.labels.dtype == b.labels.dtype
        and np.array_equal(a.labels, b.labels)
    )


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_both_stores_behave_alike(kind: str, tmp_path: Path) -> None:
    store: InMemoryDatasetStore | SqliteDatasetStore = InMemoryDatasetStore()
    if kind == "sqlite":
        store = SqliteDatasetStore(tmp_path / DATASTORE_DB_FILE)
        await store.open()
    try:
        b, a = dataset("b", 5, 2), dataset("a", 3, 4, "<f4")
        assert await store.put(b) and await store.put(a)
        assert await store.list() == [
            DatasetSummary("a", "imported-v1", 3, 4),
            DatasetSummary("b", "imported-v1", 5, 2),
        ]
        assert same(await store.get("a"), a)
        replacement = dataset("a", 7, 1)
        assert not await store.put(replacement, replace=False)  # kept
        assert same(await store.get("a"), a)
        assert await store.put(replacement)  # replaced
        assert same(await store.get("a"), replacement)
        assert await store.get("c") is None
        # Many summaries at once (GetDatasetInfos): those that exist, each once.
        many = await store.summaries(["b", "c", "a", "b", *(f"x{i}" for i in range(1200))])
        assert sorted(many, key=lambda d: d.proplet_id) == [
            DatasetSummary("a", "imported-v1", 7, 1),
            DatasetSummary("b", "imported-v1", 5, 2),
        ]
        assert await store.summaries([]) == []
        got = await store.get("b")
        assert got is not None and not got.features.flags.writeable
    finally:
        if isinstance(store, SqliteDatasetStore):
            await store.close()


async def test_datasets_survive_a_restart_and_seeding_keeps_them(tmp_path: Path) -> None:
    imported = dataset("seed-a", 20, 3)
    async with datastore(tmp_path, "seed-a", "seed-b") as stub:
        seeded_b = await stub.GetDataset(
            datastore_pb2.GetDatasetRequest(proplet_id="seed-b"), timeout=RPC_TIMEOUT
        )
        await stub.PutDataset(
            datastore_pb2.PutDatasetRequest(
                dataset=datastore_pb2.Dataset(
                    proplet_id="seed-a",
                    schema=imported.schema,
                    features=tensor_to_proto(imported.features),
                    labels=tensor_to_proto(imported.labels),
                )
            ),
            timeout=RPC_TIMEOUT,
        )
    assert (tmp_path / DATASTORE_DB_FILE).is_file()
    async with datastore(tmp_path, "seed-a", "seed-b", "seed-c") as stub:
        reply = await stub.ListDatasets(datastore_pb2.ListDatasetsRequest(), timeout=RPC_TIMEOUT)
        assert [(d.proplet_id, d.schema, d.size) for d in reply.datasets] == [
            ("seed-a", "imported-v1", 20),  # the import, not re-seeded
            ("seed-b", "fl-demo-dataset-v1", 8),
            ("seed-c", "fl-demo-dataset-v1", 8),  # a new seed id is filled
        ]
        a = await stub.GetDataset(
            datastore_pb2.GetDatasetRequest(proplet_id="seed-a"), timeout=RPC_TIMEOUT
        )
        assert np.array_equal(tensor_from_proto(a.features, "f"), imported.features)
        b = await stub.GetDataset(
            datastore_pb2.GetDatasetRequest(proplet_id="seed-b"), timeout=RPC_TIMEOUT
        )
        assert b == seeded_b
        features, _ = synthetic_dataset("seed-c", 8, 3)
        c = await stub.GetDataset(
            datastore_pb2.GetDatasetRequest(proplet_id="seed-c"), timeout=RPC_TIMEOUT
        )
        assert np.array_equal(tensor_from_proto(c.features, "f"), features)


async def test_without_a_state_dir_nothing_is_kept() -> None:
    async with datastore(None, "x") as stub:
        await stub.PutDataset(
            datastore_pb2.PutDatasetRequest(
                dataset=datastore_pb2.Dataset(
                    proplet_id="y",
                    features=tensor_to_proto(np.ones((2, 3))),
                    labels=tensor_to_proto(np.ones(2)),
                )
            ),
            timeout=RPC_TIMEOUT,
        )
    async with datastore(None, "x") as stub:
        reply = await stub.ListDatasets(datastore_pb2.ListDatasetsRequest(), timeout=RPC_TIMEOUT)
        assert [d.proplet_id for d in reply.datasets] == ["x"]


def test_state_dir_from_the_environment(tmp_path: Path) -> None:
    assert DataStoreConfig.from_env({"PROPELLER_INSECURE": "1"}).state_dir is None
    config = DataStoreConfig.from_env(
        {"PROPELLER_INSECURE": "1", "PROPELLER_STATE_DIR": str(tmp_path)}
    )
    assert config.state_dir == tmp_path


# The table as the data store created it before k-class datasets (issue 12).
_FIRST_TABLE = """CREATE TABLE datasets (
    proplet_id TEXT PRIMARY KEY, schema TEXT NOT NULL, size INTEGER NOT NULL,
    num_features INTEGER NOT NULL, features_dtype TEXT NOT NULL, features_shape TEXT NOT NULL,
    features BLOB NOT NULL, labels_dtype TEXT NOT NULL, labels_shape TEXT NOT NULL,
    labels BLOB NOT NULL, updated_at REAL NOT NULL)"""


async def test_class_counts_survive_a_restart_and_an_older_file_opens(tmp_path: Path) -> None:
    path = tmp_path / DATASTORE_DB_FILE
    old = dataset("old", 6, 2)
    with sqlite3.connect(path) as conn:
        conn.execute(_FIRST_TABLE)
        conn.execute(
            "INSERT INTO datasets VALUES (?, ?, 6, 2, '<f8', '[6, 2]', ?, '<f8', '[6]', ?, 0)",
            ("old", old.schema, old.features.tobytes(), old.labels.tobytes()),
        )
    conn.close()
    k_class = Dataset(
        "part",
        np.random.default_rng(1).random((12, 3)),
        np.arange(12, dtype=np.float64) % 4,
        schema=CLASSES_SCHEMA,
        num_classes=7,
    )
    store = SqliteDatasetStore(path)
    await store.open()
    try:
        # The older file's datasets are binary: two classes.
        got_old = await store.get("old")
        assert same(got_old, old) and got_old is not None and got_old.num_classes == 2
        assert await store.put(k_class)
    finally:
        await store.close()
    store = SqliteDatasetStore(path)
    await store.open()
    try:
        got = await store.get("part")
        assert same(got, k_class) and got is not None and got.num_classes == 7
        assert await store.list() == [
            DatasetSummary("old", old.schema, 6, 2, 2),
            DatasetSummary("part", CLASSES_SCHEMA, 12, 3, 7),
        ]
    finally:
        await store.close()
