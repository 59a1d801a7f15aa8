"""The MQTT broker (a real Mosquitto with persistence, TLS and the ACL, of this test's own)
stopped in the middle of a round and started again on the same port over the same data
directory: the manager, the coordinator and three proplets reconnect and resubscribe by
themselves, nothing published during the outage is lost (QoS 1, persistent sessions for the
manager, the proplets and a persistent watcher), a StartExperiment issued while the broker is
down succeeds once it is back, and both rounds complete with every update.

Killed (SIGKILL) instead, several times in a row (issue 10, item 1): the broker keeps nothing
it had not saved (its sessions, subscriptions and queued messages are gone, and so is what it
had acknowledged but not delivered), yet every task result reaches the manager, because a
proplet sends each result again until the manager acknowledges it, and the manager applies a
repeat as a no-op; the proplets' heartbeats and announcements resume."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from propeller.v1 import coordinator_pb2, manager_pb2
from server.config import MqttConfig
from server.mqtt import MqttSession
from tests.proplet import wat
from tests.support.clients import Clients
from tests.support.cluster import Cluster, cluster, round_notes
from tests.support.infra import Mosquitto
from tests.support.security import proplet_tls, service_tls
from tests.support.waits import eventually

# How long the phase-1 module trains: the broker is down for about this long.
SLOW_S = 3.0


def as_manager(mqtt: MqttConfig) -> MqttConfig:
    return mqtt.as_identity(service_tls("manager"))


def as_proplet(mqtt: MqttConfig, proplet_id: str) -> MqttConfig:
    return mqtt.as_identity(proplet_tls(proplet_id))


def stop_and_check_saved(broker: Mosquitto) -> None:
    broker.stop()
    db = broker.workdir / "data" / "mosquitto.db"
    assert db.exists(), f"mosquitto did not save its sessions\n{broker.tail()}"


@pytest.fixture
async def fleet(own_mqtt: MqttConfig, tmp_path: Path) -> AsyncIterator[Cluster]:
    """The Stack and three proplets, all on the test's own broker."""
    settings = {"memory_limit_bytes": 64 << 20, "rpc_timeout_s": 10.0}
    async with cluster(own_mqtt, tmp_path, proplets=3, proplet=settings) as c:
        yield c


async def tasks_in(f: Cluster, round_id: str, state: int) -> list[manager_pb2.Task]:
    """The round's three tasks, once all are in `state`."""
    return await eventually(
        lambda: f.round_tasks(round_id),
        lambda ts: len(ts) == 3 and all(t.state == state for t in ts),
    )


async def round_status(c: Clients, round_id: str) -> Any:
    """Straight from the coordinator, over gRPC (no MQTT on this path); None if unknown."""
    try:
        return await c.status(round_id)
    except grpc.aio.AioRpcError as err:
        if err.code() == grpc.StatusCode.NOT_FOUND:
            return None
        raise


async def completed(c: Clients, round_id: str) -> Any:
    status = await c.wait_state(round_id, timeout=60)
    assert status.state == coordinator_pb2.ROUND_STATE_COMPLETED, status.failure_reason
    return status


async def experiment(f: Cluster, round_id: str, image: str) -> Any:
    return await f.start_experiment(round_id, f.proplet_ids, image, k_of_n=3)


async def test_a_broker_restart_mid_round_loses_nothing(
    fleet: Cluster, own_broker: Mosquitto, trainer_wasm: Path, tmp_path: Path
) -> None:
    f = fleet

    async def note_for(round_id: str) -> dict[str, Any]:
        async with asyncio.timeout(20):
            while True:
                note = await notes.get()
                if note["round_id"] == round_id:
                    return note

    # A persistent subscriber (stable id, clean_session=False) to the round notifications.
    async with round_notes(f.mqtt, persistent=True) as notes:
        # Phase 1: the broker goes down while the three proplets train.
        r1 = f"r1-{uuid.uuid4().hex[:6]}"
        module = tmp_path / "slow.wasm"
        module.write_bytes(wat.round_update(r1, SLOW_S))
        started = await experiment(f, r1, f"file://{module}")
        assert len(started.scheduled) == 3 and not started.skipped
        await tasks_in(f, r1, manager_pb2.TASK_STATE_RUNNING)
        await asyncio.to_thread(stop_and_check_saved, own_broker)
        during = await round_status(f, r1)
        assert during.num_updates == 0  # nobody had submitted yet: the outage covers it all
        # Updates go over gRPC: the round completes while the broker is still down.
        status1 = await completed(f, r1)
        assert status1.num_updates == 3 and set(status1.reported) == set(f.proplet_ids)
        await asyncio.to_thread(own_broker.start)
        # The results the proplets produced during the outage reach the manager, and the
        # coordinator's round-complete notification reaches the persistent watcher.
        done1 = await tasks_in(f, r1, manager_pb2.TASK_STATE_COMPLETED)
        assert all(json.loads(t.results)["accepted"] for t in done1)
        note1 = await note_for(r1)
        assert note1["new_model_version"] == status1.new_model_version == 1
        assert note1["num_updates"] == 3
        assert await f.wait_alive(f.proplet_ids)

        # Phase 2: StartExperiment while the broker is down; it waits for the broker.
        await asyncio.to_thread(stop_and_check_saved, own_broker)
        r2 = f"r2-{uuid.uuid4().hex[:6]}"
        call = asyncio.ensure_future(experiment(f, r2, f"file://{trainer_wasm}"))
        try:
            # The manager configures the round, opens it and is then waiting to publish its
            # tasks (configured and opened are two calls: the round may be seen PENDING first).
            opened = await eventually(
                lambda: round_status(f, r2),
                lambda s: s is not None and s.state != coordinator_pb2.ROUND_STATE_PENDING,
            )
            assert opened.state == coordinator_pb2.ROUND_STATE_OPEN
            assert not call.done()
            await asyncio.to_thread(own_broker.start)
            resp = await call
        finally:
            if not call.done():
                call.cancel()
                await asyncio.wait({call})
        assert {s.proplet_id for s in resp.scheduled} == set(f.proplet_ids)
        assert not resp.skipped
        status2 = await completed(f, r2)
        assert status2.num_updates == 3 and set(status2.reported) == set(f.proplet_ids)
        assert status2.new_model_version == 2
        await tasks_in(f, r2, manager_pb2.TASK_STATE_COMPLETED)
        note2 = await note_for(r2)
        assert note2["new_model_version"] == 2
    assert await f.alive() == set(f.proplet_ids)


