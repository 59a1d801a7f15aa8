"""The coordinator as a real process (`python -m server.cli serve coordinator`, configured from
its environment with a PROPELLER_STATE_DIR) killed with SIGKILL or stopped with SIGTERM at the
awkward moments, then started again over the same state directory.

The registry and the aggregator are in-process gRPC servers (a real aggregator process where it
must come up late on a fixed port); where a test needs to lose or hold a reply, a servicer in
front of the real one does it. Mosquitto is real. Every wait is a poll with a bound.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import sqlite3
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import pytest

from propeller.v1 import coordinator_pb2
from server.aggregator.service import AggregatorServicer
from server.config import MqttConfig
from server.coordinator.rounds import Update
from server.faults import KILL_AT_ENV
from server.tensors import Tensors
from server.topics import Topics
from tests.coordinator.helpers import fedavg
from tests.support.clients import CLOSED, V0, clients
from tests.support.cluster import coordinator_process, round_notes, round_services, running
from tests.support.processes import service_process
from tests.support.waits import eventually

log = logging.getLogger(__name__)
T = TypeVar("T")

S = coordinator_pb2
FINISHED = CLOSED
DIMENSION = 20_000  # 160 KB per update: the BLOBs are not trivially small
# The coordinator process under test, its registry holding v0 of DIMENSION zeros.
setup = functools.partial(coordinator_process, dimension=DIMENSION)


def make_updates() -> list[Update]:
    rng = np.random.default_rng(2024)
    return [
        Update(
            proplet_id=p,
            base_model_uri=V0,
            num_samples=n,
            metrics={"loss": loss},
            tensors={"w": rng.standard_normal(DIMENSION), "b": np.array(rng.standard_normal())},
        )
        for p, n, loss in (("a", 10, 0.9), ("b", 30, 0.3), ("c", 60, 0.1))
    ]


UPDATES = make_updates()


async def never_killed_sha256(
    mqtt: MqttConfig, aggregator_addr: str, round_updates: list[Update]
) -> str:
    """The model a coordinator that is never interrupted makes from the same updates in the
    same order (its own registry, the same aggregator): its sha256."""
    own = replace(mqtt, topics=Topics(domain=f"ref-{mqtt.topics.domain}", channel="fl"))
    async with (
        round_services(
            own, dimension=DIMENSION, aggregator_addr=aggregator_addr, tick_s=0.05
        ) as services,
        clients(services) as c,
    ):
        await c.configure("r1", k_of_n=len(round_updates), timeout_s=120)
        for u in round_updates:
            await c.submit("r1", u)
        st = await c.wait_state("r1", *FINISHED)
        assert st.state == S.ROUND_STATE_COMPLETED, st.failure_reason
        [model] = [m for m in await c.models() if m.version == st.new_model_version]
        sha: str = model.sha256
        return sha


def assert_fedavg(actual: Tensors, round_updates: list[Update]) -> None:
    expected = fedavg(round_updates)
    assert list(actual) == list(expected)
    for name in expected:
        assert actual[name].dtype == expected[name].dtype
        np.testing.assert_allclose(actual[name], expected[name], rtol=1e-12, atol=1e-15)


# ---- kill -9 ---------------------------------------------------------------------------


async def test_kill_after_two_acknowledged_updates_loses_nothing(
    mqtt: MqttConfig, tmp_path: Path
) -> None:
    async with setup(mqtt, tmp_path) as (coord, reg, _):
        async with running(coord) as c:
            before = await c.configure("r1", k_of_n=3, timeout_s=120)
            for i, u in enumerate(UPDATES[:2]):
                resp = await c.submit("r1", u)
                assert (resp.accepted, resp.duplicate, resp.num_updates) == (True, False, i + 1)
            # Both acknowledged; nothing in the process gets to run after this.
            coord.kill()

        restarted = time.monotonic()
        async with running(coord) as c:
            st = await c.status("r1")
            assert (st.state, st.num_updates, list(st.reported)) == (
                S.ROUND_STATE_OPEN,
                2,
                ["a", "b"],
            )
            assert (st.started_at, st.deadline) == (before.started_at, before.deadline)
            resp = await c.submit("r1", UPDATES[2])
            assert (resp.accepted, resp.duplicate, resp.num_updates) == (True, False, 3)
            st = await c.wait_state("r1", *FINISHED)
            log.info(
                "[test] kill after 2 of 3: completed %.2fs after the restart",
                time.monotonic() - restarted,
            )
        assert st.state == S.ROUND_STATE_COMPLETED, st.failure_reason
        assert (st.new_model_version, st.closed_by, list(st.reported)) == (
            1,
            "k_of_n",
            ["a", "b", "c"],
        )
        assert st.metrics["loss"] == pytest.approx((0.9 * 10 + 0.3 * 30 + 0.1 * 60) / 100)
        models = await reg.models()
        assert [m.version for m in models] == [0, 1]
        # Exactly the bytes an uninterrupted coordinator makes from the same three updates.
        assert models[1].sha256 == await never_killed_sha256(
            mqtt, coord.env["AGGREGATOR_ADDR"], UPDATES
        )
        assert_fedavg(await reg.model(1), UPDATES)


async def test_duplicate_after_a_restart_is_accepted_but_not_counted(
    mqtt: MqttConfig, tmp_path: Path
) -> None:
    async with setup(mqtt, tmp_path) as (coord, reg, _):
        async with running(coord) as c:
            await c.configure("r1", k_of_n=3, timeout_s=120)
            await c.submit("r1", UPDATES[0])
            coord.kill()
        async with running(coord) as c:
            # "a" did not see its answer (say) and sends again, with different numbers.
            again = replace(UPDATES[0], num_samples=999, tensors=UPDATES[1].tensors)
            resp = await c.submit("r1", again)
            assert (resp.accepted, resp.duplicate, resp.num_updates) == (True, True, 1)
            assert (await c.status("r1")).num_updates == 1
            await c.submit("r1", UPDATES[1])
            await c.submit("r1", UPDATES[2])
            st = await c.wait_state("r1", *FINISHED)
        assert st.state == S.ROUND_STATE_COMPLETED, st.failure_reason
        assert (st.num_updates, list(st.reported)) == (3, ["a", "b", "c"])
        assert await reg.versions() == [0, 1]
        assert_fedavg(await reg.model(1), UPDATES)  # with the first "a", counted once


async def test_the_deadline_survives_a_restart(mqtt: MqttConfig, tmp_path: Path) -> None:
    timeout_s = 6.0
    async with setup(mqtt, tmp_path) as (coord, reg, _):
        async with running(coord) as c:
            before = await c.configure("r1", k_of_n=3, timeout_s=timeout_s)
            await c.submit("r1", UPDATES[1])
            coord.kill()
        # Stay down for half the timeout, so "restart + timeout" is well past the deadline.
        await asyncio.sleep(max(0.0, before.started_at + timeout_s / 2 - time.time()))
        restart_at = time.time()
        assert restart_at < before.deadline
        async with running(coord) as c:
            st = await c.status("r1")
            assert (st.state, st.deadline) == (S.ROUND_STATE_OPEN, before.deadline)
            st = await c.wait_state("r1", *FINISHED)
        log.info(
            "[test] deadline: restart %.2fs before it, completed %.2fs after it",
            before.deadline - restart_at,
            st.completed_at - before.deadline,
        )
        assert st.state == S.ROUND_STATE_COMPLETED, st.failure_reason
        assert (st.closed_by, st.num_updates, st.deadline) == ("deadline", 1, before.deadline)
        # Closed at the original deadline, not a fresh timeout after the restart.
        assert before.deadline <= st.completed_at < restart_at + timeout_s
        assert await reg.versions() == [0, 1]
        assert_fedavg(await reg.model(1), [UPDATES[1]])


async def test_rounds_whose_deadline_passed_while_down_close_on_restart(
    mqtt: MqttConfig, tmp_path: Path
) -> None:
    async with setup(mqtt, tmp_path) as (coord, reg, _):
        async with running(coord) as c:
            one = await c.configure("r-one", k_of_n=3, timeout_s=1.5)
            none = await c.configure("r-none", k_of_n=2, timeout_s=1.5)
            await c.submit("r-one", UPDATES[2])
            coord.kill()
        latest = max(one.deadline, none.deadline)
        # Stay down until both deadlines have passed.
        await asyncio.sleep(max(0.0, latest - time.time()) + 0.2)
        restart_at = time.time()
        async with running(coord) as c:
            st_one = await c.wait_state("r-one", *FINISHED)
            st_none = await c.wait_state("r-none", *FINISHED)
        assert st_one.state == S.ROUND_STATE_COMPLETED, st_one.failure_reason
        assert (st_one.closed_by, st_one.num_updates) == ("deadline", 1)
        assert st_one.completed_at >= restart_at
        assert st_none.state == S.ROUND_STATE_FAILED
        assert (st_none.closed_by, st_none.failure_reason) == (
            "deadline",
            "deadline passed with 0 of 2 updates",
        )
        assert await reg.versions() == [0, 1]
        assert_fedavg(await reg.model(1), [UPDATES[2]])


async def test_a_notification_cut_off_by_a_kill_is_published_after_the_restart(
    mqtt: MqttConfig, tmp_path: Path
) -> None:
    """Killed between committing the completion (with its notification, the outbox) and
    publishing it: the restarted coordinator publishes it (at least once)."""
    async with (
        setup(
            mqtt,
            tmp_path,
            PROPELLER_TEST_KILL_AT="coordinator.round_completed",
        ) as (coord, reg, _),
        round_notes(mqtt) as notes,
    ):
        assert KILL_AT_ENV in coord.env
        async with running(coord) as c:
            await c.configure("r1", k_of_n=3, timeout_s=120)
            for u in UPDATES:
                await c.submit("r1", u)
            # The third update closed the round; the coordinator aggregates, stores v1,
            # commits the completion and its notification, and kills itself.
            assert await coord.wait_exit() == -signal.SIGKILL, coord.tail()
        assert "point=coordinator.round_completed pass=1" in coord.log_text()
        state = Path(coord.env["PROPELLER_STATE_DIR"]) / "coordinator.sqlite"
        assert outbox(state) == [("r1", 0)]  # committed, not sent
        assert notes.empty()  # the publish comes after the point: it never happened

        del coord.env[KILL_AT_ENV]
        async with running(coord) as c:
            note = await asyncio.wait_for(notes.get(), 30)
            st = await c.status("r1")
        assert st.state == S.ROUND_STATE_COMPLETED and st.new_model_version == 1
        assert (note["round_id"], note["new_model_version"], note["num_updates"]) == ("r1", 1, 3)
        assert note["model_uri"] == st.new_model_uri
        await eventually(lambda: _async(outbox(state)), lambda o: o == [("r1", 1)])
        assert await reg.versions() == [0, 1]  # the model itself was stored once
        assert await coord.terminate_async() == 0


def outbox(state_file: Path) -> list[tuple[str, int]]:
    """The coordinator's outbox as another process reads it: (round_id, sent)."""
    conn = sqlite3.connect(state_file)
    try:
        rows = conn.execute("SELECT round_id, sent FROM notices ORDER BY seq").fetchall()
        return [(str(r), int(n)) for r, n in rows]
    finally:
        conn.close()


