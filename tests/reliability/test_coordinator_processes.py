"""The coordinator as a real process (`python -m server.cli serve coordinator`, configured from
its environment with a PROPELLER_STATE_DIR) killed with SIGKILL or stopped with SIGTERM at the
awkward moments, then started again over the same state directory.

The registry and the aggregator are in-process gRPC servers (a real aggregator process where it
must come up late on a fixed port); where a test needs to lose or hold a reply, a servicer in
front of the real one does it. Mosquitto is real. Every wait is a poll with a bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from propeller.v1 import (
    aggregator_pb2_grpc,
    coordinator_pb2,
    coordinator_pb2_grpc,
    model_registry_pb2,
    model_registry_pb2_grpc,
)
from server.aggregator.app import AggregatorApp, AggregatorConfig
from server.aggregator.service import AggregatorServicer
from server.config import MqttConfig
from server.coordinator.app import CoordinatorApp, CoordinatorConfig
from server.coordinator.rounds import Update
from server.grpc_server import ServiceBinding, channel, serving
from server.registry.app import RegistryApp, RegistryConfig
from server.streams import UpdateMeta, read_model_stream, update_stream
from server.tensors import Tensors
from server.topics import Topics
from tests.coordinator.helpers import fedavg
from tests.infra import Mosquitto, free_port

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
LOCAL = "127.0.0.1:0"
V0 = "fl/models/global_model_v0"
S = coordinator_pb2
FINISHED = (S.ROUND_STATE_COMPLETED, S.ROUND_STATE_FAILED)
COORDINATOR = "propeller.v1.Coordinator"
AGGREGATOR = "propeller.v1.Aggregator"
# Bounds, not expectations: how long a process may take to come up / to stop.
START_BOUND_S = 30.0
STOP_BOUND_S = 15.0
DIMENSION = 20_000  # 160 KB per update: the BLOBs are not trivially small


def make_updates() -> list[Update]:
    rng = np.random.default_rng(2024)
    return [
        Update(
            proplet_id=p,
            base_model_uri=V0,
            num_samples=n,
            metrics={"loss": loss},
            tensors={"w": rng.standard_normal(DIMENSION), "b": np.array(rng.standard_normal())},
        )
        for p, n, loss in (("a", 10, 0.9), ("b", 30, 0.3), ("c", 60, 0.1))
    ]


UPDATES = make_updates()


# ---- processes -------------------------------------------------------------------------


def clean_environment() -> dict[str, str]:
    """This process's environment without any service configuration."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PROPELLER_", "PROPLET_")) and not k.endswith("_ADDR")
    }


