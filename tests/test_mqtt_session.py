"""The MQTT session (`server.mqtt.MqttSession`) against the test broker: what it logs when
many publishes wait for their acknowledgements at once."""

from __future__ import annotations

import asyncio
import logging

import pytest

from server.config import MqttConfig
from server.mqtt import PENDING_PUBLISH_WARNING, MqttSession
from tests.support.security import service_tls

PENDING = "pending publish calls"


async def test_a_fan_out_of_64_starts_logs_no_backlog_and_a_real_backlog_still_does(
    mqtt: MqttConfig, caplog: pytest.LogCaptureFixture
) -> None:
    """64 QoS 1 publishes at once (the manager's start window) are no backlog worth a warning;
    more than `PENDING_PUBLISH_WARNING` waiting at once still is (aiomqtt's own warning)."""
    session = MqttSession(mqtt.as_identity(service_tls("manager")), "manager")
    topic = mqtt.topics.task_start_for("p-1")
    with caplog.at_level(logging.WARNING):
        async with session:
            await session.wait_connected(10)
            await asyncio.gather(*(session.publish(topic, b"{}") for _ in range(64)))
            assert PENDING not in caplog.text
            many = PENDING_PUBLISH_WARNING + 64
            await asyncio.gather(*(session.publish(topic, b"{}") for _ in range(many)))
    assert PENDING in caplog.text
