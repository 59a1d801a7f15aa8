"""A clustered MQTT broker for tests: three nats-server nodes (JetStream, MQTT listener) on
free loopback ports in a temporary directory, as one cluster, with TLS and the ACL of
`server.mqtt_acl` as NATS permissions (docs/architecture.md, "Clustered broker").

Each node: an MQTT listener (TLS, a certificate of the CA required, mapped to its user by its
subject), the NATS client port (TLS and certificates as well, and no identity allowed on it:
they are MQTT users only), routes to the two others (TLS, the broker's own certificate both ways), a
JetStream store of its own and a monitoring port (`/healthz`). JetStream keeps the MQTT
sessions, subscriptions and queued QoS 1 messages in streams replicated on all three nodes,
so any two of them carry on without the third.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.request
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path

import aiomqtt

from server.config import MqttConfig
from server.messages import MAX_PACKET_BYTES
from server.mqtt import client_tls
from server.mqtt_acl import nats_authorization
from server.pki import Bundle, CertificateAuthority
from server.topics import Topics
from tests.support.infra import BROKER, _binary, _Server
from tests.support.ports import free_port, wait_port
from tests.support.security import session_ca, tls

CLUSTER_NAME = "propeller"


class NatsNode(_Server):
    """One node of the cluster: `mqtt_port` is its MQTT listener (`port`, as for mosquitto)."""

    def __init__(
        self,
        name: str,
        workdir: Path,
        *,
        mqtt_port: int,
        route_port: int,
        routes: Sequence[int],
        bundle: Bundle,
        authorization: str,
    ) -> None:
        self.monitor_port = free_port()
        self.client_port = free_port()  # the NATS protocol's own listener
        tls_files = f'cert_file: "{bundle.cert}", key_file: "{bundle.key}", ca_file: "{bundle.ca}"'
        config = "\n".join(
            [
                f"server_name: {name}",
                f"listen: 127.0.0.1:{self.client_port}",
                f"http: 127.0.0.1:{self.monitor_port}",
                f"max_payload: {MAX_PACKET_BYTES}",
                # Every client, on either listener, is who its certificate says.
                f"tls {{ {tls_files}, verify_and_map: true }}",
                f'jetstream {{ store_dir: "{workdir / "js"}", max_memory_store: 64MB, '
                "max_file_store: 1GB }",
                f"cluster {{ name: {CLUSTER_NAME}, listen: 127.0.0.1:{route_port},",
                f"  tls {{ {tls_files}, verify: true }},",
                "  routes: [" + ", ".join(f"nats-route://127.0.0.1:{p}" for p in routes) + "] }",
                authorization,
                "mqtt {",
                f"  listen: 127.0.0.1:{mqtt_port}",
                f"  tls {{ {tls_files}, verify_and_map: true }}",
                # Sessions and messages on all three nodes: any one may die.
                "  stream_replicas: 3",
                "}",
            ]
        )
        binary = _binary("nats-server", "/usr/sbin/nats-server")
        super().__init__(binary, ["-c", "nats.conf"], "nats.conf", config, mqtt_port, workdir)
        self.name = f"nats-{name}"

    def healthy(self) -> bool:
        """Whether the node says it is healthy (JetStream current with the cluster)."""
        url = f"http://127.0.0.1:{self.monitor_port}/healthz"
        with contextlib.suppress(OSError, ValueError), urllib.request.urlopen(url, timeout=1) as r:
            return bool(r.status == 200 and json.load(r).get("status") == "ok")
        return False


class NatsCluster:
    """Three `NatsNode`s as one cluster; `nodes[i].port` is node i's MQTT port."""

    def __init__(
        self, workdir: Path, usernames: Iterable[str], ca: CertificateAuthority | None = None
    ) -> None:
        self.ca = ca or session_ca()
        bundle = self.ca.ensure(BROKER)
        # The broker's own identity is a user too: the cluster's readiness check connects as it.
        authorization = nats_authorization([BROKER.username, *usernames])
        mqtt_ports = [free_port() for _ in range(3)]
        route_ports = [free_port() for _ in range(3)]
        self.nodes = [
            NatsNode(
                f"n{i + 1}",
                workdir / f"n{i + 1}",
                mqtt_port=mqtt_ports[i],
                route_port=route_ports[i],
                routes=[p for p in route_ports if p != route_ports[i]],
                bundle=bundle,
                authorization=authorization,
            )
            for i in range(3)
        ]

    def mqtt(self, topics: Topics, first: int = 0) -> MqttConfig:
        """The cluster as a client sees it: every node, node `first` preferred, the others in
        turn after it."""
        order = [*range(first, 3), *range(first)]
        nodes = [("127.0.0.1", self.nodes[i].port) for i in order]
        return MqttConfig.on_brokers(nodes, topics=topics)

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        for node in self.nodes:
            wait_port(node.port, timeout=30)
        deadline = time.monotonic() + 60
        while not all(node.healthy() for node in self.nodes):
            if time.monotonic() > deadline:
                raise TimeoutError("nats cluster not healthy\n" + self.tails())
            time.sleep(0.1)

    async def ready(self, bound: float = 60.0) -> None:
        """Until every node accepts an MQTT session (the first one creates the streams that
        keep sessions and messages, each node its own consumers: seconds, not milliseconds)."""
        context, username = await asyncio.to_thread(client_tls, tls("service", "mqtt"))
        for node in self.nodes:
            end = asyncio.get_running_loop().time() + bound
            while True:
                try:
                    async with aiomqtt.Client(
                        "127.0.0.1", node.port, identifier=username, tls_context=context
                    ):
                        break
                except aiomqtt.MqttError as exc:
                    if asyncio.get_running_loop().time() > end:
                        why = f"{node.name}: no MQTT session: {exc}\n{node.tail()}"
                        raise TimeoutError(why) from None
                    await asyncio.sleep(0.2)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop(5.0)

    def tails(self) -> str:
        return "\n".join(node.tail() for node in self.nodes)


@contextlib.asynccontextmanager
async def nats_cluster(workdir: Path, usernames: Iterable[str]) -> AsyncIterator[NatsCluster]:
    """A running three-node cluster whose users are the identities `usernames` (certificate
    CNs: proplet ids, `service:manager`, ...), each with its rights from `server.mqtt_acl`;
    stopped on the way out."""
    broker = NatsCluster(workdir, usernames)
    try:
        await asyncio.to_thread(broker.start)
        await broker.ready()
        yield broker
    finally:
        await asyncio.to_thread(broker.stop)