async def _async(value: T) -> T:
    return value


# ---- downstream failures ----------------------------------------------------------------


async def test_aggregator_down_at_close_is_retried_until_it_is_back(
    mqtt: MqttConfig, tmp_path: Path
) -> None:
    with service_process("aggregator", {}, tmp_path) as aggregator:
        async with setup(
            mqtt,
            tmp_path,
            aggregator=aggregator.addr,
            PROPELLER_COORDINATOR_RETRY_ATTEMPTS="30",
            PROPELLER_COORDINATOR_RETRY_BACKOFF_S="0.1",
            PROPELLER_COORDINATOR_RETRY_MAX_BACKOFF_S="1",
        ) as (coord, reg, _):
            async with running(coord) as c:
                await c.configure("r1", k_of_n=1, timeout_s=120)
                closed = time.monotonic()
                await c.submit("r1", UPDATES[0])
                # The round closed with nothing listening on the aggregator's port.
                await coord.wait_log("aggregate attempt 2/30 failed")
                assert (await c.status("r1")).state == S.ROUND_STATE_AGGREGATING
                await aggregator.restart()
                back = time.monotonic()
                st = await c.wait_state("r1", *FINISHED)
                log.info(
                    "[test] aggregator down %.2fs; round completed %.2fs after it was back",
                    back - closed,
                    time.monotonic() - back,
                )
            assert st.state == S.ROUND_STATE_COMPLETED, st.failure_reason
            assert await reg.versions() == [0, 1]  # exactly one new version
            assert_fedavg(await reg.model(1), [UPDATES[0]])


