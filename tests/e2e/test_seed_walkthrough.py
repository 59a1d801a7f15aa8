"""The seed blog post's walkthrough, translated from HTTP to gRPC, end to end: real mosquitto,
the real OCI registry (module pushed with oras), five services and three proplets running the
Zig trainer in wasmtime."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import pytest
import wasmtime

from propeller.v1 import (
    coordinator_pb2,
    coordinator_pb2_grpc,
    datastore_pb2,
    datastore_pb2_grpc,
    manager_pb2,
    manager_pb2_grpc,
    model_registry_pb2,
    model_registry_pb2_grpc,
)
from proplet.app import Proplet
from proplet.config import PropletConfig
from server.config import Endpoints, MqttConfig
from server.messages import RoundComplete
from server.mqtt import MqttSession
from server.stack import Stack, StackConfig
from server.streams import read_model_stream
from server.tensors import Tensors, tensor_from_proto
from server.topics import Topics
from tests.support.infra import Mosquitto, OciRegistry, push_wasm
from tests.support.waits import eventually
from tests.wasm_client.harness import WasmRunner

T = TypeVar("T")
HYPER = coordinator_pb2.Hyperparams(epochs=1, lr=0.01, batch_size=16)
HYPER_JSON = json.dumps({"epochs": 1, "lr": 0.01, "batch_size": 16})


@dataclass
class Deployment:
    stack: Stack
    proplets: dict[str, contextlib.AsyncExitStack]
    proplet_ids: list[str]
    image: str
    topics: Topics
    mqtt: MqttConfig
    manager: manager_pb2_grpc.ManagerStub
    coordinator: coordinator_pb2_grpc.CoordinatorStub
    registry: model_registry_pb2_grpc.ModelRegistryStub
    datastore: datastore_pb2_grpc.DataStoreStub

    async def stop_proplet(self, proplet_id: str) -> None:
        await self.proplets.pop(proplet_id).aclose()

    async def get_model(self, version: int) -> Tensors:
        stream = self.registry.GetModel(
            model_registry_pb2.GetModelRequest(version=version), timeout=30
        )
        _, tensors = await read_model_stream(stream)
        return tensors

    async def round_status(self, round_id: str) -> coordinator_pb2.RoundStatus:
        status: coordinator_pb2.RoundStatus = await self.manager.GetRoundStatus(
            coordinator_pb2.GetRoundStatusRequest(round_id=round_id), timeout=10
        )
        return status

    async def wait_round_closed(
        self, round_id: str, timeout: float = 60
    ) -> coordinator_pb2.RoundStatus:
        final = (coordinator_pb2.ROUND_STATE_COMPLETED, coordinator_pb2.ROUND_STATE_FAILED)
        return await eventually(
            lambda: self.round_status(round_id), lambda s: s.state in final, timeout
        )

    async def round_tasks(self, round_id: str) -> list[manager_pb2.Task]:
        resp = await self.manager.ListTasks(
            manager_pb2.ListTasksRequest(name_prefix=f"fl-round-{round_id}"), timeout=10
        )
        return list(resp.tasks)

    async def experiment(
        self,
        round_id: str,
        model_ref: str,
        k_of_n: int,
        participants: list[str],
        timeout_s: float = 60,
    ) -> manager_pb2.StartExperimentResponse:
        resp: manager_pb2.StartExperimentResponse = await self.manager.StartExperiment(
            manager_pb2.StartExperimentRequest(
                experiment_id=f"exp-{round_id}",
                round_id=round_id,
                model_ref=model_ref,
                participants=participants,
                hyperparams=HYPER,
                k_of_n=k_of_n,
                timeout_s=timeout_s,
                task_wasm_image=self.image,
            ),
            timeout=30,
        )
        return resp


@pytest.fixture
async def deployment(
    broker: Mosquitto, registry: OciRegistry, trainer_wasm: Path, topics: Topics, tmp_path: Path
) -> AsyncIterator[Deployment]:
    pushed = push_wasm(registry, trainer_wasm, repo="fl-client-wasm", tag="latest")
    assert pushed == f"{registry.host}/fl-client-wasm:latest"
    # The seed's image reference, resolved through a registry mirror as compose's hostname would.
    image = "local-registry:5000/fl-client-wasm:latest"
    ids = [str(uuid.uuid4()) for _ in range(3)]
    mqtt = MqttConfig(port=broker.port, topics=topics)
    async with contextlib.AsyncExitStack() as outer:
        stack = await outer.enter_async_context(
            Stack(StackConfig(mqtt=mqtt, seed_proplet_ids=tuple(ids), alive_window_s=30.0))
        )
        proplets: dict[str, contextlib.AsyncExitStack] = {}
        for i, pid in enumerate(ids):
            ps = contextlib.AsyncExitStack()
            await ps.enter_async_context(
                Proplet(
                    PropletConfig(
                        proplet_id=pid,
                        name=f"proplet-{i + 1}",
                        mqtt=mqtt,
                        endpoints=Endpoints(
                            coordinator=stack.endpoints.coordinator,
                            registry=stack.endpoints.registry,
                            datastore=stack.endpoints.datastore,
                        ),
                        heartbeat_s=0.5,
                        work_dir=tmp_path / f"proplet-{i}",
                        registry_mirrors={"local-registry:5000": registry.host},
                        task_timeout_s=30,
                    )
                )
            )
            proplets[pid] = ps
        for ps in proplets.values():
            outer.push_async_callback(ps.aclose)
        chans = {
            name: await outer.enter_async_context(grpc.aio.insecure_channel(addr))
            for name, addr in (
                ("manager", stack.endpoints.manager),
                ("coordinator", stack.endpoints.coordinator),
                ("registry", stack.endpoints.registry),
                ("datastore", stack.endpoints.datastore),
            )
        }
        yield Deployment(
            stack=stack,
            proplets=proplets,
            proplet_ids=ids,
            image=image,
            topics=topics,
            mqtt=mqtt,
            manager=manager_pb2_grpc.ManagerStub(chans["manager"]),
            coordinator=coordinator_pb2_grpc.CoordinatorStub(chans["coordinator"]),
            registry=model_registry_pb2_grpc.ModelRegistryStub(chans["registry"]),
            datastore=datastore_pb2_grpc.DataStoreStub(chans["datastore"]),
        )


@contextlib.asynccontextmanager
async def round_notifications(d: Deployment) -> AsyncIterator[asyncio.Queue[dict[str, object]]]:
    queue: asyncio.Queue[dict[str, object]] = asyncio.Queue()

    async def on_message(topic: str, payload: bytes) -> None:
        assert topic == d.topics.round_next
        queue.put_nowait(json.loads(payload))

    async with MqttSession(
        d.mqtt,
        f"watcher-{uuid.uuid4().hex[:8]}",
        [d.topics.round_next],
        on_message,
        clean_session=True,
    ):
        yield queue


async def expected_fedavg(
    d: Deployment,
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


async def test_seed_walkthrough(deployment: Deployment, trainer_wasm: Path) -> None:
    d = deployment
    # 4. Proplets registered and alive, listed by their ids.
    listed = await eventually(
        lambda: d.manager.ListProplets(manager_pb2.ListPropletsRequest(), timeout=10),
        lambda r: {p.id for p in r.proplets if p.alive} == set(d.proplet_ids),
    )
    assert {p.name for p in listed.proplets} == {"proplet-1", "proplet-2", "proplet-3"}

    # 5. Initialise v0 as zeros of dimension 3, and confirm it exists.
    v0 = await d.registry.InitModel(model_registry_pb2.InitModelRequest(dimension=3), timeout=10)
    assert v0.version == 0 and v0.model_uri == "fl/models/global_model_v0"
    model0 = await d.get_model(0)
    assert model0["w"].tolist() == [0.0, 0.0, 0.0] and float(model0["b"]) == 0.0
    with pytest.raises(grpc.aio.AioRpcError) as again:
        await d.registry.InitModel(model_registry_pb2.InitModelRequest(dimension=3), timeout=10)
    assert again.value.code() == grpc.StatusCode.ALREADY_EXISTS

    async with round_notifications(d) as notes:
        # 6. Round 1 from v0 with k_of_n=3.
        r1 = f"r-{uuid.uuid4().hex[:8]}"
        resp = await d.experiment(r1, "fl/models/global_model_v0", 3, d.proplet_ids)
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

        status = await d.wait_round_closed(r1)
        assert status.state == coordinator_pb2.ROUND_STATE_COMPLETED, status.failure_reason
        assert status.completed and status.num_updates == 3 and status.closed_by == "k_of_n"
        assert status.new_model_version == 1
        assert set(status.reported) == set(d.proplet_ids)
        note = await asyncio.wait_for(notes.get(), 10)
        assert note["round_id"] == r1 and note["new_model_version"] == 1
        assert note["model_uri"] == "fl/models/global_model_v1" and note["status"] == "complete"
        RoundComplete(**note)  # type: ignore[arg-type]  # the documented payload, field for field

        # 8. v1 differs from v0 and is the sample-weighted mean of the three updates.
        model1 = await d.get_model(1)
        expected, updates = await expected_fedavg(
            d, trainer_wasm, model0, "fl/models/global_model_v0", r1, d.proplet_ids
        )
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
        await d.experiment(r2, "fl/models/global_model_v1", 3, d.proplet_ids)
        status2 = await d.wait_round_closed(r2)
        assert status2.state == coordinator_pb2.ROUND_STATE_COMPLETED, status2.failure_reason
        assert status2.new_model_version == 2
        note2 = await asyncio.wait_for(notes.get(), 10)
        assert note2["round_id"] == r2 and note2["new_model_version"] == 2
        model2 = await d.get_model(2)
        expected2, _ = await expected_fedavg(
            d, trainer_wasm, model1, "fl/models/global_model_v1", r2, d.proplet_ids
        )
        np.testing.assert_allclose(model2["w"], expected2["w"], rtol=1e-12, atol=1e-15)
        listed_models = await d.registry.ListModels(
            model_registry_pb2.ListModelsRequest(), timeout=10
        )
        assert [m.version for m in listed_models.models] == [0, 1, 2]


async def test_manual_federated_task(deployment: Deployment) -> None:
    d = deployment
    await eventually(
        lambda: d.manager.ListProplets(manager_pb2.ListPropletsRequest(), timeout=10),
        lambda r: sum(p.alive for p in r.proplets) == 3,
    )
    await d.registry.InitModel(model_registry_pb2.InitModelRequest(dimension=3), timeout=10)
    pid = d.proplet_ids[0]
    ep = d.stack.endpoints

    def manual_task(round_id: str) -> manager_pb2.CreateTaskRequest:
        return manager_pb2.CreateTaskRequest(
            name=f"fl-manual-{round_id}",
            image_url=d.image,
            proplet_id=pid,
            env={
                "ROUND_ID": round_id,
                "MODEL_URI": "fl/models/global_model_v0",
                "HYPERPARAMS": HYPER_JSON,
                "COORDINATOR_URL": ep.coordinator,
                "MODEL_REGISTRY_URL": ep.registry,
                "DATA_STORE_URL": ep.datastore,
            },
        )

    # The round must be known to the coordinator: configure and open it, then run one task.
    rid = f"manual-r-{uuid.uuid4().hex[:8]}"
    await d.coordinator.ConfigureRound(
        coordinator_pb2.ConfigureRoundRequest(
            round_id=rid,
            participants=[pid],
            k_of_n=1,
            timeout_s=60,
            model_ref="fl/models/global_model_v0",
            hyperparams=HYPER,
            start=True,
        ),
        timeout=10,
    )
    task = await d.manager.CreateTask(manual_task(rid), timeout=10)
    assert task.state == manager_pb2.TASK_STATE_PENDING
    started = await d.manager.StartTask(manager_pb2.TaskRef(task_id=task.id), timeout=10)
    # Published before StartTask answers: a fast proplet may already have reported Running.
    assert started.state in (manager_pb2.TASK_STATE_SCHEDULED, manager_pb2.TASK_STATE_RUNNING)
    finished = await eventually(
        lambda: d.manager.GetTask(manager_pb2.TaskRef(task_id=task.id), timeout=10),
        lambda t: t.state in (manager_pb2.TASK_STATE_COMPLETED, manager_pb2.TASK_STATE_FAILED),
    )
    assert finished.state == manager_pb2.TASK_STATE_COMPLETED, finished.error
    status = await d.wait_round_closed(rid)
    assert status.completed and status.reported == [pid] and status.new_model_version == 1

    # A manual task for a round nobody configured fails with the coordinator's reason.
    stray = await d.manager.CreateTask(
        manual_task(f"manual-unknown-{uuid.uuid4().hex[:6]}"), timeout=10
    )
    await d.manager.StartTask(manager_pb2.TaskRef(task_id=stray.id), timeout=10)
    failed = await eventually(
        lambda: d.manager.GetTask(manager_pb2.TaskRef(task_id=stray.id), timeout=10),
        lambda t: t.state in (manager_pb2.TASK_STATE_COMPLETED, manager_pb2.TASK_STATE_FAILED),
    )
    assert failed.state == manager_pb2.TASK_STATE_FAILED
    assert "NOT_FOUND" in failed.error
    models = await d.registry.ListModels(model_registry_pb2.ListModelsRequest(), timeout=10)
    assert [m.version for m in models.models] == [0, 1]


async def test_a_stopped_proplet(deployment: Deployment) -> None:
    d = deployment
    await eventually(
        lambda: d.manager.ListProplets(manager_pb2.ListPropletsRequest(), timeout=10),
        lambda r: sum(p.alive for p in r.proplets) == 3,
    )
    await d.registry.InitModel(model_registry_pb2.InitModelRequest(dimension=3), timeout=10)
    gone = d.proplet_ids[2]
    await d.stop_proplet(gone)
    # Still within its alive window, so it is scheduled, but it will never report.

    r_k2 = f"r-{uuid.uuid4().hex[:8]}"
    resp = await d.experiment(r_k2, "fl/models/global_model_v0", 2, d.proplet_ids)
    assert len(resp.scheduled) == 3
    status = await d.wait_round_closed(r_k2)
    assert status.state == coordinator_pb2.ROUND_STATE_COMPLETED, status.failure_reason
    assert status.num_updates == 2 and status.closed_by == "k_of_n"
    assert gone not in status.reported

    r_k3 = f"r-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    await d.experiment(r_k3, "fl/models/global_model_v1", 3, d.proplet_ids, timeout_s=3)
    mid = await eventually(lambda: d.round_status(r_k3), lambda s: s.num_updates == 2)
    assert mid.state == coordinator_pb2.ROUND_STATE_OPEN  # waits for the third, up to the deadline
    status3 = await d.wait_round_closed(r_k3)
    assert time.monotonic() - started >= 2.5
    assert status3.state == coordinator_pb2.ROUND_STATE_COMPLETED, status3.failure_reason
    assert status3.completed and status3.num_updates == 2 and status3.k_of_n == 3
    assert status3.closed_by == "deadline" and status3.new_model_version == 2
