"""Misbehaving WASM modules as federated round tasks (Manager.StartExperiment on a real Stack,
a real proplet with small but realistic limits): each fails with its own reason within its
limits, submits nothing to the coordinator (whose round fails at once, with that reason), and
leaves the proplet alive (heartbeats go on) and able to run the next round's real trainer to
completion."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from propeller.v1 import coordinator_pb2, manager_pb2
from proplet import PropletConfig
from proplet.runner import HARD_DEADLINE_GRACE_S
from server.config import MqttConfig
from tests.proplet import wat
from tests.support.cluster import Cluster, cluster
from tests.support.waits import eventually

# The limits under test: PROPLET_TASK_TIMEOUT_S=2, PROPLET_MEMORY_LIMIT_MB=64, and the default
# PROPLET_OUTPUT_LIMIT_MB=16.
TASK_TIMEOUT_S = 2.0
MEMORY_LIMIT = 64 << 20
OUTPUT_LIMIT = 16 << 20


def invalid_json() -> bytes:
    return wat.printing(b'{"round_id": "r", "update": {"w": [0.1, 0.2,\n', exit_code=0)


def hundred_megabytes() -> bytes:
    """Writes 100 MiB to stdout in 1 MiB writes (and ignores the write errors)."""
    return wat.flood(chunk=1 << 20, times=100)


def eight_memories() -> bytes:
    return wat.many_memories(8, 1000)


def an_hour_asleep() -> bytes:
    return wat.sleeper(3600)


# (module, how the task's error starts, what else it says)
CASES: dict[str, tuple[Callable[[], bytes], str, str]] = {
    "trap": (wat.trap, "trap: wasm `unreachable` instruction executed", ""),
    "infinite-loop": (wat.infinite_loop, f"deadline exceeded after {TASK_TIMEOUT_S:g}s", ""),
    "memory-hog": (wat.memory_hog, "memory limit exceeded (", "of 64 MiB in use): trap"),
    # 8 x 62.5 MiB, each under the cap on its own: the limit is a total.
    "eight-memories": (
        eight_memories,
        "memory limit exceeded: the module needs 8 linear memories, a task may have 1",
        "(64 MiB of memory and tables in all)",
    ),
    # Asleep in a WASI host call (poll_oneoff) for an hour: woken at the deadline.
    "sleeps-in-host": (an_hour_asleep, f"deadline exceeded after {TASK_TIMEOUT_S:g}s", ""),
    "invalid-json": (invalid_json, "invalid update: stdout is not one JSON object", ""),
    "100MB-stdout": (
        hundred_megabytes,
        f"output too large: more than {OUTPUT_LIMIT} bytes on stdout",
        "",
    ),
}


@pytest.fixture
async def world(mqtt: MqttConfig, tmp_path: Path) -> AsyncIterator[Cluster]:
    """The Stack and one proplet with the limits under test."""
    assert PropletConfig(proplet_id="p", tls=None).output_limit_bytes == OUTPUT_LIMIT  # the default
    limits = {
        "heartbeat_s": 0.25,
        "task_timeout_s": TASK_TIMEOUT_S,
        "memory_limit_bytes": MEMORY_LIMIT,
        "rpc_timeout_s": 5.0,
    }
    async with cluster(mqtt, tmp_path, proplets=1, proplet=limits) as c:
        yield c


async def one_round(world: Cluster, image: str) -> tuple[str, str]:
    """A one-participant round running `image`; (round_id, task_id)."""
    rid = f"r-{uuid.uuid4().hex[:8]}"
    resp = await world.start_experiment(rid, world.proplet_ids, image, k_of_n=1)
    [scheduled] = resp.scheduled
    return rid, scheduled.task_id


async def heard_from_after(world: Cluster, t: float) -> manager_pb2.Proplet:
    """The proplet as the manager lists it, once a heartbeat newer than `t` arrived."""

    async def me() -> manager_pb2.Proplet:
        return next(p for p in await world.proplets() if p.id in world.proplet_ids)

    return await eventually(me, lambda p: p.last_seen > t, timeout=10)


@pytest.mark.parametrize("case", list(CASES))
async def test_a_misbehaving_round_task_fails_alone(
    world: Cluster, case: str, tmp_path: Path, trainer_wasm: Path
) -> None:
    build, reason, detail = CASES[case]
    module = tmp_path / f"{case}.wasm"
    module.write_bytes(build())

    bad_round, bad_task = await one_round(world, f"file://{module}")
    task = await world.finished(bad_task)
    assert task.state == manager_pb2.TASK_STATE_FAILED
    assert task.error.startswith(reason), task.error
    assert detail in task.error, task.error
    # Stopped by its own limits, never left behind in a host call (the runner's last resort).
    assert "blocked in a host call" not in task.error, task.error
    # Within its limits: the runner's hard stop is the task timeout plus a grace period.
    assert task.finished_at - task.started_at < TASK_TIMEOUT_S + HARD_DEADLINE_GRACE_S + 1.0

    # Nothing reached the coordinator, and the round (its only participant failed) failed at
    # once, with the task's error as the reason, instead of waiting for its deadline.
    status = await world.wait_state(bad_round, coordinator_pb2.ROUND_STATE_FAILED, via="manager")
    assert status.num_updates == 0 and list(status.reported) == []
    assert [(f.proplet_id, f.reason) for f in status.failed] == [(world.proplet_ids[0], task.error)]

    # The proplet lives on: still heartbeating after the failure, listed alive, idle.
    me = await heard_from_after(world, task.finished_at)
    assert me.alive and me.task_count == 0

    # ... and runs the next round's real trainer to completion.
    good_round, good_task = await one_round(world, f"file://{trainer_wasm}")
    good = await world.finished(good_task)
    assert good.state == manager_pb2.TASK_STATE_COMPLETED, good.error
    done = await world.wait_state(
        good_round, coordinator_pb2.ROUND_STATE_COMPLETED, timeout=60, via="manager"
    )
    assert list(done.reported) == world.proplet_ids and done.num_updates == 1
    still = await world.status(bad_round, via="manager")
    assert still.num_updates == 0 and list(still.reported) == []
