"""Proplet configuration from the environment, as compose and the CLI provide it."""

from __future__ import annotations

from pathlib import Path

import pytest

from proplet import PropletConfig
from proplet.config import parse_mirrors
from tests.support.environment import config_from_env


def test_from_env_reads_every_setting() -> None:
    config = config_from_env(
        PropletConfig,
        PROPLET_ID="p-1",
        PROPLET_NAME="edge-1",
        PROPLET_HEARTBEAT_S="2.5",
        PROPLET_WORK_DIR="/var/lib/proplet",
        PROPLET_TASK_TIMEOUT_S="30",
        PROPLET_MEMORY_LIMIT_MB="64",
        PROPLET_OUTPUT_LIMIT_MB="2",
        PROPLET_TABLE_ELEMENTS_LIMIT="4096",
        PROPLET_TABLES_LIMIT="2",
        PROPLET_FUEL_LIMIT="5000000000",
        PROPLET_REGISTRY_MIRRORS="local-registry:5000=127.0.0.1:5000, ghcr.io=m:5000",
    )
    assert (config.proplet_id, config.name, config.heartbeat_s) == ("p-1", "edge-1", 2.5)
    assert config.work_dir == Path("/var/lib/proplet")
    assert config.task_timeout_s == 30.0
    assert config.memory_limit_bytes == 64 << 20
    assert config.output_limit_bytes == 2 << 20
    assert (config.limits.table_elements, config.limits.tables) == (4096, 2)
    assert config.limits.elements_per_table == 2048
    assert config.limits.fuel == 5_000_000_000
    assert config.limits.linear_memory_bytes == (64 << 20) - 4096 * 8
    assert config.registry_mirrors == {"local-registry:5000": "127.0.0.1:5000", "ghcr.io": "m:5000"}
    assert (config.mqtt.host, config.mqtt.port, config.mqtt.topics.domain) == (
        "mosquitto",
        1884,
        "d1",
    )
    assert config.endpoints.coordinator == "coordinator:8086"
    assert config.endpoints.registry == "model-registry:8084"
    assert config.endpoints.datastore == "local-data-store:8083"
    assert config.registry_address("local-registry:5000") == "127.0.0.1:5000"
    assert config.registry_address("other:5000") == "other:5000"


def test_defaults() -> None:
    config = PropletConfig.from_env({"PROPELLER_INSECURE": "1", "PROPLET_ID": "p-1"})
    assert config.heartbeat_s == 10.0
    assert config.task_timeout_s == 300.0
    assert config.memory_limit_bytes == 256 << 20
    assert config.output_limit_bytes == 16 << 20
    assert (config.table_elements_limit, config.tables_limit) == (65536, 1)
    assert (config.fuel_limit, config.limits.fuel) == (0, 10**15)  # 0: the documented default
    # Memory and tables share the 256 MiB: 512 KiB for 65,536 table elements.
    assert config.limits.linear_memory_bytes == (256 << 20) - (512 << 10)
    assert config.registry_mirrors == {}
    assert config.insecure_registries is None


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "PROPLET_ID: required"),
        ({"PROPLET_ID": "a/b"}, "proplet_id"),
        ({"PROPLET_ID": "p", "PROPLET_HEARTBEAT_S": "often"}, "PROPLET_HEARTBEAT_S"),
        ({"PROPLET_ID": "p", "PROPLET_HEARTBEAT_S": "0"}, "heartbeat_s"),
        ({"PROPLET_ID": "p", "PROPLET_TASK_TIMEOUT_S": "-1"}, "timeout_s"),
        ({"PROPLET_ID": "p", "PROPLET_MEMORY_LIMIT_MB": "lots"}, "PROPLET_MEMORY_LIMIT_MB"),
        ({"PROPLET_ID": "p", "PROPLET_TABLES_LIMIT": "0"}, "tables"),
        ({"PROPLET_ID": "p", "PROPLET_FUEL_LIMIT": "-1"}, "fuel_limit"),
        ({"PROPLET_ID": "p", "PROPLET_FUEL_LIMIT": str(2**63)}, "fuel_limit"),
        ({"PROPLET_ID": "p", "PROPLET_FUEL_LIMIT": "much"}, "PROPLET_FUEL_LIMIT"),
        ({"PROPLET_ID": "p", "PROPLET_TABLE_ELEMENTS_LIMIT": "x"}, "PROPLET_TABLE_ELEMENTS_LIMIT"),
        # The tables' share (8 MiB) leaves no room for memory in 8 MiB.
        (
            {
                "PROPLET_ID": "p",
                "PROPLET_MEMORY_LIMIT_MB": "8",
                "PROPLET_TABLE_ELEMENTS_LIMIT": "1048576",
            },
            "memory_bytes",
        ),
        ({"PROPLET_ID": "p", "PROPLET_REGISTRY_MIRRORS": "nohost"}, "PROPLET_REGISTRY_MIRRORS"),
    ],
)
def test_bad_settings_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PropletConfig.from_env({"PROPELLER_INSECURE": "1", **env})


def test_insecure_registries_from_env() -> None:
    config = PropletConfig.from_env(
        {
            "PROPELLER_INSECURE": "1",
            "PROPLET_ID": "p",
            "PROPLET_INSECURE_REGISTRIES": "registry:5000, other:80",
        }
    )
    assert config.insecure_registries == frozenset({"registry:5000", "other:80"})
    assert config.is_insecure("registry:5000")
    assert not config.is_insecure("127.0.0.1:5000")


def test_mirror_list_parsing() -> None:
    assert parse_mirrors("") == {}
    assert parse_mirrors("a:1=b:2,,c=d") == {"a:1": "b:2", "c": "d"}
