"""Test doubles at the manager's boundaries: a proplet speaking the real MQTT protocol through
the real broker, a coordinator serving the real gRPC contract, and a running manager."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import grpc

from propeller.v1 import coordinator_pb2, coordinator_pb2_grpc, manager_pb2, manager_pb2_grpc
from server.config import Endpoints, MqttConfig, TlsConfig
from server.grpc_server import ServiceBinding, channel, serving
from server.manager import ManagerApp, ManagerConfig
from server.messages import PropletAnnounce, ResultAck, TaskResult, TaskStart, TaskStop
from server.models import parse_model_uri
from server.mqtt import MqttSession
from server.topics import Topics
from tests.support.security import operator_tls, proplet_tls, service_tls
from tests.support.waits import eventually


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


WASM = "local-registry:5000/fl-client-wasm:latest"


def experiment(round_id: str, participants: list[str], **kw: Any) -> Any:
    """A StartExperimentRequest for `participants` training v0 with `WASM`."""
    return manager_pb2.StartExperimentRequest(
        round_id=round_id,
        model_ref=kw.pop("model_ref", "fl/models/global_model_v0"),
        participants=participants,
        task_wasm_image=WASM,
        **kw,
    )


async def until_alive(stub: Any, proplet_id: str, alive: bool = True) -> None:
    """Poll the manager until it lists `proplet_id` with the given liveness."""

    async def check() -> bool:
        listed = await stub.ListProplets(manager_pb2.ListPropletsRequest())
        return any(p.id == proplet_id and p.alive is alive for p in listed.proplets)

    await eventually(check, what=f"proplet {proplet_id} alive={alive}", timeout=10)


def mqtt_config(port: int, topics: Topics) -> MqttConfig:
    return MqttConfig(host="127.0.0.1", port=port, topics=topics)


class FakeProplet:
    """A proplet as the manager sees it: announces itself, heartbeats, receives the task
    starts and stops addressed to it and publishes results, over TLS with a certificate of
    its own (`tls`: another one, e.g. to speak as another proplet)."""

    def __init__(
        self,
        broker_port: int,
        topics: Topics,
        proplet_id: str,
        *,
        name: str = "",
        heartbeat_s: float | None = 0.2,
        tls: TlsConfig | None = None,
    ) -> None:
        self.id = proplet_id
        self.name = name or f"name-{proplet_id}"
        self.topics = topics
        self.heartbeat_s = heartbeat_s
        self.starts: asyncio.Queue[TaskStart] = asyncio.Queue()
        self.stops: asyncio.Queue[TaskStop] = asyncio.Queue()
        # The attempt of the latest start received per task id: what `report` echoes.
        self.attempts: dict[str, int] = {}
        self.acks: asyncio.Queue[ResultAck] = asyncio.Queue()
        self.session = MqttSession(
            mqtt_config(broker_port, topics).as_identity(tls or proplet_tls(proplet_id)),
            f"fake-proplet-{topics.domain}-{proplet_id}",
            topics.proplet_subscriptions(proplet_id),
            self._on_message,
            clean_session=True,
        )
        self._heartbeat: asyncio.Task[None] | None = None

    async def _on_message(self, topic: str, payload: bytes) -> None:
        if self.topics.is_task_start(topic):
            start = TaskStart.from_json(payload)
            if start.proplet_id in ("", self.id):
                self.attempts[start.id] = start.attempt
                self.starts.put_nowait(start)
        elif self.topics.is_task_stop(topic):
            stop = TaskStop.from_json(payload)
            if stop.proplet_id in ("", self.id):
                self.stops.put_nowait(stop)
        elif topic == self.topics.result_ack_for(self.id):
            self.acks.put_nowait(ResultAck.from_json(payload))

    async def __aenter__(self) -> FakeProplet:
        await self.session.__aenter__()
        await self.session.publish(
            self.topics.proplet_create_for(self.id),
            PropletAnnounce(self.id, self.name, {"os": "test", "arch": "wasm32"}).to_json(),
        )
        if self.heartbeat_s is not None:
            self._heartbeat = asyncio.create_task(self._beat(self.heartbeat_s))
        return self

    async def _beat(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            beat = PropletAnnounce(self.id).to_json()
            await self.session.publish(self.topics.proplet_alive_for(self.id), beat)

    async def stop_heartbeat(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
            self._heartbeat = None

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop_heartbeat()
        await self.session.__aexit__(exc_type, exc, tb)

    async def report(
        self,
        task_id: str,
        state: str,
        results: str = "",
        error: str = "",
        *,
        attempt: int | None = None,
    ) -> None:
        """Publish a result, of the latest start received for `task_id` unless `attempt`."""
        if attempt is None:
            attempt = self.attempts.get(task_id, 0)
        await self.session.publish(
            self.topics.proplet_results_for(self.id),
            TaskResult(
                task_id, self.id, state, results=results, error=error, attempt=attempt
            ).to_json(),
        )

    async def next_start(self, timeout: float = 10.0) -> TaskStart:
        return await asyncio.wait_for(self.starts.get(), timeout)


@dataclass
class FakeCoordinator:
    """The Coordinator's round calls over real gRPC, recording what the manager asked for.
    Models up to `latest_version` exist; a round id can be configured once."""

    latest_version: int = 1
    configured: list[coordinator_pb2.ConfigureRoundRequest] = field(default_factory=list)
    started: list[str] = field(default_factory=list)
    rounds: dict[str, coordinator_pb2.RoundStatus] = field(default_factory=dict)
    failures: list[coordinator_pb2.ReportParticipantFailureRequest] = field(default_factory=list)

    async def ConfigureRound(
        self, request: coordinator_pb2.ConfigureRoundRequest, context: Any
    ) -> coordinator_pb2.RoundStatus:
        self.configured.append(request)
        if request.round_id in self.rounds:
            await context.abort(
                grpc.StatusCode.ALREADY_EXISTS, f"round_id: {request.round_id!r} exists"
            )
        if parse_model_uri(request.model_ref) > self.latest_version:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"model_ref: {request.model_ref!r} not stored"
            )
        status = coordinator_pb2.RoundStatus(
            round_id=request.round_id,
            experiment_id=request.experiment_id,
            state=coordinator_pb2.ROUND_STATE_PENDING,
            k_of_n=request.k_of_n or len(request.participants),
            participants=request.participants,
            model_ref=request.model_ref,
            timeout_s=request.timeout_s or 60.0,
            hyperparams=request.hyperparams,
            task_wasm_image=request.task_wasm_image,
            module_digest=request.module_digest,
        )
        self.rounds[request.round_id] = status
        return status

    async def StartRound(
        self, request: coordinator_pb2.StartRoundRequest, context: Any
    ) -> coordinator_pb2.RoundStatus:
        self.started.append(request.round_id)
        status = self.rounds.get(request.round_id)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"round_id: {request.round_id!r}")
            raise AssertionError("unreachable")
        now = time.time()
        status.state = coordinator_pb2.ROUND_STATE_OPEN
        status.started_at = now
        status.deadline = now + status.timeout_s
        return status

    async def GetRoundStatus(
        self, request: coordinator_pb2.GetRoundStatusRequest, context: Any
    ) -> coordinator_pb2.RoundStatus:
        status = self.rounds.get(request.round_id)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"round_id: {request.round_id!r}")
            raise AssertionError("unreachable")
        return status

    async def ReportParticipantFailure(
        self, request: coordinator_pb2.ReportParticipantFailureRequest, context: Any
    ) -> coordinator_pb2.RoundStatus:
        self.failures.append(request)
        return await self.GetRoundStatus(
            coordinator_pb2.GetRoundStatusRequest(round_id=request.round_id), context
        )

    async def SubmitUpdate(self, request: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "fake")

    async def ListRounds(self, request: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "fake")

    async def WatchRound(self, request: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "fake")


@contextlib.asynccontextmanager
async def fake_coordinator(
    fake: FakeCoordinator | None = None,
) -> AsyncIterator[tuple[FakeCoordinator, str]]:
    """`fake` (a new FakeCoordinator by default) served on a free loopback port; yields it and
    its address."""
    fake = FakeCoordinator() if fake is None else fake
    binding = ServiceBinding(
        "propeller.v1.Coordinator", fake, coordinator_pb2_grpc.add_CoordinatorServicer_to_server
    )
    async with serving("127.0.0.1:0", [binding], service_tls("coordinator")) as port:
        yield fake, f"127.0.0.1:{port}"


TASK_ENDPOINTS = Endpoints(
    manager="manager:7070",
    coordinator="coordinator:8086",
    aggregator="aggregator:8085",
    registry="model-registry:8084",
    datastore="local-data-store:8083",
)


@dataclass
class RunningManager:
    app: ManagerApp
    stub: Any  # ManagerStub (the generated service code is untyped)
    config: ManagerConfig


@contextlib.asynccontextmanager
async def running_manager(
    broker_port: int,
    topics: Topics,
    *,
    coordinator_addr: str = "127.0.0.1:9",
    alive_window_s: float = 30.0,
    **settings: Any,
) -> AsyncIterator[RunningManager]:
    """A ManagerApp served on a free port (`settings`: other ManagerConfig fields,
    e.g. `oci_registry`: where it resolves `WASM`, the `seed_image_registry` fixture)."""
    config = ManagerConfig(
        addr="127.0.0.1:0",
        coordinator_addr=coordinator_addr,
        tls=service_tls("manager"),
        mqtt=mqtt_config(broker_port, topics).as_identity(service_tls("manager")),
        alive_window_s=alive_window_s,
        task_endpoints=TASK_ENDPOINTS,
        rpc_timeout_s=5.0,
        **settings,
    )
    async with (
        ManagerApp(config) as app,
        serving(config.addr, app.bindings, config.tls) as port,
        channel(f"127.0.0.1:{port}", operator_tls()) as chan,
    ):
        yield RunningManager(app, manager_pb2_grpc.ManagerStub(chan), config)
