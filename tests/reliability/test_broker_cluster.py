"""A clustered MQTT broker (issue 13, item 3): three nats-server nodes (JetStream with its MQTT
listener) on loopback, TLS and the ACL as NATS permissions (`tests/support/nats.py`).

- The broker: QoS 1 to a persistent session across nodes, the ACL (a proplet publishes only
  its own topics), a session that follows its client to another node when its node is
  killed (SIGKILL) with what was queued for it meanwhile; only a listed certificate of the
  CA connects; another identity's client id reads nothing of that session.
- The product on it: the services on node 1, proplets spread over nodes 2 and 3; a round
  completes; node 2 killed mid-round, its proplets fail over, the round completes and every
  task result reaches the manager; the services as processes (PROPELLER_MQTT_BROKERS), their
  node 1 killed mid-round, the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import ssl
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from propeller.v1 import coordinator_pb2, manager_pb2
from server.config import TlsConfig
from server.mqtt import MqttSession, client_tls
from server.pki import CertificateAuthority, Identity, Kind
from server.topics import Topics
from tests.proplet import wat
from tests.reliability.test_manager_crash import fleet_services
from tests.security.test_mqtt import assert_refused_at_connect, client_context, connect
from tests.support.clients import clients
from tests.support.cluster import Cluster, cluster, run_proplets
from tests.support.nats import NatsCluster, nats_cluster
from tests.support.processes import mqtt_env
from tests.support.security import proplet_tls, service_tls
from tests.support.waits import eventually

pytestmark = pytest.mark.process

MANAGER = "service:manager"
# A bound on one JetStream leader election after a node dies (nats-server 2.9: 4 to 9 s,
# longer on a loaded machine), during which MQTT sessions cannot be opened or publish QoS 1.
ELECTION_S = 30.0
SERVICES = ("service:manager", "service:coordinator", "operator:tester")


class Inbox:
    """What a session receives, in order."""

    def __init__(self) -> None:
        self.got: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()

    async def on_message(self, topic: str, payload: bytes) -> None:
        self.got.put_nowait((topic, payload))

    async def next(self, bound: float = ELECTION_S) -> tuple[str, bytes]:
        return await asyncio.wait_for(self.got.get(), bound)


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[NatsCluster]:
    async with nats_cluster(tmp_path / "nats", [*SERVICES, "p1", "p2"]) as running:
        yield running


async def test_a_session_follows_its_proplet_to_another_node(
    broker: NatsCluster, topics: Topics
) -> None:
    """QoS 1 across nodes; the ACL holds on every node; a proplet's node killed: its session
    reconnects to the next node by itself, with its subscriptions and what was queued."""
    manager_inbox, proplet_inbox = Inbox(), Inbox()
    manager = MqttSession(
        broker.mqtt(topics, 0).as_identity(service_tls("manager")),
        MANAGER,
        topics.reports,
        manager_inbox.on_message,
    )
    proplet = MqttSession(
        broker.mqtt(topics, 1).as_identity(proplet_tls("p1")),
        "p1",
        topics.proplet_subscriptions("p1"),
        proplet_inbox.on_message,
    )
    async with manager, proplet:
        assert manager.broker[1] == broker.nodes[0].port
        assert proplet.broker[1] == broker.nodes[1].port
        # A forged heartbeat (p1 as p2) is refused on p1's own node; its own goes through.
        await proplet.publish(topics.proplet_alive_for("p2"), b"forged")
        await proplet.publish(topics.proplet_alive_for("p1"), b"alive")
        assert await manager_inbox.next() == (topics.proplet_alive_for("p1"), b"alive")
        await manager.publish(topics.task_start_for("p1"), b"task-1")
        assert await proplet_inbox.next() == (topics.task_start_for("p1"), b"task-1")

        connects = proplet.connects
        await asyncio.to_thread(broker.nodes[1].kill)
        # Queued for p1 while it has no connection: delivered on the node it fails over to.
        # The whole cluster may pause for one JetStream leader election first (the dead node
        # led the streams that keep sessions and messages): the publish waits that out.
        await manager.publish(topics.task_start_for("p1"), b"task-2", timeout=ELECTION_S)

        async def reconnected() -> bool:
            return proplet.connects > connects

        await eventually(reconnected, what="p1 connected again")
        # On a node still alive: node 3 first, node 1 when node 3 did not answer in time
        # (during the election pause a connection can time out).
        assert proplet.broker[1] in (broker.nodes[2].port, broker.nodes[0].port)
        assert await proplet_inbox.next() == (topics.task_start_for("p1"), b"task-2")
        await proplet.publish(topics.proplet_alive_for("p1"), b"moved", timeout=ELECTION_S)
        assert await manager_inbox.next() == (topics.proplet_alive_for("p1"), b"moved")
    assert manager_inbox.got.empty() and proplet_inbox.got.empty()


async def test_another_identitys_client_id_reads_nothing_of_its_session(
    broker: NatsCluster, topics: Topics
) -> None:
    """NATS does not tie the client id to the certificate (mosquitto does): p2 may connect
    as client id `p1`, but the session's subscriptions are checked against p2's own
    permissions, so p1's queued task start reaches p1 and nobody else."""
    victim, victim_inbox = "p1", Inbox()
    subscriptions = topics.proplet_subscriptions(victim)
    as_victim = broker.mqtt(topics, 1).as_identity(proplet_tls(victim))
    async with MqttSession(as_victim, victim, subscriptions, victim_inbox.on_message):
        pass  # subscribed once: the cluster now keeps the session and its subscriptions
    as_manager = broker.mqtt(topics, 0).as_identity(service_tls("manager"))
    async with MqttSession(as_manager, MANAGER) as manager:
        await manager.publish(topics.task_start_for(victim), b"queued")
    context, _ = await asyncio.to_thread(client_tls, proplet_tls("p2"))
    async with aiomqtt.Client(
        "127.0.0.1",
        broker.nodes[2].port,
        identifier=victim,
        clean_session=False,
        tls_context=context,
    ) as hijack:
        # The victim's session, resumed by p2: its subscriptions are refused (the node logs
        # "Subscription Violation - User CN=p2"); a message for p1 is not delivered to p2.
        async with MqttSession(as_manager, MANAGER) as manager:
            await manager.publish(topics.task_start_for(victim), b"while-hijacked")
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(3):
                async for message in hijack.messages:
                    pytest.fail(f"p2 received {message.topic.value}: {message.payload!r}")
    async with MqttSession(as_victim, victim, subscriptions, victim_inbox.on_message):
        got = {await victim_inbox.next(), await victim_inbox.next()}
    start = topics.task_start_for(victim)
    assert got == {(start, b"queued"), (start, b"while-hijacked")}


