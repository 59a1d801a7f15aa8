"""Two coordinator processes on one PostgreSQL database (`server.coordinator.replicas`), each
taking updates, and one of them killed with SIGKILL while it holds a round: right after it
claimed the round's aggregation, right after it stored the round's model, and right after it
claimed the round's deadline. The other replica takes the round over once the dead one's
lease expires and completes it exactly once: one new version, the same bytes as a
coordinator that was never interrupted makes from the same updates.

The updates are sent as the proplets send them (`Clients.submit`: signed metadata, streamed
tensors), half to each replica. The registry and the aggregator run in this process
(`test_coordinator_processes.setup`); Mosquitto and PostgreSQL are real.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from propeller.v1 import coordinator_pb2
from server.config import MqttConfig
from server.faults import KILL_AT_ENV
from tests.reliability.test_coordinator_processes import UPDATES, never_killed_sha256, setup
from tests.support.clients import Clients
from tests.support.cluster import running
from tests.support.processes import ServiceProcess, service_process
from tests.support.state import StateBackend
from tests.support.waits import eventually

pytestmark = pytest.mark.process

S = coordinator_pb2
LEASE_S = "2"


def second_replica(first: ServiceProcess, replica_id: str, **more: str) -> dict[str, str]:
    """The environment of another coordinator configured as `first` (its database, registry,
    aggregator and broker), unarmed, with an id of its own."""
    env = {k: v for k, v in first.env.items() if k != KILL_AT_ENV}
    return {**env, "PROPELLER_COORDINATOR_REPLICA_ID": replica_id, **more}


@contextlib.asynccontextmanager
async def replicas(
    mqtt: MqttConfig, tmp_path: Path, database_url: str, kill_at: str, **b_env: str
) -> AsyncIterator[tuple[ServiceProcess, ServiceProcess, Clients]]:
    """Two coordinator processes (not started) on the database: replica-a, armed to kill
    itself at `kill_at`, and replica-b (`b_env` on top of a's settings), leases of LEASE_S;
    and a client of their registry."""
    async with setup(
        mqtt,
        tmp_path,
        PROPELLER_DATABASE_URL=database_url,
        PROPELLER_COORDINATOR_REPLICA_ID="replica-a",
        PROPELLER_COORDINATOR_LEASE_S=LEASE_S,
        PROPELLER_TEST_KILL_AT=kill_at,
    ) as (a_proc, reg, _):
        b = second_replica(a_proc, "replica-b", **b_env)
        with service_process("coordinator", b, tmp_path / "b") as b_proc:
            yield a_proc, b_proc, reg


async def submit_cut_off_or_not(c: Clients, round_id: str, index: int) -> None:
    """An update to a replica that kills itself right after taking it: the answer may be cut
    off, the update is committed before the kill either way (the other replica counts it)."""
    with contextlib.suppress(grpc.aio.AioRpcError):
        await c.submit(round_id, UPDATES[index])


def version_rows(db: StateBackend) -> list[tuple[int]]:
    return [(int(v),) for (v,) in db.raw("coordinator", "SELECT new_model_version FROM rounds")]


@pytest.mark.parametrize("point", ["coordinator.aggregation_claimed", "coordinator.model_stored"])
async def test_the_replica_holding_the_aggregation_killed_the_other_completes_it_once(
    mqtt: MqttConfig, tmp_path: Path, database_url: str, point: str
) -> None:
    db = StateBackend("postgres", tmp_path / "state", database_url)
    async with replicas(mqtt, tmp_path, database_url, point) as (a_proc, b_proc, reg):
        async with running(b_proc) as b, running(a_proc) as a:
            await a.configure("r1", k_of_n=3, timeout_s=120)
            # Half each: one to b, then the k-th to a, which claims the aggregation.
            await b.submit("r1", UPDATES[0])
            await a.submit("r1", UPDATES[1])
            await submit_cut_off_or_not(a, "r1", 2)
            assert await a_proc.wait_exit() == -signal.SIGKILL, a_proc.tail()
            assert f"point={point}" in a_proc.log_text()
            st = await b.wait_state("r1", timeout=60)
            # The notice of the completion, published by b (once: a never completed).
            await eventually(
                lambda: asyncio.to_thread(db.raw, "coordinator", "SELECT sent FROM notices"),
                lambda rows: rows == [(1,)],
                what="the round's notice sent",
            )
        assert st.state == S.ROUND_STATE_COMPLETED, st.failure_reason
        assert (st.new_model_version, st.closed_by, list(st.reported)) == (
            1,
            "k_of_n",
            ["a", "b", "c"],
        )
        assert "taken over: aggregating again" in b_proc.log_text(), b_proc.tail()
        models = await reg.models()
        assert [m.version for m in models] == [0, 1]  # stored once, by whichever replica
        assert models[1].sha256 == await never_killed_sha256(
            mqtt, a_proc.env["AGGREGATOR_ADDR"], UPDATES
        )
        assert db.raw("coordinator", "SELECT lease_owner, state FROM rounds") == [
            ("replica-b", "completed")
        ]
        assert db.raw("coordinator", "SELECT count(*) FROM updates") == [(3,)]


async def test_the_replica_holding_the_deadline_killed_the_other_closes_the_round(
    mqtt: MqttConfig, tmp_path: Path, database_url: str
) -> None:
    # b looks for due rounds once a second (a: every 50 ms), so that a stopped b is almost
    # never caught inside its claim's transaction.
    kill_at = "coordinator.deadline_claimed"
    async with replicas(
        mqtt, tmp_path, database_url, kill_at, PROPELLER_COORDINATOR_TICK_S="1"
    ) as (a_proc, b_proc, reg):
        async with running(b_proc) as b, running(a_proc) as a:
            await a.configure("r1", k_of_n=3, timeout_s=4)
            await a.submit("r1", UPDATES[0])
            await b.submit("r1", UPDATES[1])
            # b stalls (SIGSTOP) over the deadline, so it is a that claims the deadline,
            # and dies there; b, continued, takes the round over when a's lease expires.
            b_proc.send(signal.SIGSTOP)
            try:
                assert await a_proc.wait_exit(60) == -signal.SIGKILL, a_proc.tail()
            finally:
                b_proc.send(signal.SIGCONT)
            assert "point=coordinator.deadline_claimed" in a_proc.log_text()
            st = await b.wait_state("r1", timeout=60)
        assert st.state == S.ROUND_STATE_COMPLETED, st.failure_reason
        assert (st.new_model_version, st.closed_by, list(st.reported)) == (
            1,
            "deadline",
            ["a", "b"],
        )
        models = await reg.models()
        assert [m.version for m in models] == [0, 1]
        assert models[1].sha256 == await never_killed_sha256(
            mqtt, a_proc.env["AGGREGATOR_ADDR"], UPDATES[:2]
        )
        db = StateBackend("postgres", tmp_path / "state", database_url)
        assert db.raw("coordinator", "SELECT lease_owner, state FROM rounds") == [
            ("replica-b", "completed")
        ]
