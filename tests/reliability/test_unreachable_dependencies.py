"""A proplet whose round services are out of reach: it retries transient failures with
exponential backoff and jitter until the round's deadline (env ROUND_DEADLINE, set by the
manager on every round task), then fails the task with a reason naming the service, the
attempts and the time spent. Rejections are final. Real Stack, real proplet, real trainer; the
dependency that is missing is a closed port, a data store started late, or a coordinator
stopped and started again on the same port over the same state file."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from propeller.v1 import coordinator_pb2, manager_pb2
from proplet import PropletConfig
from proplet.errors import TaskFailed
from proplet.federated import (
    MIN_ATTEMPT_TIMEOUT_S,
    Backoff,
    CallFailed,
    FederatedClient,
    FlTask,
    RetryLog,
    call_with_retries,
)
from server.config import Endpoints, MqttConfig
from server.coordinator.app import CoordinatorApp, CoordinatorConfig
from server.datastore.app import DataStoreApp, DataStoreConfig
from server.manager.experiments import round_task_env
from server.round_spec import Hyperparams
from tests.support.clients import HYPER, V0, Clients, clients
from tests.support.cluster import Cluster, cluster, serve_app
from tests.support.environment import config_from_env
from tests.support.ports import free_port
from tests.support.security import service_tls
from tests.support.waits import eventually


@pytest.fixture
async def world(mqtt: MqttConfig, tmp_path: Path, trainer_wasm: Path) -> AsyncIterator[Cluster]:
    """The Stack and one proplet running the real trainer."""
    limits = {"memory_limit_bytes": 64 << 20, "rpc_timeout_s": 5.0}
    image = f"file://{trainer_wasm}"
    async with cluster(mqtt, tmp_path, proplets=1, proplet=limits, image=image) as c:
        yield c


def task_env(world: Cluster, round_id: str, deadline: float, **overrides: str) -> dict[str, str]:
    """A round task's environment as the manager writes it, with `overrides`."""
    ep = world.endpoints
    return {
        "ROUND_ID": round_id,
        "MODEL_URI": V0,
        "HYPERPARAMS": json.dumps({"epochs": 1, "lr": 0.01, "batch_size": 16}),
        "COORDINATOR_URL": ep.coordinator,
        "MODEL_REGISTRY_URL": ep.registry,
        "DATA_STORE_URL": ep.datastore,
        "ROUND_DEADLINE": repr(deadline),
        **overrides,
    }


async def start_task(world: Cluster, env: dict[str, str]) -> str:
    """A manual round task with `env` on the proplet, started; its id."""
    task = await world.run_task(
        manager_pb2.CreateTaskRequest(
            name=f"fl-manual-{env['ROUND_ID']}",
            image_url=world.image,
            env=env,
            proplet_id=world.proplet_ids[0],
        )
    )
    task_id: str = task.id
    return task_id


async def open_round(coordinator: Clients, round_id: str, pid: str, timeout_s: float) -> Any:
    """A manual round on `coordinator` (one participant, k_of_n 1), open at once."""
    return await coordinator.configure(
        round_id, participants=[pid], k_of_n=1, timeout_s=timeout_s, hyperparams=HYPER
    )


async def logged(caplog: pytest.LogCaptureFixture, text: str, timeout: float = 20.0) -> None:
    """Wait (bounded) for a proplet log line containing `text`."""

    async def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records]

    await eventually(lines, lambda ls: any(text in line for line in ls), timeout=timeout)


# --------------------------------------------------------------------------- end to end


async def test_an_unreachable_model_registry_fails_the_task_by_the_round_deadline(
    world: Cluster,
) -> None:
    rid = f"r-{uuid.uuid4().hex[:8]}"
    [pid] = world.proplet_ids
    status = await open_round(world, rid, pid, timeout_s=3.0)
    closed = f"127.0.0.1:{free_port()}"  # nothing listens there
    env = task_env(world, rid, status.deadline, MODEL_REGISTRY_URL=f"grpc://{closed}")
    task_id = await start_task(world, env)
    task = await world.finished(task_id)
    assert task.state == manager_pb2.TASK_STATE_FAILED
    m = re.match(
        rf"model registry at {re.escape(closed)} unreachable after (\d+) attempts over "
        r"([0-9.]+)s: UNAVAILABLE: ",
        task.error,
    )
    assert m is not None, task.error
    attempts, spent = int(m[1]), float(m[2])
    assert attempts >= 2  # retried, with backoff: not a tight loop either
    assert attempts <= 10
    assert spent <= status.timeout_s
    # Given up on by the deadline (+ the MQTT hop of the result), not after the RPC timeouts.
    assert task.finished_at <= status.deadline + 1.0
    after = await world.status(rid)
    assert after.num_updates == 0 and pid not in after.reported


