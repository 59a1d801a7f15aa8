"""`propeller-fl datasets partition` against a real data store over mutual TLS: the digits
train split spread over proplets (IID or Dirichlet), the global test split under its reserved
id, each proplet reading its own part (and its held-out split) and nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from propeller.v1 import datastore_pb2, datastore_pb2_grpc
from server.datastore import catalog
from server.datastore.app import DataStoreApp, DataStoreConfig
from server.datastore.catalog import Corpus
from server.datastore.datasets import CLASSES_SCHEMA
from server.grpc_server import channel
from server.tensors import tensor_from_proto
from tests.cli.helpers import Cli, table_rows, tls_flags
from tests.support.cluster import serve_app
from tests.support.security import operator_tls, proplet_tls, service_tls

RPC_TIMEOUT = 60.0


@pytest.fixture
async def datastore(tmp_path: Path) -> AsyncIterator[str]:
    """A data store with its SQLite state, nothing seeded; yields its address."""
    config = DataStoreConfig(
        addr="127.0.0.1:0", state_dir=tmp_path / "state", tls=service_tls("datastore")
    )
    async with serve_app(DataStoreApp(config), tls=config.tls) as addr:
        yield addr


@pytest.fixture(scope="module")
def digits() -> Corpus:
    return catalog.digits()


def flags(addr: str) -> list[str]:
    return [*tls_flags(), "--datastore", addr, "--timeout", "20"]


async def fetch(addr: str, dataset_id: str, *, as_proplet: str = "", split: str = "") -> Any:
    """GetDataset as the operator, or as proplet `as_proplet` with its own certificate."""
    who = proplet_tls(as_proplet) if as_proplet else operator_tls()
    async with channel(addr, who) as ch:
        stub = datastore_pb2_grpc.DataStoreStub(ch)
        return await stub.GetDataset(
            datastore_pb2.GetDatasetRequest(proplet_id=dataset_id, split=split),
            timeout=RPC_TIMEOUT,
        )


def arrays(msg: datastore_pb2.Dataset) -> tuple[np.ndarray, np.ndarray]:
    return (
        tensor_from_proto(msg.features, "features"),
        tensor_from_proto(msg.labels, "labels"),
    )


def rows_of(features: np.ndarray) -> list[bytes]:
    return sorted(row.tobytes() for row in features)


async def test_dirichlet_partition_stores_every_train_sample_once(
    cli: Cli, datastore: str, digits: Corpus
) -> None:
    f = flags(datastore)
    args = ("datasets", "partition", "--dataset", "digits", "--proplets", "4")
    doc = (await cli(*args, "--dirichlet", "0.1", "--seed", "3", "--json", *f)).ok().json()
    ids = ["proplet-1", "proplet-2", "proplet-3", "proplet-4"]
    assert [p["proplet_id"] for p in doc["proplets"]] == ids
    assert (doc["partition"], doc["alpha"], doc["seed"], doc["num_classes"]) == (
        "dirichlet",
        0.1,
        3,
        10,
    )
    assert doc["test"]["proplet_id"] == "digits.test" and doc["test"]["size"] == digits.test.size

    # What the data store holds: the parts, which together are the train split exactly ...
    parts = {pid: await fetch(datastore, pid) for pid in ids}
    pooled: list[bytes] = []
    for pid, msg in parts.items():
        features, labels = arrays(msg)
        assert (msg.schema, msg.num_classes) == (CLASSES_SCHEMA, 10)
        assert len(labels) >= 10
        reported = next(p for p in doc["proplets"] if p["proplet_id"] == pid)
        assert reported["labels"] == np.bincount(labels.astype(int), minlength=10).tolist()
        pooled += rows_of(features)
    assert sorted(pooled) == rows_of(digits.train.features)  # each sample once, none lost
    # ... and the global test split under its reserved id.
    test = await fetch(datastore, "digits.test")
    np.testing.assert_array_equal(arrays(test)[0], digits.test.features)
    np.testing.assert_array_equal(arrays(test)[1], digits.test.labels)

    # The same seed again: the same parts, byte for byte.
    again = (await cli(*args, "--dirichlet", "0.1", "--seed", "3", "--json", *f)).ok().json()
    assert again == doc
    for pid in ids:
        assert await fetch(datastore, pid) == parts[pid]

    # `datasets list` shows them all, test split included.
    header, rows = table_rows((await cli("datasets", "list", *f)).ok().out)
    assert [r[0] for r in rows] == sorted([*ids, "digits.test"])
    assert all(r[header.index("SCHEMA")] == CLASSES_SCHEMA for r in rows)


async def test_iid_partition_over_given_ids_as_a_table(cli: Cli, datastore: str) -> None:
    ids = ["edge-a", "edge-b", "edge-c"]
    out = (
        (
            await cli(
                "datasets",
                "partition",
                "--ids",
                ",".join(ids),
                "--iid",
                "--seed",
                "1",
                *flags(datastore),
            )
        )
        .ok()
        .out
    )
    head, _, body = out.partition("\n\n")
    assert "IID, seed 1, at least 10 samples each" in head
    header, rows = table_rows(body)
    assert header == ["PROPLET", "SIZE", *map(str, range(10))]
    assert [r[0] for r in rows] == [*ids, "digits.test"]
    sizes = [int(r[1]) for r in rows[:3]]
    assert sum(sizes) == 1438 and max(sizes) - min(sizes) <= 1
    for r in rows[:3]:  # every class in every part, within one of a third of its count
        assert all(45 <= int(c) <= 50 for c in r[2:]), r


async def test_each_proplet_reads_its_own_part_and_held_out_split_only(
    cli: Cli, datastore: str
) -> None:
    f = flags(datastore)
    await cli("datasets", "partition", "--proplets", "2", "--iid", "--seed", "0", *f)
    own = await fetch(datastore, "proplet-1", as_proplet="proplet-1")
    held_out = await fetch(datastore, "proplet-1", as_proplet="proplet-1", split="test")
    assert len(arrays(held_out)[1]) == len(arrays(own)[1]) // 5
    assert held_out.num_classes == 10
    for other in ("proplet-2", "digits.test"):
        with pytest.raises(grpc.aio.AioRpcError) as excinfo:
            await fetch(datastore, other, as_proplet="proplet-1")
        assert excinfo.value.code() == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["--proplets", "200", "--iid"], ["--proplets: 200 proplets x --min-samples 10"]),
        (["--ids", "a,digits.test", "--iid"], ["--ids[1]: 'digits.test' is reserved"]),
        (["--ids", " , ", "--iid"], ["--ids: no proplet id given"]),
        (["--proplets", "0", "--iid"], ["--proplets: must be >= 1"]),
        (["--proplets", "2", "--iid", "--seed", "-1"], ["--seed: must be >= 0, got -1"]),
        (["--proplets", "2", "--iid", "--min-samples", "0"], ["--min-samples: must be >= 1"]),
        (["--proplets", "3", "--dirichlet", "-1"], ["--dirichlet: alpha must be a number > 0"]),
    ],
)
async def test_bad_arguments_fail_with_one_line_and_store_nothing(
    cli: Cli, datastore: str, argv: list[str], needles: list[str]
) -> None:
    result = await cli("datasets", "partition", *argv, *flags(datastore))
    result.failed_with("datasets partition", *needles)
    listed = (await cli("datasets", "list", "--json", *flags(datastore))).ok().json()
    assert listed["datasets"] == []


async def test_iid_and_dirichlet_are_exclusive_and_one_is_required(
    cli: Cli, datastore: str
) -> None:
    for argv in (["--proplets", "2"], ["--proplets", "2", "--iid", "--dirichlet", "1"]):
        result = await cli("datasets", "partition", *argv, *flags(datastore))
        assert result.code == 2 and "--iid" in result.err