@dataclass
class ServeProcess:
    """`python -m server.cli serve SERVICE` with `env`, restartable; one log file per run."""

    service: str
    port: int
    env: dict[str, str]
    log_dir: Path
    grpc_service: str
    proc: subprocess.Popen[bytes] | None = None
    runs: int = 0
    logs: list[Path] = field(default_factory=list)

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.runs += 1
        path = self.log_dir / f"{self.service}-{self.runs}.log"
        self.logs.append(path)
        with open(path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "server.cli", "serve", self.service],
                env={**clean_environment(), **self.env},
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )

    def log_text(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(encoding='utf-8', errors='replace')}"
            for p in self.logs
            if p.exists()
        )

    async def ready(self) -> float:
        """Wait (bounded) until the gRPC health service says SERVING; returns the seconds."""
        assert self.proc is not None
        began = time.monotonic()
        # Reconnect quickly: the default backoff (1 s, growing) would dominate the wait.
        options = [
            ("grpc.initial_reconnect_backoff_ms", 50),
            ("grpc.max_reconnect_backoff_ms", 100),
        ]
        async with grpc.aio.insecure_channel(self.addr, options=options) as chan:
            stub = health_pb2_grpc.HealthStub(chan)
            while True:
                assert self.proc.poll() is None, f"{self.service} exited\n{self.log_text()}"
                with contextlib.suppress(grpc.aio.AioRpcError):
                    resp = await stub.Check(
                        health_pb2.HealthCheckRequest(service=self.grpc_service), timeout=1
                    )
                    if resp.status == health_pb2.HealthCheckResponse.SERVING:
                        return time.monotonic() - began
                assert time.monotonic() - began < START_BOUND_S, (
                    f"{self.service} not serving after {START_BOUND_S}s\n{self.log_text()}"
                )
                await asyncio.sleep(0.05)

    async def wait_exit(self, bound_s: float = STOP_BOUND_S) -> int:
        assert self.proc is not None
        end = time.monotonic() + bound_s
        while (rc := self.proc.poll()) is None:
            assert time.monotonic() < end, (
                f"{self.service} still running {bound_s}s later\n{self.log_text()}"
            )
            await asyncio.sleep(0.02)
        return rc

    async def kill(self) -> None:
        """SIGKILL: no clean-up of any kind runs in the process."""
        assert self.proc is not None and self.proc.poll() is None
        self.proc.send_signal(signal.SIGKILL)
        assert await self.wait_exit() == -signal.SIGKILL

    async def terminate(self) -> tuple[int, float]:
        """SIGTERM, as `docker compose stop` sends; returns (exit status, seconds to exit)."""
        assert self.proc is not None and self.proc.poll() is None
        began = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        rc = await self.wait_exit()
        return rc, time.monotonic() - began

    async def wait_log(self, text: str, bound_s: float = 30.0) -> None:
        end = time.monotonic() + bound_s
        while text not in self.log_text():
            assert time.monotonic() < end, f"never logged {text!r}\n{self.log_text()}"
            await asyncio.sleep(0.05)

    def stop_now(self) -> None:
        """Clean-up for `finally`: whatever state the test left the process in."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@contextlib.contextmanager
def reaped(*procs: ServeProcess) -> Iterator[None]:
    try:
        yield
    finally:
        for p in procs:
            p.stop_now()


def coordinator_process(
    tmp_path: Path,
    broker: Mosquitto,
    topics: Topics,
    *,
    aggregator_addr: str,
    registry_addr: str,
    **env: str,
) -> ServeProcess:
    port = free_port()
    settings = {
        "PROPELLER_COORDINATOR_LISTEN": f"127.0.0.1:{port}",
        "AGGREGATOR_ADDR": aggregator_addr,
        "MODEL_REGISTRY_ADDR": registry_addr,
        "PROPELLER_MQTT_HOST": "127.0.0.1",
        "PROPELLER_MQTT_PORT": str(broker.port),
        "PROPELLER_DOMAIN_ID": topics.domain,
        "PROPELLER_CHANNEL_ID": topics.channel,
        "PROPELLER_STATE_DIR": str(tmp_path / "state"),
        "PROPELLER_COORDINATOR_TICK_S": "0.05",
        "PROPELLER_COORDINATOR_RPC_TIMEOUT_S": "10",
        "PROPELLER_LOG_LEVEL": "INFO",
        **env,
    }
    return ServeProcess("coordinator", port, settings, tmp_path, COORDINATOR)


# ---- clients ---------------------------------------------------------------------------


@dataclass
class CoordinatorClient:
    """Calls to one run of the coordinator process (a fresh channel per run)."""

    stub: Any

    async def configure(self, round_id: str = "r1", **kw: Any) -> Any:
        req: dict[str, Any] = {
            "round_id": round_id,
            "participants": ["a", "b", "c"],
            "model_ref": V0,
            "start": True,
        }
        req.update(kw)
        return await self.stub.ConfigureRound(
            coordinator_pb2.ConfigureRoundRequest(**req), timeout=10
        )

    async def submit(self, round_id: str, update: Update) -> Any:
        meta = UpdateMeta(
            round_id,
            update.proplet_id,
            update.base_model_uri,
            update.num_samples,
            dict(update.metrics),
        )
        return await self.stub.SubmitUpdate(update_stream(meta, update.tensors), timeout=30)

    async def status(self, round_id: str = "r1") -> Any:
        return await self.stub.GetRoundStatus(
            coordinator_pb2.GetRoundStatusRequest(round_id=round_id), timeout=10
        )

    async def wait_state(self, round_id: str, *states: int, timeout: float = 30.0) -> Any:
        end = time.monotonic() + timeout
        while True:
            st = await self.status(round_id)
            if st.state in states:
                return st
            assert time.monotonic() < end, f"round {round_id} still {st} after {timeout}s"
            await asyncio.sleep(0.02)


@asynccontextmanager
async def coordinator_client(proc: ServeProcess) -> AsyncIterator[CoordinatorClient]:
    async with channel(proc.addr) as chan:
        yield CoordinatorClient(coordinator_pb2_grpc.CoordinatorStub(chan))


@asynccontextmanager
async def running(proc: ServeProcess) -> AsyncIterator[CoordinatorClient]:
    """Start the process, wait until it serves, and give a client of this run."""
    proc.start()
    seconds = await proc.ready()
    log.info("[test] %s run %d serving after %.2fs", proc.service, proc.runs, seconds)
    async with coordinator_client(proc) as client:
        yield client


@dataclass
class Registry:
    app: RegistryApp
    addr: str
    stub: Any

    async def models(self) -> list[Any]:
        resp = await self.stub.ListModels(model_registry_pb2.ListModelsRequest(), timeout=10)
        return list(resp.models)

    async def versions(self) -> list[int]:
        return [m.version for m in await self.models()]

    async def model(self, version: int) -> Tensors:
        call = self.stub.GetModel(model_registry_pb2.GetModelRequest(version=version), timeout=30)
        _header, tensors = await read_model_stream(call)
        return tensors


@asynccontextmanager
async def registry_server(front: Any = None) -> AsyncIterator[Registry]:
    """An in-process ModelRegistry with v0 (`DIMENSION` zeros); `front(real_servicer)` may put a
    servicer in front of the real one (what the coordinator talks to)."""
    app = RegistryApp(RegistryConfig(addr=LOCAL))
    bindings = app.bindings
    if front is not None:
        real = app.bindings[0]
        bindings = [ServiceBinding(real.name, front(real.servicer), real.add)]
    async with app, serving(LOCAL, bindings) as port, channel(f"127.0.0.1:{port}") as chan:
        reg = Registry(app, f"127.0.0.1:{port}", model_registry_pb2_grpc.ModelRegistryStub(chan))
        await reg.stub.InitModel(
            model_registry_pb2.InitModelRequest(dimension=DIMENSION), timeout=30
        )
        yield reg


@asynccontextmanager
async def aggregator_server(servicer: Any = None) -> AsyncIterator[str]:
    """An in-process Aggregator (or `servicer` in its place); yields its address."""
    app = AggregatorApp(AggregatorConfig(addr=LOCAL))
    bindings = app.bindings
    if servicer is not None:
        bindings = [
            ServiceBinding(
                AGGREGATOR, servicer, aggregator_pb2_grpc.add_AggregatorServicer_to_server
            )
        ]
    async with app, serving(LOCAL, bindings) as port:
        yield f"127.0.0.1:{port}"


async def never_killed_sha256(
    broker: Mosquitto, aggregator_addr: str, round_updates: list[Update]
) -> str:
    """The model a coordinator that is never interrupted makes from the same updates in the
    same order (its own registry, the same aggregator): its sha256."""
    topics = Topics(domain=f"ref{uuid.uuid4().hex[:8]}", channel="fl")
    async with registry_server() as reg:
        app = CoordinatorApp(
            CoordinatorConfig(
                addr=LOCAL,
                aggregator_addr=aggregator_addr,
                registry_addr=reg.addr,
                mqtt=MqttConfig(host="127.0.0.1", port=broker.port, topics=topics),
                tick_s=0.05,
            )
        )
        async with app, serving(LOCAL, app.bindings) as port, channel(f"127.0.0.1:{port}") as ch:
            client = CoordinatorClient(coordinator_pb2_grpc.CoordinatorStub(ch))
            await client.configure("r1", k_of_n=len(round_updates), timeout_s=120)
            for u in round_updates:
                await client.submit("r1", u)
            st = await client.wait_state("r1", *FINISHED)
            assert st.state == S.ROUND_STATE_COMPLETED, st.failure_reason
        [model] = [m for m in await reg.models() if m.version == st.new_model_version]
        sha: str = model.sha256
        return sha


def assert_fedavg(actual: Tensors, round_updates: list[Update]) -> None:
    expected = fedavg(round_updates)
    assert list(actual) == list(expected)
    for name in expected:
        assert actual[name].dtype == expected[name].dtype
        np.testing.assert_allclose(actual[name], expected[name], rtol=1e-12, atol=1e-15)


# ---- kill -9 ---------------------------------------------------------------------------


async def test_kill_after_two_acknowledged_updates_loses_nothing(
    broker: Mosquitto, topics: Topics, tmp_path: Path
) -> None:
    async with aggregator_server() as aggregator, registry_server() as reg:
        coord = coordinator_process(
            tmp_path, broker, topics, aggregator_addr=aggregator, registry_addr=reg.addr
        )
        with reaped(coord):
            async with running(coord) as c:
                before = await c.configure("r1", k_of_n=3, timeout_s=120)
                for i, u in enumerate(UPDATES[:2]):
                    resp = await c.submit("r1", u)
                    assert (resp.accepted, resp.duplicate, resp.num_updates) == (True, False, i + 1)
                # Both acknowledged; nothing in the process gets to run after this.
                await coord.kill()

            restarted = time.monotonic()
            async with running(coord) as c:
                st = await c.status("r1")
                assert (st.state, st.num_updates, list(st.reported)) == (
                    S.ROUND_STATE_OPEN,
                    2,
                    ["a", "b"],
                )
                assert (st.started_at, st.deadline) == (before.started_at, before.deadline)
                resp = await c.submit("r1", UPDATES[2])
                assert (resp.accepted, resp.duplicate, resp.num_updates) == (True, False, 3)
                st = await c.wait_state("r1", *FINISHED)
                log.info(
                    "[test] kill after 2 of 3: completed %.2fs after the restart",
                    time.monotonic() - restarted,
                )
        assert st.state == S.ROUND_STATE_COMPLETED, st.failure_reason
        assert (st.new_model_version, st.closed_by, list(st.reported)) == (
            1,
            "k_of_n",
            ["a", "b", "c"],
        )
        assert st.metrics["loss"] == pytest.approx((0.9 * 10 + 0.3 * 30 + 0.1 * 60) / 100)
        models = await reg.models()
        assert [m.version for m in models] == [0, 1]
        # Exactly the bytes an uninterrupted coordinator makes from the same three updates.
        assert models[1].sha256 == await never_killed_sha256(broker, aggregator, UPDATES)
        assert_fedavg(await reg.model(1), UPDATES)


async def test_duplicate_after_a_restart_is_accepted_but_not_counted(
    broker: Mosquitto, topics: Topics, tmp_path: Path
) -> None:
    async with aggregator_server() as aggregator, registry_server() as reg:
        coord = coordinator_process(
            tmp_path, broker, topics, aggregator_addr=aggregator, registry_addr=reg.addr
        )
        with reaped(coord):
            async with running(coord) as c:
                await c.configure("r1", k_of_n=3, timeout_s=120)
                await c.submit("r1", UPDATES[0])
                await coord.kill()
            async with running(coord) as c:
                # "a" did not see its answer (say) and sends again, with different numbers.
                again = replace(UPDATES[0], num_samples=999, tensors=UPDATES[1].tensors)
                resp = await c.submit("r1", again)
                assert (resp.accepted, resp.duplicate, resp.num_updates) == (True, True, 1)
                assert (await c.status("r1")).num_updates == 1
                await c.submit("r1", UPDATES[1])
                await c.submit("r1", UPDATES[2])
                st = await c.wait_state("r1", *FINISHED)
        assert st.state == S.ROUND_STATE_COMPLETED, st.failure_reason
        assert (st.num_updates, list(st.reported)) == (3, ["a", "b", "c"])
        assert await reg.versions() == [0, 1]
        assert_fedavg(await reg.model(1), UPDATES)  # with the first "a", counted once


async def test_the_deadline_survives_a_restart(
    broker: Mosquitto, topics: Topics, tmp_path: Path
) -> None:
    timeout_s = 6.0
    async with aggregator_server() as aggregator, registry_server() as reg:
        coord = coordinator_process(
            tmp_path, broker, topics, aggregator_addr=aggregator, registry_addr=reg.addr
        )
        with reaped(coord):
            async with running(coord) as c:
                before = await c.configure("r1", k_of_n=3, timeout_s=timeout_s)
                await c.submit("r1", UPDATES[1])
                await coord.kill()
            # Stay down for half the timeout, so "restart + timeout" is well past the deadline.
            await asyncio.sleep(max(0.0, before.started_at + timeout_s / 2 - time.time()))
            restart_at = time.time()
            assert restart_at < before.deadline
            async with running(coord) as c:
                st = await c.status("r1")
                assert (st.state, st.deadline) == (S.ROUND_STATE_OPEN, before.deadline)
                st = await c.wait_state("r1", *FINISHED)
        log.info(
            "[test] deadline: restart %.2fs before it, completed %.2fs after it",
            before.deadline - restart_at,
            st.completed_at - before.deadline,
        )
        assert st.state == S.ROUND_STATE_COMPLETED, st.failure_reason
        assert (st.closed_by, st.num_updates, st.deadline) == ("deadline", 1, before.deadline)
        # Closed at the original deadline, not a fresh timeout after the restart.
        assert before.deadline <= st.completed_at < restart_at + timeout_s
        assert await reg.versions() == [0, 1]
        assert_fedavg(await reg.model(1), [UPDATES[1]])


async def test_rounds_whose_deadline_passed_while_down_close_on_restart(
    broker: Mosquitto, topics: Topics, tmp_path: Path
) -> None:
    async with aggregator_server() as aggregator, registry_server() as reg:
        coord = coordinator_process(
            tmp_path, broker, topics, aggregator_addr=aggregator, registry_addr=reg.addr
        )
        with reaped(coord):
            async with running(coord) as c:
                one = await c.configure("r-one", k_of_n=3, timeout_s=1.5)
                none = await c.configure("r-none", k_of_n=2, timeout_s=1.5)
                await c.submit("r-one", UPDATES[2])
                await coord.kill()
            latest = max(one.deadline, none.deadline)
            # Stay down until both deadlines have passed.
            await asyncio.sleep(max(0.0, latest - time.time()) + 0.2)
            restart_at = time.time()
            async with running(coord) as c:
                st_one = await c.wait_state("r-one", *FINISHED)
                st_none = await c.wait_state("r-none", *FINISHED)
        assert st_one.state == S.ROUND_STATE_COMPLETED, st_one.failure_reason
        assert (st_one.closed_by, st_one.num_updates) == ("deadline", 1)
        assert st_one.completed_at >= restart_at
        assert st_none.state == S.ROUND_STATE_FAILED
        assert (st_none.closed_by, st_none.failure_reason) == (
            "deadline",
            "deadline passed with 0 of 2 updates",
        )
        assert await reg.versions() == [0, 1]
        assert_fedavg(await reg.model(1), [UPDATES[2]])


# ---- downstream failures ----------------------------------------------------------------


async def test_aggregator_down_at_close_is_retried_until_it_is_back(
    broker: Mosquitto, topics: Topics, tmp_path: Path
) -> None:
    aggregator_port = free_port()
    aggregator = ServeProcess(
        "aggregator",
        aggregator_port,
        {"PROPELLER_AGGREGATOR_LISTEN": f"127.0.0.1:{aggregator_port}"},
        tmp_path,
        AGGREGATOR,
    )
    async with registry_server() as reg:
        coord = coordinator_process(
            tmp_path,
            broker,
            topics,
            aggregator_addr=aggregator.addr,
            registry_addr=reg.addr,
            PROPELLER_COORDINATOR_RETRY_ATTEMPTS="30",
            PROPELLER_COORDINATOR_RETRY_BACKOFF_S="0.1",
            PROPELLER_COORDINATOR_RETRY_MAX_BACKOFF_S="1",
        )
        with reaped(coord, aggregator):
            async with running(coord) as c:
                await c.configure("r1", k_of_n=1, timeout_s=120)
                closed = time.monotonic()
                await c.submit("r1", UPDATES[0])
                # The round closed with nothing listening on the aggregator's port.
                await coord.wait_log("aggregate attempt 2/30 failed")
                assert (await c.status("r1")).state == S.ROUND_STATE_AGGREGATING
                aggregator.start()
                await aggregator.ready()
                back = time.monotonic()
                st = await c.wait_state("r1", *FINISHED)
                log.info(
                    "[test] aggregator down %.2fs; round completed %.2fs after it was back",
                    back - closed,
                    time.monotonic() - back,
                )
        assert st.state == S.ROUND_STATE_COMPLETED, st.failure_reason
        assert await reg.versions() == [0, 1]  # exactly one new version
        assert_fedavg(await reg.model(1), [UPDATES[0]])


class RegistryFront:
    """The real ModelRegistry servicer, except that PutModel replies can be lost (the model is
    stored, the caller gets UNAVAILABLE) or held (stored, no answer until the caller leaves)."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.lose_replies = 0
        self.hold_replies = False
        self.puts = 0
        self.landed = asyncio.Event()

    async def InitModel(self, request: Any, context: Any) -> Any:
        return await self.real.InitModel(request, context)

    async def GetModelInfo(self, request: Any, context: Any) -> Any:
        return await self.real.GetModelInfo(request, context)

    async def ListModels(self, request: Any, context: Any) -> Any:
        return await self.real.ListModels(request, context)

    async def GetModel(self, request: Any, context: Any) -> AsyncIterator[Any]:
        async for chunk in self.real.GetModel(request, context):
            yield chunk

    async def PutModel(self, request_iterator: Any, context: Any) -> Any:
        reply = await self.real.PutModel(request_iterator, context)
        self.puts += 1
        self.landed.set()
        if self.hold_replies:
            await asyncio.Event().wait()  # cancelled when the caller goes away
        if self.lose_replies > 0:
            self.lose_replies -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset (test)")
        return reply


