"""The data store killed with SIGKILL and restarted over the same state directory: imported
datasets are still there, byte for byte; seeding at start-up only fills the ids without a
dataset, so an imported dataset is never overwritten by a restart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from propeller.v1 import datastore_pb2, datastore_pb2_grpc
from server.datastore.datasets import synthetic_dataset
from server.grpc_server import channel
from server.tensors import Array, tensor_from_proto, tensor_to_proto
from tests.support.processes import RPC_S, service_process

Stub = Any  # generated gRPC stubs carry no type information


def dataset(proplet_id: str, n: int, d: int, seed: int) -> datastore_pb2.Dataset:
    rng = np.random.default_rng(seed)
    return datastore_pb2.Dataset(
        proplet_id=proplet_id,
        schema="imported-v1",
        features=tensor_to_proto(rng.normal(size=(n, d))),
        labels=tensor_to_proto((rng.random(n) < 0.5).astype(np.float64)),
    )


async def fetch(stub: Stub, proplet_id: str) -> tuple[str, Array, Array]:
    ds = await stub.GetDataset(
        datastore_pb2.GetDatasetRequest(proplet_id=proplet_id), timeout=RPC_S
    )
    return (
        ds.schema,
        tensor_from_proto(ds.features, "features"),
        tensor_from_proto(ds.labels, "labels"),
    )


async def listing(stub: Stub) -> list[tuple[str, str, int, int]]:
    reply = await stub.ListDatasets(datastore_pb2.ListDatasetsRequest(), timeout=RPC_S)
    return [(d.proplet_id, d.schema, d.size, d.num_features) for d in reply.datasets]


async def test_a_killed_data_store_keeps_imported_datasets(tmp_path: Path) -> None:
    env = {
        "PROPELLER_STATE_DIR": str(tmp_path / "state"),
        "PROPELLER_DATASTORE_SEED_IDS": "seed-a,seed-b",
        "PROPELLER_DATASTORE_SAMPLES": "16",
        "PROPELLER_DATASTORE_FEATURES": "3",
    }
    imported = dataset("imported", 500, 7, seed=1)
    replacing = dataset("seed-a", 40, 3, seed=2)  # an import over a seeded id
    with service_process("datastore", env, tmp_path) as ds:
        await ds.restart()
        async with channel(ds.addr, ds.tls) as chan:
            stub = datastore_pb2_grpc.DataStoreStub(chan)
            assert [row[0] for row in await listing(stub)] == ["seed-a", "seed-b"]
            for msg in (imported, replacing):
                await stub.PutDataset(datastore_pb2.PutDatasetRequest(dataset=msg), timeout=RPC_S)
            before = await listing(stub)
            ds.kill()  # right after the last answer

            # Restart with one more seed id: only that one is seeded.
            ds.env["PROPELLER_DATASTORE_SEED_IDS"] = "seed-a,seed-b,seed-c"
            await ds.restart()
            after = await listing(stub)
            assert after == [*before, ("seed-c", "fl-demo-dataset-v1", 16, 3)]
            assert ("imported", "imported-v1", 500, 7) in after
            assert ("seed-a", "imported-v1", 40, 3) in after
            for msg in (imported, replacing):
                schema, features, labels = await fetch(stub, msg.proplet_id)
                assert schema == "imported-v1"
                assert np.array_equal(features, tensor_from_proto(msg.features, "f"))
                assert np.array_equal(labels, tensor_from_proto(msg.labels, "l"))
            _, features, labels = await fetch(stub, "seed-b")
            expected = synthetic_dataset("seed-b", 16, 3)
            assert np.array_equal(features, expected[0]) and np.array_equal(labels, expected[1])
        assert await ds.terminate_async() == 0, ds.tail()
