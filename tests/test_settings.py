"""`setting` fields: one declaration gives a config field its default and its variable, and
`settings_from_env` reads them all by the type each field declares."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from server.config import MqttConfig, setting, settings_from_env
from tests.support.environment import DEPLOYMENT_ENV, config_from_env


@dataclass(frozen=True)
class Example:
    name: str = setting("EXAMPLE_NAME", "default")
    count: int = setting("EXAMPLE_COUNT", 3)
    # A float field with an integer default still reads "2.5".
    ratio: float = setting("EXAMPLE_RATIO", 1)
    other: str = "not from the environment"


def test_unset_and_empty_variables_keep_the_defaults() -> None:
    assert settings_from_env(Example, {}) == {"name": "default", "count": 3, "ratio": 1}
    assert settings_from_env(Example, {"EXAMPLE_NAME": "", "EXAMPLE_COUNT": ""}) == {
        "name": "default",
        "count": 3,
        "ratio": 1,
    }


def test_each_variable_is_read_as_its_fields_type() -> None:
    env = {"EXAMPLE_NAME": "n", "EXAMPLE_COUNT": "7", "EXAMPLE_RATIO": "2.5", "OTHER": "x"}
    assert Example(**settings_from_env(Example, env)) == Example("n", 7, 2.5)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"EXAMPLE_COUNT": "2.5"}, "EXAMPLE_COUNT: '2.5' is not an integer"),
        ({"EXAMPLE_RATIO": "fast"}, "EXAMPLE_RATIO: 'fast' is not a number"),
    ],
)
def test_a_malformed_number_names_its_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError) as caught:
        settings_from_env(Example, env)
    assert str(caught.value) == message


# --- MQTT: one broker, or the nodes of a clustered one -------------------------------


def test_one_broker_by_host_and_port() -> None:
    mqtt = config_from_env(MqttConfig, PROPELLER_MQTT_HOST="b", PROPELLER_MQTT_PORT="1884")
    assert mqtt.brokers == [("b", 1884)] and mqtt.failover == ()


def test_the_nodes_of_a_clustered_broker_in_the_order_given() -> None:
    env = {**DEPLOYMENT_ENV, "PROPELLER_MQTT_BROKERS": " n2:1883, [::1]:1884 ,n1:1885,"}
    del env["PROPELLER_MQTT_HOST"], env["PROPELLER_MQTT_PORT"]
    mqtt = MqttConfig.from_env(env)
    assert mqtt.brokers == [("n2", 1883), ("::1", 1884), ("n1", 1885)]
    assert (mqtt.host, mqtt.port) == ("n2", 1883)  # the preferred node
    assert mqtt.topics.domain == DEPLOYMENT_ENV["PROPELLER_DOMAIN_ID"]


@pytest.mark.parametrize("entry", ["n1", "n1:", ":1883", "n1:0", "n1:65536", "n1:x"])
def test_a_malformed_broker_node_is_named(entry: str) -> None:
    env = {"PROPELLER_INSECURE": "1", "PROPELLER_MQTT_BROKERS": f"ok:1883,{entry}"}
    with pytest.raises(ValueError, match=f"PROPELLER_MQTT_BROKERS: {entry!r} is not host:port"):
        MqttConfig.from_env(env)


def test_the_broker_is_named_once() -> None:
    with pytest.raises(ValueError, match="PROPELLER_MQTT_BROKERS and PROPELLER_MQTT_HOST"):
        config_from_env(MqttConfig, PROPELLER_MQTT_BROKERS="n1:1883")
