"""The whole system in one process: the one stack runner behind `propeller-fl demo`,
`propeller-fl up`, the benchmarks and the test suite's end-to-end runs (compose runs the same
apps one per process).

`Stack` starts, in dependency order and stopping in reverse:
- an embedded MQTT broker when asked for (`broker_port`), else the broker `mqtt` names;
- the five services, each on its own gRPC server (registry, data store, aggregator ->
  coordinator -> manager);
- N proplets (`proplet_ids`) sharing one wasmtime engine, pointed at those services; the stack
  is up once the manager lists every one of them as alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from propeller.v1 import manager_pb2, manager_pb2_grpc
from proplet.app import Proplet
from proplet.config import PropletConfig
from proplet.runner import WasmRuntime
from server.aggregator.app import AggregatorApp, AggregatorConfig
from server.config import Endpoints, MqttConfig
from server.coordinator.app import CoordinatorApp, CoordinatorConfig
from server.datastore.app import DataStoreApp, DataStoreConfig
from server.embedded_broker import EmbeddedBroker
from server.errors import Unavailable, rpc_errors
from server.grpc_server import channel, serving
from server.lifecycle import Lifecycle, ServiceApp
from server.manager.app import ManagerApp, ManagerConfig
from server.paging import all_pages
from server.registry.app import RegistryApp, RegistryConfig

log = logging.getLogger(__name__)

# How long the proplets have to announce themselves before the stack gives up.
READY_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class StackConfig:
    """Where the services listen (port 0 = any free port) and what they share."""

    mqtt: MqttConfig = field(default_factory=MqttConfig)
    # An embedded MQTT broker on this port (0 = any free one) in `mqtt`'s namespace, instead
    # of the broker `mqtt` names; None: use that one.
    broker_port: int | None = None
    host: str = "127.0.0.1"
    manager_port: int = 0
    coordinator_port: int = 0
    aggregator_port: int = 0
    registry_port: int = 0
    datastore_port: int = 0
    seed_proplet_ids: tuple[str, ...] = ()
    num_samples: int = 64
    num_features: int = 3
    # Every service's durable state (manager.sqlite, coordinator.sqlite, registry.sqlite,
    # datastore.sqlite) in this directory; None keeps it all in memory.
    state_dir: Path | None = None
    alive_window_s: float = 30.0
    coordinator_tick_s: float = 0.2
    # Proplets run in this process (named proplet-1, proplet-2, ...), their module cache in
    # `proplet_work_dir`.
    proplet_ids: tuple[str, ...] = ()
    proplet_work_dir: Path | None = None
    proplet_task_timeout_s: float = 300.0


class Stack(Lifecycle):
    """Async context manager; `endpoints` (and `mqtt`, the broker in use) hold the bound
    addresses once entered."""

    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.endpoints = Endpoints()
        self.mqtt = config.mqtt
        self.broker: EmbeddedBroker | None = None
        self.coordinator: CoordinatorApp | None = None
        self.manager: ManagerApp | None = None
        self.registry: RegistryApp | None = None
        self.datastore: DataStoreApp | None = None
        self.proplets: list[Proplet] = []

    def _addr(self, port: int) -> str:
        return f"{self.config.host}:{port}"

    async def _serve(self, stack: contextlib.AsyncExitStack, app: ServiceApp, port: int) -> str:
        """Start `app` and its gRPC server; the address it listens on."""
        await stack.enter_async_context(app)
        bound = await stack.enter_async_context(serving(self._addr(port), app.bindings))
        return self._addr(bound)

    async def _open(self, stack: contextlib.AsyncExitStack) -> None:
        cfg = self.config
        if cfg.broker_port is not None:
            self.broker = await stack.enter_async_context(EmbeddedBroker(cfg.host, cfg.broker_port))
            self.mqtt = self.broker.mqtt_config(cfg.mqtt.topics)
        self.registry = RegistryApp(
            RegistryConfig(self._addr(cfg.registry_port), state_dir=cfg.state_dir)
        )
        registry = await self._serve(stack, self.registry, cfg.registry_port)
        self.datastore = DataStoreApp(
            DataStoreConfig(
                self._addr(cfg.datastore_port),
                seed_proplet_ids=cfg.seed_proplet_ids,
                num_samples=cfg.num_samples,
                num_features=cfg.num_features,
                state_dir=cfg.state_dir,
            )
        )
        datastore = await self._serve(stack, self.datastore, cfg.datastore_port)
        aggregator = await self._serve(
            stack,
            AggregatorApp(AggregatorConfig(self._addr(cfg.aggregator_port))),
            cfg.aggregator_port,
        )
        self.coordinator = CoordinatorApp(
            CoordinatorConfig(
                addr=self._addr(cfg.coordinator_port),
                aggregator_addr=aggregator,
                registry_addr=registry,
                mqtt=self.mqtt,
                tick_s=cfg.coordinator_tick_s,
                state_dir=cfg.state_dir,
            )
        )
        coordinator = await self._serve(stack, self.coordinator, cfg.coordinator_port)
        services = Endpoints(
            manager=self._addr(cfg.manager_port),
            coordinator=coordinator,
            aggregator=aggregator,
            registry=registry,
            datastore=datastore,
        )
        self.manager = ManagerApp(
            ManagerConfig(
                addr=self._addr(cfg.manager_port),
                coordinator_addr=coordinator,
                mqtt=self.mqtt,
                alive_window_s=cfg.alive_window_s,
                task_endpoints=services,
                state_dir=cfg.state_dir,
            )
        )
        manager = await self._serve(stack, self.manager, cfg.manager_port)
        self.endpoints = Endpoints(
            manager=manager,
            coordinator=coordinator,
            aggregator=aggregator,
            registry=registry,
            datastore=datastore,
        )
        log.info("[stack] up: %s", self.endpoints)
        if cfg.proplet_ids:
            if cfg.proplet_work_dir is None:
                raise ValueError("proplet_work_dir: required with proplet_ids")
            self.proplets = await stack.enter_async_context(
                proplets(
                    self.endpoints,
                    self.mqtt,
                    cfg.proplet_ids,
                    cfg.proplet_work_dir,
                    task_timeout_s=cfg.proplet_task_timeout_s,
                )
            )
            await wait_alive(self.endpoints.manager, cfg.proplet_ids)


@contextlib.asynccontextmanager
async def proplets(
    endpoints: Endpoints,
    mqtt: MqttConfig,
    ids: Sequence[str],
    work_dir: Path,
    *,
    task_timeout_s: float = 300.0,
    heartbeat_s: float = 10.0,
) -> AsyncIterator[list[Proplet]]:
    """Proplets `proplet-1..N` in this process, one wasmtime engine and module cache for all,
    pointed at `endpoints`; stopped (their tasks Interrupted) on exit."""
    runtime = WasmRuntime.shared()
    async with contextlib.AsyncExitStack() as stack:
        started = []
        for i, pid in enumerate(ids):
            config = PropletConfig(
                proplet_id=pid,
                name=f"proplet-{i + 1}",
                mqtt=mqtt,
                endpoints=endpoints,
                heartbeat_s=heartbeat_s,
                work_dir=work_dir / "proplets",
                task_timeout_s=task_timeout_s,
            )
            started.append(await stack.enter_async_context(Proplet(config, runtime=runtime)))
        yield started


async def wait_alive(manager: str, ids: Sequence[str]) -> None:
    """Until the manager at `manager` lists every proplet in `ids` as alive (they announce
    over MQTT); Unavailable naming the missing ones after READY_TIMEOUT_S."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + READY_TIMEOUT_S
    want = set(ids)
    alive: set[str] = set()
    async with channel(manager) as ch:
        stub = manager_pb2_grpc.ManagerStub(ch)
        while loop.time() < deadline:
            with rpc_errors("Manager.ListProplets"):
                listed = all_pages(
                    lambda r: stub.ListProplets(r, timeout=10),
                    manager_pb2.ListPropletsRequest(),
                    lambda r: r.proplets,
                )
                alive = {p.id async for p in listed if p.alive}
            if want <= alive:
                return
            await asyncio.sleep(0.05)
    missing = sorted(want - alive)
    raise Unavailable(
        f"proplets not registered with the manager within {READY_TIMEOUT_S:g}s: {missing}"
    )
