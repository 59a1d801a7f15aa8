"""Child processes of the tests: the one harness for anything the suite runs as a process.

`ChildProcess` starts a command with an environment of its own, keeps its output in log files
(a marker line per start, so a restarted process has one log), stops it with SIGTERM (bounded)
or SIGKILL, and puts the log's tail into every failure message. `ServiceProcess` is
`python -m server.cli serve SERVICE` on a free port of its own, ready when its gRPC health
service says SERVING; `UpProcess` is `propeller-fl up`, ready when it prints `ready`.
A service process gets its bundle from the suite's CA (`tests.support.security`) unless it is
started `insecure`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Literal, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.config import MQTT_BROKERS_ENV, MqttConfig, TlsConfig
from server.grpc_server import channel
from tests.support.ports import free_port
from tests.support.security import operator_tls, proplet_tls, service_tls, tls_env

# Bounds, not expectations: start-up (imports, opening the state, connecting MQTT), a stop.
READY_S = 60.0
STOP_S = 30.0
# One RPC to a service process: generous, so a slow machine does not flake.
RPC_S = 60.0

# The variable each `serve` service listens on, and the gRPC service its health check names.
LISTEN_VARS = {
    "manager": "PROPELLER_MANAGER_LISTEN",
    "coordinator": "PROPELLER_COORDINATOR_LISTEN",
    "aggregator": "PROPELLER_AGGREGATOR_LISTEN",
    "registry": "PROPELLER_REGISTRY_LISTEN",
    "datastore": "PROPELLER_DATASTORE_LISTEN",
}
GRPC_SERVICES = {
    "manager": "propeller.v1.Manager",
    "coordinator": "propeller.v1.Coordinator",
    "aggregator": "propeller.v1.Aggregator",
    "registry": "propeller.v1.ModelRegistry",
    "datastore": "propeller.v1.DataStore",
}
# The deployments' workloads of ours (compose.yaml's services, the Kubernetes workloads of the
# same names) -> the `propeller-fl serve` service each runs.
DEPLOYED_SERVICES = {
    "manager": "manager",
    "coordinator": "coordinator",
    "aggregator": "aggregator",
    "model-registry": "registry",
    "local-data-store": "datastore",
    "proplet": "proplet",
    "proplet-2": "proplet",
    "proplet-3": "proplet",
}
# Variables the services read that do not start with PROPELLER_ / PROPLET_.
_OTHER_VARS = frozenset(
    {
        "MANAGER_ADDR",
        "COORDINATOR_ADDR",
        "AGGREGATOR_ADDR",
        "MODEL_REGISTRY_ADDR",
        "DATA_STORE_ADDR",
        "PROPLET_IDS",
    }
)
# Reconnect quickly: the default backoff (1 s, growing) would dominate a readiness wait.
_FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 100),
]

Output = Literal["log", "file", "devnull", "pipe"]
P = TypeVar("P", bound="ChildProcess")


def mqtt_env(mqtt: MqttConfig) -> dict[str, str]:
    """The variables that put a service on `mqtt`'s broker (every node of a clustered one,
    in order), in its namespace."""
    if mqtt.failover:
        nodes = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in mqtt.brokers)
        broker = {MQTT_BROKERS_ENV: nodes}
    else:
        broker = {"PROPELLER_MQTT_HOST": mqtt.host, "PROPELLER_MQTT_PORT": str(mqtt.port)}
    return {
        **broker,
        "PROPELLER_DOMAIN_ID": mqtt.topics.domain,
        "PROPELLER_CHANNEL_ID": mqtt.topics.channel,
    }


def service_environment(reserved: frozenset[str] | set[str] = frozenset()) -> dict[str, str]:
    """This process's environment less anything a service reads (and less `reserved`), so a
    child sees only the configuration its test gives it, as in a container."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PROPELLER_", "PROPLET_", "OTEL_"))
        and k not in _OTHER_VARS
        and k not in reserved
    }
    env["PYTHONUNBUFFERED"] = "1"
    return env


