"""What the manager does with what reaches it over MQTT (issue 9, items 4 and 8): it trusts
the topic (which the broker's ACL lets only its proplet publish to), never the payload. A real
stack and a real proplet over the tests' broker (TLS, certificates, the ACL); the attacker is a
proplet with a real certificate of the deployment. A proplet without one cannot connect at
all (tests/security/test_mqtt.py): the manager never hears of it and never schedules it."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from propeller.v1 import manager_pb2
from server.config import MqttConfig
from server.messages import COMPLETED, FAILED, PropletAnnounce, TaskResult
from server.mqtt import MqttSession
from tests.proplet import wat
from tests.support.cluster import Cluster, cluster
from tests.support.security import proplet_tls
from tests.support.waits import eventually


@pytest.fixture
async def world(mqtt: MqttConfig, tmp_path: Path) -> AsyncIterator[Cluster]:
    """The stack and one real proplet."""
    async with cluster(mqtt, tmp_path, proplets=1, proplet={"memory_limit_bytes": 64 << 20}) as c:
        yield c


def fresh(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def registered(world: Cluster, proplet_id: str) -> None:
    await eventually(
        world.proplets,
        lambda ps: any(p.id == proplet_id for p in ps),
        what=f"{proplet_id} registered",
    )


async def test_a_proplet_announcing_itself_as_another_is_never_scheduled(
    world: Cluster, trainer_wasm: Path
) -> None:
    t = world.topics
    evil, ghost = fresh("evil"), fresh("ghost")
    [real] = world.proplet_ids
    mqtt = world.mqtt.as_identity(proplet_tls(evil))
    async with MqttSession(mqtt, evil, clean_session=True) as s:
        # On its own topics (the only ones the broker lets it use), payloads naming others.
        for victim in (ghost, real):
            await s.publish(t.proplet_create_for(evil), PropletAnnounce(victim, "x").to_json())
            await s.publish(t.proplet_alive_for(evil), PropletAnnounce(victim).to_json())
        # On the ghost's own topic: refused by the broker.
        await s.publish(t.proplet_create_for(ghost), PropletAnnounce(ghost).to_json())
        # Itself, last: once it is listed, everything before it was handled.
        await s.publish(t.proplet_create_for(evil), PropletAnnounce(evil, "evil").to_json())
        await registered(world, evil)
    listed = {p.id: p for p in await world.proplets()}
    assert set(listed) == {real, evil}
    assert listed[real].name == "proplet-1"  # the forged announcement changed nothing
    # Never scheduled: the ghost is unknown.
    round_id = fresh("r")
    # (A module the manager can read, so it can pin its digest.)
    image = f"file://{trainer_wasm}"
    resp = await world.start_experiment(round_id, [ghost, real], image, k_of_n=1)
    assert [s.proplet_id for s in resp.scheduled] == [real]
    assert [(s.proplet_id, s.reason) for s in resp.skipped] == [(ghost, "unknown proplet")]


async def test_a_forged_result_for_another_proplets_task_is_not_recorded(
    world: Cluster, tmp_path: Path
) -> None:
    t = world.topics
    [real] = world.proplet_ids
    evil = fresh("evil")
    round_id = fresh("r")
    module = tmp_path / "slow.wasm"
    module.write_bytes(wat.round_update(round_id, 1.0))
    resp = await world.start_experiment(round_id, [real], f"file://{module}", k_of_n=1)
    [scheduled] = resp.scheduled
    await eventually(
        lambda: world.task(scheduled.task_id),
        lambda task: task.state == manager_pb2.TASK_STATE_RUNNING,
        what="the real task running",
    )
    async with MqttSession(world.mqtt.as_identity(proplet_tls(evil)), evil) as s:
        for claimed in (real, evil, ""):  # as the real proplet, as itself, as nobody
            for state in (COMPLETED, FAILED):
                forged = TaskResult(
                    scheduled.task_id,
                    claimed,
                    state,
                    results='{"forged": true}',
                    error="forged",
                    attempt=1,  # the task's first start
                )
                await s.publish(t.proplet_results_for(evil), forged.to_json())
        # On the real proplet's own results topic: refused by the broker.
        forged = TaskResult(scheduled.task_id, real, COMPLETED, '{"forged": true}', attempt=1)
        await s.publish(t.proplet_results_for(real), forged.to_json())
        await s.publish(t.proplet_create_for(evil), PropletAnnounce(evil).to_json())
        await registered(world, evil)  # every forged result before it was handled
    task = await world.task(scheduled.task_id)
    assert task.state == manager_pb2.TASK_STATE_RUNNING and "forged" not in task.results
    # The real proplet's result is the one recorded.
    done = await world.finished(scheduled.task_id)
    assert done.state == manager_pb2.TASK_STATE_COMPLETED, done.error
    assert json.loads(done.results)["accepted"] is True
