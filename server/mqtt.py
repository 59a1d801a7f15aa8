"""One MQTT session per component: connects, resubscribes after every reconnect, and hands each
message to a callback. Publishing waits (bounded) for a connection instead of failing at once,
so a short broker outage costs latency, not messages.

Delivery is at least once: a QoS 1 publish that was in flight when the connection dropped is
sent again on the next connection (the broker may then see it twice). Components that must not
miss messages published while they were offline (the manager, the proplets) use a stable client
id with `clean_session=False`; the broker keeps their subscriptions and queues their QoS 1
messages, across its own restart too when it has persistence on (Mosquitto `persistence true`).

With TLS (`MqttConfig.tls`) the session verifies the broker's certificate against the
deployment CA and presents the process's own; the brokers take the certificate's CN as the
MQTT user name and client id (docs/security.md, "MQTT"), so the session's client id is that
user name whatever the caller asked for: one session per identity, which no other identity can
take over (on the clustered NATS broker another identity can take the client id, but reads
nothing of the session: docs/security.md, "MQTT on the clustered broker").

A clustered broker (`MqttConfig.failover`: the other nodes) is used one node at a time: the
session connects to the first node that answers, and when its connection is lost or refused
it tries the next node in turn (the same jittered backoff between tries as with one broker).
Nodes of a cluster share sessions (NATS keeps them in JetStream, replicated), so the
persistent session and its queued messages follow the client to the node it lands on
(docs/reliability.md, "Clustered broker").
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack

import aiomqtt

from server import metrics
from server.config import MqttConfig, TlsConfig
from server.errors import Unavailable
from server.lifecycle import Lifecycle, start_task
from server.pki import PkiError, read_identity

log = logging.getLogger(__name__)
# Publishes waiting for their acknowledgement on one connection before aiomqtt logs a
# warning (its default, 10, is below the manager's start window of 64: thousands of warnings a
# fleet round, docs/benchmarks.md "Fleet"); a backlog past this still says so.
PENDING_PUBLISH_WARNING = 256

MessageHandler = Callable[[str, bytes], Awaitable[None]]


def client_tls(tls: TlsConfig) -> tuple[ssl.SSLContext, str]:
    """A client's TLS context for `tls` (the broker verified against the CA, the client's own
    certificate presented) and its MQTT user name (the certificate's CN). Blocking (reads the
    files); ValueError naming the file that cannot be used."""
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca))
        context.load_cert_chain(str(tls.cert), str(tls.key))
        username = read_identity(tls.cert).username
    except (OSError, ssl.SSLError, PkiError) as exc:
        raise ValueError(f"mqtt tls: {tls.cert}: {exc}") from None
    return context, username


class _Connection:
    """One connection of a session: its client, and a future done once it is gone (one per
    connection that every publish waits on beside its own, rather than a task per publish
    waiting on an event)."""

    __slots__ = ("client", "lost")

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def close(self) -> None:
        if not self.lost.done():
            self.lost.set_result(None)


class MqttSession(Lifecycle):
    """Async context manager around a reconnecting aiomqtt client: entry waits (up to 10 s)
    for the first connection, exit ends the connection task.

    `handler(topic, payload)` runs for each message on the subscribed topics, one at a time;
    a handler that raises is logged and the session carries on. Long work belongs in a task
    the handler starts, not in the handler.
    """

    def __init__(
        self,
        config: MqttConfig,
        client_id: str,
        subscriptions: Sequence[str] = (),
        handler: MessageHandler | None = None,
        *,
        clean_session: bool = False,
        max_backoff_s: float = 2.0,
    ) -> None:
        self.config = config
        self.client_id = client_id
        self.subscriptions = list(subscriptions)
        self.handler = handler
        self.clean_session = clean_session
        self.max_backoff_s = max_backoff_s
        self._conn: _Connection | None = None
        self._connected = asyncio.Event()
        self._tls: ssl.SSLContext | None = None
        self.connects = 0
        # The node of `config.brokers` the session is on, or tries next.
        self._node = 0

    @property
    def broker(self) -> tuple[str, int]:
        """The broker node (host, port) the session is connected to, or tries next."""
        return self.config.brokers[self._node]

    async def _open(self, stack: AsyncExitStack) -> None:
        if self.config.tls is not None:
            self._tls, self.client_id = await asyncio.to_thread(client_tls, self.config.tls)
        stack.callback(self._connected.clear)
        start_task(stack, self._run(), f"mqtt-{self.client_id}")
        await self.wait_connected(10.0)

    async def wait_connected(self, timeout: float) -> None:
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation.
        try:
            async with asyncio.timeout(timeout):
                await self._connected.wait()
        except TimeoutError:
            nodes = ", ".join(f"{h}:{p}" for h, p in self.config.brokers)
            raise Unavailable(f"mqtt: no connection to {nodes} within {timeout}s") from None

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, timeout: float = 10.0
    ) -> None:
        """Publish, waiting up to `timeout` for a (re)connection; Unavailable after that.

        With QoS 1 this returns once the broker has acknowledged the message. A message whose
        connection dropped before the acknowledgement is sent again on the next connection."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            await self.wait_connected(max(0.0, deadline - loop.time()))
            conn = self._conn
            if conn is None or conn.lost.done():  # dropped since the event was set
                await asyncio.sleep(0)
                continue
            try:
                if await self._publish_on(conn, topic, payload, qos, deadline - loop.time()):
                    return
                error = "connection lost before the broker acknowledged"
            except aiomqtt.MqttError as exc:
                error = str(exc)
            if loop.time() >= deadline:
                raise Unavailable(f"mqtt: publish to {topic} failed: {error}")
            log.info("[mqtt] %s publish to %s: %s; trying again", self.client_id, topic, error)
            if not conn.lost.done():
                # Refused on a live connection (often one about to drop): a short pause.
                await asyncio.sleep(min(0.05, max(0.0, deadline - loop.time())))

    @staticmethod
    async def _publish_on(
        conn: _Connection, topic: str, payload: bytes, qos: int, timeout: float
    ) -> bool:
        """True once `conn` delivered the message (acknowledged, for QoS 1); False if the
        connection was lost first. MqttError when the client refused or timed out."""
        publish = asyncio.ensure_future(
            conn.client.publish(topic, payload, qos=qos, timeout=max(0.1, timeout))
        )
        try:
            await asyncio.wait({publish, conn.lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not publish.done():
                publish.cancel()
                # Retrieve whatever it ends with, so nothing is logged as never retrieved.
                publish.add_done_callback(lambda f: f.cancelled() or f.exception())
        if publish.done() and not publish.cancelled():
            publish.result()  # raises the client's MqttError
            return True
        return False

    async def _run(self) -> None:
        backoff = 0.05
        while True:
            host, port = self.broker
            try:
                async with aiomqtt.Client(
                    host,
                    port,
                    identifier=self.client_id,
                    clean_session=self.clean_session,
                    keepalive=self.config.keepalive,
                    # Small QoS 1 messages otherwise wait ~40 ms on Nagle + delayed ACK per hop.
                    socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
                    tls_context=self._tls,
                ) as client:
                    # aiomqtt warns above 10 publishes waiting for their acknowledgements;
                    # the manager's fan-out keeps 64 task starts out at once by design.
                    client.pending_calls_threshold = PENDING_PUBLISH_WARNING
                    conn = _Connection(client)
                    try:
                        # Every connection subscribes again: a broker that lost our session
                        # (restarted without persistence, or clean_session) knows nothing.
                        for topic in self.subscriptions:
                            granted = await client.subscribe(topic, qos=1)
                            if any(getattr(code, "is_failure", False) for code in granted):
                                # The broker's ACL refused it: say so rather than go deaf.
                                log.warning(
                                    "[mqtt] %s subscription to %s refused by the broker",
                                    self.client_id,
                                    topic,
                                )
                        self._conn = conn
                        self.connects += 1
                        metrics.mqtt_connected(self.connects)
                        self._connected.set()
                        backoff = 0.05
                        log.info("[mqtt] %s connected to %s:%d", self.client_id, host, port)
                        async for message in client.messages:
                            await self._dispatch(message)
                    finally:
                        # Publishes waiting on this connection move to the next one at once.
                        self._connected.clear()
                        self._conn = None
                        conn.close()
            except aiomqtt.MqttError as exc:
                log.warning(
                    "[mqtt] %s disconnected from %s:%d: %s; retrying in %.2fs",
                    self.client_id,
                    host,
                    port,
                    exc,
                    backoff,
                )
            finally:
                self._connected.clear()
                self._conn = None
            # Lost or refused: the next node of a cluster (the same one when there is one).
            self._node = (self._node + 1) % len(self.config.brokers)
            # Exponential backoff with jitter so a fleet does not reconnect in lockstep.
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(self.max_backoff_s, backoff * 2)

    async def _dispatch(self, message: aiomqtt.Message) -> None:
        if self.handler is None:
            return
        payload = message.payload
        data = payload if isinstance(payload, bytes) else str(payload or "").encode()
        try:
            await self.handler(message.topic.value, data)
        except Exception:
            log.exception("[mqtt] %s handler failed on %s", self.client_id, message.topic.value)
