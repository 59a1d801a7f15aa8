"""The MQTT broker (a real Mosquitto with persistence, of this test's own) stopped in the
middle of a round and started again on the same port over the same data directory: the
manager, the coordinator and three proplets reconnect and resubscribe by themselves, nothing
published during the outage is lost (QoS 1, persistent sessions for the manager, the proplets
and a persistent watcher), a StartExperiment issued while the broker is down succeeds once it
is back, and both rounds complete with every update."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest

from propeller.v1 import (
    coordinator_pb2,
    coordinator_pb2_grpc,
    manager_pb2,
    manager_pb2_grpc,
    model_registry_pb2,
    model_registry_pb2_grpc,
)
from proplet import Proplet, PropletConfig
from server.config import Endpoints, MqttConfig
from server.mqtt import MqttSession
from server.stack import Stack, StackConfig
from server.topics import Topics
from tests.proplet import wat
from tests.support.infra import Mosquitto
from tests.support.ports import free_port
from tests.support.waits import eventually

T = TypeVar("T")
RPC_S = 10.0
HYPER = coordinator_pb2.Hyperparams(epochs=1, lr=0.01, batch_size=16)
# How long the phase-1 module trains: the broker is down for about this long.
SLOW_S = 3.0
Stub = Any


def slow_update(round_id: str, seconds: float) -> bytes:
    """A round module that "trains" for `seconds` (a WASI sleep), then prints a valid update
    for `round_id` and the 3-feature model."""
    update = json.dumps(
        {
            "round_id": round_id,
            "num_samples": 10,
            "metrics": {"loss": 0.5},
            "update": {"w": [0.25, -0.5, 1.0], "b": 0.125},
        }
    ).encode()
    ns = int(seconds * 1e9)
    body = (
        # poll_oneoff on one relative monotonic-clock subscription (see wat.sleeper) ...
        "(i32.store8 (i32.const 8) (i32.const 0))"
        "(i32.store (i32.const 16) (i32.const 1))"
        f"(i64.store (i32.const 24) (i64.const {ns}))"
        "(drop (call $poll_oneoff (i32.const 0) (i32.const 256) (i32.const 1) (i32.const 512)))"
        # ... then one fd_write of the update to stdout.
        f"(i32.store (i32.const 0) (i32.const {wat.DATA_AT}))"
        f"(i32.store (i32.const 4) (i32.const {len(update)}))"
        "(drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))"
    )
    return wat.build(body, update)


@pytest.fixture
def own_broker() -> Iterator[Mosquitto]:
    """A Mosquitto of this test's own (persistence on), to stop and start at will.

    Started as root, mosquitto drops to the `mosquitto` user: its data directory must be
    reachable and writable by that user, which pytest's private tmp_path is not (persistence
    would then fail silently and a restart would forget every session)."""
    workdir = Path(tempfile.mkdtemp(prefix="propeller-mosquitto-"))
    workdir.chmod(0o755)
    (workdir / "data").mkdir()
    (workdir / "data").chmod(0o777)
    broker = Mosquitto(free_port(), workdir)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def stop_and_check_saved(broker: Mosquitto) -> None:
    broker.stop()
    db = broker.workdir / "data" / "mosquitto.db"
    assert db.exists(), f"mosquitto did not save its sessions; see {broker.workdir}/mosquitto.log"


@dataclass
class Fleet:
    broker: Mosquitto
    stack: Stack
    proplet_ids: list[str]
    topics: Topics
    mqtt: MqttConfig
    manager: Stub
    coordinator: Stub
    tmp: Path

    async def round_tasks(self, round_id: str) -> list[Any]:
        resp = await self.manager.ListTasks(
            manager_pb2.ListTasksRequest(name_prefix=f"fl-round-{round_id}"), timeout=RPC_S
        )
        return list(resp.tasks)

    async def tasks_in(self, round_id: str, state: int) -> list[Any]:
        return await eventually(
            lambda: self.round_tasks(round_id),
            lambda ts: len(ts) == 3 and all(t.state == state for t in ts),
        )

    async def round_status(self, round_id: str) -> Any:
        """Straight from the coordinator, over gRPC (no MQTT on this path)."""
        try:
            return await self.coordinator.GetRoundStatus(
                coordinator_pb2.GetRoundStatusRequest(round_id=round_id), timeout=RPC_S
            )
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise

    async def completed(self, round_id: str) -> Any:
        final = (coordinator_pb2.ROUND_STATE_COMPLETED, coordinator_pb2.ROUND_STATE_FAILED)
        status = await eventually(
            lambda: self.round_status(round_id), lambda s: s is not None and s.state in final
        )
        assert status.state == coordinator_pb2.ROUND_STATE_COMPLETED, status.failure_reason
        return status

    async def experiment(self, round_id: str, image: str) -> Any:
        return await self.manager.StartExperiment(
            manager_pb2.StartExperimentRequest(
                round_id=round_id,
                model_ref="fl/models/global_model_v0",
                participants=self.proplet_ids,
                k_of_n=3,
                timeout_s=60,
                task_wasm_image=image,
                hyperparams=HYPER,
            ),
            timeout=60,
        )

    async def alive(self) -> set[str]:
        listed = await self.manager.ListProplets(manager_pb2.ListPropletsRequest(), timeout=RPC_S)
        return {p.id for p in listed.proplets if p.alive}

    async def stop_broker(self) -> None:
        await asyncio.to_thread(stop_and_check_saved, self.broker)

    async def start_broker(self) -> None:
        await asyncio.to_thread(self.broker.start)


@pytest.fixture
async def fleet(own_broker: Mosquitto, topics: Topics, tmp_path: Path) -> AsyncIterator[Fleet]:
    ids = [f"p{i}-{uuid.uuid4().hex[:6]}" for i in range(3)]
    mqtt = MqttConfig(port=own_broker.port, topics=topics)
    async with AsyncExitStack() as cm:
        stack = await cm.enter_async_context(
            Stack(StackConfig(mqtt=mqtt, seed_proplet_ids=tuple(ids)))
        )
        ep = stack.endpoints
        for i, pid in enumerate(ids):
            await cm.enter_async_context(
                Proplet(
                    PropletConfig(
                        proplet_id=pid,
                        mqtt=mqtt,
                        endpoints=Endpoints(
                            coordinator=ep.coordinator, registry=ep.registry, datastore=ep.datastore
                        ),
                        heartbeat_s=0.5,
                        work_dir=tmp_path / f"proplet-{i}",
                        task_timeout_s=30.0,
                        memory_limit_bytes=64 << 20,
                        rpc_timeout_s=10.0,
                    )
                )
            )
        chans = {
            name: await cm.enter_async_context(grpc.aio.insecure_channel(addr))
            for name, addr in (
                ("manager", ep.manager),
                ("coordinator", ep.coordinator),
                ("registry", ep.registry),
            )
        }
        await model_registry_pb2_grpc.ModelRegistryStub(chans["registry"]).InitModel(
            model_registry_pb2.InitModelRequest(dimension=3), timeout=RPC_S
        )
        f = Fleet(
            broker=own_broker,
            stack=stack,
            proplet_ids=ids,
            topics=topics,
            mqtt=mqtt,
            manager=manager_pb2_grpc.ManagerStub(chans["manager"]),
            coordinator=coordinator_pb2_grpc.CoordinatorStub(chans["coordinator"]),
            tmp=tmp_path,
        )
        await eventually(f.alive, lambda a: a == set(ids))
        yield f


async def test_a_broker_restart_mid_round_loses_nothing(fleet: Fleet, trainer_wasm: Path) -> None:
    f = fleet
    notes: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def on_note(topic: str, payload: bytes) -> None:
        notes.put_nowait(json.loads(payload))

    async def note_for(round_id: str) -> dict[str, Any]:
        async with asyncio.timeout(20):
            while True:
                note = await notes.get()
                if note["round_id"] == round_id:
                    return note

    # A persistent subscriber (stable id, clean_session=False) to the round notifications.
    watcher = MqttSession(f.mqtt, f"watcher-{uuid.uuid4().hex[:8]}", [f.topics.round_next], on_note)
    async with watcher:
        # Phase 1: the broker goes down while the three proplets train.
        r1 = f"r1-{uuid.uuid4().hex[:6]}"
        module = f.tmp / "slow.wasm"
        module.write_bytes(slow_update(r1, SLOW_S))
        started = await f.experiment(r1, f"file://{module}")
        assert len(started.scheduled) == 3 and not started.skipped
        await f.tasks_in(r1, manager_pb2.TASK_STATE_RUNNING)
        await f.stop_broker()
        during = await f.round_status(r1)
        assert during.num_updates == 0  # nobody had submitted yet: the outage covers it all
        # Updates go over gRPC: the round completes while the broker is still down.
        status1 = await f.completed(r1)
        assert status1.num_updates == 3 and set(status1.reported) == set(f.proplet_ids)
        await f.start_broker()
        # The results the proplets produced during the outage reach the manager, and the
        # coordinator's round-complete notification reaches the persistent watcher.
        done1 = await f.tasks_in(r1, manager_pb2.TASK_STATE_COMPLETED)
        assert all(json.loads(t.results)["accepted"] for t in done1)
        note1 = await note_for(r1)
        assert note1["new_model_version"] == status1.new_model_version == 1
        assert note1["num_updates"] == 3
        assert await eventually(f.alive, lambda a: a == set(f.proplet_ids))

        # Phase 2: StartExperiment while the broker is down; it waits for the broker.
        await f.stop_broker()
        r2 = f"r2-{uuid.uuid4().hex[:6]}"
        call = asyncio.ensure_future(f.experiment(r2, f"file://{trainer_wasm}"))
        try:
            # The manager has opened the round and is now waiting to publish its tasks.
            opened = await eventually(lambda: f.round_status(r2), lambda s: s is not None)
            assert opened.state == coordinator_pb2.ROUND_STATE_OPEN
            assert not call.done()
            await f.start_broker()
            resp = await call
        finally:
            if not call.done():
                call.cancel()
                await asyncio.wait({call})
        assert {s.proplet_id for s in resp.scheduled} == set(f.proplet_ids)
        assert not resp.skipped
        status2 = await f.completed(r2)
        assert status2.num_updates == 3 and set(status2.reported) == set(f.proplet_ids)
        assert status2.new_model_version == 2
        await f.tasks_in(r2, manager_pb2.TASK_STATE_COMPLETED)
        note2 = await note_for(r2)
        assert note2["new_model_version"] == 2
    assert await f.alive() == set(f.proplet_ids)


async def test_every_reconnect_subscribes_again(own_broker: Mosquitto, topics: Topics) -> None:
    """With clean sessions the restarted broker remembers no subscription: messages after the
    restart arrive only because the session subscribed again on reconnecting."""
    mqtt = MqttConfig(port=own_broker.port, topics=topics)
    topic = f"{topics.base}/test/resubscribe"
    got: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_message(_: str, payload: bytes) -> None:
        got.put_nowait(payload)

    sub = MqttSession(mqtt, f"sub-{uuid.uuid4().hex[:8]}", [topic], on_message, clean_session=True)
    pub = MqttSession(mqtt, f"pub-{uuid.uuid4().hex[:8]}", clean_session=True)
    async with sub, pub:
        await pub.publish(topic, b"before")
        assert await asyncio.wait_for(got.get(), 10) == b"before"
        for n in range(2):  # twice: every reconnect, not only the first
            connects = sub.connects
            await asyncio.to_thread(own_broker.stop)
            await asyncio.to_thread(own_broker.start)

            async def reconnected(seen: int = connects) -> bool:
                return sub.connects > seen

            await eventually(reconnected, bool, timeout=15)
            await pub.publish(topic, f"after-{n}".encode())
            assert await asyncio.wait_for(got.get(), 10) == f"after-{n}".encode()


async def test_a_publish_during_a_short_outage_waits_for_the_broker(
    own_broker: Mosquitto, topics: Topics
) -> None:
    """QoS 1 to a persistent subscriber: published while the broker is down (the publisher
    waits for it), delivered after it is back."""
    mqtt = MqttConfig(port=own_broker.port, topics=topics)
    topic = f"{topics.base}/test/outage"
    got: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_message(_: str, payload: bytes) -> None:
        got.put_nowait(payload)

    sub = MqttSession(mqtt, f"sub-{uuid.uuid4().hex[:8]}", [topic], on_message)
    pub = MqttSession(mqtt, f"pub-{uuid.uuid4().hex[:8]}")
    async with sub, pub:
        await asyncio.to_thread(stop_and_check_saved, own_broker)
        sending = asyncio.ensure_future(pub.publish(topic, b"during", timeout=15))
        await asyncio.sleep(0.3)  # the outage itself, not a synchronisation
        assert not sending.done()
        await asyncio.to_thread(own_broker.start)
        await sending
        assert await asyncio.wait_for(got.get(), 15) == b"during"