class RegistryFront:
    """The real ModelRegistry servicer, except that PutModel replies can be lost (the model is
    stored, the caller gets UNAVAILABLE) or held (stored, no answer until the caller leaves)."""

    def __init__(self, *, lose_replies: int = 0, hold_replies: bool = False) -> None:
        self.real: Any = None  # the real servicer, set when the registry starts
        self.lose_replies = lose_replies
        self.hold_replies = hold_replies
        self.puts = 0
        self.landed = asyncio.Event()

    def in_front_of(self, real: Any) -> RegistryFront:
        self.real = real
        return self

    async def InitModel(self, request: Any, context: Any) -> Any:
        return await self.real.InitModel(request, context)

    async def GetModelInfo(self, request: Any, context: Any) -> Any:
        return await self.real.GetModelInfo(request, context)

    async def ListModels(self, request: Any, context: Any) -> Any:
        return await self.real.ListModels(request, context)

    async def GetModel(self, request: Any, context: Any) -> AsyncIterator[Any]:
        async for chunk in self.real.GetModel(request, context):
            yield chunk

    async def PutLineage(self, request_iterator: Any, context: Any) -> Any:
        return await self.real.PutLineage(request_iterator, context)

    async def GetLineage(self, request: Any, context: Any) -> AsyncIterator[Any]:
        async for chunk in self.real.GetLineage(request, context):
            yield chunk

    async def PutModel(self, request_iterator: Any, context: Any) -> Any:
        reply = await self.real.PutModel(request_iterator, context)
        self.puts += 1
        self.landed.set()
        if self.hold_replies:
            await asyncio.Event().wait()  # cancelled when the caller goes away
        if self.lose_replies > 0:
            self.lose_replies -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset (test)")
        return reply


