"""A model of more than a million parameters through the whole path with no JSON on the way:
registry -> proplet -> module (the MLP trainer, contract v2: safetensors on stdin and
stdout) -> coordinator -> aggregator -> registry, with the real services and real proplets.
The stored version must be the sample-weighted mean of the updates, recomputed here by the
independent numpy implementation of the trainer."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from propeller.v1 import coordinator_pb2, datastore_pb2
from proplet import safetensors
from proplet.runner import CompiledModule, Invocation, RunControl, RunOutput, WasmRuntime
from server.config import MqttConfig
from server.streams import model_stream
from server.tensors import Tensors, tensor_to_proto
from tests.support.clients import LONG_RPC_S, V0
from tests.support.cluster import Cluster, cluster
from tests.wasm_client import mlp_reference as ref

# 1000 inputs -> 1000 hidden -> 2 classes: 1,003,002 parameters, 8 MB of f64. Two classes
# because the data store keeps 0/1 labels (k-class labels arrive with the digits dataset).
SIZES = [1000, 1000, 2]
SAMPLES = {"proplet-a": 6, "proplet-b": 10}
HYPER = coordinator_pb2.Hyperparams(epochs=1, lr=0.05, batch_size=4)


@pytest.fixture
async def deployment(mqtt: MqttConfig, tmp_path: Path) -> AsyncIterator[Cluster]:
    async with cluster(mqtt, tmp_path, proplets=list(SAMPLES), dimension=None) as d:
        yield d


async def test_a_million_parameter_mlp_goes_round_trip_without_json(
    deployment: Cluster, mlp_wasm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = deployment
    base = ref.make_mlp(SIZES, seed=31)
    assert sum(a.size for a in base.values()) >= 1_000_000
    put = await d.registry.PutModel(model_stream(base, 1 << 20), timeout=LONG_RPC_S)
    assert put.model_uri == V0
    data: dict[str, tuple[Any, Any]] = {}
    for i, (pid, n) in enumerate(SAMPLES.items()):
        x, y = ref.make_data(n, SIZES[0], SIZES[-1], seed=40 + i)
        data[pid] = (x, y)
        dataset = datastore_pb2.Dataset(
            proplet_id=pid, features=tensor_to_proto(x), labels=tensor_to_proto(y)
        )
        await d.datastore.PutDataset(
            datastore_pb2.PutDatasetRequest(dataset=dataset), timeout=LONG_RPC_S
        )

    # What each module run was given, seen at the runtime's door (the real run goes on).
    seen: list[Invocation] = []
    real_run = WasmRuntime.run

    async def recording_run(
        self: WasmRuntime,
        compiled: CompiledModule,
        invocation: Invocation,
        control: RunControl | None = None,
    ) -> RunOutput:
        seen.append(invocation)
        return await real_run(self, compiled, invocation, control)

    monkeypatch.setattr(WasmRuntime, "run", recording_run)

    round_id = f"r-{uuid.uuid4().hex[:8]}"
    await d.start_experiment(
        round_id,
        list(SAMPLES),
        f"file://{mlp_wasm}",
        model_ref=V0,
        hyperparams=HYPER,
        k_of_n=len(SAMPLES),
        timeout_s=120,
    )
    status = await d.wait_state(round_id, timeout=120)
    assert status.state == coordinator_pb2.ROUND_STATE_COMPLETED, status

    # No JSON model or dataset went into the module: they went in as safetensors on stdin.
    assert len(seen) == len(SAMPLES)
    for invocation in seen:
        assert "MODEL_DATA" not in invocation.env and "DATASET_DATA" not in invocation.env
        model_in = safetensors.decode(invocation.stdin, "model")
        assert list(model_in.tensors) == list(base)
        pid = invocation.env["PROPLET_ID"]
        n = SAMPLES[pid]
        assert len(invocation.stdin) > 8 * (sum(a.size for a in base.values()) + n * (SIZES[0] + 1))

    # The stored v1 is FedAvg of the updates, each recomputed by the numpy reference.
    updates: dict[str, Tensors] = {}
    for pid, (x, y) in data.items():
        updates[pid] = ref.train(
            base,
            x,
            y,
            epochs=HYPER.epochs,
            lr=HYPER.lr,
            batch_size=HYPER.batch_size,
            round_id=round_id,
            proplet_id=pid,
        )
    total = sum(SAMPLES.values())
    stored = await d.model(1)
    assert list(stored) == list(base)
    for name in base:
        expected = sum(updates[pid][name] * SAMPLES[pid] for pid in SAMPLES) / total
        assert stored[name].dtype == np.float64
        np.testing.assert_allclose(stored[name], expected, rtol=0, atol=1e-9)
        # ... and training moved it (so the comparison is not of two copies of v0).
    moved = max(float(np.max(np.abs(stored[k] - base[k]))) for k in base)
    assert moved > 1e-4
