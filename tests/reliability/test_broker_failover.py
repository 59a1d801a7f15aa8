"""A client given several broker nodes (`MqttConfig.failover`, PROPELLER_MQTT_BROKERS) uses
the first that answers and moves on when one refuses; with the test's Mosquitto as the only
live node (the clustered broker itself: test_broker_cluster.py)."""

from __future__ import annotations

import asyncio

from server.config import MqttConfig
from server.mqtt import MqttSession
from tests.support.ports import free_port
from tests.support.security import proplet_tls, service_tls


async def test_a_session_passes_over_nodes_that_refuse(mqtt: MqttConfig) -> None:
    live = (mqtt.host, mqtt.port)
    # Two nodes where nothing listens, first in the list: the session goes round to the third.
    dead = [("127.0.0.1", free_port()), ("127.0.0.1", free_port())]
    nodes = MqttConfig.on_brokers([*dead, live], topics=mqtt.topics)
    assert nodes.brokers[-1] == live
    got: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_message(_: str, payload: bytes) -> None:
        got.put_nowait(payload)

    pid = "p-failover"
    topic = mqtt.topics.task_start_for(pid)
    proplet = MqttSession(
        nodes.as_identity(proplet_tls(pid)), pid, [topic], on_message, clean_session=True
    )
    manager = MqttSession(mqtt.as_identity(service_tls("manager")), "manager", clean_session=True)
    async with proplet, manager:
        assert proplet.broker == live
        await manager.publish(topic, b"through the live node")
        assert await asyncio.wait_for(got.get(), 10) == b"through the live node"