async def test_a_data_store_that_comes_up_late_is_retried_until_it_answers(
    world: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="proplet.federated")
    rid = f"r-{uuid.uuid4().hex[:8]}"
    [pid] = world.proplet_ids
    status = await open_round(world, rid, pid, timeout_s=30.0)
    late = f"127.0.0.1:{free_port()}"
    task_id = await start_task(world, task_env(world, rid, status.deadline, DATA_STORE_URL=late))
    # The proplet found nobody there and is backing off...
    await logged(caplog, f"data store at {late}: GetDataset {pid}: attempt 1 failed")
    # ... and the real data store comes up on that port about a second later.
    await asyncio.sleep(1.0)
    tls = service_tls("datastore")
    late_store = DataStoreApp(DataStoreConfig(addr=late, seed_proplet_ids=(pid,), tls=tls))
    async with serve_app(late_store, late, tls=tls):
        task = await world.finished(task_id)
        assert task.state == manager_pb2.TASK_STATE_COMPLETED, task.error
        assert json.loads(task.results)["accepted"] is True
    done = await world.wait_state(rid, coordinator_pb2.ROUND_STATE_COMPLETED, timeout=60)
    assert list(done.reported) == [pid]


@asynccontextmanager
async def coordinator_on(
    world: Cluster, addr: str, state_dir: Path, mqtt: MqttConfig
) -> AsyncIterator[Clients]:
    """A coordinator of its own on `addr`, keeping its rounds in `state_dir`. Its MQTT is
    `mqtt`: the broker's plaintext listener, since the stack's own coordinator holds the
    coordinator's MQTT identity (one connection per identity: docs/security.md)."""
    ep = world.endpoints
    config = CoordinatorConfig(
        addr=addr,
        aggregator_addr=ep.aggregator,
        registry_addr=ep.registry,
        datastore_addr=ep.datastore,
        mqtt=mqtt,
        rpc_timeout_s=5.0,
        tick_s=0.05,
        state_dir=state_dir,
        tls=service_tls("coordinator"),
    )
    async with (
        serve_app(CoordinatorApp(config), addr, tls=config.tls),
        clients({"coordinator": addr}) as c,
    ):
        yield c


async def test_a_coordinator_down_at_submit_time_gets_the_update_when_back(
    world: Cluster, caplog: pytest.LogCaptureFixture, tmp_path: Path, plain_mqtt: MqttConfig
) -> None:
    caplog.set_level(logging.WARNING, logger="proplet.federated")
    addr = f"127.0.0.1:{free_port()}"
    rid = f"r-{uuid.uuid4().hex[:8]}"
    [pid] = world.proplet_ids
    async with coordinator_on(world, addr, tmp_path / "coord", plain_mqtt) as coord:
        status = await open_round(coord, rid, pid, timeout_s=30.0)
    # The coordinator is down when the proplet has trained and submits.
    task_id = await start_task(world, task_env(world, rid, status.deadline, COORDINATOR_URL=addr))
    await logged(caplog, f"coordinator at {addr}: SubmitUpdate: attempt 1 failed")
    # Back on the same port, over the same state: the round is still open, same deadline.
    async with coordinator_on(world, addr, tmp_path / "coord", plain_mqtt) as coord:
        task = await world.finished(task_id)
        assert task.state == manager_pb2.TASK_STATE_COMPLETED, task.error
        summary = json.loads(task.results)
        assert summary["accepted"] is True and summary["duplicate"] is False
        done = await coord.wait_state(rid, coordinator_pb2.ROUND_STATE_COMPLETED, timeout=60)
        assert done.deadline == status.deadline
        assert list(done.reported) == [pid] and done.num_updates == 1
        assert done.new_model_version == 1


async def test_a_rejected_update_is_not_retried(
    world: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="proplet.federated")
    rid = f"r-{uuid.uuid4().hex[:8]}"
    status = await open_round(world, rid, "someone-else", timeout_s=30.0)
    task_id = await start_task(world, task_env(world, rid, status.deadline))
    task = await world.finished(task_id)
    assert task.state == manager_pb2.TASK_STATE_FAILED
    assert task.error.startswith("coordinator rejected update: "), task.error
    assert not [r for r in caplog.records if "SubmitUpdate: attempt" in r.getMessage()]


