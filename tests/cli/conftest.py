"""Fixtures for the client command tests: the CLI runner and a real in-process stack."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from server.config import MqttConfig
from server.stack import Stack, StackConfig
from server.topics import Topics
from tests.cli.helpers import Cli, make_cli
from tests.support.infra import Mosquitto

SEEDED = ("seed-a", "seed-b")


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Cli:
    return make_cli(capsys)


@pytest.fixture
def mqtt(broker: Mosquitto, topics: Topics) -> MqttConfig:
    return MqttConfig(port=broker.port, topics=topics)


@pytest.fixture
async def stack(mqtt: MqttConfig) -> AsyncIterator[Stack]:
    """All five services; the data store seeded for SEEDED (64 samples, 3 features)."""
    async with Stack(StackConfig(mqtt=mqtt, seed_proplet_ids=SEEDED)) as s:
        yield s
