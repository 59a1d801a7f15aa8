"""`python -m proplet` as compose runs it: configured from the environment, serving tasks
until SIGTERM, then exiting cleanly."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid
from pathlib import Path

from server.messages import COMPLETED
from server.topics import Topics
from tests.proplet import wat
from tests.proplet.conftest import ManagerProbe
from tests.support.infra import Mosquitto
from tests.support.security import proplet_tls, tls_env

ROOT = Path(__file__).resolve().parents[2]


async def test_entry_point_serves_tasks_until_sigterm(
    broker: Mosquitto, topics: Topics, probe: ManagerProbe, tmp_path: Path
) -> None:
    proplet_id = f"proc-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        # Its bundle: the proplet id comes from its certificate (PROPLET_ID must agree), for
        # gRPC and MQTT alike.
        **tls_env(proplet_tls(proplet_id)),
        "PROPLET_ID": proplet_id,
        "PROPLET_HEARTBEAT_S": "0.2",
        "PROPLET_WORK_DIR": str(tmp_path / "work"),
        "PROPELLER_MQTT_PORT": str(broker.port),
        "PROPELLER_DOMAIN_ID": topics.domain,
        "PROPELLER_CHANNEL_ID": topics.channel,
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proplet",
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await probe.wait_until(lambda: any(a.proplet_id == proplet_id for a in probe.created))
        result = await probe.run(wat.hello(), proplet_id=proplet_id)
        assert (result.state, result.results) == (COMPLETED, "hello from wasm\n")
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, stderr.decode()[-2000:]
    assert b"stopped" in stderr