async def test_round_tasks_carry_the_round_deadline(world: Cluster) -> None:
    rid = f"r-{uuid.uuid4().hex[:8]}"
    resp = await world.start_experiment(rid, world.proplet_ids, world.image, k_of_n=1, timeout_s=30)
    [scheduled] = resp.scheduled
    task = await world.task(scheduled.task_id)
    assert float(task.env["ROUND_DEADLINE"]) == resp.round.deadline > time.time()
    done = await world.finished(scheduled.task_id)
    assert done.state == manager_pb2.TASK_STATE_COMPLETED, done.error


# --------------------------------------------------------------------------- the policy
# (plain functions and configuration: unit tests, unlike the end-to-end ones above)


@pytest.mark.unit
def test_backoff_grows_exponentially_with_jitter_and_a_cap() -> None:
    backoff = Backoff(initial_s=0.2, max_s=5.0)
    assert [backoff.ceiling(n) for n in range(1, 9)] == pytest.approx(
        [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0]
    )
    rng = random.Random(7)
    for n in range(1, 200):
        d = backoff.delay(n, rng)
        assert backoff.ceiling(n) / 2 <= d <= backoff.ceiling(n) <= backoff.max_s


@pytest.mark.unit
def test_two_proplets_do_not_retry_in_lockstep() -> None:
    backoff = Backoff()
    first = [d for d, _ in zip(backoff.delays(random.Random(1)), range(8), strict=False)]
    second = [d for d, _ in zip(backoff.delays(random.Random(2)), range(8), strict=False)]
    assert all(a != b for a, b in zip(first, second, strict=True))
    # Proplets seed their own source from the OS: two of them draw different schedules.
    a, b = FederatedClient("p1", 5.0, tls=None), FederatedClient("p2", 5.0, tls=None)
    assert [a.backoff.delay(n, a.rng) for n in range(1, 6)] != [
        b.backoff.delay(n, b.rng) for n in range(1, 6)
    ]


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details, "")


@pytest.mark.unit
async def test_a_call_cancelled_by_grpc_is_tried_again() -> None:
    """CANCELLED that the proplet did not ask for (gRPC's core cancels streams under load) is
    another attempt's business, like UNAVAILABLE; a refusal is final at once."""
    codes = [grpc.StatusCode.CANCELLED, grpc.StatusCode.CANCELLED]

    async def flaky(timeout: float) -> str:
        if codes:
            raise rpc_error(codes.pop(), "CANCELLED")
        return "model"

    kw: dict[str, Any] = {
        "rpc_timeout_s": 1.0,
        "backoff": Backoff(initial_s=0.01, max_s=0.02),
        "rng": random.Random(1),
    }
    record = RetryLog()
    assert await call_with_retries(flaky, deadline=time.monotonic() + 10, record=record, **kw) == (
        "model"
    )
    assert len(record.timeouts) == 3

    async def refused(timeout: float) -> str:
        raise rpc_error(grpc.StatusCode.NOT_FOUND, "no such model")

    with pytest.raises(CallFailed) as failed:
        await call_with_retries(refused, deadline=time.monotonic() + 10, **kw)
    assert failed.value.attempts == 1


@pytest.mark.unit
async def test_no_attempt_waits_longer_than_its_timeout() -> None:
    """A service that accepts the call and never answers: every attempt is cut off at its own
    timeout (even by a client that ignores it), and the calls end by the deadline."""
    spans: list[tuple[float, float]] = []
    given: list[float] = []

    async def hangs(timeout: float) -> None:
        given.append(timeout)
        started = time.monotonic()
        try:
            await asyncio.sleep(3600)
        finally:
            spans.append((started, time.monotonic()))

    record = RetryLog()
    began = time.monotonic()
    with pytest.raises(CallFailed) as failed:
        await call_with_retries(
            hangs,
            deadline=began + 2.0,
            rpc_timeout_s=0.3,
            backoff=Backoff(initial_s=0.05, max_s=0.2),
            rng=random.Random(3),
            record=record,
        )
    assert failed.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert failed.value.attempts == len(spans) == len(given) >= 3
    assert record.timeouts == given
    assert all(t <= 0.3 for t in given)
    slack = 0.5  # event-loop scheduling
    for (start, end), timeout in zip(spans, given, strict=True):
        assert end - start < timeout + slack
    assert spans[-1][0] < began + 2.0  # no attempt starts after the deadline
    assert time.monotonic() - began < 2.0 + 0.3 + slack
    assert len(set(record.delays)) == len(record.delays)  # jittered


