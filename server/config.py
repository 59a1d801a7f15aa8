"""Configuration read from the environment. Only entry points call `from_env`; tests build
the dataclasses directly."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from server.topics import Topics

N = TypeVar("N", int, float)


def env_str(env: Mapping[str, str], key: str, default: str) -> str:
    value = env.get(key, "")
    return value if value else default


def env_int(env: Mapping[str, str], key: str, default: int) -> int:
    return _env_number(env, key, default, int, "an integer")


def env_float(env: Mapping[str, str], key: str, default: float) -> float:
    return _env_number(env, key, default, float, "a number")


def _env_number(
    env: Mapping[str, str], key: str, default: N, parse: Callable[[str], N], what: str
) -> N:
    raw = env.get(key, "")
    if not raw:
        return default
    try:
        return parse(raw)
    except ValueError:
        raise ValueError(f"{key}: {raw!r} is not {what}") from None


def env_list(env: Mapping[str, str], key: str) -> list[str]:
    return [p.strip() for p in env.get(key, "").split(",") if p.strip()]


@dataclass(frozen=True)
class MqttConfig:
    """Where the broker is and which deployment namespace to use."""

    host: str = "127.0.0.1"
    port: int = 1883
    topics: Topics = field(default_factory=Topics)
    keepalive: int = 30

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> MqttConfig:
        env = os.environ if env is None else env
        return cls(
            host=env_str(env, "PROPELLER_MQTT_HOST", "127.0.0.1"),
            port=env_int(env, "PROPELLER_MQTT_PORT", 1883),
            topics=Topics(
                domain=env_str(env, "PROPELLER_DOMAIN_ID", "propeller"),
                channel=env_str(env, "PROPELLER_CHANNEL_ID", "fl"),
            ),
        )


# Each service's environment variable (as the seed names them), default port and what
# messages call it. One table, so the services, the proplet and the CLI agree.
ENDPOINTS: dict[str, tuple[str, int, str]] = {
    "manager": ("MANAGER_ADDR", 7070, "manager"),
    "coordinator": ("COORDINATOR_ADDR", 8086, "coordinator"),
    "aggregator": ("AGGREGATOR_ADDR", 8085, "aggregator"),
    "registry": ("MODEL_REGISTRY_ADDR", 8084, "model registry"),
    "datastore": ("DATA_STORE_ADDR", 8083, "data store"),
}


@dataclass(frozen=True)
class Endpoints:
    """gRPC addresses of the services, as host:port."""

    manager: str = "127.0.0.1:7070"
    coordinator: str = "127.0.0.1:8086"
    aggregator: str = "127.0.0.1:8085"
    registry: str = "127.0.0.1:8084"
    datastore: str = "127.0.0.1:8083"

    @classmethod
    def on(cls, host: str) -> Endpoints:
        """Every service on `host` at its default port."""
        return cls(**{name: f"{host}:{port}" for name, (_, port, _) in ENDPOINTS.items()})

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, defaults: Endpoints | None = None
    ) -> Endpoints:
        """The addresses the environment names; the others from `defaults` (127.0.0.1)."""
        env = os.environ if env is None else env
        d = defaults or cls()
        return cls(
            **{name: env_str(env, var, getattr(d, name)) for name, (var, _, _) in ENDPOINTS.items()}
        )

    def label(self, service: str) -> str:
        """What messages call `service`, with its address: "model registry at host:port"."""
        return f"{ENDPOINTS[service][2]} at {getattr(self, service)}"


def bind_problem(host: str, port: int) -> str | None:
    """Why `host:port` cannot be listened on right now (the OS's reason), or None if it can.
    Checked before a fixed port is used, so a taken port is one clear line instead of a
    traceback (amqtt) or a silently shared port (gRPC servers bind with SO_REUSEPORT)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            return str(exc.strerror or exc)
    return None