async def test_only_a_listed_certificate_of_the_ca_connects(
    broker: NatsCluster, tmp_path: Path
) -> None:
    """Every node's MQTT listener wants a certificate of the deployment's CA that maps to a
    user (`verify_and_map`): without one, from another CA, or of an identity the cluster
    does not list, the connection is refused; plaintext too. (The probes of
    tests/security/test_mqtt.py, which runs them against mosquitto and the embedded broker.)"""
    other = CertificateAuthority.create(tmp_path / "other-ca")
    wrong_ca = TlsConfig.bundle(other.issue(Identity(Kind.PROPLET, "p1")).dir)
    stranger = f"stranger-{uuid.uuid4().hex[:8]}"
    for node in broker.nodes:
        for outcome in (
            await connect(node.port, client_context(None), "p1"),
            await connect(node.port, None, "p1"),
            await connect(node.port, client_context(wrong_ca, trust=other.cert_path), "p1"),
            await connect(node.port, client_context(proplet_tls(stranger)), stranger),
        ):
            assert_refused_at_connect(outcome)
        # A listed identity with its own certificate: accepted (the check is real).
        assert await connect(node.port, client_context(proplet_tls("p1")), "p1") == "accepted"


async def nats_protocol_answer(port: int, context: ssl.SSLContext) -> str:
    """What a node's NATS protocol port answers a client with `context` that connects and
    subscribes to every QoS 1 delivery of the MQTT listener: its first line after CONNECT,
    SUB and PING ("PONG" when accepted, "-ERR ..." otherwise)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        async with asyncio.timeout(10):
            assert (await reader.readline()).startswith(b"INFO ")
            await writer.start_tls(context, server_hostname="127.0.0.1")
            writer.write(b'CONNECT {"verbose":false,"pedantic":false}\r\n')
            writer.write(b"SUB $MQTT.sub.> 1\r\nPING\r\n")
            await writer.drain()
            return (await reader.readline()).decode().strip()
    except (ssl.SSLError, ConnectionError) as exc:
        return f"-ERR closed: {exc}"
    finally:
        writer.close()
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            await writer.wait_closed()


async def test_a_certificate_holder_gets_nothing_from_the_nats_protocol_port(
    broker: NatsCluster,
) -> None:
    """The identities are MQTT users only: on the NATS protocol port (where every QoS 1
    delivery of the MQTT listener could otherwise be read) a proplet's certificate, or the
    manager's, is refused."""
    for identity in (proplet_tls("p1"), service_tls("manager")):
        context = client_context(identity)
        for node in broker.nodes:
            answer = await nats_protocol_answer(node.client_port, context)
            assert answer.startswith("-ERR"), (node.name, answer)


