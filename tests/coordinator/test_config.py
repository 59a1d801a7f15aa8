"""CoordinatorConfig from the environment compose declares."""

from __future__ import annotations

import pytest

from server.coordinator.app import CoordinatorConfig
from server.topics import Topics
from tests.support.environment import config_from_env


def test_defaults() -> None:
    c = CoordinatorConfig.from_env({"PROPELLER_INSECURE": "1"})
    assert c == CoordinatorConfig(tls=None)
    assert (c.addr, c.aggregator_addr, c.registry_addr) == (
        "127.0.0.1:8086",
        "127.0.0.1:8085",
        "127.0.0.1:8084",
    )
    assert (c.rpc_timeout_s, c.default_timeout_s, c.tick_s) == (30.0, 60.0, 0.2)


def test_from_env() -> None:
    c = config_from_env(
        CoordinatorConfig,
        PROPELLER_COORDINATOR_LISTEN="0.0.0.0:9000",
        PROPELLER_ROUND_DEFAULT_TIMEOUT_S="30",
    )
    assert c.addr == "0.0.0.0:9000"
    assert (c.aggregator_addr, c.registry_addr) == ("aggregator:8085", "model-registry:8084")
    assert (c.mqtt.host, c.mqtt.port) == ("mosquitto", 1884)
    assert c.mqtt.topics == Topics("d1", "c1")
    assert c.default_timeout_s == 30.0


def test_bad_number_names_the_variable() -> None:
    with pytest.raises(ValueError, match="PROPELLER_COORDINATOR_TICK_S"):
        CoordinatorConfig.from_env(
            {"PROPELLER_INSECURE": "1", "PROPELLER_COORDINATOR_TICK_S": "soon"}
        )
