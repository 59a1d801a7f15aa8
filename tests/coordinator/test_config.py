"""CoordinatorConfig from the environment compose declares."""

from __future__ import annotations

import pytest

from server.config import TLS_DIR_ENV
from server.coordinator.app import CoordinatorConfig
from server.pki import coordinator_replica_service
from server.topics import Topics
from tests.support.environment import config_from_env
from tests.support.security import service_tls


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


def test_a_coordinator_replica_s_id_is_its_certificate_s() -> None:
    """Under mutual TLS a replica is who its certificate says: service `coordinator-{id}`
    gives the replica id (its leases' owner; its MQTT user name and client id are the
    certificate's); a PROPELLER_COORDINATOR_REPLICA_ID that disagrees is refused, naming
    both; the single coordinator's certificate (and a site's) leaves the setting as given."""
    bundle = service_tls(coordinator_replica_service("r7"))
    env = {TLS_DIR_ENV: str(bundle.cert.parent), "PROPELLER_DATABASE_URL": "postgresql://x/y"}
    config = CoordinatorConfig.from_env(env)
    assert config.replica_id == "r7"
    assert config.replica is not None and config.replica.replica_id == "r7"
    same = {**env, "PROPELLER_COORDINATOR_REPLICA_ID": "r7"}
    assert CoordinatorConfig.from_env(same).replica_id == "r7"
    with pytest.raises(
        ValueError, match=r"PROPELLER_COORDINATOR_REPLICA_ID: 'r8', but .*coordinator-r7"
    ):
        CoordinatorConfig.from_env({**env, "PROPELLER_COORDINATOR_REPLICA_ID": "r8"})
    for name in ("coordinator", "manager-r7"):
        single = {**env, TLS_DIR_ENV: str(service_tls(name).cert.parent)}
        assert CoordinatorConfig.from_env(single).replica_id == ""
        given = {**single, "PROPELLER_COORDINATOR_REPLICA_ID": "x"}
        assert CoordinatorConfig.from_env(given).replica_id == "x"
