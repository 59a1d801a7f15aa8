"""Configuration read from the environment. Only entry points call `from_env`; tests build
the dataclasses directly."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from server.topics import Topics


def env_str(env: Mapping[str, str], key: str, default: str) -> str:
    value = env.get(key, "")
    return value if value else default


def env_int(env: Mapping[str, str], key: str, default: int) -> int:
    raw = env.get(key, "")
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{key}: {raw!r} is not an integer") from None


def env_float(env: Mapping[str, str], key: str, default: float) -> float:
    raw = env.get(key, "")
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{key}: {raw!r} is not a number") from None


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


@dataclass(frozen=True)
class Endpoints:
    """gRPC addresses of the services, as host:port."""

    manager: str = "127.0.0.1:7070"
    coordinator: str = "127.0.0.1:8086"
    aggregator: str = "127.0.0.1:8085"
    registry: str = "127.0.0.1:8084"
    datastore: str = "127.0.0.1:8083"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Endpoints:
        env = os.environ if env is None else env
        d = cls()
        return cls(
            manager=env_str(env, "MANAGER_ADDR", d.manager),
            coordinator=env_str(env, "COORDINATOR_ADDR", d.coordinator),
            aggregator=env_str(env, "AGGREGATOR_ADDR", d.aggregator),
            registry=env_str(env, "MODEL_REGISTRY_ADDR", d.registry),
            datastore=env_str(env, "DATA_STORE_ADDR", d.datastore),
        )