async def test_a_lost_registry_reply_does_not_store_the_model_twice(
    mqtt: MqttConfig, tmp_path: Path
) -> None:
    front = RegistryFront(lose_replies=1)
    async with setup(mqtt, tmp_path, registry_front=front.in_front_of) as (coord, reg, _):
        async with running(coord) as c:
            await c.configure("r1", k_of_n=2, timeout_s=120)
            await c.submit("r1", UPDATES[0])
            await c.submit("r1", UPDATES[2])
            st = await c.wait_state("r1", *FINISHED)
        assert st.state == S.ROUND_STATE_COMPLETED, st.failure_reason
        assert st.new_model_version == 1
        assert front.puts == 1  # the retry found the stored model by its sha256
        assert await reg.versions() == [0, 1]
        assert "store model attempt 1/5 failed" in coord.log_text()
        assert_fedavg(await reg.model(1), [UPDATES[0], UPDATES[2]])


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill", "term"])
async def test_stopped_while_the_registry_write_is_unanswered(
    mqtt: MqttConfig, tmp_path: Path, sig: signal.Signals
) -> None:
    """The model is stored but the coordinator stops before it hears so: after the restart it
    aggregates again, finds those bytes in the registry and records that version."""
    front = RegistryFront(hold_replies=True)
    async with setup(mqtt, tmp_path, registry_front=front.in_front_of) as (coord, reg, _):
        async with running(coord) as c:
            await c.configure("r1", k_of_n=2, timeout_s=120)
            await c.submit("r1", UPDATES[1])
            await c.submit("r1", UPDATES[2])
            await asyncio.wait_for(front.landed.wait(), 30)
            assert (await c.status("r1")).state == S.ROUND_STATE_AGGREGATING
            if sig is signal.SIGKILL:
                coord.kill()
            else:
                rc = await coord.terminate_async()
                log.info(
                    "[test] SIGTERM with a registry write in flight: exit in %.2fs",
                    coord.stopped_after_s,
                )
                assert rc == 0, coord.log_text()
        assert await reg.versions() == [0, 1]
        front.hold_replies = False
        async with running(coord) as c:
            st = await c.wait_state("r1", *FINISHED)
        assert st.state == S.ROUND_STATE_COMPLETED, st.failure_reason
        assert st.new_model_version == 1
        assert front.puts == 1
        assert await reg.versions() == [0, 1]
        assert_fedavg(await reg.model(1), UPDATES[1:])


