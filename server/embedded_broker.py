"""An MQTT broker inside the process (amqtt), for the one-process modes (`propeller-fl demo`,
`propeller-fl up`) only: anything measured or deployed uses Mosquitto.

Configured the way the services expect a broker to behave:
- bound to one address (127.0.0.1 by default); port 0 picks a free port, read back as `port`;
- with a TLS bundle (`tls`, the broker's own certificate from the deployment CA), the same
  rules as the deployment's mosquitto (docs/security.md, "MQTT"): TLS only, every client must
  present a certificate of the CA (refused in the handshake otherwise) that is not revoked
  (the CA's revocation list, re-read when it changes, so a revocation holds from the next
  connection on, without a restart); its CN is its user name and must be its client id; and
  the ACL of `server.mqtt_acl` decides what it may publish, subscribe to and receive. Without
  a bundle (PROPELLER_INSECURE=1): every client is let in and no topic is filtered;
- no packet larger than `messages.MAX_PACKET_BYTES` (a client sending one is disconnected, as
  mosquitto's `max_packet_size` does);
- QoS 1 with persistent sessions: the manager and the proplets connect with
  clean_session=False. amqtt's own anonymous-auth plugin marks each session it admits as
  anonymous, and amqtt keeps neither the subscriptions nor the queued QoS 1 messages of an
  anonymous session that disconnects. The auth plugins here admit clients without that mark,
  so a client that reconnects gets what was published to it meanwhile, as with Mosquitto;
  a disconnected persistent session is dropped after `session_expiry_s`.

amqtt looks up, merges into and takes over the session of the client id a CONNECT names before
it asks its auth plugins; so each connection's CONNECT is read and checked here first
(`_Broker`), and a refused client never reaches amqtt's sessions. Connections already open when
a certificate is revoked stay open (as with mosquitto) until they reconnect.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import socket
import ssl
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

from amqtt.adapters import StreamReaderAdapter, StreamWriterAdapter
from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.errors import BrokerError
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin

from server.config import MqttConfig, TlsConfig, bind_problem
from server.lifecycle import Lifecycle
from server.messages import MAX_PACKET_BYTES
from server.mqtt_acl import Access, allowed
from server.pki import PkiError, RevocationList, identity_of, load_certificate
from server.topics import Topics

log = logging.getLogger(__name__)

DEFAULT_SESSION_EXPIRY_S = 3600


class AdmitAllAuthPlugin(BaseAuthPlugin):  # type: ignore[misc]  # amqtt is untyped here
    """Admits every client and leaves its session an ordinary (non-anonymous) one, so
    clean_session=False keeps subscriptions and QoS 1 messages across a reconnect."""

    @dataclass
    class Config:
        """No options."""

    async def authenticate(self, *, session: Any) -> bool:
        return True


# A CONNECT larger than this is refused before it is read (ours are a few dozen bytes).
MAX_CONNECT_BYTES = 64 << 10
# How long a new connection may take to send its CONNECT.
CONNECT_TIMEOUT_S = 10.0
# MQTT 3.1.1 CONNACK "not authorized", without a session present.
_NOT_AUTHORIZED = b"\x20\x02\x00\x05"

# The user name admitted for the connection being handled (each connection is a task of its
# own): what `CertificateAuthPlugin` gives the session.
_ADMITTED: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "propeller_mqtt_admitted", default=None
)


class _Admission:
    """Who may connect: a certificate of the CA (verified in the handshake) that names a
    propeller identity and is not revoked (the CA's revocation list, re-read when it
    changes), with a client id that is that identity's user name."""

    def __init__(self, tls: TlsConfig) -> None:
        ca = load_certificate(tls.ca.read_bytes(), str(tls.ca))
        self._revoked = RevocationList(tls.crl, ca) if tls.crl is not None else None

    def check(self, der: bytes | None, client_id: str) -> tuple[str | None, str]:
        """(user name, "") when admitted, else (None, why not)."""
        if der is None:
            return None, "no client certificate"
        try:
            cert = load_certificate(der, "client certificate")
            identity = identity_of(cert)
            if self._revoked is not None and self._revoked.is_revoked(cert.serial_number):
                return None, f"{identity}'s certificate is revoked"
        except PkiError as exc:
            return None, str(exc)
        if client_id != identity.username:
            return None, f"{identity} must connect with client id {identity.username!r}"
        return identity.username, ""


