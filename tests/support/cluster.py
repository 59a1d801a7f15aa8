"""In-process services and real proplets on the test broker: the one cluster the integration
tests run against, with what differs between them as parameters.

- `cluster(mqtt, work_dir, proplets=N, ...)`: all five services (`server.stack.Stack`, the
  product's own one-process runner) plus N real proplets, clients of every service, v0 stored
  and every proplet listed alive by the manager before the test starts.
- `round_services(mqtt, ...)`: only what a round needs (registry with v0, aggregator,
  coordinator), for tests that set the coordinator's own settings.
- `serve_app(app)`: one service app entered and served on a free loopback port.
- `run_proplets(...)`: real proplets pointed at a set of services.
- `round_notes(mqtt)`: the round-complete notifications a subscriber sees.
- `coordinator_process(mqtt, work_dir, ...)`: the coordinator as a real process (not started)
  over a state directory, its registry (v0 stored) and aggregator in this process;
  `running(process)` starts a service process again and gives a client of that run.

Everything is mutual TLS from the suite's CA (`tests.support.security`) unless a test passes
`insecure=True`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from propeller.v1 import aggregator_pb2_grpc, manager_pb2
from proplet import Proplet, PropletConfig
from server.aggregator.app import AggregatorApp, AggregatorConfig
from server.config import Endpoints, MqttConfig, TlsConfig
from server.coordinator.app import CoordinatorApp, CoordinatorConfig
from server.grpc_server import ServiceBinding, serving
from server.mqtt import MqttSession
from server.registry.app import RegistryApp, RegistryConfig
from server.stack import Stack, StackConfig
from server.topics import Topics
from tests.support.clients import V0, Clients, clients
from tests.support.processes import ServiceProcess, mqtt_env, service_process
from tests.support.security import operator_tls, proplet_tls, service_tls, session_ca

# A hand-made round task's HYPERPARAMS: `tests.support.clients.HYPER` as the module reads it.
HYPER_JSON = json.dumps({"epochs": 1, "lr": 0.01, "batch_size": 16})

LOCAL = "127.0.0.1:0"

log = logging.getLogger(__name__)


class App(Protocol):
    """What every service app is: an async context manager with gRPC bindings."""

    @property
    def bindings(self) -> list[ServiceBinding]: ...

    async def __aenter__(self) -> Any: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Any: ...


@contextlib.asynccontextmanager
async def serve_app(
    app: App,
    addr: str = LOCAL,
    bindings: Sequence[ServiceBinding] | None = None,
    *,
    tls: TlsConfig | None,
) -> AsyncIterator[str]:
    """Enter `app` and serve its bindings (or `bindings` in their place) on `addr` (a free
    loopback port by default) with `tls` (None: plaintext); yields the address clients use."""
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(app)
        served = app.bindings if bindings is None else bindings
        port = await stack.enter_async_context(serving(addr, served, tls))
        yield f"{addr.rpartition(':')[0]}:{port}"


def tls_for(service: str, insecure: bool) -> TlsConfig | None:
    """A service's TLS from the suite's CA, or None for a plaintext test."""
    return None if insecure else service_tls(service)


@contextlib.asynccontextmanager
async def round_services(
    mqtt: MqttConfig,
    *,
    dimension: int | None = 3,
    aggregator_addr: str | None = None,
    insecure: bool = False,
    **coordinator: Any,
) -> AsyncIterator[Endpoints]:
    """A model registry holding v0 (`dimension` zeros; None: empty), an aggregator (unless
    `aggregator_addr` names one elsewhere) and a coordinator with the `coordinator` settings
    of CoordinatorConfig, in this process. Yields their addresses (no manager, no data
    store: so num_samples is not capped by dataset sizes unless a test names a data store
    and the cap)."""
    async with contextlib.AsyncExitStack() as stack:
        tls = tls_for("registry", insecure)
        registry = await stack.enter_async_context(
            serve_app(RegistryApp(RegistryConfig(LOCAL, tls=tls)), tls=tls)
        )
        if dimension is not None:
            async with clients({"registry": registry}, insecure=insecure) as c:
                await c.init_model(dimension)
        if aggregator_addr is None:
            tls = tls_for("aggregator", insecure)
            aggregator = await stack.enter_async_context(
                serve_app(AggregatorApp(AggregatorConfig(LOCAL, tls=tls)), tls=tls)
            )
        else:
            aggregator = aggregator_addr
        tls = tls_for("coordinator", insecure)
        config = CoordinatorConfig(
            addr=LOCAL,
            aggregator_addr=aggregator,
            registry_addr=registry,
            mqtt=mqtt.as_identity(tls),
            tls=tls,
            **{"num_samples_cap": "none", **coordinator},
        )
        coordinator_addr = await stack.enter_async_context(
            serve_app(CoordinatorApp(config), tls=tls)
        )
        yield Endpoints(
            manager="",
            coordinator=coordinator_addr,
            aggregator=aggregator,
            registry=registry,
            datastore="",
        )


@contextlib.asynccontextmanager
async def round_clients(mqtt: MqttConfig, **coordinator: Any) -> AsyncIterator[Clients]:
    """`round_services` (v0 of 3 zeros; the coordinator's RPC timeout 30 s and tick 0.05 s
    unless `coordinator` says else) and clients of them."""
    settings: dict[str, Any] = {"rpc_timeout_s": 30.0, "tick_s": 0.05, **coordinator}
    async with round_services(mqtt, **settings) as services, clients(services) as c:
        yield c


@contextlib.asynccontextmanager
async def run_proplets(
    services: Endpoints,
    mqtt: MqttConfig,
    ids: Sequence[str],
    work_dir: Path,
    insecure: bool = False,
    spread: Sequence[MqttConfig] = (),
    built: Mapping[str, Callable[[PropletConfig], Proplet]] | None = None,
    **config: Any,
) -> AsyncIterator[dict[str, contextlib.AsyncExitStack]]:
    """Real proplets `ids` on the broker, using `services`' coordinator, registry and data
    store: named proplet-1, proplet-2, ..., heartbeat every 0.5 s, 30 s per task, each with
    its own certificate (`insecure`: none), unless `config` (PropletConfig fields) says
    else. `spread`: the brokers (nodes of a cluster) proplet i uses `spread[i % len]` of,
    in `mqtt`'s namespace (empty: all on `mqtt`); `built`: the proplets made otherwise than
    `Proplet(config)` (e.g. a compromised one, `tests/support/poisoning.py`), by id. Yields
    one exit stack per proplet: closing it stops that proplet early."""
    running: dict[str, contextlib.AsyncExitStack] = {}
    try:
        for i, pid in enumerate(ids):
            tls = None if insecure else proplet_tls(pid)
            broker = (
                dataclasses.replace(spread[i % len(spread)], topics=mqtt.topics) if spread else mqtt
            )
            settings: dict[str, Any] = {
                "name": f"proplet-{i + 1}",
                "heartbeat_s": 0.5,
                "work_dir": work_dir / f"proplet-{i}",
                "task_timeout_s": 30.0,
                "result_resend_s": 0.5,
                "tls": tls,
                "mqtt": broker.as_identity(tls),
                **config,
            }
            endpoints = Endpoints(
                coordinator=services.coordinator,
                registry=services.registry,
                datastore=services.datastore,
            )
            one = contextlib.AsyncExitStack()
            running[pid] = one
            make = (built or {}).get(pid, Proplet)
            await one.enter_async_context(
                make(PropletConfig(proplet_id=pid, endpoints=endpoints, **settings))
            )
        yield running
    finally:
        for one in reversed(running.values()):
            await one.aclose()  # a no-op for a proplet already stopped


@dataclass
class Cluster(Clients):
    """All five services in this process (`stack`), real proplets, clients of every service."""

    stack: Stack = field(kw_only=True)
    mqtt: MqttConfig = field(kw_only=True)
    proplet_ids: list[str] = field(kw_only=True)
    running: dict[str, contextlib.AsyncExitStack] = field(kw_only=True)
    # The round module the test's rounds run (an image reference or a file:// URL).
    image: str = field(kw_only=True, default="")

    @property
    def topics(self) -> Topics:
        return self.mqtt.topics

    @property
    def endpoints(self) -> Endpoints:
        return self.stack.endpoints

    def round_task(
        self, name: str, round_id: str, proplet_id: str, coordinator_url: str = ""
    ) -> manager_pb2.CreateTaskRequest:
        """A round task created by hand (not by an experiment): `image` on `proplet_id` for
        `round_id` from v0 (HYPER's hyperparameters), reporting to `coordinator_url` (default:
        the stack's coordinator)."""
        ep = self.stack.endpoints
        return manager_pb2.CreateTaskRequest(
            name=name,
            image_url=self.image,
            proplet_id=proplet_id,
            env={
                "ROUND_ID": round_id,
                "MODEL_URI": V0,
                "HYPERPARAMS": HYPER_JSON,
                "COORDINATOR_URL": coordinator_url or ep.coordinator,
                "MODEL_REGISTRY_URL": ep.registry,
                "DATA_STORE_URL": ep.datastore,
            },
        )

    async def stop_proplet(self, proplet_id: str) -> None:
        await self.running[proplet_id].aclose()


@contextlib.asynccontextmanager
async def cluster(
    mqtt: MqttConfig,
    work_dir: Path,
    *,
    proplets: int | Sequence[str] = 0,
    dimension: int | None = 3,
    stack: Mapping[str, Any] | None = None,
    proplet: Mapping[str, Any] | None = None,
    image: str = "",
    insecure: bool = False,
    spread: Sequence[MqttConfig] = (),
    built: Mapping[str, Callable[[PropletConfig], Proplet]] | None = None,
) -> AsyncIterator[Cluster]:
    """The Stack with the data store seeded for the proplets (`stack`: other StackConfig
    fields), `proplets` real proplets (a count of fresh UUIDs, or the ids; `proplet`: their
    PropletConfig fields), v0 of `dimension` zeros (None: no model yet), and the proplets
    listed alive before it yields. `image`: the round module the test runs. Mutual TLS from
    the suite's CA on every hop, unless `insecure`. `spread`: the broker nodes the proplets
    are spread over (`run_proplets`); the services use `mqtt`. `built`: as for
    `run_proplets`."""
    ids = [str(uuid.uuid4()) for _ in range(proplets)] if isinstance(proplets, int) else [*proplets]
    ca_dir = None if insecure else session_ca().dir
    config = dataclasses.replace(
        StackConfig(mqtt=mqtt, seed_proplet_ids=tuple(ids), ca_dir=ca_dir), **dict(stack or {})
    )
    async with (
        Stack(config) as running_stack,
        run_proplets(
            running_stack.endpoints,
            mqtt,
            ids,
            work_dir,
            insecure,
            spread,
            built,
            **dict(proplet or {}),
        ) as running,
        clients(running_stack.endpoints, insecure=insecure) as c,
    ):
        made = Cluster(
            c.channels,
            **c.connection(),
            stack=running_stack,
            mqtt=mqtt,
            proplet_ids=ids,
            running=running,
            image=image,
        )
        if dimension is not None:
            await made.init_model(dimension)
        if ids:
            await made.wait_alive(ids)
        yield made


@contextlib.asynccontextmanager
async def round_notes(
    mqtt: MqttConfig,
    *,
    persistent: bool = False,
    insecure: bool = False,
    identity: TlsConfig | None = None,
) -> AsyncIterator[asyncio.Queue[dict[str, Any]]]:
    """The round-complete notifications (JSON) on the deployment's round topic, in order,
    as `identity` (any identity may read them; by default an operator of its own from the
    suite's CA; `insecure`: as nobody, on a plaintext `mqtt`); `persistent`: a session the
    broker keeps while this subscriber is away."""
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def on_message(topic: str, payload: bytes) -> None:
        assert topic == mqtt.topics.round_next, topic
        queue.put_nowait(json.loads(payload))

    name = f"watcher-{uuid.uuid4().hex[:8]}"
    async with MqttSession(
        mqtt.as_identity(None if insecure else identity or operator_tls(name)),
        name,
        [mqtt.topics.round_next],
        on_message,
        clean_session=not persistent,
    ):
        yield queue


@contextlib.asynccontextmanager
async def coordinator_process(
    mqtt: MqttConfig,
    work_dir: Path,
    *,
    dimension: int,
    aggregator: Any = None,
    registry_front: Callable[[Any], Any] | None = None,
    **env: str,
) -> AsyncIterator[tuple[ServiceProcess, Clients, str]]:
    """A model registry holding v0 (`dimension` zeros) in this process; an aggregator in
    this process (or the `aggregator` servicer served in its place, or, given a string, the
    address of one elsewhere); and the coordinator process, not started, over
    `work_dir/state`, configured for them by `env` on top of the defaults (no data store:
    num_samples is not capped). `registry_front`, given the real registry servicer, returns
    the one to serve in its place. Yields the process, a client of the registry and the
    registry's address."""
    async with contextlib.AsyncExitStack() as stack:
        if not isinstance(aggregator, str):
            bindings = None
            if aggregator is not None:
                add = aggregator_pb2_grpc.add_AggregatorServicer_to_server
                bindings = [ServiceBinding("propeller.v1.Aggregator", aggregator, add)]
            aggregator = await stack.enter_async_context(
                serve_app(
                    AggregatorApp(AggregatorConfig(LOCAL, tls=service_tls("aggregator"))),
                    bindings=bindings,
                    tls=service_tls("aggregator"),
                )
            )
        app = RegistryApp(RegistryConfig(LOCAL, tls=service_tls("registry")))
        real = app.bindings[0]
        front = (
            None
            if registry_front is None
            else [dataclasses.replace(real, servicer=registry_front(real.servicer))]
        )
        registry = await stack.enter_async_context(
            serve_app(app, bindings=front, tls=service_tls("registry"))
        )
        reg = await stack.enter_async_context(clients({"registry": registry}))
        await reg.init_model(dimension)
        settings = {
            **mqtt_env(mqtt),
            "AGGREGATOR_ADDR": aggregator,
            "MODEL_REGISTRY_ADDR": registry,
            "PROPELLER_STATE_DIR": str(work_dir / "state"),
            "PROPELLER_COORDINATOR_TICK_S": "0.05",
            "PROPELLER_COORDINATOR_RPC_TIMEOUT_S": "10",
            "PROPELLER_LOG_LEVEL": "INFO",
            "PROPELLER_NUM_SAMPLES_CAP": "none",
            **env,
        }
        yield stack.enter_context(service_process("coordinator", settings, work_dir)), reg, registry


@contextlib.asynccontextmanager
async def running(process: ServiceProcess) -> AsyncIterator[Clients]:
    """Start the service process (again), wait until it serves, and give a client of this
    run."""
    seconds = await process.restart()
    log.info("[test] %s run %d serving after %.2fs", process.service, process.starts, seconds)
    async with clients({process.service: process.addr}) as client:
        yield client
