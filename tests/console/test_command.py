"""`propeller-fl console` as an operator runs it: a process of its own, given the services'
addresses and an operator's bundle (--tls-dir); it prints the page's address, serves the
fleet there, and stops cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from server.config import MqttConfig
from tests.support.cluster import Cluster, cluster
from tests.support.ports import free_port
from tests.support.processes import ChildProcess, service_environment
from tests.support.security import operator_tls
from tests.support.waits import eventually

pytestmark = pytest.mark.process


@pytest.fixture
async def stack(mqtt: MqttConfig, tmp_path: Path) -> AsyncIterator[Cluster]:
    async with cluster(mqtt, tmp_path, proplets=1) as c:
        yield c


def fetch(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return json.load(answer)


async def test_the_command_serves_the_fleet_as_an_operator(stack: Cluster, tmp_path: Path) -> None:
    port = free_port()
    bundle = operator_tls().cert.parent
    console = ChildProcess(
        "console",
        [
            sys.executable,
            "-m",
            "server.cli",
            "console",
            "--listen",
            f"127.0.0.1:{port}",
            "--poll",
            "0.2",
            "--manager",
            stack.endpoints.manager,
            "--coordinator",
            stack.endpoints.coordinator,
            "--tls-dir",
            str(bundle),
        ],
        tmp_path / "logs",
        env=service_environment(),
        stdout="log",
    )
    console.start()
    try:
        url = f"http://127.0.0.1:{port}/"
        await console.wait_log(f"console {url}")
        state = await eventually(
            lambda: asyncio.to_thread(fetch, f"{url}state.json"),
            lambda s: bool(s["proplets"]),
            what="the proplets on the console",
        )
        assert [p["id"] for p in state["proplets"]] == stack.proplet_ids
        assert state["problem"] == ""
        assert await console.terminate_async() == 0, console.tail()
        assert "Traceback" not in console.log_text(), console.tail()
    finally:
        if console.running:
            console.kill()