# Four proplets: two on node 2, two on node 3 (each preferring its node, then the next ones).
PROPLETS = 4


@pytest.fixture
async def fleet(tmp_path: Path, topics: Topics) -> AsyncIterator[tuple[Cluster, NatsCluster]]:
    """The services on node 1 (the manager's and the coordinator's sessions prefer it), four
    real proplets spread over nodes 2 and 3."""
    ids = [f"p{n}-{uuid.uuid4().hex[:8]}" for n in range(PROPLETS)]
    settings = {"memory_limit_bytes": 64 << 20, "rpc_timeout_s": 10.0}
    async with (
        nats_cluster(tmp_path / "nats", [*SERVICES, *ids]) as broker,
        cluster(
            broker.mqtt(topics, 0),
            tmp_path,
            proplets=ids,
            proplet=settings,
            spread=[broker.mqtt(topics, 1), broker.mqtt(topics, 2)],
        ) as fleet,
    ):
        yield fleet, broker


async def completed(f: Cluster, round_id: str) -> Any:
    status = await f.wait_state(round_id, timeout=60)
    assert status.state == coordinator_pb2.ROUND_STATE_COMPLETED, status.failure_reason
    assert status.num_updates == PROPLETS and set(status.reported) == set(f.proplet_ids)
    return status


async def every_result(f: Cluster, round_id: str) -> list[manager_pb2.Task]:
    """The round's tasks once every one is COMPLETED (its result reached the manager), each
    accepted by the coordinator once."""
    done = await eventually(
        lambda: f.round_tasks(round_id),
        lambda ts: (
            len(ts) == PROPLETS and all(t.state == manager_pb2.TASK_STATE_COMPLETED for t in ts)
        ),
        what="every task COMPLETED",
    )
    for task in done:
        summary = json.loads(task.results)
        assert summary["accepted"] is True and summary["duplicate"] is False, task.results
    return done


async def test_a_round_completes_on_a_three_node_broker(
    fleet: tuple[Cluster, NatsCluster], trainer_wasm: Path
) -> None:
    f, _ = fleet
    round_id = f"c-{uuid.uuid4().hex[:6]}"
    resp = await f.start_experiment(
        round_id, f.proplet_ids, f"file://{trainer_wasm}", k_of_n=PROPLETS
    )
    assert {s.proplet_id for s in resp.scheduled} == set(f.proplet_ids) and not resp.skipped
    status = await completed(f, round_id)
    assert status.new_model_version == 1
    await every_result(f, round_id)


