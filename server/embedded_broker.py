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
- QoS 1 with persistent sessions: the manager and the proplets connect with
  clean_session=False. amqtt's own anonymous-auth plugin marks each session it admits as
  anonymous, and amqtt keeps neither the subscriptions nor the queued QoS 1 messages of an
  anonymous session that disconnects. The auth plugins here admit clients without that mark,
  so a client that reconnects gets what was published to it meanwhile, as with Mosquitto;
  a disconnected persistent session is dropped after `session_expiry_s`.

What amqtt cannot do that mosquitto does: it takes over a connected session before it asks the
auth plugins, so a client with a valid certificate that connects with another identity's
client id is refused, but drops that identity's live connection first (which reconnects at
once; nothing queued is lost or read). Connections already open when a certificate is
revoked stay open (as with mosquitto) until they reconnect.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import socket
import ssl
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.errors import BrokerError
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin

from server.config import MqttConfig, TlsConfig, bind_problem
from server.lifecycle import Lifecycle
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


# The certificate (DER) the client of the connection being handled presented: set per
# connection (each is a task of its own) before amqtt reads its CONNECT. amqtt's
# `session.ssl_object` would not do: a resumed session keeps its first connection's.
_PEER_CERT: contextvars.ContextVar[bytes | None] = contextvars.ContextVar(
    "propeller_mqtt_peer_cert", default=None
)


class _Broker(Broker):  # type: ignore[misc]  # amqtt is untyped here
    """amqtt's broker with mutual TLS: a client without a certificate of the CA is refused
    in the handshake (amqtt itself only asks for one), and the certificate of each connection
    reaches the auth plugin."""

    @staticmethod
    def _create_ssl_context(listener: Any) -> ssl.SSLContext:
        context: ssl.SSLContext = Broker._create_ssl_context(listener)
        context.verify_mode = ssl.CERT_REQUIRED
        return context

    async def stream_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
    ) -> None:
        ssl_object = writer.get_extra_info("ssl_object")
        _PEER_CERT.set(ssl_object.getpeercert(binary_form=True) if ssl_object else None)
        try:
            await super().stream_connected(reader, writer, listener_name)
        except ConnectionError as exc:
            # A refused client that hangs up before amqtt closes its side: nothing to report.
            log.debug("[mqtt] embedded broker: connection closed by the client: %s", exc)


class CertificateAuthPlugin(BaseAuthPlugin):  # type: ignore[misc]
    """Admits a client whose certificate (verified against the CA in the handshake) names a
    propeller identity, is not revoked, and whose client id is that identity's user name; the
    session's user name becomes it. Sessions are not marked anonymous (see the module)."""

    @dataclass
    class Config:
        ca: str
        crl: str = ""

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        ca = load_certificate(Path(self.config.ca).read_bytes(), self.config.ca)
        self._revoked = RevocationList(Path(self.config.crl), ca) if self.config.crl else None

    async def authenticate(self, *, session: Any) -> bool:
        client_id = session.client_id
        der = _PEER_CERT.get()
        if der is None:
            return _refused(client_id, "no client certificate")
        try:
            cert = load_certificate(der, "client certificate")
            identity = identity_of(cert)
            if self._revoked is not None and self._revoked.is_revoked(cert.serial_number):
                return _refused(client_id, f"{identity}'s certificate is revoked")
        except PkiError as exc:
            return _refused(client_id, str(exc))
        if client_id != identity.username:
            return _refused(
                client_id, f"{identity} must connect with client id {identity.username!r}"
            )
        session.username = identity.username
        return True


def _refused(client_id: str, reason: str) -> bool:
    log.warning("[mqtt] embedded broker refused client_id=%r: %s", client_id, reason)
    return False


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
            auth = {"ca": str(tls.ca), "crl": str(tls.crl or "")}
            plugins = {_plugin(CertificateAuthPlugin): auth, _plugin(AclTopicPlugin): {}}
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
