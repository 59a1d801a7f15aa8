"""`propeller-fl up --state-dir DIR`: stopped with SIGTERM and started again with the same
directory, it still has the models and the tasks of the first run (every service's SQLite
file is in DIR)."""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc

from propeller.v1 import (
    manager_pb2,
    manager_pb2_grpc,
    model_registry_pb2,
    model_registry_pb2_grpc,
)
from tests.support.ports import free_port

SERVICES = ("manager", "coordinator", "aggregator", "registry", "datastore", "mqtt")
READY_S = 120.0
STOP_S = 20.0


class Up:
    """`propeller-fl up` as a subprocess; its stdout read on a thread so waits stay bounded."""

    def __init__(self, cwd: Path, state_dir: Path, wasm: Path, ports: dict[str, int]) -> None:
        flags = [arg for name, port in ports.items() for arg in (f"--{name}-port", str(port))]
        self.stderr = cwd / "up.stderr"
        with self.stderr.open("a") as err:
            self.proc = subprocess.Popen(
                [
                    *(sys.executable, "-m", "server.cli.main", "up", "--proplets", "1"),
                    *("--state-dir", str(state_dir), "--wasm", str(wasm), *flags),
                ],
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_S
        seen: list[str] = []
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no 'ready' within {READY_S}s; printed: {seen}"
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            assert line is not None, f"exited {self.proc.wait()}: {self.stderr.read_text()}"
            if line == "ready":
                return
            seen.append(line)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(STOP_S)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        return code

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def test_up_with_a_state_dir_carries_on_after_a_restart(tmp_path: Path, trainer_wasm: Path) -> None:
    state_dir = tmp_path / "state"
    ports = {name: free_port() for name in SERVICES}
    manager, registry = f"127.0.0.1:{ports['manager']}", f"127.0.0.1:{ports['registry']}"

    first = Up(tmp_path, state_dir, trainer_wasm, ports)
    try:
        first.wait_ready()
        with grpc.insecure_channel(manager) as mch, grpc.insecure_channel(registry) as rch:
            models = model_registry_pb2_grpc.ModelRegistryStub(rch)
            v0 = models.InitModel(model_registry_pb2.InitModelRequest(dimension=3), timeout=10)
            task = manager_pb2_grpc.ManagerStub(mch).CreateTask(
                manager_pb2.CreateTaskRequest(name="kept", image_url="reg/x:1"), timeout=10
            )
        assert first.stop() == 0, first.stderr.read_text()
    finally:
        first.cleanup()
    assert sorted(p.name for p in state_dir.glob("*.sqlite")) == [
        "coordinator.sqlite",
        "datastore.sqlite",
        "manager.sqlite",
        "registry.sqlite",
    ]

    second = Up(tmp_path, state_dir, trainer_wasm, ports)
    try:
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
        assert second.stop() == 0, second.stderr.read_text()
    finally:
        second.cleanup()
