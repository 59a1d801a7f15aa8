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
    ResultAck,
    TaskResult,
    TaskStart,
    TaskStop,
)
from server.mqtt import MqttSession
from server.topics import Report, Topics
from tests.support.infra import Mosquitto
from tests.support.security import proplet_tls, service_tls

FINAL_STATES = (COMPLETED, FAILED, INTERRUPTED)
WAIT_S = 15.0


class ManagerProbe:
    """Stands where the manager stands on MQTT (with the manager's certificate): publishes
    tasks, records results and heartbeats, and acknowledges each result as the manager does
    (unless `acking` is off)."""

    def __init__(self, port: int, topics: Topics) -> None:
        self.topics = topics
        self.results: list[TaskResult] = []
        self.alive: list[PropletAnnounce] = []
        self.created: list[PropletAnnounce] = []
        self.acking = True
        self._pending_acks: set[asyncio.Future[None]] = set()
        self._changed = asyncio.Condition()
        self.session = MqttSession(
            MqttConfig(port=port, topics=topics).as_identity(service_tls("manager")),
            client_id=f"probe-{uuid.uuid4().hex[:8]}",
            subscriptions=topics.reports,
            handler=self._on_message,
            clean_session=True,
        )

    async def _on_message(self, topic: str, payload: bytes) -> None:
        report = self.topics.parse_report(topic)
        if report is None:
            return
        kind, sender = report
        if kind is Report.RESULTS:
            result = TaskResult.from_json(payload)
            self.results.append(result)
            if self.acking:
                self._ack(sender, result)
        elif kind is Report.ALIVE:
            self.alive.append(PropletAnnounce.from_json(payload))
        else:
            self.created.append(PropletAnnounce.from_json(payload))
        async with self._changed:
            self._changed.notify_all()

    def _ack(self, sender: str, result: TaskResult) -> None:
        """Acknowledge in the background: the handler must not wait on its own connection."""
        ack = ResultAck.of(result).to_json()
        sent = asyncio.ensure_future(self.session.publish(self.topics.result_ack_for(sender), ack))
        self._pending_acks.add(sent)
        sent.add_done_callback(self._pending_acks.discard)

    async def acks_sent(self) -> None:
        if self._pending_acks:
            await asyncio.wait(set(self._pending_acks))

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
        await self.session.publish(self.topics.task_start_for(proplet_id), start.to_json())
        return task_id

    async def stop(self, task_id: str, proplet_id: str = "") -> None:
        await self.session.publish(
            self.topics.task_stop_for(proplet_id), TaskStop(task_id, proplet_id).to_json()
        )

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
        mqtt=MqttConfig(port=broker.port, topics=topics).as_identity(proplet_tls(pid)),
        heartbeat_s=0.2,
        work_dir=tmp_path / "work",
        task_timeout_s=1.0,
        memory_limit_bytes=16 << 20,
        output_limit_bytes=64 << 10,
        rpc_timeout_s=5.0,
    )


@pytest.fixture
async def probe(broker: Mosquitto, topics: Topics) -> AsyncIterator[ManagerProbe]:
    p = ManagerProbe(broker.port, topics)
    async with p.session:
        yield p
        await p.acks_sent()


@pytest.fixture
async def proplet(proplet_config: PropletConfig, probe: ManagerProbe) -> AsyncIterator[Proplet]:
    async with Proplet(proplet_config) as running:
        yield running


def with_changes(config: PropletConfig, **changes: Any) -> PropletConfig:
    """`config` with `changes`; another proplet_id brings that proplet's own certificate
    (gRPC and MQTT), unless `tls` is among the changes."""
    pid = changes.get("proplet_id")
    if pid is not None and "tls" not in changes:
        tls = proplet_tls(pid)
        changes |= {"tls": tls, "mqtt": changes.get("mqtt", config.mqtt).as_identity(tls)}
    return replace(config, **changes)