# ---- SIGTERM -----------------------------------------------------------------------------


async def test_sigterm_with_an_open_round_exits_cleanly_and_the_round_continues(
    mqtt: MqttConfig, tmp_path: Path
) -> None:
    async with setup(mqtt, tmp_path) as (coord, reg, _):
        async with running(coord) as c:
            before = await c.configure("r1", k_of_n=3, timeout_s=120)
            await c.submit("r1", UPDATES[0])
            rc = await coord.terminate_async()
        log.info("[test] SIGTERM with an open round: exit in %.2fs", coord.stopped_after_s)
        assert rc == 0, coord.log_text()
        assert "[serve] coordinator stopped after" in coord.log_text()
        async with running(coord) as c:
            st = await c.status("r1")
            assert (st.state, st.num_updates, st.deadline) == (
                S.ROUND_STATE_OPEN,
                1,
                before.deadline,
            )
            assert (await c.submit("r1", UPDATES[0])).duplicate
            await c.submit("r1", UPDATES[1])
            await c.submit("r1", UPDATES[2])
            st = await c.wait_state("r1", *FINISHED)
        assert st.state == S.ROUND_STATE_COMPLETED, st.failure_reason
        assert await reg.versions() == [0, 1]
        assert_fedavg(await reg.model(1), UPDATES)


class GatedAggregator:
    """The real Aggregator servicer behind a gate: calls wait until it opens."""

    def __init__(self) -> None:
        self.real = AggregatorServicer()
        self.open = asyncio.Event()
        self.entered = asyncio.Event()
        self.calls = 0

    async def Aggregate(self, request_iterator: Any, context: Any) -> AsyncIterator[Any]:
        self.calls += 1
        # Read the first message before waiting: the call is under way (and gRPC's request
        # reader is started, so a call cancelled at the gate leaves nothing un-awaited).
        requests = aiter(request_iterator)
        first = await anext(requests)
        self.entered.set()
        await self.open.wait()

        async def replay() -> AsyncIterator[Any]:
            yield first
            async for chunk in requests:
                yield chunk

        async for chunk in self.real.Aggregate(replay(), context):
            yield chunk


async def test_sigterm_during_aggregation_exits_cleanly_and_the_round_completes_once(
    mqtt: MqttConfig, tmp_path: Path
) -> None:
    gate = GatedAggregator()
    async with setup(mqtt, tmp_path, aggregator=gate) as (coord, reg, _):
        async with running(coord) as c:
            await c.configure("r1", k_of_n=2, timeout_s=120)
            await c.submit("r1", UPDATES[0])
            await c.submit("r1", UPDATES[1])
            await asyncio.wait_for(gate.entered.wait(), 30)  # aggregation in flight
            rc = await coord.terminate_async()
        log.info("[test] SIGTERM during aggregation: exit in %.2fs", coord.stopped_after_s)
        assert rc == 0, coord.log_text()
        assert await reg.versions() == [0]
        gate.open.set()
        async with running(coord) as c:
            st = await c.wait_state("r1", *FINISHED)
        assert st.state == S.ROUND_STATE_COMPLETED, st.failure_reason
        assert (st.new_model_version, st.closed_by) == (1, "k_of_n")
        assert gate.calls == 2  # the interrupted call, then the one after the restart
        assert await reg.versions() == [0, 1]
        assert_fedavg(await reg.model(1), UPDATES[:2])
