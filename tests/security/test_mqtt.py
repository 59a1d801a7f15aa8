"""Each MQTT attack class of issue 9 (items 4 and 8), against both brokers as deployed: the
tests' Mosquitto (the compose configuration: TLS, certificates required, CN as user name and
client id, the ACL from `server.mqtt_acl`) and the embedded broker (`propeller-fl demo` /
`up`) with the same rules. Every refusal is observed positively: a TLS alert or a refused
CONNACK at connect, and for what the ACL drops, a marker published after it that arrives
while the dropped message never does.

The attacker holds a real proplet certificate of the deployment, a revoked one, one from
another CA, or none at all. What the manager does with what reaches it (a payload naming
another proplet, a result for another proplet's task) is in tests/security/test_mqtt_manager.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from proplet import Proplet, PropletConfig
from server.config import MqttConfig, TlsConfig
from server.embedded_broker import EmbeddedBroker
from server.messages import COMPLETED, MAX_PACKET_BYTES, ResultAck, RoundComplete, TaskStart
from server.mqtt import MqttSession
from server.pki import (
    CertificateAuthority,
    Identity,
    Kind,
    coordinator_replica_service,
    manager_replica_service,
)
from server.topics import Topics
from tests.proplet import wat
from tests.proplet.conftest import ManagerProbe, with_changes
from tests.support.infra import BROKER, Mosquitto, mosquitto
from tests.support.security import operator_tls, proplet_tls, service_tls, session_ca, tls
from tests.support.waits import eventually

# A bound on one connection attempt, not an expectation: refusals are answered at once.
CONNECT_BOUND_S = 15.0
# MQTT 3.1.1 CONNACK return codes.
ACCEPTED = 0
NOT_AUTHORIZED = 5


def fresh(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class Broker:
    kind: str  # "mosquitto" | "embedded"
    mqtt: MqttConfig  # its address and the test's namespace, as nobody

    @property
    def port(self) -> int:
        return self.mqtt.port

    def as_(self, identity: TlsConfig) -> MqttConfig:
        return self.mqtt.as_identity(identity)


@pytest.fixture(params=["mosquitto", "embedded"])
async def target(
    request: pytest.FixtureRequest, broker: Mosquitto, topics: Topics
) -> AsyncIterator[Broker]:
    if request.param == "mosquitto":
        yield Broker("mosquitto", MqttConfig(port=broker.port, topics=topics))
    else:
        async with EmbeddedBroker(tls=tls(Kind.SERVICE, BROKER.name)) as embedded:
            yield Broker("embedded", embedded.mqtt_config(topics))


# --------------------------------------------------------------------------- connecting


def client_context(identity: TlsConfig | None, trust: Path | None = None) -> ssl.SSLContext:
    """A client's TLS: trusting the suite's CA (or `trust`), presenting `identity` (if any)."""
    context = ssl.create_default_context(cafile=str(trust or session_ca().cert_path))
    if identity is not None:
        context.load_cert_chain(str(identity.cert), str(identity.key))
    return context


def connect_packet(client_id: str) -> bytes:
    """An MQTT 3.1.1 CONNECT: clean session, keepalive 30 s, no credentials."""
    cid = client_id.encode()
    body = b"\x00\x04MQTT\x04\x02\x00\x1e" + struct.pack("!H", len(cid)) + cid
    assert len(body) < 128
    return bytes([0x10, len(body)]) + body


async def connect(
    port: int, context: ssl.SSLContext | None, client_id: str, first: bytes | None = None
) -> str:
    """What the broker answers a CONNECT (or `first`, another first packet): "accepted",
    "refused (code N)", or "closed: ..." when it ends the connection first (a TLS alert, or
    plaintext on a TLS port)."""
    writer = None
    try:
        async with asyncio.timeout(CONNECT_BOUND_S):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=context, server_hostname="127.0.0.1" if context else None
            )
            writer.write(connect_packet(client_id) if first is None else first)
            await writer.drain()
            answer = await reader.read(4)
    except (ssl.SSLError, ConnectionError) as exc:
        return f"closed: {exc}"
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(ssl.SSLError, ConnectionError):
                await writer.wait_closed()
    if len(answer) < 4:
        return f"closed: {answer!r}"
    assert answer[:2] == b"\x20\x02", answer
    return "accepted" if answer[3] == ACCEPTED else f"refused (code {answer[3]})"


def assert_refused_at_connect(outcome: str) -> None:
    assert outcome.startswith("closed") or outcome == f"refused (code {NOT_AUTHORIZED})", outcome


async def test_a_client_without_a_certificate_is_refused(target: Broker) -> None:
    assert_refused_at_connect(await connect(target.port, client_context(None), fresh("anon")))
    # Nor is there a plaintext way in.
    assert_refused_at_connect(await connect(target.port, None, fresh("plain")))
    # The same client with a certificate of the deployment: accepted (the check is real).
    pid = fresh("p")
    assert await connect(target.port, client_context(proplet_tls(pid)), pid) == "accepted"


@pytest.mark.parametrize(
    "first",
    [
        b"\x30\x05\x00\x01a\x00\x00",  # a PUBLISH before any CONNECT
        b"\x10\xff\xff\xff\x7f",  # a CONNECT announcing 256 MiB
    ],
)
async def test_a_connection_must_start_with_a_sane_connect(target: Broker, first: bytes) -> None:
    pid = fresh("p")
    outcome = await connect(target.port, client_context(proplet_tls(pid)), pid, first)
    assert outcome.startswith("closed"), outcome


def remaining_length(n: int) -> bytes:
    out = b""
    while True:
        byte, n = n % 128, n // 128
        out += bytes([byte | (0x80 if n else 0)])
        if not n:
            return out


async def test_a_packet_over_the_bound_ends_the_connection(target: Broker) -> None:
    """Every packet is bounded as it arrives (`messages.MAX_PACKET_BYTES`): a client that
    announces a bigger one is disconnected before anything of it is held."""
    pid = fresh("p")
    too_big = 2 * MAX_PACKET_BYTES
    async with asyncio.timeout(CONNECT_BOUND_S):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1",
            target.port,
            ssl=client_context(proplet_tls(pid)),
            server_hostname="127.0.0.1",
        )
        try:
            writer.write(connect_packet(pid))
            assert await reader.readexactly(4) == b"\x20\x02\x00\x00"  # accepted
            topic = target.mqtt.topics.proplet_alive_for(pid).encode()
            header = b"\x30" + remaining_length(too_big) + struct.pack("!H", len(topic)) + topic
            writer.write(header)
            with contextlib.suppress(ssl.SSLError, ConnectionError):
                assert await reader.read() == b""  # closed by the broker
        finally:
            writer.close()
            with contextlib.suppress(ssl.SSLError, ConnectionError):
                await writer.wait_closed()


async def test_a_certificate_of_another_ca_is_refused(target: Broker, tmp_path: Path) -> None:
    other = CertificateAuthority.create(tmp_path / "other-ca")
    pid = fresh("p")  # the same identity, from a CA the deployment does not trust
    bundle = other.issue(Identity(Kind.PROPLET, pid))
    impostor = TlsConfig.bundle(bundle.dir)
    assert_refused_at_connect(
        await connect(target.port, client_context(impostor, trust=other.cert_path), pid)
    )


async def test_the_client_id_is_the_certificates_identity(target: Broker) -> None:
    """A proplet cannot take over another's session (its queued tasks) by naming its client
    id: mosquitto makes every client id the certificate's user name; the embedded broker
    refuses another one."""
    victim, attacker = fresh("victim"), fresh("attacker")
    outcome = await connect(target.port, client_context(proplet_tls(attacker)), victim)
    if target.kind == "mosquitto":
        assert outcome == "accepted"  # as client id `attacker`, whatever it asked for
    else:
        assert outcome == f"refused (code {NOT_AUTHORIZED})"
    # Either way the victim's session is its own: a task start queued for it while it is
    # away reaches the victim when it connects, and nobody else.
    got: asyncio.Queue[str] = asyncio.Queue()
    start_topic = target.mqtt.topics.task_start_for(victim)

    async def on_start(topic: str, payload: bytes) -> None:
        got.put_nowait(TaskStart.from_json(payload).id)

    subscriptions = target.mqtt.topics.proplet_subscriptions(victim)
    async with MqttSession(target.as_(proplet_tls(victim)), victim, subscriptions, on_start):
        pass  # subscribed once: a persistent session now holds its subscriptions
    async with MqttSession(target.as_(service_tls("manager")), "manager") as manager:
        await manager.publish(start_topic, TaskStart(id="t-queued", name="t").to_json())
    hijack = await connect(target.port, client_context(proplet_tls(attacker)), victim)
    assert hijack in ("accepted", f"refused (code {NOT_AUTHORIZED})")
    async with MqttSession(target.as_(proplet_tls(victim)), victim, subscriptions, on_start):
        assert await asyncio.wait_for(got.get(), CONNECT_BOUND_S) == "t-queued"


# --------------------------------------------------------------------------- the ACL


class Listener:
    """An MQTT session that records what it receives, in order."""

    def __init__(self, mqtt: MqttConfig, client_id: str, subscriptions: list[str]) -> None:
        self.received: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self.session = MqttSession(mqtt, client_id, subscriptions, self._on, clean_session=True)

    async def _on(self, topic: str, payload: bytes) -> None:
        self.received.put_nowait((topic, payload))

    async def until(self, marker: bytes) -> list[tuple[str, bytes]]:
        """Everything received up to and including `marker` (published last)."""
        seen: list[tuple[str, bytes]] = []
        while not seen or seen[-1][1] != marker:
            seen.append(await asyncio.wait_for(self.received.get(), CONNECT_BOUND_S))
        return seen


@contextlib.asynccontextmanager
async def listening(
    mqtt: MqttConfig, client_id: str, subscriptions: list[str]
) -> AsyncIterator[Listener]:
    listener = Listener(mqtt, client_id, subscriptions)
    async with listener.session:
        yield listener


@contextlib.asynccontextmanager
async def as_proplet(target: Broker, pid: str) -> AsyncIterator[MqttSession]:
    async with MqttSession(target.as_(proplet_tls(pid)), pid, clean_session=True) as s:
        yield s


async def test_a_proplet_publishes_only_its_own_reports(target: Broker) -> None:
    t = target.mqtt.topics
    attacker, victim = fresh("attacker"), fresh("victim")
    async with (
        listening(target.as_(service_tls("manager")), "manager", t.reports) as manager,
        listening(target.as_(operator_tls(fresh("watch"))), "w", [t.round_next]) as watcher,
        as_proplet(target, attacker) as s,
    ):
        # Speaking as the victim: its announcement, heartbeat and a result.
        await s.publish(t.proplet_create_for(victim), b"forged create")
        await s.publish(t.proplet_alive_for(victim), b"forged alive")
        await s.publish(t.proplet_results_for(victim), b"forged result")
        # A round completion, which only the coordinator announces.
        note = RoundComplete("r1", 9, "fl/models/global_model_v9", 1, "k_of_n").to_json()
        await s.publish(t.round_next, note)
        # Its own announcement: delivered, after everything above.
        await s.publish(t.proplet_create_for(attacker), b"own")
        assert await manager.until(b"own") == [(t.proplet_create_for(attacker), b"own")]
        async with MqttSession(target.as_(service_tls("coordinator")), "c") as coordinator:
            await coordinator.publish(t.round_next, b"the coordinator's")
        assert await watcher.until(b"the coordinator's") == [(t.round_next, b"the coordinator's")]


async def test_only_the_manager_reaches_a_proplets_task_topics(target: Broker) -> None:
    t = target.mqtt.topics
    attacker, victim = fresh("attacker"), fresh("victim")
    injected = TaskStart(id="injected", name="evil", file=b"\0asm", proplet_id=victim)
    async with (
        listening(target.as_(proplet_tls(victim)), victim, t.proplet_subscriptions(victim)) as v,
        as_proplet(target, attacker) as s,
    ):
        # Task injection: a start (addressed and broadcast), a stop, a forged acknowledgement.
        await s.publish(t.task_start_for(victim), injected.to_json())
        await s.publish(t.task_start, injected.to_json())
        await s.publish(t.task_stop_for(victim), b'{"id": "real"}')
        await s.publish(t.result_ack_for(victim), ResultAck("real", 1, COMPLETED).to_json())
        async with MqttSession(target.as_(service_tls("manager")), "manager") as manager:
            await manager.publish(t.task_start_for(victim), b"the manager's")
        assert await v.until(b"the manager's") == [(t.task_start_for(victim), b"the manager's")]


async def test_a_proplet_reads_neither_anothers_tasks_nor_its_acks(target: Broker) -> None:
    t = target.mqtt.topics
    reader, victim = fresh("reader"), fresh("victim")
    wide = [t.task_start_for(victim), t.result_ack_for(victim), f"{t.task_start}/+", "#"]
    async with listening(target.as_(proplet_tls(reader)), reader, [*wide, t.task_start]) as r:
        async with MqttSession(target.as_(service_tls("manager")), "manager") as manager:
            await manager.publish(t.task_start_for(victim), b"victim's task")
            await manager.publish(t.result_ack_for(victim), b"victim's ack")
            await manager.publish(t.task_start, b"broadcast")
        assert await r.until(b"broadcast") == [(t.task_start, b"broadcast")]


@pytest.fixture(params=["mosquitto", "embedded"])
async def replicas_target(
    request: pytest.FixtureRequest, topics: Topics, tmp_path: Path
) -> AsyncIterator[Broker]:
    """A broker whose ACL names the manager replica and the coordinator replica `listed`
    (`certs mqtt-acl --manager-replica listed --coordinator-replica listed`); the embedded
    broker knows every replica by its name."""
    if request.param == "mosquitto":
        with mosquitto(
            tmp_path / "mosquitto",
            ca=session_ca(),
            manager_replicas=["listed"],
            coordinator_replicas=["listed"],
        ) as b:
            yield Broker("mosquitto", MqttConfig(port=b.port, topics=topics))
    else:
        async with EmbeddedBroker(tls=tls(Kind.SERVICE, BROKER.name)) as embedded:
            yield Broker("embedded", embedded.mqtt_config(topics))


async def test_a_manager_replica_acts_as_the_manager_and_never_as_a_proplet(
    replicas_target: Broker,
) -> None:
    """A manager replica (its own certificate, service `manager-listed`) reads every
    proplet's reports and starts a proplet's task, as the manager does; it cannot speak as a
    proplet or announce a round. On mosquitto a replica the ACL does not name has no more
    than any identity: its start never arrives."""
    target, t = replicas_target, replicas_target.mqtt.topics
    victim = fresh("victim")
    replica = service_tls(manager_replica_service("listed"))
    async with (
        listening(target.as_(proplet_tls(victim)), victim, t.proplet_subscriptions(victim)) as v,
        listening(target.as_(replica), "r", t.reports) as manager,
        listening(target.as_(operator_tls(fresh("watch"))), "w", [t.round_next]) as watcher,
    ):
        # One session per identity (its client id is the certificate's): it reads and says.
        r = manager.session
        if target.kind == "mosquitto":
            unlisted = service_tls(manager_replica_service("unlisted"))
            async with MqttSession(target.as_(unlisted), "u", clean_session=True) as u:
                await u.publish(t.task_start_for(victim), b"unlisted replica's")
        await r.publish(t.proplet_results_for(victim), b"forged result")
        await r.publish(t.round_next, b"forged round")
        await r.publish(t.task_start_for(victim), b"replica's")
        assert await v.until(b"replica's") == [(t.task_start_for(victim), b"replica's")]
        async with as_proplet(target, victim) as p:
            await p.publish(t.proplet_alive_for(victim), b"alive")
        assert await manager.until(b"alive") == [(t.proplet_alive_for(victim), b"alive")]
        async with MqttSession(target.as_(service_tls("coordinator")), "c") as coordinator:
            await coordinator.publish(t.round_next, b"the coordinator's")
        assert await watcher.until(b"the coordinator's") == [(t.round_next, b"the coordinator's")]


async def test_a_coordinator_replica_announces_rounds_and_starts_no_task(
    replicas_target: Broker,
) -> None:
    """A coordinator replica (its own certificate, service `coordinator-listed`) announces a
    round as the coordinator does, and cannot start a proplet's task (the manager's). On
    mosquitto a replica the ACL does not name has no more than any identity: its
    announcement never arrives."""
    target, t = replicas_target, replicas_target.mqtt.topics
    victim = fresh("victim")
    replica = service_tls(coordinator_replica_service("listed"))
    async with (
        listening(target.as_(proplet_tls(victim)), victim, t.proplet_subscriptions(victim)) as v,
        listening(target.as_(operator_tls(fresh("watch"))), "w", [t.round_next]) as watcher,
        MqttSession(target.as_(replica), "c", clean_session=True) as c,
    ):
        if target.kind == "mosquitto":
            unlisted = service_tls(coordinator_replica_service("unlisted"))
            async with MqttSession(target.as_(unlisted), "u", clean_session=True) as u:
                await u.publish(t.round_next, b"unlisted replica's")
        await c.publish(t.task_start_for(victim), b"forged start")
        await c.publish(t.round_next, b"replica's")
        assert await watcher.until(b"replica's") == [(t.round_next, b"replica's")]
        async with MqttSession(target.as_(service_tls("manager")), "m") as manager:
            await manager.publish(t.task_start_for(victim), b"the manager's")
        # Only the manager's start reached the proplet: the replica's forged one never did.
        assert await v.until(b"the manager's") == [(t.task_start_for(victim), b"the manager's")]


# --------------------------------------------------------------------------- revocation


async def revoke(*pids: str) -> None:
    for pid in pids:
        await asyncio.to_thread(session_ca().revoke_identity, Identity(Kind.PROPLET, pid))


async def still_open(session: MqttSession, proplet_id: str, manager: Listener) -> None:
    """`session`, connected before its certificate was revoked, still gets through."""
    topic = session.config.topics.proplet_alive_for(proplet_id)
    await session.publish(topic, b"still open")
    assert await manager.until(b"still open") == [(topic, b"still open")]


async def test_embedded_broker_refuses_a_revoked_certificate_from_its_next_connection() -> None:
    # Two proplets: `held` connected before the revocation, `new` connecting after it (one
    # connection per identity: the same one would replace the held connection).
    held, new = fresh("held"), fresh("new")
    async with EmbeddedBroker(tls=tls(Kind.SERVICE, BROKER.name)) as embedded:
        topics = Topics(fresh("d"), "fl")
        mqtt = embedded.mqtt_config(topics)
        context = client_context(proplet_tls(new))
        assert await connect(embedded.port, context, new) == "accepted"
        async with (
            listening(mqtt.as_identity(service_tls("manager")), "m", topics.reports) as manager,
            MqttSession(mqtt.as_identity(proplet_tls(held)), held, clean_session=True) as s,
        ):
            await revoke(held, new)  # no restart, no reload
            assert await connect(embedded.port, context, new) == f"refused (code {NOT_AUTHORIZED})"
            # What holds, and what does not: a connection made before the revocation stays
            # open until it reconnects (as with mosquitto).
            await still_open(s, held, manager)


async def test_mosquitto_refuses_a_revoked_certificate_once_it_reloads(
    own_broker: Mosquitto, topics: Topics
) -> None:
    """mosquitto reads the CRL at start and on SIGHUP only: a revocation holds for new
    connections once the broker is reloaded (`docker compose kill -s HUP mosquitto`), and a
    connection made before stays open. docs/security.md says so."""
    held, new = fresh("held"), fresh("new")
    mqtt = MqttConfig(port=own_broker.port, topics=topics)
    context = client_context(proplet_tls(new))
    async with (
        listening(mqtt.as_identity(service_tls("manager")), "m", topics.reports) as manager,
        MqttSession(mqtt.as_identity(proplet_tls(held)), held, clean_session=True) as s,
    ):
        await revoke(held, new)
        # Not reloaded yet: mosquitto does not know of the revocation.
        assert await connect(own_broker.port, context, new) == "accepted"
        own_broker.reload()
        # Once the reload has happened (it is asynchronous), the handshake fails: revoked.
        await eventually(
            lambda: connect(own_broker.port, context, new),
            lambda outcome: outcome.startswith("closed"),
            what="the revoked certificate refused after the reload",
        )
        await still_open(s, held, manager)


# --------------------------------------------------------------------------- a real proplet


async def test_a_proplet_never_runs_a_start_another_proplet_published(
    target: Broker, tmp_path: Path
) -> None:
    """End to end with a real proplet: an injected start (addressed and broadcast) is never
    run; the manager's start, published after it, is."""
    t = target.mqtt.topics
    pid, attacker = fresh("proplet"), fresh("attacker")
    probe = ManagerProbe(target.port, t)
    config = with_changes(
        base_config(target.mqtt, tmp_path), proplet_id=pid, heartbeat_s=0.5, task_timeout_s=5.0
    )
    async with probe.session, Proplet(config):
        await probe.wait_until(lambda: any(a.proplet_id == pid for a in probe.created))
        async with as_proplet(target, attacker) as s:
            evil = TaskStart(id="injected", name="evil", file=wat.hello(), proplet_id=pid)
            await s.publish(t.task_start_for(pid), evil.to_json())
            await s.publish(t.task_start, evil.to_json())
        result = await probe.run(wat.printing(b"legit"), proplet_id=pid)
        assert (result.state, result.results) == (COMPLETED, "legit")
        assert probe.states("injected") == []
    await probe.acks_sent()


def base_config(mqtt: MqttConfig, tmp_path: Path) -> PropletConfig:
    return PropletConfig(proplet_id="placeholder", tls=None, mqtt=mqtt, work_dir=tmp_path / "w")
