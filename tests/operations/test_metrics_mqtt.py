"""`propeller_mqtt_reconnects_total` counts a session's connections after its first: a broker
restarted under a live session is one reconnect, scraped from /metrics."""

from __future__ import annotations

import asyncio

import pytest

from server.config import MqttConfig
from server.metrics import MetricsConfig, serving_metrics
from server.mqtt import MqttSession
from tests.operations.scrape import scrape
from tests.support.infra import Mosquitto
from tests.support.security import service_tls
from tests.support.waits import eventually

pytestmark = pytest.mark.integration

RECONNECTS = "propeller_mqtt_reconnects_total"


async def test_a_broker_restart_is_one_reconnect(
    own_broker: Mosquitto, own_mqtt: MqttConfig
) -> None:
    session = MqttSession(own_mqtt.as_identity(service_tls("manager")), "manager")
    with serving_metrics(MetricsConfig("127.0.0.1:0")) as endpoint:
        assert endpoint is not None
        async with session:
            # The first connection is no reconnect.
            before = (await scrape(endpoint.url)).value(RECONNECTS)
            await asyncio.to_thread(own_broker.stop)
            await asyncio.to_thread(own_broker.start)

            async def connected_again() -> int:
                return session.connects

            await eventually(connected_again, lambda n: n == 2, timeout=15, what="reconnected")
            after = (await scrape(endpoint.url)).value(RECONNECTS)
    assert after - before == 1