async def test_a_lost_registry_reply_does_not_store_the_model_twice(
    broker: Mosquitto, topics: Topics, tmp_path: Path
) -> None:
    fronts: list[RegistryFront] = []

    def front(real: Any) -> RegistryFront:
        fronts.append(RegistryFront(real))
        fronts[-1].lose_replies = 1
        return fronts[-1]

    async with aggregator_server() as aggregator, registry_server(front) as reg:
        coord = coordinator_process(
            tmp_path, broker, topics, aggregator_addr=aggregator, registry_addr=reg.addr
        )
        with reaped(coord):
            async with running(coord) as c:
                await c.configure("r1", k_of_n=2, timeout_s=120)
                await c.submit("r1", UPDATES[0])
                await c.submit("r1", UPDATES[2])
                st = await c.wait_state("r1", *FINISHED)
        assert st.state == S.ROUND_STATE_COMPLETED, st.failure_reason
        assert st.new_model_version == 1
        assert fronts[0].puts == 1  # the retry found the stored model by its sha256
        assert await reg.versions() == [0, 1]
        assert "store model attempt 1/5 failed" in coord.log_text()
        assert_fedavg(await reg.model(1), [UPDATES[0], UPDATES[2]])


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill", "term"])
async def test_stopped_while_the_registry_write_is_unanswered(
    broker: Mosquitto, topics: Topics, tmp_path: Path, sig: signal.Signals
) -> None:
    """The model is stored but the coordinator stops before it hears so: after the restart it
    aggregates again, finds those bytes in the registry and records that version."""
    fronts: list[RegistryFront] = []

    def front(real: Any) -> RegistryFront:
        fronts.append(RegistryFront(real))
        fronts[-1].hold_replies = True
        return fronts[-1]

    async with aggregator_server() as aggregator, registry_server(front) as reg:
        coord = coordinator_process(
            tmp_path, broker, topics, aggregator_addr=aggregator, registry_addr=reg.addr
        )
        with reaped(coord):
            async with running(coord) as c:
                await c.configure("r1", k_of_n=2, timeout_s=120)
                await c.submit("r1", UPDATES[1])
                await c.submit("r1", UPDATES[2])
                await asyncio.wait_for(fronts[0].landed.wait(), 30)
                assert (await c.status("r1")).state == S.ROUND_STATE_AGGREGATING
                if sig is signal.SIGKILL:
                    await coord.kill()
                else:
                    rc, seconds = await coord.terminate()
                    log.info(
                        "[test] SIGTERM with a registry write in flight: exit in %.2fs", seconds
                    )
                    assert rc == 0, coord.log_text()
            assert await reg.versions() == [0, 1]
            fronts[0].hold_replies = False
            async with running(coord) as c:
                st = await c.wait_state("r1", *FINISHED)
        assert st.state == S.ROUND_STATE_COMPLETED, st.failure_reason
        assert st.new_model_version == 1
        assert fronts[0].puts == 1
        assert await reg.versions() == [0, 1]
        assert_fedavg(await reg.model(1), UPDATES[1:])


