"""`propeller-fl up` as a user runs it: a real subprocess on the ports it is told, the real
grpcurl against it, one federated round driven over gRPC with the printed proplet ids and
trainer image, then SIGTERM and a clean exit."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from propeller.v1 import coordinator_pb2
from tests.support.clients import clients
from tests.support.processes import UP_SERVICES, UpProcess, up_ports, up_process

READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 20.0


@pytest.fixture
def up(tmp_path: Path, trainer_wasm: Path) -> Iterator[tuple[UpProcess, dict[str, int]]]:
    """`up` with two proplets on free ports (the trainer it runs is built first)."""
    ports = up_ports()
    with up_process(["--proplets", "2"], tmp_path, ports) as running:
        yield running, ports


async def test_up_serves_a_round_and_stops_on_sigterm(
    up: tuple[UpProcess, dict[str, int]], trainer_wasm: Path
) -> None:
    running, ports = up
    printed = await asyncio.to_thread(running.wait_ready, READY_TIMEOUT_S)
    entries = [line.split(None, 1) for line in printed]
    assert all(len(e) == 2 for e in entries), printed
    by_name = {name: value for name, value in entries if name != "proplet"}
    # Secure by default: a throwaway CA and an operator bundle, with grpcurl's flags for it.
    tls = running.operator_tls
    assert tls is not None and tls.key.exists()
    flags = by_name["grpcurl"].split()
    assert flags == ["-cacert", str(tls.ca), "-cert", str(tls.cert), "-key", str(tls.key)]
    for name in UP_SERVICES:
        assert by_name[name] == f"127.0.0.1:{ports[name]}", printed
    assert by_name["trainer"] == f"file://{trainer_wasm}"
    ids = [value for name, value in entries if name == "proplet"]
    assert len(ids) == 2 and all(uuid.UUID(i).version == 4 for i in ids)

    manager = f"127.0.0.1:{ports['manager']}"
    grpcurl = Path(sys.executable).parent / "grpcurl"
    listed = await asyncio.to_thread(
        subprocess.run,
        [str(grpcurl), *flags, manager, "list"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert listed.returncode == 0, listed.stderr
    assert "propeller.v1.Manager" in listed.stdout.split()

    # One round, as a user would start it: v0, then an experiment with the printed ids/image.
    async with clients({"manager": manager, "registry": by_name["registry"]}, tls=tls) as c:
        await c.init_model(3)
        hyper = coordinator_pb2.Hyperparams(epochs=1, lr=0.1, batch_size=1)
        started = await c.start_experiment(
            "up-r1", ids, by_name["trainer"], timeout_s=30, hyperparams=hyper
        )
        assert sorted(s.proplet_id for s in started.scheduled) == sorted(ids)
        status = await c.wait_state("up-r1", timeout=60, via="manager")
        assert status.state == coordinator_pb2.ROUND_STATE_COMPLETED, status
        assert status.new_model_version == 1 and sorted(status.reported) == sorted(ids)
        assert await c.versions() == [0, 1]

    assert await running.terminate_async(STOP_TIMEOUT_S) == 0, running.tail()
    assert "Traceback" not in running.log_text()
