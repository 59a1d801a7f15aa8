"""SIGTERM on the registry, the manager and the data store (real processes) while a call is in
flight: the call completes, or is rejected cleanly and leaves nothing behind (never a torn
version); the process exits 0; a restart over the same state directory carries on from what
was saved."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from propeller.v1 import (
    coordinator_pb2,
    datastore_pb2,
    datastore_pb2_grpc,
    manager_pb2,
    manager_pb2_grpc,
    model_registry_pb2,
    model_registry_pb2_grpc,
    tensor_pb2,
)
from server.config import MqttConfig
from server.grpc_server import channel
from server.streams import model_stream
from server.tensors import Tensors, sha256_of, tensor_from_proto, tensor_to_proto
from server.topics import Topics
from tests.manager.fakes import WASM, FakeCoordinator, FakeProplet, fake_coordinator
from tests.reliability.test_manager_crash import manager_env
from tests.reliability.test_registry_crash import (
    BIG_CHUNKS,
    CHUNK,
    big_model,
    fetched_sha256,
    listed,
    put,
    small_model,
)
from tests.support.infra import Mosquitto
from tests.support.processes import RPC_S, STOP_S, ServiceProcess, service_process
from tests.support.waits import eventually

log = logging.getLogger(__name__)

Stub = Any  # generated gRPC stubs carry no type information
# The gRPC status of a call the stopping server refused or cut short.
REJECTED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


async def until_shutting_down(process: ServiceProcess) -> None:
    """Until the process has begun its graceful stop: its health service stops answering
    SERVING (or stops taking calls at all)."""
    async with channel(process.addr, process.tls) as chan:
        stub = health_pb2_grpc.HealthStub(chan)

        async def serving() -> bool:
            try:
                resp = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
            except grpc.aio.AioRpcError:
                return False
            return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)

        await eventually(serving, lambda s: not s, timeout=STOP_S, what="no longer SERVING")


# --- registry ---------------------------------------------------------------------------------


async def test_sigterm_during_put_model_never_leaves_a_torn_version(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    with service_process("registry", {"PROPELLER_STATE_DIR": str(state_dir)}, tmp_path) as reg:
        await reg.restart()
        async with channel(reg.addr, reg.tls) as chan:
            stub = model_registry_pb2_grpc.ModelRegistryStub(chan)
            assert (await put(stub, small_model(0))).version == 0
            tensors = big_model(7)
            digest = await asyncio.to_thread(sha256_of, tensors)

            async def chunks() -> AsyncIterator[tensor_pb2.ModelChunk]:
                for n, chunk in enumerate(model_stream(tensors, CHUNK), start=1):
                    yield chunk
                    if n == BIG_CHUNKS // 10:
                        reg.send(signal.SIGTERM)  # with most of the model still to send

            acknowledged: model_registry_pb2.ModelVersion | None = None
            try:
                acknowledged = await stub.PutModel(chunks(), timeout=RPC_S)
            except grpc.aio.AioRpcError as err:
                assert err.code() in REJECTED, (err.code(), err.details())
            code = await reg.wait_exit()
            assert code == 0, reg.tail()
            log.info("PutModel in flight at SIGTERM: acknowledged=%s", acknowledged is not None)

            await reg.restart()
            models = await listed(stub)
            versions = [m.version for m in models]
            if acknowledged is not None:
                assert acknowledged.version == 1 and acknowledged.sha256 == digest
                assert versions == [0, 1]
            assert versions in ([0], [0, 1]), versions  # absent or complete, nothing else
            for m in models:
                assert await fetched_sha256(stub, m.version) == m.sha256
            if versions == [0, 1]:
                assert models[1].sha256 == digest
            # Numbering carries on from what was saved.
            assert (await put(stub, small_model(2))).version == len(versions)
        assert await reg.terminate_async() == 0, reg.tail()


# --- manager ----------------------------------------------------------------------------------


class GatedCoordinator(FakeCoordinator):
    """StartRound waits for `gate`: the manager's StartExperiment stays in flight until the
    test opens it."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.waiting = asyncio.Event()

    async def StartRound(
        self, request: coordinator_pb2.StartRoundRequest, context: Any
    ) -> coordinator_pb2.RoundStatus:
        self.waiting.set()
        await self.gate.wait()
        return await super().StartRound(request, context)