# ---- SIGTERM -----------------------------------------------------------------------------


async def test_sigterm_with_an_open_round_exits_cleanly_and_the_round_continues(
    broker: Mosquitto, topics: Topics, tmp_path: Path
) -> None:
    async with aggregator_server() as aggregator, registry_server() as reg:
        coord = coordinator_process(
            tmp_path, broker, topics, aggregator_addr=aggregator, registry_addr=reg.addr
        )
        with reaped(coord):
            async with running(coord) as c:
                before = await c.configure("r1", k_of_n=3, timeout_s=120)
                await c.submit("r1", UPDATES[0])
                rc, seconds = await coord.terminate()
            log.info("[test] SIGTERM with an open round: exit in %.2fs", seconds)
            assert rc == 0, coord.log_text()
            assert "[serve] coordinator stopped after" in coord.log_text()
            async with running(coord) as c:
                st = await c.status("r1")
                assert (st.state, st.num_updates, st.deadline) == (
                    S.ROUND_STATE_OPEN,
                    1,
                    before.deadline,
                )
                assert (await c.submit("r1", UPDATES[0])).duplicate
                await c.submit("r1", UPDATES[1])
                await c.submit("r1", UPDATES[2])
                st = await c.wait_state("r1", *FINISHED)
        assert st.state == S.ROUND_STATE_COMPLETED, st.failure_reason
        assert await reg.versions() == [0, 1]
        assert_fedavg(await reg.model(1), UPDATES)