class _Broker(Broker):  # type: ignore[misc]  # amqtt is untyped here
    """amqtt's broker with mutual TLS. A client without a certificate of the CA is refused in
    the handshake (amqtt itself only asks for one). Every connection's CONNECT is read and
    checked (`_Admission`) before amqtt sees it: amqtt looks up, merges into and takes over
    the session of the client id a CONNECT names before it asks its auth plugins, so a
    refused client must never reach it (it would disconnect that client id's owner and lose
    what was queued for it)."""

    admission: _Admission | None = None

    @staticmethod
    def _create_ssl_context(listener: Any) -> ssl.SSLContext:
        context: ssl.SSLContext = Broker._create_ssl_context(listener)
        context.verify_mode = ssl.CERT_REQUIRED
        return context

    async def stream_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
    ) -> None:
        try:
            if self.admission is None:
                await super().stream_connected(reader, writer, listener_name)
                return
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT_S):
                    packet, client_id = await _read_connect(reader)
            except (ValueError, TimeoutError, asyncio.IncompleteReadError) as exc:
                log.warning("[mqtt] embedded broker: no valid CONNECT: %s", exc)
                writer.close()
                return
            ssl_object = writer.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
            username, why = self.admission.check(der, client_id)
            if username is None:
                log.warning("[mqtt] embedded broker refused client_id=%r: %s", client_id, why)
                writer.write(_NOT_AUTHORIZED)
                await writer.drain()
                writer.close()
                return
            _ADMITTED.set(username)
            await self._client_connected(
                listener_name, _Replay(packet, reader), StreamWriterAdapter(writer)
            )
        except ConnectionError as exc:
            # A client that hangs up while being refused or served: nothing to report.
            log.debug("[mqtt] embedded broker: connection closed by the client: %s", exc)


async def _read_connect(reader: asyncio.StreamReader) -> tuple[bytes, str]:
    """The first packet, which must be an MQTT 3.1.1 CONNECT: its bytes and its client id."""
    first = await reader.readexactly(1)
    if first[0] >> 4 != 1:
        raise ValueError("the first packet is not a CONNECT")
    length_bytes = b""
    length = 0
    for shift in range(0, 28, 7):
        byte = await reader.readexactly(1)
        length_bytes += byte
        length |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            break
    else:
        raise ValueError("malformed remaining length")
    if length > MAX_CONNECT_BYTES:
        raise ValueError(f"CONNECT of {length} bytes")
    body = await reader.readexactly(length)
    name_length = int.from_bytes(body[0:2], "big")
    at = 2 + name_length + 4  # protocol name, level, flags, keepalive
    id_length = int.from_bytes(body[at : at + 2], "big")
    raw_id = body[at + 2 : at + 2 + id_length]
    if len(body) < at + 2 or len(raw_id) != id_length:
        raise ValueError("truncated CONNECT")
    try:
        client_id = raw_id.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("client id is not UTF-8") from None
    return first + length_bytes + body, client_id


class PacketTooLarge(Exception):
    """A client announced a packet larger than `MAX_PACKET_BYTES`."""


class _Replay(StreamReaderAdapter):  # type: ignore[misc]
    """A connection's reader for amqtt: the CONNECT already read, then the rest, never more
    than `MAX_PACKET_BYTES` at once (amqtt reads a packet's payload in one read, so no packet
    much larger gets in)."""

    def __init__(self, already: bytes, reader: asyncio.StreamReader) -> None:
        super().__init__(reader)
        self._already = already

    async def read(self, n: int = -1) -> bytes:
        if n > MAX_PACKET_BYTES:
            # Not an error amqtt's reads swallow (they would carry on mid-packet): its reader
            # loop ends, and the connection with it.
            raise PacketTooLarge(f"a packet of {n} bytes, at most {MAX_PACKET_BYTES}")
        if not self._already:
            data: bytes = await super().read(n)
            return data
        if n < 0 or n >= len(self._already):
            head, self._already = self._already, b""
            rest = await super().read(n - len(head)) if n > len(head) else b""
            return head + rest
        head, self._already = self._already[:n], self._already[n:]
        return head


class CertificateAuthPlugin(BaseAuthPlugin):  # type: ignore[misc]
    """Admits the client `_Broker` admitted (its certificate checked, its client id its
    identity's user name), which becomes the session's user name. Sessions are not marked
    anonymous (see the module)."""

    @dataclass
    class Config:
        """No options: `_Broker` checks the certificate before amqtt reads the CONNECT."""

    async def authenticate(self, *, session: Any) -> bool:
        username = _ADMITTED.get()
        if username is None or session.client_id != username:
            log.warning("[mqtt] embedded broker refused client_id=%r", session.client_id)
            return False
        session.username = username
        return True


