"""`propeller-fl up --state-dir DIR`: stopped with SIGTERM and started again with the same
directory, it still has the models and the tasks of the first run (every service's SQLite
file is in DIR)."""

from __future__ import annotations

from pathlib import Path

import grpc

from propeller.v1 import (
    manager_pb2,
    manager_pb2_grpc,
    model_registry_pb2,
    model_registry_pb2_grpc,
)
from tests.support.ports import free_port
from tests.support.processes import up_process

SERVICES = ("manager", "coordinator", "aggregator", "registry", "datastore", "mqtt")
STOP_S = 20.0


def test_up_with_a_state_dir_carries_on_after_a_restart(tmp_path: Path, trainer_wasm: Path) -> None:
    state_dir = tmp_path / "state"
    ports = {name: free_port() for name in SERVICES}
    manager, registry = f"127.0.0.1:{ports['manager']}", f"127.0.0.1:{ports['registry']}"

    flags = [arg for name, port in ports.items() for arg in (f"--{name}-port", str(port))]
    args = ["--proplets", "1", "--state-dir", str(state_dir), "--wasm", str(trainer_wasm), *flags]
    with up_process(args, tmp_path) as first:
        first.wait_ready()
        with grpc.insecure_channel(manager) as mch, grpc.insecure_channel(registry) as rch:
            models = model_registry_pb2_grpc.ModelRegistryStub(rch)
            v0 = models.InitModel(model_registry_pb2.InitModelRequest(dimension=3), timeout=10)
            task = manager_pb2_grpc.ManagerStub(mch).CreateTask(
                manager_pb2.CreateTaskRequest(name="kept", image_url="reg/x:1"), timeout=10
            )
        assert first.terminate(STOP_S) == 0, first.tail()
    assert sorted(p.name for p in state_dir.glob("*.sqlite")) == [
        "coordinator.sqlite",
        "datastore.sqlite",
        "manager.sqlite",
        "registry.sqlite",
    ]

    with up_process(args, tmp_path) as second:
        second.wait_ready()
        with grpc.insecure_channel(manager) as mch, grpc.insecure_channel(registry) as rch:
            models = model_registry_pb2_grpc.ModelRegistryStub(rch)
            listed = models.ListModels(model_registry_pb2.ListModelsRequest(), timeout=10)
            assert [(m.version, m.sha256) for m in listed.models] == [(0, v0.sha256)]
            again = manager_pb2_grpc.ManagerStub(mch).GetTask(
                manager_pb2.TaskRef(task_id=task.id), timeout=10
            )
            assert again == task
            # v0 is still there: initialising it again is refused.
            try:
                models.InitModel(model_registry_pb2.InitModelRequest(dimension=3), timeout=10)
                raise AssertionError("InitModel succeeded over a stored v0")
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.ALREADY_EXISTS
        assert second.terminate(STOP_S) == 0, second.tail()
