"""The seed blog post's walkthrough, translated from HTTP to gRPC, end to end: real mosquitto,
the real OCI registry (module pushed with oras), five services and three proplets running the
Zig trainer in wasmtime."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import wasmtime

from propeller.v1 import coordinator_pb2, datastore_pb2, manager_pb2
from server.config import MqttConfig
from server.messages import RoundComplete
from server.provenance import module_digest
from server.tensors import Tensors, tensor_from_proto
from tests.support.clients import HYPER, V0
from tests.support.cluster import HYPER_JSON, Cluster, cluster, round_notes
from tests.support.infra import OciRegistry, push_wasm
from tests.support.waits import eventually
from tests.wasm_client.harness import WasmRunner

V1 = "fl/models/global_model_v1"


@pytest.fixture
async def deployment(
    mqtt: MqttConfig, registry: OciRegistry, trainer_wasm: Path, tmp_path: Path
) -> AsyncIterator[Cluster]:
    """Five services, three proplets (the registry name the seed uses mirrored to the test's
    OCI registry, for the manager too), the trainer pushed there with oras; no model yet."""
    pushed = push_wasm(registry, trainer_wasm, repo="fl-client-wasm", tag="latest")
    assert pushed == f"{registry.host}/fl-client-wasm:latest"
    # The seed's image reference, resolved through a registry mirror as compose's hostname would.
    image = "local-registry:5000/fl-client-wasm:latest"
    mirrors = {"registry_mirrors": {"local-registry:5000": registry.host}}
    async with cluster(
        mqtt,
        tmp_path,
        proplets=3,
        dimension=None,
        proplet=mirrors,
        image=image,
        stack={"oci_registry": registry.host},
    ) as d:
        yield d


async def experiment(
    d: Cluster, round_id: str, model_ref: str, k_of_n: int, timeout_s: float = 60
) -> manager_pb2.StartExperimentResponse:
    return await d.start_experiment(
        round_id,
        d.proplet_ids,
        d.image,
        experiment_id=f"exp-{round_id}",
        model_ref=model_ref,
        k_of_n=k_of_n,
        timeout_s=timeout_s,
    )


async def closed(d: Cluster, round_id: str) -> coordinator_pb2.RoundStatus:
    return await d.wait_state(round_id, timeout=60, via="manager")


async def expected_fedavg(
    d: Cluster,
    trainer_wasm: Path,
    base: Tensors,
    base_uri: str,
    round_id: str,
    proplets: list[str],
) -> tuple[Tensors, list[dict[str, Any]]]:
    """What FedAvg of the proplets' updates must be: run the same module on the same inputs
    here (training is deterministic per round and proplet) and weight by sample count."""
    runner = WasmRunner(wasmtime.Engine(), trainer_wasm)
    updates: list[dict[str, Any]] = []
    for pid in proplets:
        ds = await d.datastore.GetDataset(
            datastore_pb2.GetDatasetRequest(proplet_id=pid), timeout=10
        )
        x = tensor_from_proto(ds.features, "features")
        y = tensor_from_proto(ds.labels, "labels")
        env = {
            "ROUND_ID": round_id,
            "MODEL_URI": base_uri,
            "HYPERPARAMS": HYPER_JSON,
            "PROPLET_ID": pid,
            "MODEL_DATA": json.dumps({k: v.tolist() for k, v in base.items()}),
            "DATASET_DATA": json.dumps(
                {
                    "schema": ds.schema,
                    "proplet_id": pid,
                    "data": [
                        {"x": row.tolist(), "y": float(lab)} for row, lab in zip(x, y, strict=True)
                    ],
                    "size": len(y),
                }
            ),
        }
        result = await asyncio.to_thread(runner.run, env)
        updates.append(result.json())
    total = sum(int(u["num_samples"]) for u in updates)
    mean: Tensors = {}
    for name in base:
        weighted = [
            np.asarray(u["update"][name], np.float64) * int(u["num_samples"]) for u in updates
        ]
        mean[name] = np.sum(weighted, axis=0) / total
    return mean, updates


async def test_seed_walkthrough(deployment: Cluster, trainer_wasm: Path) -> None:
    d = deployment
    # 4. Proplets registered and alive, listed by their ids.
    listed = await d.proplets()
    assert {p.id for p in listed if p.alive} == set(d.proplet_ids)
    assert {p.name for p in listed} == {"proplet-1", "proplet-2", "proplet-3"}

    # 5. Initialise v0 as zeros of dimension 3, and confirm it exists.
    v0 = await d.init_model(3)
    assert v0.version == 0 and v0.model_uri == V0
    model0 = await d.model(0)
    assert model0["w"].tolist() == [0.0, 0.0, 0.0] and float(model0["b"]) == 0.0
    with pytest.raises(grpc.aio.AioRpcError) as again:
        await d.init_model(3)
    assert again.value.code() == grpc.StatusCode.ALREADY_EXISTS

    async with round_notes(d.mqtt) as notes:
        # 6. Round 1 from v0 with k_of_n=3.
        r1 = f"r-{uuid.uuid4().hex[:8]}"
        resp = await experiment(d, r1, V0, 3)
        assert {s.proplet_id for s in resp.scheduled} == set(d.proplet_ids)
        assert not resp.skipped
        assert {s.task_name for s in resp.scheduled} == {
            f"fl-round-{r1}-{p}" for p in d.proplet_ids
        }

        # 7. Exactly three tasks for the round, one per participant.
        tasks = await d.round_tasks(r1)
        assert sorted((t.name, t.proplet_id) for t in tasks) == sorted(
            (f"fl-round-{r1}-{p}", p) for p in d.proplet_ids
        )
        for t in tasks:
            assert t.env["ROUND_ID"] == r1 and t.env["MODEL_URI"] == "fl/models/global_model_v0"
            assert json.loads(t.env["HYPERPARAMS"]) == {"epochs": 1, "lr": 0.01, "batch_size": 16}

        status = await closed(d, r1)
        assert status.state == coordinator_pb2.ROUND_STATE_COMPLETED, status.failure_reason
        assert status.completed and status.num_updates == 3 and status.closed_by == "k_of_n"
        assert status.new_model_version == 1
        # The round ran the module the image named at its start, pinned by digest.
        module = await asyncio.to_thread(trainer_wasm.read_bytes)
        assert status.module_digest == module_digest(module)
        assert status.task_wasm_image.startswith(f"{d.image}@sha256:")
        assert {t.image_url for t in tasks} == {status.task_wasm_image}
        assert set(status.reported) == set(d.proplet_ids)
        note = await asyncio.wait_for(notes.get(), 10)
        assert note["round_id"] == r1 and note["new_model_version"] == 1
        assert note["model_uri"] == "fl/models/global_model_v1" and note["status"] == "complete"
        RoundComplete(**note)  # the documented payload, field for field

        # 8. v1 differs from v0 and is the sample-weighted mean of the three updates.
        model1 = await d.model(1)
        expected, updates = await expected_fedavg(d, trainer_wasm, model0, V0, r1, d.proplet_ids)
        assert not np.allclose(model1["w"], model0["w"])
        for name in ("w", "b"):
            np.testing.assert_allclose(model1[name], expected[name], rtol=1e-12, atol=1e-15)
        # The round reports the trainers' real metrics (sample-weighted), not made-up numbers.
        np.testing.assert_allclose(
            status.metrics["loss"],
            np.average(
                [float(u["metrics"]["loss"]) for u in updates],
                weights=[int(u["num_samples"]) for u in updates],
            ),
            rtol=1e-9,
        )
        done = await eventually(
            lambda: d.round_tasks(r1),
            lambda ts: all(t.state == manager_pb2.TASK_STATE_COMPLETED for t in ts),
        )
        assert len(done) == 3

        # 9. A second round from v1 produces v2.
        r2 = f"r-{uuid.uuid4().hex[:8]}"
        await experiment(d, r2, V1, 3)
        status2 = await closed(d, r2)
        assert status2.state == coordinator_pb2.ROUND_STATE_COMPLETED, status2.failure_reason
        assert status2.new_model_version == 2
        note2 = await asyncio.wait_for(notes.get(), 10)
        assert note2["round_id"] == r2 and note2["new_model_version"] == 2
        model2 = await d.model(2)
        expected2, _ = await expected_fedavg(d, trainer_wasm, model1, V1, r2, d.proplet_ids)
        np.testing.assert_allclose(model2["w"], expected2["w"], rtol=1e-12, atol=1e-15)
        assert await d.versions() == [0, 1, 2]


async def test_manual_federated_task(deployment: Cluster) -> None:
    d = deployment
    await d.init_model(3)
    pid = d.proplet_ids[0]

    def manual_task(round_id: str) -> manager_pb2.CreateTaskRequest:
        return d.round_task(f"fl-manual-{round_id}", round_id, pid)

    # The round must be known to the coordinator: configure and open it, then run one task.
    rid = f"manual-r-{uuid.uuid4().hex[:8]}"
    await d.configure(rid, participants=[pid], k_of_n=1, timeout_s=60, hyperparams=HYPER)
    task = await d.manager.CreateTask(manual_task(rid), timeout=10)
    assert task.state == manager_pb2.TASK_STATE_PENDING
    started = await d.manager.StartTask(manager_pb2.TaskRef(task_id=task.id), timeout=10)
    # Published before StartTask answers: a fast proplet may already have reported Running.
    assert started.state in (manager_pb2.TASK_STATE_SCHEDULED, manager_pb2.TASK_STATE_RUNNING)
    finished = await d.finished(task.id)
    assert finished.state == manager_pb2.TASK_STATE_COMPLETED, finished.error
    status = await closed(d, rid)
    assert status.completed and status.reported == [pid] and status.new_model_version == 1

    # A manual task for a round nobody configured fails with the coordinator's reason.
    stray = await d.manager.CreateTask(
        manual_task(f"manual-unknown-{uuid.uuid4().hex[:6]}"), timeout=10
    )
    await d.manager.StartTask(manager_pb2.TaskRef(task_id=stray.id), timeout=10)
    failed = await d.finished(stray.id)
    assert failed.state == manager_pb2.TASK_STATE_FAILED
    assert "NOT_FOUND" in failed.error
    assert await d.versions() == [0, 1]


async def test_a_stopped_proplet(deployment: Cluster) -> None:
    d = deployment
    await d.init_model(3)
    gone = d.proplet_ids[2]
    await d.stop_proplet(gone)
    # Still within its alive window, so it is scheduled, but it will never report.

    r_k2 = f"r-{uuid.uuid4().hex[:8]}"
    resp = await experiment(d, r_k2, V0, 2)
    assert len(resp.scheduled) == 3
    status = await closed(d, r_k2)
    assert status.state == coordinator_pb2.ROUND_STATE_COMPLETED, status.failure_reason
    assert status.num_updates == 2 and status.closed_by == "k_of_n"
    assert gone not in status.reported

    r_k3 = f"r-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    await experiment(d, r_k3, V1, 3, timeout_s=3)
    mid = await eventually(lambda: d.status(r_k3, "manager"), lambda s: s.num_updates == 2)
    assert mid.state == coordinator_pb2.ROUND_STATE_OPEN  # waits for the third, up to the deadline
    status3 = await closed(d, r_k3)
    assert time.monotonic() - started >= 2.5
    assert status3.state == coordinator_pb2.ROUND_STATE_COMPLETED, status3.failure_reason
    assert status3.completed and status3.num_updates == 2 and status3.k_of_n == 3
    assert status3.closed_by == "deadline" and status3.new_model_version == 2
