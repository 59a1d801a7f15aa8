"""`propeller-fl up` as a user runs it: a real subprocess on the ports it is told, the real
grpcurl against it, one federated round driven over gRPC with the printed proplet ids and
trainer image, then SIGTERM and a clean exit."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from propeller.v1 import (
    coordinator_pb2,
    manager_pb2,
    manager_pb2_grpc,
    model_registry_pb2,
    model_registry_pb2_grpc,
)
from tests.support.ports import free_port
from tests.support.processes import UpProcess, up_process

SERVICES = ("manager", "coordinator", "aggregator", "registry", "datastore", "mqtt")
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 20.0


@pytest.fixture
def up(tmp_path: Path, trainer_wasm: Path) -> Iterator[tuple[UpProcess, dict[str, int]]]:
    """`up` with two proplets on free ports (the trainer it runs is built first)."""
    ports = {name: free_port() for name in SERVICES}
    flags = [arg for name, port in ports.items() for arg in (f"--{name}-port", str(port))]
    with up_process(["--proplets", "2", *flags], tmp_path) as running:
        yield running, ports


def test_up_serves_a_round_and_stops_on_sigterm(
    up: tuple[UpProcess, dict[str, int]], trainer_wasm: Path
) -> None:
    running, ports = up
    printed = running.wait_ready(READY_TIMEOUT_S)
    entries = [line.split(None, 1) for line in printed]
    assert all(len(e) == 2 for e in entries), printed
    by_name = {name: value for name, value in entries if name != "proplet"}
    for name in SERVICES:
        assert by_name[name] == f"127.0.0.1:{ports[name]}", printed
    assert by_name["trainer"] == f"file://{trainer_wasm}"
    ids = [value for name, value in entries if name == "proplet"]
    assert len(ids) == 2 and all(uuid.UUID(i).version == 4 for i in ids)

    manager = f"127.0.0.1:{ports['manager']}"
    grpcurl = Path(sys.executable).parent / "grpcurl"
    listed = subprocess.run(
        [str(grpcurl), "-plaintext", manager, "list"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert listed.returncode == 0, listed.stderr
    assert "propeller.v1.Manager" in listed.stdout.split()

    # One round, as a user would start it: v0, then an experiment with the printed ids/image.
    with (
        grpc.insecure_channel(manager) as mch,
        grpc.insecure_channel(f"127.0.0.1:{ports['registry']}") as rch,
    ):
        registry = model_registry_pb2_grpc.ModelRegistryStub(rch)
        stub = manager_pb2_grpc.ManagerStub(mch)
        registry.InitModel(model_registry_pb2.InitModelRequest(dimension=3), timeout=10)
        started = stub.StartExperiment(
            manager_pb2.StartExperimentRequest(
                round_id="up-r1",
                model_ref="fl/models/global_model_v0",
                participants=ids,
                hyperparams=coordinator_pb2.Hyperparams(epochs=1, lr=0.1, batch_size=1),
                timeout_s=30,
                task_wasm_image=by_name["trainer"],
            ),
            timeout=10,
        )
        assert sorted(s.proplet_id for s in started.scheduled) == sorted(ids)
        final = (coordinator_pb2.ROUND_STATE_COMPLETED, coordinator_pb2.ROUND_STATE_FAILED)
        deadline = time.monotonic() + 60
        while True:
            status = stub.GetRoundStatus(
                coordinator_pb2.GetRoundStatusRequest(round_id="up-r1"), timeout=10
            )
            if status.state in final or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert status.state == coordinator_pb2.ROUND_STATE_COMPLETED, status
        assert status.new_model_version == 1 and sorted(status.reported) == sorted(ids)
        models = registry.ListModels(model_registry_pb2.ListModelsRequest(), timeout=10)
        assert [m.version for m in models.models] == [0, 1]

    assert running.terminate(STOP_TIMEOUT_S) == 0, running.tail()
    assert "Traceback" not in running.log_text()
