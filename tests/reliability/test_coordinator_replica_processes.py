"""Two coordinator processes on one PostgreSQL database (`server.coordinator.replicas`), each
taking updates, and one of them killed with SIGKILL while it holds a round: right after it
claimed the round's aggregation, right after it stored the round's model, and right after it
claimed the round's deadline. The other replica takes the round over once the dead one's
lease expires and completes it exactly once: one new version, the same bytes as a
coordinator that was never interrupted makes from the same updates.

The updates are sent as the proplets send them (`Clients.submit`: signed metadata, streamed
tensors), half to each replica. The registry and the aggregator run in this process
(`test_coordinator_processes.setup`); Mosquitto and PostgreSQL are real.

Under mutual TLS, as deployed: each replica has a certificate of its own, the service
`coordinator-{replica_id}`, from which it takes its replica id (the leases name it) and which
the broker makes its client id; the broker is a Mosquitto of the test's own whose ACL names
both replicas (`certs mqtt-acl --coordinator-replica`). Neither takes the other's MQTT session
over, the round's notice (published by a replica) reaches a subscriber, and the registry and
the aggregator take a replica's calls as the coordinator's (docs/reliability.md,
"Coordinator replicas").
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from propeller.v1 import coordinator_pb2
from server.config import MqttConfig
from server.faults import KILL_AT_ENV
from server.pki import coordinator_replica_service
from server.topics import Topics
from tests.reliability.test_coordinator_processes import UPDATES, never_killed_sha256, setup
from tests.support.clients import Clients
from tests.support.cluster import round_notes, running
from tests.support.infra import Mosquitto, mosquitto
from tests.support.processes import ServiceProcess, service_process
from tests.support.security import service_tls, session_ca, tls_env
from tests.support.state import StateBackend
from tests.support.waits import eventually

pytestmark = pytest.mark.process

S = coordinator_pb2
LEASE_S = "2"
REPLICAS = ("replica-a", "replica-b")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """The deployed broker (TLS, CN as user name and client id, the ACL) naming the two
    replicas, as `certs mqtt-acl --coordinator-replica replica-a --coordinator-replica
    replica-b` writes it."""
    with mosquitto(tmp_path / "mosquitto", ca=session_ca(), coordinator_replicas=REPLICAS) as b:
        yield b


@pytest.fixture
def mqtt(broker: Mosquitto, topics: Topics) -> MqttConfig:
    return MqttConfig(port=broker.port, topics=topics)


def replica(replica_id: str) -> dict[str, str]:
    """What makes a coordinator process the replica `replica_id`: its own certificate, the
    service `coordinator-{replica_id}` (the id is read from it)."""
    return tls_env(service_tls(coordinator_replica_service(replica_id)))


def second_replica(first: ServiceProcess, replica_id: str, **more: str) -> dict[str, str]:
    """The environment of another coordinator configured as `first` (its database, registry,
    aggregator and broker), unarmed, with a certificate of its own."""
    env = {k: v for k, v in first.env.items() if k != KILL_AT_ENV}
    return {**env, **replica(replica_id), **more}


def no_session_taken_over(broker: Mosquitto) -> None:
    """Each replica connected as its own identity, and neither knocked the other off
    (mosquitto logs a takeover as "already connected, closing old connection")."""
    log = broker.log_text()
    for r in REPLICAS:
        assert f"as service:{coordinator_replica_service(r)} " in log, broker.tail()
    assert "closing old connection" not in log, broker.tail()


async def submit_cut_off_or_not(c: Clients, round_id: str, index: int) -> None:
    """An update to a replica that kills itself right after taking it: the answer may be cut
    off, the update is committed before the kill either way (the other replica counts it)."""
    with contextlib.suppress(grpc.aio.AioRpcError):
        await c.submit(round_id, UPDATES[index])


def version_rows(db: StateBackend) -> list[tuple[int]]:
    return [(int(v),) for (v,) in db.raw("coordinator", "SELECT new_model_version FROM rounds")]


@pytest.mark.parametrize("point", ["coordinator.aggregation_claimed", "coordinator.model_stored"])
async def test_the_replica_holding_the_aggregation_killed_the_other_completes_it_once(
    broker: Mosquitto, mqtt: MqttConfig, tmp_path: Path, database_url: str, point: str
) -> None:
    db = StateBackend("postgres", tmp_path / "state", database_url)
    async with (
        setup(
            mqtt,
            tmp_path,
            PROPELLER_DATABASE_URL=database_url,
            PROPELLER_COORDINATOR_LEASE_S=LEASE_S,
            PROPELLER_TEST_KILL_AT=point,
        ) as (a_proc, reg, _),
        round_notes(mqtt) as notes,
    ):
        a_proc.env.update(replica("replica-a"))
        b_env = second_replica(a_proc, "replica-b")
        with service_process("coordinator", b_env, tmp_path / "b") as b_proc:
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
                # ...through the broker's ACL, which lets a replica announce rounds.
                note = await asyncio.wait_for(notes.get(), 30)
                assert (note["round_id"], note["new_model_version"]) == ("r1", 1), note
        no_session_taken_over(broker)
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
    broker: Mosquitto, mqtt: MqttConfig, tmp_path: Path, database_url: str
) -> None:
    async with setup(
        mqtt,
        tmp_path,
        PROPELLER_DATABASE_URL=database_url,
        PROPELLER_COORDINATOR_LEASE_S=LEASE_S,
        PROPELLER_TEST_KILL_AT="coordinator.deadline_claimed",
    ) as (a_proc, reg, _):
        a_proc.env.update(replica("replica-a"))
        # b looks for due rounds once a second (a: every 50 ms), so that a stopped b is
        # almost never caught inside its claim's transaction.
        b_env = second_replica(a_proc, "replica-b", PROPELLER_COORDINATOR_TICK_S="1")
        with service_process("coordinator", b_env, tmp_path / "b") as b_proc:
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
        no_session_taken_over(broker)
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