class AclTopicPlugin(BaseTopicPlugin):  # type: ignore[misc]
    """The ACL of `server.mqtt_acl`, for the session's client id (= its certificate's user
    name: `CertificateAuthPlugin` admits no other)."""

    @dataclass
    class Config:
        """No options: the rules are `server.mqtt_acl.RULES`."""

    async def topic_filtering(
        self, *, session: Any = None, topic: str | None = None, action: Action | None = None
    ) -> bool:
        if session is None or not topic:
            return False
        username = session.client_id or ""
        if action is Action.PUBLISH:
            ok = allowed(username, Access.WRITE, topic)
        elif action is Action.SUBSCRIBE:
            ok = allowed(username, Access.READ, topic, subscribe=True)
        else:
            ok = allowed(username, Access.READ, topic)
        if not ok and action is not Action.RECEIVE:
            log.warning("[mqtt] embedded broker: %s to %s denied for %r", action, topic, username)
        return ok


def _plugin(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class EmbeddedBroker(Lifecycle):
    """Async context manager: `async with EmbeddedBroker(tls=bundle) as b: b.mqtt_config()`
    (`tls`: the broker's own bundle; None: plaintext, anonymous, no ACL)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        tls: TlsConfig | None,
        session_expiry_s: int = DEFAULT_SESSION_EXPIRY_S,
    ) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"mqtt port: {port} is not in 0..65535")
        self.host = host
        self.tls = tls
        self.requested_port = port
        self.port = port
        self.session_expiry_s = session_expiry_s
        self._broker: Broker | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def mqtt_config(self, topics: Topics | None = None) -> MqttConfig:
        """How clients reach this broker (in the given namespace)."""
        if self._broker is None:
            raise RuntimeError("embedded broker: not started")
        return MqttConfig(host=self.host, port=self.port, topics=topics or Topics())

    def _config(self) -> dict[str, Any]:
        listener: dict[str, Any] = {"type": "tcp", "bind": f"{self.host}:{self.requested_port}"}
        # Only these plugins: no $SYS publisher, no packet logger.
        plugins: dict[str, Any] = {_plugin(AdmitAllAuthPlugin): {}}
        tls = self.tls
        if tls is not None:
            listener |= {
                "ssl": True,
                "cafile": str(tls.ca),
                "certfile": str(tls.cert),
                "keyfile": str(tls.key),
            }
            plugins = {_plugin(CertificateAuthPlugin): {}, _plugin(AclTopicPlugin): {}}
        return {
            "listeners": {"default": listener},
            "session_expiry_interval": self.session_expiry_s,
            "plugins": plugins,
        }

    def _check_free(self) -> None:
        """Fail with one clear line when the port is taken (amqtt would log a traceback)."""
        problem = bind_problem(self.host, self.requested_port) if self.requested_port else None
        if problem is not None:
            raise OSError(f"mqtt: cannot listen on {self.address}: {problem}")

    async def _open(self, stack: AsyncExitStack) -> None:
        self._check_free()
        broker = _Broker(self._config())
        if self.tls is not None:
            broker.admission = await asyncio.to_thread(_Admission, self.tls)
        try:
            await broker.start()
        except BrokerError as exc:
            # Usually the port is taken; say so as an OSError like any failed bind.
            cause = exc.__cause__ or exc
            raise OSError(f"mqtt: cannot listen on {self.address}: {cause}") from None
        stack.push_async_callback(self._shutdown, broker)
        self.port = self._bound_port(broker)
        self._broker = broker
        log.info(
            "[mqtt] embedded broker listening on %s (%s)",
            self.address,
            "mutual TLS, ACL" if self.tls else "plaintext, no authentication",
        )

    def _bound_port(self, broker: Broker) -> int:
        if self.requested_port:
            return self.requested_port
        # amqtt does not report the port it bound; its listener's asyncio server does.
        servers: dict[str, Any] = getattr(broker, "_servers", {})
        instance = getattr(servers.get("default"), "instance", None)
        for sock in getattr(instance, "sockets", None) or ():
            name = sock.getsockname()
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                return int(name[1])
        raise RuntimeError("embedded broker: cannot tell which port it bound")

    async def _shutdown(self, broker: Broker) -> None:
        self._broker = None
        await broker.shutdown()
        log.info("[mqtt] embedded broker on %s stopped", self.address)
