"""The embedded broker as the services use it: QoS 1 through `MqttSession`, persistent
sessions that keep messages across a reconnect, a clean start and stop, one-line bind errors.
Plaintext here (`tls=None`); its TLS, authentication and ACL: tests/security/test_mqtt.py."""

from __future__ import annotations

import asyncio

import pytest

from server.embedded_broker import EmbeddedBroker
from server.mqtt import MqttSession


async def test_qos1_and_persistent_sessions() -> None:
    got: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()

    async def on_message(topic: str, payload: bytes) -> None:
        got.put_nowait((topic, payload))

    async with EmbeddedBroker(tls=None) as broker:
        assert broker.port > 0
        mqtt = broker.mqtt_config()
        async with MqttSession(mqtt, "pub") as pub:
            async with MqttSession(mqtt, "sub", ["a/#"], on_message):
                for i in range(50):
                    await pub.publish("a/b", b"m%d" % i)
                received = [await asyncio.wait_for(got.get(), 10) for _ in range(50)]
                assert received == [("a/b", b"m%d" % i) for i in range(50)]
            # The subscriber is away; its persistent session keeps what is published meanwhile.
            await pub.publish("a/b", b"while away")
            async with MqttSession(mqtt, "sub", ["a/#"], on_message):
                assert await asyncio.wait_for(got.get(), 10) == ("a/b", b"while away")


async def test_a_taken_port_is_one_clear_error() -> None:
    async with EmbeddedBroker(tls=None) as first:
        with pytest.raises(OSError, match=rf"mqtt: cannot listen on 127\.0\.0\.1:{first.port}"):
            async with EmbeddedBroker(port=first.port, tls=None):
                pass
