"""`propeller-fl up --state-dir DIR`: stopped with SIGTERM and started again with the same
directory, it still has the models and the tasks of the first run (every service's SQLite
file is in DIR)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from propeller.v1 import manager_pb2
from tests.support.clients import clients
from tests.support.processes import up_ports, up_process

STOP_S = 20.0


async def test_up_with_a_state_dir_carries_on_after_a_restart(
    tmp_path: Path, trainer_wasm: Path
) -> None:
    state_dir = tmp_path / "state"
    ports = up_ports()
    services = {name: f"127.0.0.1:{ports[name]}" for name in ("manager", "registry")}
    args = ["--proplets", "1", "--state-dir", str(state_dir), "--wasm", str(trainer_wasm)]

    with up_process(args, tmp_path, ports) as first:
        await asyncio.to_thread(first.wait_ready)
        # Its throwaway CA lives in the state directory, so a restart keeps the credentials.
        tls = first.operator_tls
        assert tls is not None and tls.cert.parent == state_dir / "certs" / "operator-admin"
        ca = (state_dir / "certs" / "ca.crt").read_bytes()
        async with clients(services, tls=tls) as c:
            v0 = await c.init_model(3)
            task = await c.manager.CreateTask(
                manager_pb2.CreateTaskRequest(name="kept", image_url="reg/x:1"), timeout=10
            )
        assert await first.terminate_async(STOP_S) == 0, first.tail()
    assert sorted(p.name for p in state_dir.glob("*.sqlite")) == [
        "coordinator.sqlite",
        "datastore.sqlite",
        "manager.sqlite",
        "registry.sqlite",
    ]

    with up_process(args, tmp_path, ports) as second:
        await asyncio.to_thread(second.wait_ready)
        assert second.operator_tls == tls
        assert (state_dir / "certs" / "ca.crt").read_bytes() == ca
        async with clients(services, tls=tls) as c:
            assert [(m.version, m.sha256) for m in await c.models()] == [(0, v0.sha256)]
            assert await c.task(task.id) == task
            # v0 is still there: initialising it again is refused.
            with pytest.raises(grpc.aio.AioRpcError) as again:
                await c.init_model(3)
            assert again.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert await second.terminate_async(STOP_S) == 0, second.tail()
