"""Configs read from a deployment's environment, for the tests of each config's `from_env`:
`config_from_env(PropletConfig, PROPLET_ID="p-1", ...)` reads `DEPLOYMENT_ENV` with the
given variables over it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, TypeVar

C = TypeVar("C", covariant=True)

# What compose.yaml gives every container: the services by their compose names, the broker
# and the namespace (a port and names other than the defaults, so that reading them shows),
# plaintext (these tests issue no certificates).
DEPLOYMENT_ENV: Mapping[str, str] = {
    "PROPELLER_INSECURE": "1",
    "PROPELLER_MQTT_HOST": "mosquitto",
    "PROPELLER_MQTT_PORT": "1884",
    "PROPELLER_DOMAIN_ID": "d1",
    "PROPELLER_CHANNEL_ID": "c1",
    "COORDINATOR_ADDR": "coordinator:8086",
    "AGGREGATOR_ADDR": "aggregator:8085",
    "MODEL_REGISTRY_ADDR": "model-registry:8084",
    "DATA_STORE_ADDR": "local-data-store:8083",
}


class FromEnv(Protocol[C]):
    def from_env(self, env: Mapping[str, str] | None = None, /) -> C: ...


def config_from_env(config: FromEnv[C], **env: str) -> C:
    """`config.from_env` of `DEPLOYMENT_ENV` with `env` over it."""
    return config.from_env({**DEPLOYMENT_ENV, **env})