class TaskInbox:
    """A new proplet's task-start topic, and what arrives on it."""

    def __init__(self, mqtt: MqttConfig) -> None:
        self.proplet_id = f"p-{uuid.uuid4().hex[:8]}"
        self.topic = mqtt.topics.task_start_for(self.proplet_id)
        self.got: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_message(self, _: str, payload: bytes) -> None:
        self.got.put_nowait(payload)

    def session(self, mqtt: MqttConfig, *, clean_session: bool = False) -> MqttSession:
        """The proplet's session, subscribed to its task-start topic."""
        pid = self.proplet_id
        return MqttSession(
            as_proplet(mqtt, pid), pid, [self.topic], self.on_message, clean_session=clean_session
        )


async def test_every_reconnect_subscribes_again(
    own_broker: Mosquitto, own_mqtt: MqttConfig
) -> None:
    """With clean sessions the restarted broker remembers no subscription: messages after the
    restart arrive only because the session subscribed again on reconnecting. (The manager
    publishing to a proplet's own task topic: what the ACL allows.)"""
    mqtt = own_mqtt
    inbox = TaskInbox(mqtt)
    topic, got = inbox.topic, inbox.got
    sub = inbox.session(mqtt, clean_session=True)
    pub = MqttSession(as_manager(mqtt), "manager", clean_session=True)
    async with sub, pub:
        await pub.publish(topic, b"before")
        assert await asyncio.wait_for(got.get(), 10) == b"before"
        for n in range(2):  # twice: every reconnect, not only the first
            connects = sub.connects
            await asyncio.to_thread(own_broker.stop)
            await asyncio.to_thread(own_broker.start)

            async def reconnected(seen: int = connects) -> bool:
                return sub.connects > seen

            await eventually(reconnected, timeout=15)
            await pub.publish(topic, f"after-{n}".encode())
            assert await asyncio.wait_for(got.get(), 10) == f"after-{n}".encode()


async def test_a_publish_during_a_short_outage_waits_for_the_broker(
    own_broker: Mosquitto, own_mqtt: MqttConfig
) -> None:
    """QoS 1 to a persistent subscriber: published while the broker is down (the publisher
    waits for it), delivered after it is back."""
    mqtt = own_mqtt
    inbox = TaskInbox(mqtt)
    topic, got = inbox.topic, inbox.got
    sub = inbox.session(mqtt)
    pub = MqttSession(as_manager(mqtt), "manager")
    async with sub, pub:
        await asyncio.to_thread(stop_and_check_saved, own_broker)
        sending = asyncio.ensure_future(pub.publish(topic, b"during", timeout=15))
        await asyncio.sleep(0.3)  # the outage itself, not a synchronisation
        assert not sending.done()
        await asyncio.to_thread(own_broker.start)
        await sending
        assert await asyncio.wait_for(got.get(), 15) == b"during"


async def kill(broker: Mosquitto) -> None:
    """SIGKILL: mosquitto saves nothing (it saves its sessions on a clean stop only)."""
    await asyncio.to_thread(broker.kill)


async def heard_from_since(f: Cluster, since: float) -> None:
    """Every proplet heard from (an announcement or a heartbeat) after `since`."""
    await eventually(
        f.proplets,
        lambda ps: {p.id for p in ps if p.last_seen > since} == set(f.proplet_ids),
        what="every proplet heard from again",
    )


async def test_task_results_survive_a_broker_killed_mid_round_again_and_again(
    fleet: Cluster, own_broker: Mosquitto, tmp_path: Path
) -> None:
    f = fleet
    ids = set(f.proplet_ids)
    module = tmp_path / "slow.wasm"
    # Three rounds, the broker killed once in each, at three moments: while the proplets
    # train; while they train, back only after they have all reported (every Completed result
    # produced while it is down); and right as the round completes (results in flight).
    for n, moment in enumerate(("training", "outage", "reporting")):
        round_id = f"k{n}-{uuid.uuid4().hex[:6]}"
        module.write_bytes(wat.round_update(round_id, 1.0))
        resp = await experiment(f, round_id, f"file://{module}")
        assert {s.proplet_id for s in resp.scheduled} == ids and not resp.skipped
        if moment == "reporting":
            await completed(f, round_id)
            await kill(own_broker)
            await asyncio.to_thread(own_broker.start)
        else:
            await tasks_in(f, round_id, manager_pb2.TASK_STATE_RUNNING)
            await kill(own_broker)
            if moment == "outage":
                await completed(f, round_id)  # over gRPC, while the broker is down
            await asyncio.to_thread(own_broker.start)
        back = time.time()
        status = await completed(f, round_id)
        assert status.num_updates == 3 and set(status.reported) == ids
        assert status.new_model_version == n + 1
        done = await tasks_in(f, round_id, manager_pb2.TASK_STATE_COMPLETED)
        for task in done:
            summary = json.loads(task.results)
            assert summary["accepted"] is True and summary["duplicate"] is False, task.results
        await heard_from_since(f, back)
    assert await f.alive() == ids
