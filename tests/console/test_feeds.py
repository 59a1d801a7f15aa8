"""The console's feeds against the real services (in process, mutual TLS): it reads them as an
operator, so another identity is refused and the page says why; services it cannot reach are
said too."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from server.config import Endpoints, MqttConfig
from server.console.app import Console, ConsoleConfig
from tests.support.cluster import Cluster, cluster
from tests.support.ports import free_port
from tests.support.security import operator_tls, proplet_tls
from tests.support.waits import eventually

pytestmark = pytest.mark.integration


@pytest.fixture
async def stack(mqtt: MqttConfig, tmp_path: Path) -> AsyncIterator[Cluster]:
    async with cluster(mqtt, tmp_path, proplets=1) as c:
        yield c


def config(endpoints: Endpoints, **fields: object) -> ConsoleConfig:
    settings = {"tls": operator_tls(), "listen": "127.0.0.1:0", "poll_s": 0.2, **fields}
    return ConsoleConfig(endpoints=endpoints, **settings)  # type: ignore[arg-type]


async def test_an_operator_sees_the_proplets(stack: Cluster) -> None:
    async with Console(config(stack.endpoints)) as console:
        shown = await eventually(
            lambda: _snapshot(console), lambda s: bool(s["proplets"]), what="the proplets listed"
        )
    assert [(p["id"], p["alive"]) for p in shown["proplets"]] == [(stack.proplet_ids[0], True)]
    assert shown["problem"] == ""


async def test_another_identity_is_refused_and_the_page_says_why(stack: Cluster) -> None:
    as_proplet = config(stack.endpoints, tls=proplet_tls(stack.proplet_ids[0]))
    async with Console(as_proplet) as console:
        shown = await eventually(
            lambda: _snapshot(console), lambda s: bool(s["problem"]), what="the console's problem"
        )
    assert shown["problem"].startswith("PERMISSION_DENIED: ListProplets: proplet ")
    assert "allowed: operators" in shown["problem"] and shown["proplets"] == []


async def test_services_it_cannot_reach_are_named(stack: Cluster) -> None:
    nowhere = Endpoints(manager=f"127.0.0.1:{free_port()}", coordinator=stack.endpoints.coordinator)
    async with Console(config(nowhere)) as console:
        shown = await eventually(
            lambda: _snapshot(console), lambda s: bool(s["problem"]), what="the console's problem"
        )
    assert shown["problem"].startswith(f"UNAVAILABLE: cannot reach manager at {nowhere.manager}")


async def _snapshot(console: Console) -> dict[str, Any]:
    return console.board.snapshot()


async def test_serving_beyond_loopback_is_warned_of(
    stack: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    async with Console(config(stack.endpoints, listen="0.0.0.0:0")) as console:
        assert console.url.startswith("http://0.0.0.0:")
        # Served on every interface, it answers whatever name a browser reached it by.
        port = console.url.rstrip("/").rpartition(":")[2]
        reader, writer = await asyncio.open_connection("127.0.0.1", int(port))
        writer.write(f"GET /state.json HTTP/1.1\r\nHost: fleet.example:{port}\r\n\r\n".encode())
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        await writer.wait_closed()
        assert answer.startswith(b"HTTP/1.1 200"), answer
    assert "not loopback: whoever reaches it sees it" in caplog.text