@pytest.mark.unit
async def test_attempt_timeouts_shrink_to_the_deadline_but_not_below_the_floor() -> None:
    given: list[float] = []

    async def unavailable(timeout: float) -> None:
        given.append(timeout)
        raise rpc_error(grpc.StatusCode.UNAVAILABLE, "connection refused")

    with pytest.raises(CallFailed) as failed:
        await call_with_retries(
            unavailable,
            deadline=time.monotonic() - 5.0,  # already past: one attempt, the floor timeout
            rpc_timeout_s=30.0,
            backoff=Backoff(),
            rng=random.Random(0),
        )
    assert failed.value.attempts == 1 and given == [MIN_ATTEMPT_TIMEOUT_S]
    reason = failed.value.reason("model registry", "reg:1", "GetModel m")
    assert reason.startswith("model registry at reg:1 unreachable after 1 attempt over ")
    assert reason.endswith("s: UNAVAILABLE: connection refused")


@pytest.mark.unit
@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ALREADY_EXISTS,
    ],
)
async def test_answers_are_final(code: grpc.StatusCode) -> None:
    calls = 0

    async def rejects(timeout: float) -> None:
        nonlocal calls
        calls += 1
        raise rpc_error(code, "no")

    with pytest.raises(CallFailed) as failed:
        await call_with_retries(
            rejects,
            deadline=time.monotonic() + 30,
            rpc_timeout_s=5.0,
            backoff=Backoff(),
            rng=random.Random(0),
        )
    assert calls == 1 and failed.value.code == code and not failed.value.transient
    assert failed.value.reason("data store", "ds:1", "GetDataset p") == (
        f"data store ds:1: GetDataset p: {code.name}: no"
    )


@pytest.mark.unit
def test_round_deadline_from_the_task_env() -> None:
    base = {"ROUND_ID": "r1", "MODEL_URI": V0}
    assert FlTask.from_env(base, Endpoints()).round_deadline is None
    fl = FlTask.from_env({**base, "ROUND_DEADLINE": "1700000000.25"}, Endpoints())
    assert fl.round_deadline == 1700000000.25
    soon = FlTask.from_env({**base, "ROUND_DEADLINE": repr(time.time() + 10)}, Endpoints())
    assert 9 < soon.retry_deadline(300) - time.monotonic() <= 10
    manual = FlTask.from_env(base, Endpoints())
    assert 299 < manual.retry_deadline(300) - time.monotonic() <= 300
    for bad in ("soon", "nan", "-1", "inf"):
        with pytest.raises(TaskFailed, match="ROUND_DEADLINE"):
            FlTask.from_env({**base, "ROUND_DEADLINE": bad}, Endpoints())
    task: dict[str, Any] = {
        "round_id": "r1",
        "model_uri": V0,
        "hyperparams": Hyperparams(),
        "proplet_id": "p1",
        "endpoints": Endpoints(),
    }
    env = round_task_env(**task, deadline=1700000000.25)
    assert env["ROUND_DEADLINE"] == "1700000000.25"
    assert "ROUND_DEADLINE" not in round_task_env(**task)


@pytest.mark.unit
def test_retry_settings_from_the_environment() -> None:
    def proplet(**env: str) -> PropletConfig:
        return config_from_env(PropletConfig, PROPLET_ID="p", **env)

    config = proplet(PROPLET_RETRY_BACKOFF_S="0.5", PROPLET_RETRY_MAX_BACKOFF_S="8")
    assert config.backoff == Backoff(initial_s=0.5, max_s=8.0)
    assert proplet().backoff == Backoff(0.2, 5.0)
    with pytest.raises(ValueError, match="retry_backoff_s"):
        proplet(PROPLET_RETRY_BACKOFF_S="0")
    with pytest.raises(ValueError, match="retry_max_backoff_s"):
        proplet(PROPLET_RETRY_BACKOFF_S="2", PROPLET_RETRY_MAX_BACKOFF_S="1")
    with pytest.raises(ValueError, match="PROPLET_RETRY_MAX_BACKOFF_S"):
        proplet(PROPLET_RETRY_MAX_BACKOFF_S="soon")