class ChildProcess:
    """`argv` with `env` in `cwd`; stderr in `logs/NAME.log`. Stdout goes to the same log
    ("log"), to `logs/NAME.out` ("file"), nowhere ("devnull"), or to a pipe ("pipe"). Stdin
    reads nothing ("devnull": end of file at once) or is a pipe that stays open and silent
    while the process runs ("pipe": a read waits)."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        logs: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        stdout: Output = "devnull",
        stdin: Literal["devnull", "pipe"] = "devnull",
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(os.environ if env is None else env)
        self.logs = logs
        self.cwd = cwd or logs
        self.stdout = stdout
        self.stdin = stdin
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.stopped_after_s = 0.0
        logs.mkdir(parents=True, exist_ok=True)

    @property
    def log_path(self) -> Path:
        return self.logs / f"{self.name}.log"

    @property
    def out_path(self) -> Path:
        return self.logs / f"{self.name}.out"

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} was never started"
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        assert not self.running, f"{self.name} is already running"
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"--- {self.name} start {self.starts}: {' '.join(self.argv)}\n".encode())
            log.flush()
            # The child keeps its own copies of the descriptors; ours close at once.
            with contextlib.ExitStack() as files:
                stdout: int | IO[bytes] = subprocess.PIPE
                if self.stdout == "log":
                    stdout = log
                elif self.stdout == "file":
                    stdout = files.enter_context(open(self.out_path, "ab"))
                elif self.stdout == "devnull":
                    stdout = subprocess.DEVNULL
                self.proc = subprocess.Popen(
                    self.argv,
                    env=self.env,
                    cwd=self.cwd,
                    stdin=subprocess.PIPE if self.stdin == "pipe" else subprocess.DEVNULL,
                    stdout=stdout,
                    stderr=log,
                )

    def send(self, sig: signal.Signals) -> None:
        assert self.proc is not None and self.proc.poll() is None, f"{self.name} is not running"
        self.proc.send_signal(sig)

    def wait(self, bound: float = STOP_S) -> int:
        """The exit status, once the process has exited (fails after `bound` seconds)."""
        assert self.proc is not None
        try:
            code = self.proc.wait(bound)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} still running {bound}s later\n{self.tail()}"
            ) from None
        self._close_stdin()
        return code

    def _close_stdin(self) -> None:
        """Our end of a stdin pipe, once the process is gone."""
        if self.proc is not None and self.proc.stdin is not None:
            self.proc.stdin.close()

    async def wait_exit(self, bound: float = STOP_S) -> int:
        return await asyncio.to_thread(self.wait, bound)

    def kill(self) -> None:
        """SIGKILL: no handler runs in the process, nothing is flushed or closed."""
        self.send(signal.SIGKILL)
        assert self.wait() == -signal.SIGKILL, self.tail()

    def terminate(self, bound: float = STOP_S) -> int:
        """SIGTERM, as `docker compose stop` sends; the exit status (fails if the process is
        still running after `bound` seconds). `stopped_after_s` says how long it took."""
        began = time.monotonic()
        self.send(signal.SIGTERM)
        code = self.wait(bound)
        self.stopped_after_s = time.monotonic() - began
        return code

    async def terminate_async(self, bound: float = STOP_S) -> int:
        return await asyncio.to_thread(self.terminate, bound)

    def stop(self, grace: float = 5.0) -> None:
        """Clean-up: SIGTERM, then SIGKILL after `grace` seconds, whatever state it is in."""
        if self.running:
            assert self.proc is not None
            self.proc.terminate()
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._close_stdin()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 40) -> str:
        text = "\n".join(self.log_text().splitlines()[-lines:])
        return f"--- {self.name} log ({self.log_path}):\n{text}"

    async def wait_log(self, text: str, bound: float = 30.0) -> None:
        """Until the log has `text` (fails if the process exits first, or after `bound`)."""
        end = time.monotonic() + bound
        while text not in self.log_text():
            exited = f"{self.name} exited without logging {text!r}\n{self.tail()}"
            assert self.running or text in self.log_text(), exited
            assert time.monotonic() < end, f"{self.name} never logged {text!r}\n{self.tail()}"
            await asyncio.sleep(0.05)


class ServiceProcess(ChildProcess):
    """`python -m server.cli serve SERVICE` with `env` (on top of `service_environment()` and
    the service's bundle: a proplet's for its PROPLET_ID; `insecure`: PROPELLER_INSECURE=1),
    listening on a free loopback port of its own that restarts keep (a proplet listens on
    nothing: give it PROPLET_ID and the rest in `env`). `tls` is what a client of it uses."""

    def __init__(
        self, service: str, env: Mapping[str, str], logs: Path, *, insecure: bool = False
    ) -> None:
        self.service = service
        self.port = free_port()
        self.addr = f"127.0.0.1:{self.port}"
        self.tls: TlsConfig | None = None if insecure else operator_tls()
        own: TlsConfig | None = None
        if not insecure:
            own = proplet_tls(env["PROPLET_ID"]) if service == "proplet" else service_tls(service)
        listen = {LISTEN_VARS[service]: self.addr} if service in LISTEN_VARS else {}
        super().__init__(
            service,
            [sys.executable, "-m", "server.cli", "serve", service],
            logs,
            env={**service_environment(), **tls_env(own), **env, **listen},
        )

    async def ready(self, bound: float = READY_S) -> float:
        """Until the gRPC health service says SERVING for this service; the seconds it took.
        Fails at once if the process exits."""
        assert self.service in GRPC_SERVICES, (
            f"{self.service} serves no gRPC: wait until the manager lists it alive instead"
        )
        began = time.monotonic()
        request = health_pb2.HealthCheckRequest(service=GRPC_SERVICES[self.service])
        async with channel(self.addr, self.tls, _FAST_RECONNECT) as chan:
            stub = health_pb2_grpc.HealthStub(chan)
            while True:
                assert self.running, f"{self.service} exited before it was ready\n{self.tail()}"
                with contextlib.suppress(grpc.aio.AioRpcError):
                    resp = await stub.Check(request, timeout=1.0)
                    if resp.status == health_pb2.HealthCheckResponse.SERVING:
                        return time.monotonic() - began
                assert time.monotonic() - began < bound, (
                    f"{self.service} not serving after {bound}s\n{self.tail()}"
                )
                await asyncio.sleep(0.05)

    async def restart(self) -> float:
        """Start (again, on the same port) and wait until it serves."""
        self.start()
        return await self.ready()


@contextlib.contextmanager
def service_process(
    service: str, env: Mapping[str, str], logs: Path, *, insecure: bool = False
) -> Iterator[ServiceProcess]:
    """A ServiceProcess (not started) that is killed on exit if it is still running."""
    process = ServiceProcess(service, env, logs, insecure=insecure)
    try:
        yield process
    finally:
        process.stop(grace=0)


class UpProcess(ChildProcess):
    """`python -m server.cli.main up ARGS` in `cwd`; its printed lines are read on a thread,
    so every wait for them is bounded."""

    def __init__(
        self,
        args: Sequence[str],
        cwd: Path,
        *,
        options: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        # `options`: the command's own (-v) before `up`; `env`: added to this environment.
        super().__init__(
            "up",
            [sys.executable, "-m", "server.cli.main", *options, "up", *args],
            cwd,
            env={**os.environ, **(env or {})},
            stdout="pipe",
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.printed: list[str] = []

    def start(self) -> None:
        super().start()
        self.lines = queue.Queue()
        threading.Thread(target=self._read, args=(self.proc, self.lines), daemon=True).start()

    @staticmethod
    def _read(proc: subprocess.Popen[bytes] | None, lines: queue.Queue[str | None]) -> None:
        assert proc is not None and proc.stdout is not None
        with proc.stdout:
            for raw in proc.stdout:
                lines.put(raw.decode().rstrip("\n"))
        lines.put(None)

    def wait_ready(self, bound: float = 120.0) -> list[str]:
        """Until it prints `ready`; the lines printed before it."""
        deadline = time.monotonic() + bound
        self.printed = []
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no 'ready' within {bound}s; printed: {self.printed}"
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            assert line is not None, (
                f"exited {self.proc.wait() if self.proc else None} before 'ready': "
                f"{self.printed}\n{self.tail()}"
            )
            if line == "ready":
                return self.printed
            self.printed.append(line)

    @property
    def operator_tls(self) -> TlsConfig | None:
        """The operator bundle `up` printed (None: it runs --insecure); after `wait_ready`."""
        for line in self.printed:
            name, _, value = line.partition(" ")
            if name == "operator":
                return TlsConfig.bundle(Path(value.strip()))
        return None


# What `up` serves, each on the port its `--NAME-port` flag names.
UP_SERVICES = ("manager", "coordinator", "aggregator", "registry", "datastore", "mqtt")


def up_ports() -> dict[str, int]:
    """A free port for each of UP_SERVICES."""
    return {name: free_port() for name in UP_SERVICES}


@contextlib.contextmanager
def up_process(
    args: Sequence[str],
    cwd: Path,
    ports: Mapping[str, int] | None = None,
    *,
    options: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> Iterator[UpProcess]:
    """`up ARGS` with a `--NAME-port` flag for each of `ports` (`options` and `env` as
    `UpProcess` takes them), started, and killed on exit if it is still running."""
    flags = [f for name, port in (ports or {}).items() for f in (f"--{name}-port", str(port))]
    with started(UpProcess([*args, *flags], cwd, options=options, env=env)) as process:
        yield process


@contextlib.contextmanager
def started(process: P, *, grace: float = 0.0) -> Iterator[P]:
    """`process`, started, and stopped on the way out whatever state it is in (SIGTERM, then
    SIGKILL after `grace` seconds)."""
    process.start()
    try:
        yield process
    finally:
        process.stop(grace)