async def test_sigterm_lets_a_start_experiment_in_flight_finish(
    broker: Mosquitto, topics: Topics, mqtt: MqttConfig, tmp_path: Path, seed_image_registry: str
) -> None:
    coord = GatedCoordinator()
    async with fake_coordinator(coord) as (_, coord_addr):
        env = manager_env(mqtt, tmp_path / "state", coord_addr, seed_image_registry)
        with service_process("manager", env, tmp_path) as mgr:
            await mgr.restart()
            async with (
                channel(mgr.addr, mgr.tls) as chan,
                FakeProplet(broker.port, topics, "p1", heartbeat_s=None) as p1,
            ):
                stub = manager_pb2_grpc.ManagerStub(chan)

                async def listed() -> bool:
                    reply = await stub.ListProplets(manager_pb2.ListPropletsRequest())
                    return [p.id for p in reply.proplets] == ["p1"]

                await eventually(listed, what="p1 registered", timeout=30)
                pending = await stub.CreateTask(
                    manager_pb2.CreateTaskRequest(name="pending", image_url=WASM), timeout=RPC_S
                )
                call = asyncio.ensure_future(
                    stub.StartExperiment(
                        manager_pb2.StartExperimentRequest(
                            experiment_id="exp-term",
                            round_id="r-term",
                            model_ref="fl/models/global_model_v0",
                            participants=["p1"],
                            task_wasm_image=WASM,
                        ),
                        timeout=RPC_S,
                    )
                )
                try:
                    await asyncio.wait_for(coord.waiting.wait(), RPC_S)
                    mgr.send(signal.SIGTERM)
                    await until_shutting_down(mgr)
                    coord.gate.set()  # the in-flight call may now finish
                    started = await call
                finally:
                    coord.gate.set()
                    if not call.done():
                        call.cancel()
                        with contextlib.suppress(BaseException):
                            await call
                [scheduled] = started.scheduled
                assert (await p1.next_start()).id == scheduled.task_id
                code = await mgr.wait_exit()
                assert code == 0, mgr.tail()

                await mgr.restart()
                experiment = await stub.GetExperiment(
                    manager_pb2.GetExperimentRequest(experiment_id="exp-term"), timeout=RPC_S
                )
                assert [s.task_id for s in experiment.scheduled] == [scheduled.task_id]
                task = await stub.GetTask(manager_pb2.TaskRef(task_id=scheduled.task_id))
                assert task.state == manager_pb2.TASK_STATE_SCHEDULED
                again = await stub.GetTask(manager_pb2.TaskRef(task_id=pending.id))
                assert again == pending
                # It carries on: the saved pending task can be started now.
                restarted = await stub.StartTask(manager_pb2.TaskRef(task_id=pending.id))
                assert restarted.state == manager_pb2.TASK_STATE_SCHEDULED
            assert await mgr.terminate_async() == 0, mgr.tail()


# --- data store -------------------------------------------------------------------------------


def big_dataset(proplet_id: str, seed: int, n: int = 500_000) -> datastore_pb2.Dataset:
    rng = np.random.default_rng(seed)
    return datastore_pb2.Dataset(  # n x 4 float64 features: 16 MB by default
        proplet_id=proplet_id,
        features=tensor_to_proto(rng.normal(size=(n, 4))),
        labels=tensor_to_proto((rng.random(n) < 0.5).astype(np.float64)),
    )


def arrays(ds: datastore_pb2.Dataset) -> Tensors:
    return {
        "features": tensor_from_proto(ds.features, "features"),
        "labels": tensor_from_proto(ds.labels, "labels"),
    }


async def test_sigterm_on_the_data_store_keeps_what_it_acknowledged(tmp_path: Path) -> None:
    env = {"PROPELLER_STATE_DIR": str(tmp_path / "state")}
    saved = big_dataset("saved", 1)
    racing = [big_dataset(f"racing-{i}", 10 + i) for i in range(4)]
    with service_process("datastore", env, tmp_path) as ds:
        await ds.restart()
        async with channel(ds.addr, ds.tls) as chan:
            stub = datastore_pb2_grpc.DataStoreStub(chan)
            await stub.PutDataset(datastore_pb2.PutDatasetRequest(dataset=saved), timeout=RPC_S)
            calls = [
                asyncio.ensure_future(
                    stub.PutDataset(datastore_pb2.PutDatasetRequest(dataset=msg), timeout=RPC_S)
                )
                for msg in racing
            ]
            # SIGTERM as soon as the first of them is answered: the others are in flight (or
            # still on their way).
            await asyncio.wait(calls, timeout=RPC_S, return_when=asyncio.FIRST_COMPLETED)
            ds.send(signal.SIGTERM)
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
            acknowledged: list[str] = []
            for msg, outcome in zip(racing, outcomes, strict=True):
                if isinstance(outcome, grpc.aio.AioRpcError):
                    assert outcome.code() in REJECTED, (outcome.code(), outcome.details())
                else:
                    assert isinstance(outcome, datastore_pb2.DatasetInfo), outcome
                    acknowledged.append(msg.proplet_id)
            code = await ds.wait_exit()
            assert code == 0, ds.tail()
            log.info("PutDataset racing SIGTERM: acknowledged %s", acknowledged)
            assert acknowledged, "the first answer came before the SIGTERM"

            await ds.restart()
            reply = await stub.ListDatasets(datastore_pb2.ListDatasetsRequest(), timeout=RPC_S)
            ids = [d.proplet_id for d in reply.datasets]
            assert {"saved", *acknowledged} <= set(ids)
            for msg in (saved, *racing):
                if msg.proplet_id not in ids:
                    continue  # rejected and absent: fine
                got = await stub.GetDataset(
                    datastore_pb2.GetDatasetRequest(proplet_id=msg.proplet_id), timeout=RPC_S
                )
                for name, arr in arrays(got).items():
                    assert np.array_equal(arr, arrays(msg)[name]), (msg.proplet_id, name)
        assert await ds.terminate_async() == 0, ds.tail()
