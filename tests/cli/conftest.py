"""Fixtures for the client command tests: the CLI runner and a real in-process stack."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from server.config import MqttConfig
from server.stack import Stack
from tests.support.cluster import cluster

SEEDED = ("seed-a", "seed-b")


@pytest.fixture
async def stack(mqtt: MqttConfig, tmp_path: Path) -> AsyncIterator[Stack]:
    """All five services; the data store seeded for SEEDED (64 samples, 3 features)."""
    seeded = {"seed_proplet_ids": SEEDED}
    async with cluster(mqtt, tmp_path, dimension=None, stack=seeded) as c:
        yield c.stack