async def test_a_node_killed_mid_round_the_round_still_completes(
    fleet: tuple[Cluster, NatsCluster], tmp_path: Path
) -> None:
    """Node 2 SIGKILLed while its two proplets train: they fail over to node 3, the round
    completes with every update, and every task's result reaches the manager (through the
    proplets' re-sending until acknowledged, whatever the dead node held)."""
    f, broker = fleet
    round_id = f"k-{uuid.uuid4().hex[:6]}"
    module = tmp_path / "slow.wasm"
    module.write_bytes(wat.round_update(round_id, 2.0))
    resp = await f.start_experiment(round_id, f.proplet_ids, f"file://{module}", k_of_n=PROPLETS)
    assert {s.proplet_id for s in resp.scheduled} == set(f.proplet_ids) and not resp.skipped
    await eventually(
        lambda: f.round_tasks(round_id),
        lambda ts: (
            len(ts) == PROPLETS and all(t.state == manager_pb2.TASK_STATE_RUNNING for t in ts)
        ),
        what="every task RUNNING",
    )
    killed_at = time.time()
    await asyncio.to_thread(broker.nodes[1].kill)
    await completed(f, round_id)
    await every_result(f, round_id)
    # The moved proplets are heard from again (over node 3 or node 1).
    await eventually(
        f.proplets,
        lambda ps: {p.id for p in ps if p.last_seen > killed_at} == set(f.proplet_ids),
        what="every proplet heard from after the kill",
    )
    # The cluster carries on with two nodes: the next round completes too.
    after = f"k2-{uuid.uuid4().hex[:6]}"
    module.write_bytes(wat.round_update(after, 0.1))
    await f.start_experiment(after, f.proplet_ids, f"file://{module}", k_of_n=PROPLETS)
    status = await completed(f, after)
    assert status.new_model_version == 2
    await every_result(f, after)


async def test_the_services_as_processes_fail_over_when_their_node_dies(
    tmp_path: Path, topics: Topics
) -> None:
    """The five services as `propeller-fl serve` processes, given the cluster by
    PROPELLER_MQTT_BROKERS with node 1 first; two proplets on nodes 2 and 3. Node 1 SIGKILLed
    mid-round: the manager and the coordinator move to another node by themselves, the round
    completes and both results reach the manager (they travel only over MQTT, and the
    manager's node is gone); the next round completes too."""
    ids = [f"q{n}-{uuid.uuid4().hex[:8]}" for n in range(2)]
    async with nats_cluster(tmp_path / "nats", [*SERVICES, *ids]) as broker:
        services_mqtt = broker.mqtt(topics, 0)
        assert mqtt_env(services_mqtt)["PROPELLER_MQTT_BROKERS"].count(",") == 2
        spread = [broker.mqtt(topics, 1), broker.mqtt(topics, 2)]
        async with (
            fleet_services(services_mqtt, tmp_path, ids) as (manager, endpoints),
            run_proplets(endpoints, services_mqtt, ids, tmp_path / "proplets", spread=spread),
            clients(endpoints) as c,
        ):
            await manager.restart()
            await c.wait_alive(ids)
            module = tmp_path / "slow.wasm"
            for n, kill in enumerate((True, False)):
                round_id = f"s{n}-{uuid.uuid4().hex[:6]}"
                module.write_bytes(wat.round_update(round_id, 2.0))
                await c.start_experiment(round_id, ids, f"file://{module}", k_of_n=2)
                if kill:
                    await eventually(
                        functools.partial(c.round_tasks, round_id),
                        lambda ts: (
                            len(ts) == 2
                            and all(t.state == manager_pb2.TASK_STATE_RUNNING for t in ts)
                        ),
                        what="both tasks RUNNING",
                    )
                    await asyncio.to_thread(broker.nodes[0].kill)
                status = await c.wait_state(round_id, timeout=60)
                assert status.state == coordinator_pb2.ROUND_STATE_COMPLETED, status
                assert status.new_model_version == n + 1 and set(status.reported) == set(ids)
                done = await eventually(
                    functools.partial(c.round_tasks, round_id),
                    lambda ts: (
                        len(ts) == 2
                        and all(t.state == manager_pb2.TASK_STATE_COMPLETED for t in ts)
                    ),
                    what="both tasks COMPLETED",
                )
                assert all(json.loads(t.results)["accepted"] for t in done)
