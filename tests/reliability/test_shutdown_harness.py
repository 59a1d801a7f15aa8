"""Services as real processes for the crash and shutdown tests: `python -m server.cli serve
SERVICE` with an environment of its own (PROPELLER_STATE_DIR, a free listen port, the test's
MQTT namespace), killed with SIGKILL or stopped with SIGTERM, restarted on the same port over
the same state directory. Every wait is bounded; `service_process` kills leftovers on exit.

(Helpers only; the tests are in test_{manager,registry,datastore}_*.py and
test_shutdown_graceful.py.)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.grpc_server import channel
from tests.infra import free_port

ROOT = Path(__file__).resolve().parents[2]
# Bounds: start-up (imports, opening the state, connecting MQTT), a stop, and one RPC.
READY_S = 60.0
STOP_S = 30.0
RPC_S = 60.0

LISTEN_VARS = {
    "manager": "PROPELLER_MANAGER_LISTEN",
    "coordinator": "PROPELLER_COORDINATOR_LISTEN",
    "registry": "PROPELLER_REGISTRY_LISTEN",
    "datastore": "PROPELLER_DATASTORE_LISTEN",
}
# Variables the services read that do not start with PROPELLER_ / PROPLET_.
_OTHER_VARS = (
    "MANAGER_ADDR",
    "COORDINATOR_ADDR",
    "AGGREGATOR_ADDR",
    "MODEL_REGISTRY_ADDR",
    "DATA_STORE_ADDR",
    "PROPLET_IDS",
)


def base_env() -> dict[str, str]:
    """This process's environment less anything a service reads."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PROPELLER_", "PROPLET_")) and k not in _OTHER_VARS
    }
    env["PYTHONUNBUFFERED"] = "1"
    return env


class ServiceProcess:
    """One `serve SERVICE` process, restartable on the same port and state directory."""

    def __init__(self, service: str, env: Mapping[str, str], logs: Path) -> None:
        self.service = service
        self.port = free_port()
        self.addr = f"127.0.0.1:{self.port}"
        self.env = {**base_env(), **env, LISTEN_VARS[service]: self.addr}
        self.logs = logs
        logs.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def log_path(self) -> Path:
        return self.logs / f"{self.service}.log"

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.service} is not running"
        return self.proc.pid

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"--- start {self.starts}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "server.cli", "serve", self.service],
                env=self.env,
                cwd=self.logs,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )

    async def ready(self, timeout: float = READY_S) -> None:
        """Until the gRPC health service says SERVING; fails if the process exits."""
        deadline = time.monotonic() + timeout
        async with channel(self.addr) as chan:
            stub = health_pb2_grpc.HealthStub(chan)
            while True:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise AssertionError(
                        f"{self.service} exited with {self.proc.returncode} before it was "
                        f"ready\n{self.tail()}"
                    )
                with contextlib.suppress(grpc.aio.AioRpcError):
                    resp = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                    if resp.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"{self.service} not serving after {timeout} s\n{self.tail()}"
                    )
                await asyncio.sleep(0.05)

    async def restart(self) -> None:
        self.start()
        await self.ready()

    def kill(self) -> None:
        """SIGKILL: no handler runs, nothing is flushed or closed."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(STOP_S)

    def terminate(self, timeout: float = STOP_S) -> int:
        """SIGTERM and the exit status (fails if it does not stop within `timeout`)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.service} still running {timeout} s after SIGTERM\n{self.tail()}"
            ) from None

    async def terminate_async(self, timeout: float = STOP_S) -> int:
        return await asyncio.to_thread(self.terminate, timeout)

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""
        return f"--- {self.service} log:\n" + "\n".join(text.splitlines()[-lines:])


@contextlib.contextmanager
def service_process(service: str, env: Mapping[str, str], logs: Path) -> Iterator[ServiceProcess]:
    """A ServiceProcess (not started) that is killed on exit if still running."""
    process = ServiceProcess(service, env, logs)
    try:
        yield process
    finally:
        process.cleanup()
