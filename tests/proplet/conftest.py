"""Fixtures for proplet tests: a config on the test broker with small limits, an MQTT
"manager" that publishes task starts/stops and records what proplets report, and a running
proplet."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from proplet import Proplet, PropletConfig
from server.config import MqttConfig
from server.messages import (
    COMPLETED,
    FAILED,
    INTERRUPTED,
    PropletAnnounce,
    TaskResult,
    TaskStart,
    TaskStop,
)
from server.mqtt import MqttSession
from server.topics import Topics
from tests.support.infra import Mosquitto
from tests.support.security import proplet_tls

FINAL_STATES = (COMPLETED, FAILED, INTERRUPTED)
WAIT_S = 15.0


class ManagerProbe:
    """Stands where the manager stands on MQTT: publishes tasks, records results/heartbeats."""

    def __init__(self, broker: Mosquitto, topics: Topics) -> None:
        self.topics = topics
        self.results: list[TaskResult] = []
        self.alive: list[PropletAnnounce] = []
        self.created: list[PropletAnnounce] = []
        self._changed = asyncio.Condition()
        self.session = MqttSession(
            MqttConfig(port=broker.port, topics=topics),
            client_id=f"probe-{uuid.uuid4().hex[:8]}",
            subscriptions=[topics.proplet_results, topics.proplet_alive, topics.proplet_create],
            handler=self._on_message,
            clean_session=True,
        )

    async def _on_message(self, topic: str, payload: bytes) -> None:
        if topic == self.topics.proplet_results:
            self.results.append(TaskResult.from_json(payload))
        elif topic == self.topics.proplet_alive:
            self.alive.append(PropletAnnounce.from_json(payload))
        elif topic == self.topics.proplet_create:
            self.created.append(PropletAnnounce.from_json(payload))
        async with self._changed:
            self._changed.notify_all()

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = WAIT_S) -> None:
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(predicate), timeout)

    def states(self, task_id: str) -> list[str]:
        return [r.state for r in self.results if r.task_id == task_id]

    def final(self, task_id: str) -> TaskResult | None:
        for r in self.results:
            if r.task_id == task_id and r.state in FINAL_STATES:
                return r
        return None

    async def result(self, task_id: str, timeout: float = WAIT_S) -> TaskResult:
        """The task's final result (Completed/Failed/Interrupted), waiting for it."""
        await self.wait_until(lambda: self.final(task_id) is not None, timeout)
        found = self.final(task_id)
        assert found is not None
        return found

    async def start(
        self,
        wasm: bytes | None = None,
        *,
        image_url: str = "",
        env: dict[str, str] | None = None,
        cli_args: list[str] | None = None,
        proplet_id: str = "",
        task_id: str | None = None,
        name: str = "task",
    ) -> str:
        task_id = task_id or f"task-{uuid.uuid4().hex[:8]}"
        start = TaskStart(
            id=task_id,
            name=name,
            image_url=image_url,
            file=wasm or b"",
            env=env or {},
            cli_args=cli_args or [],
            proplet_id=proplet_id,
        )
        await self.session.publish(self.topics.task_start, start.to_json())
        return task_id

    async def stop(self, task_id: str, proplet_id: str = "") -> None:
        await self.session.publish(self.topics.task_stop, TaskStop(task_id, proplet_id).to_json())

    async def publish_raw(self, topic: str, payload: bytes) -> None:
        await self.session.publish(topic, payload)

    async def run(self, wasm: bytes | None = None, **kwargs: Any) -> TaskResult:
        """Start a task and wait for its final result."""
        return await self.result(await self.start(wasm, **kwargs))


@pytest.fixture
def proplet_config(broker: Mosquitto, topics: Topics, tmp_path: Path) -> PropletConfig:
    return PropletConfig(
        proplet_id=(pid := f"proplet-{uuid.uuid4().hex[:8]}"),
        tls=proplet_tls(pid),
        name="test-proplet",
        mqtt=MqttConfig(port=broker.port, topics=topics),
        heartbeat_s=0.2,
        work_dir=tmp_path / "work",
        task_timeout_s=1.0,
        memory_limit_bytes=16 << 20,
        output_limit_bytes=64 << 10,
        rpc_timeout_s=5.0,
    )


@pytest.fixture
async def probe(broker: Mosquitto, topics: Topics) -> AsyncIterator[ManagerProbe]:
    p = ManagerProbe(broker, topics)
    async with p.session:
        yield p


@pytest.fixture
async def proplet(proplet_config: PropletConfig, probe: ManagerProbe) -> AsyncIterator[Proplet]:
    async with Proplet(proplet_config) as running:
        yield running


def with_changes(config: PropletConfig, **changes: Any) -> PropletConfig:
    return replace(config, **changes)