class GatedAggregator:
    """The real Aggregator servicer behind a gate: calls wait until it opens."""

    def __init__(self) -> None:
        self.real = AggregatorServicer()
        self.open = asyncio.Event()
        self.entered = asyncio.Event()
        self.calls = 0

    async def Aggregate(self, request_iterator: Any, context: Any) -> AsyncIterator[Any]:
        self.calls += 1
        # Read the first message before waiting: the call is under way (and gRPC's request
        # reader is started, so a call cancelled at the gate leaves nothing un-awaited).
        requests = aiter(request_iterator)
        first = await anext(requests)
        self.entered.set()
        await self.open.wait()

        async def replay() -> AsyncIterator[Any]:
            yield first
            async for chunk in requests:
                yield chunk

        async for chunk in self.real.Aggregate(replay(), context):
            yield chunk


async def test_sigterm_during_aggregation_exits_cleanly_and_the_round_completes_once(
    broker: Mosquitto, topics: Topics, tmp_path: Path
) -> None:
    gate = GatedAggregator()
    async with aggregator_server(gate) as aggregator, registry_server() as reg:
        coord = coordinator_process(
            tmp_path, broker, topics, aggregator_addr=aggregator, registry_addr=reg.addr
        )
        with reaped(coord):
            async with running(coord) as c:
                await c.configure("r1", k_of_n=2, timeout_s=120)
                await c.submit("r1", UPDATES[0])
                await c.submit("r1", UPDATES[1])
                await asyncio.wait_for(gate.entered.wait(), 30)  # aggregation in flight
                rc, seconds = await coord.terminate()
            log.info("[test] SIGTERM during aggregation: exit in %.2fs", seconds)
            assert rc == 0, coord.log_text()
            assert await reg.versions() == [0]
            gate.open.set()
            async with running(coord) as c:
                st = await c.wait_state("r1", *FINISHED)
        assert st.state == S.ROUND_STATE_COMPLETED, st.failure_reason
        assert (st.new_model_version, st.closed_by) == (1, "k_of_n")
        assert gate.calls == 2  # the interrupted call, then the one after the restart
        assert await reg.versions() == [0, 1]
        assert_fedavg(await reg.model(1), UPDATES[:2])
