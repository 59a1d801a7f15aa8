"""An MQTT broker inside the process (amqtt), for the one-process modes (`propeller-fl demo`,
`propeller-fl up`) only: anything measured or deployed uses Mosquitto.

Configured the way the services expect a broker to behave:
- bound to one address (127.0.0.1 by default); port 0 picks a free port, read back as `port`;
- every client is let in (no credentials) and no topic is filtered;
- QoS 1 with persistent sessions: the manager and the proplets connect with
  clean_session=False. amqtt's own anonymous-auth plugin marks each session it admits as
  anonymous, and amqtt keeps neither the subscriptions nor the queued QoS 1 messages of an
  anonymous session that disconnects. The auth plugin here admits clients without that mark,
  so a client that reconnects gets what was published to it meanwhile, as with Mosquitto;
  a disconnected persistent session is dropped after `session_expiry_s`.
"""

from __future__ import annotations

import logging
import socket
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

from amqtt.broker import Broker
from amqtt.errors import BrokerError
from amqtt.plugins.base import BaseAuthPlugin

from server.config import MqttConfig, bind_problem
from server.lifecycle import Lifecycle
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


_AUTH_PLUGIN = f"{AdmitAllAuthPlugin.__module__}.{AdmitAllAuthPlugin.__qualname__}"


class EmbeddedBroker(Lifecycle):
    """Async context manager: `async with EmbeddedBroker() as b: b.mqtt_config()`."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        session_expiry_s: int = DEFAULT_SESSION_EXPIRY_S,
    ) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"mqtt port: {port} is not in 0..65535")
        self.host = host
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
        return {
            "listeners": {
                "default": {"type": "tcp", "bind": f"{self.host}:{self.requested_port}"},
            },
            "session_expiry_interval": self.session_expiry_s,
            # Only this plugin: no $SYS publisher, no packet logger, no topic filter.
            "plugins": {_AUTH_PLUGIN: {}},
        }

    def _check_free(self) -> None:
        """Fail with one clear line when the port is taken (amqtt would log a traceback)."""
        problem = bind_problem(self.host, self.requested_port) if self.requested_port else None
        if problem is not None:
            raise OSError(f"mqtt: cannot listen on {self.address}: {problem}")

    async def _open(self, stack: AsyncExitStack) -> None:
        self._check_free()
        broker = Broker(self._config())
        try:
            await broker.start()
        except BrokerError as exc:
            # Usually the port is taken; say so as an OSError like any failed bind.
            cause = exc.__cause__ or exc
            raise OSError(f"mqtt: cannot listen on {self.address}: {cause}") from None
        stack.push_async_callback(self._shutdown, broker)
        self.port = self._bound_port(broker)
        self._broker = broker
        log.info("[mqtt] embedded broker listening on %s", self.address)

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
