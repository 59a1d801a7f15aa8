"""All five services in one process, each on its own gRPC server, started in dependency order
(registry, data store, aggregator -> coordinator -> manager). The test suite's end-to-end runs
and the one-process modes use this; compose runs the same apps one per process.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from server.aggregator.app import AggregatorApp, AggregatorConfig
from server.config import Endpoints, MqttConfig
from server.coordinator.app import CoordinatorApp, CoordinatorConfig
from server.datastore.app import DataStoreApp, DataStoreConfig
from server.grpc_server import serving
from server.manager.app import ManagerApp, ManagerConfig
from server.registry.app import RegistryApp, RegistryConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StackConfig:
    """Where the services listen (port 0 = any free port) and what they share."""

    mqtt: MqttConfig = field(default_factory=MqttConfig)
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


class Stack:
    """Async context manager; `endpoints` holds the bound addresses once entered."""

    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.endpoints = Endpoints()
        self.coordinator: CoordinatorApp | None = None
        self.manager: ManagerApp | None = None
        self.registry: RegistryApp | None = None
        self.datastore: DataStoreApp | None = None
        self._stack: contextlib.AsyncExitStack | None = None

    def _addr(self, port: int) -> str:
        return f"{self.config.host}:{port}"

    async def __aenter__(self) -> Stack:
        cfg = self.config
        async with contextlib.AsyncExitStack() as stack:
            self.registry = await stack.enter_async_context(
                RegistryApp(RegistryConfig(self._addr(cfg.registry_port), state_dir=cfg.state_dir))
            )
            registry = self._addr(
                await stack.enter_async_context(
                    serving(self._addr(cfg.registry_port), self.registry.bindings)
                )
            )
            self.datastore = await stack.enter_async_context(
                DataStoreApp(
                    DataStoreConfig(
                        self._addr(cfg.datastore_port),
                        seed_proplet_ids=cfg.seed_proplet_ids,
                        num_samples=cfg.num_samples,
                        num_features=cfg.num_features,
                        state_dir=cfg.state_dir,
                    )
                )
            )
            datastore = self._addr(
                await stack.enter_async_context(
                    serving(self._addr(cfg.datastore_port), self.datastore.bindings)
                )
            )
            aggregator_app = await stack.enter_async_context(
                AggregatorApp(AggregatorConfig(self._addr(cfg.aggregator_port)))
            )
            aggregator = self._addr(
                await stack.enter_async_context(
                    serving(self._addr(cfg.aggregator_port), aggregator_app.bindings)
                )
            )
            self.coordinator = await stack.enter_async_context(
                CoordinatorApp(
                    CoordinatorConfig(
                        addr=self._addr(cfg.coordinator_port),
                        aggregator_addr=aggregator,
                        registry_addr=registry,
                        mqtt=cfg.mqtt,
                        tick_s=cfg.coordinator_tick_s,
                        state_dir=cfg.state_dir,
                    )
                )
            )
            coordinator = self._addr(
                await stack.enter_async_context(
                    serving(self._addr(cfg.coordinator_port), self.coordinator.bindings)
                )
            )
            task_endpoints = Endpoints(
                manager=self._addr(cfg.manager_port),
                coordinator=coordinator,
                aggregator=aggregator,
                registry=registry,
                datastore=datastore,
            )
            self.manager = await stack.enter_async_context(
                ManagerApp(
                    ManagerConfig(
                        addr=self._addr(cfg.manager_port),
                        coordinator_addr=coordinator,
                        mqtt=cfg.mqtt,
                        alive_window_s=cfg.alive_window_s,
                        task_endpoints=task_endpoints,
                        state_dir=cfg.state_dir,
                    )
                )
            )
            manager = self._addr(
                await stack.enter_async_context(
                    serving(self._addr(cfg.manager_port), self.manager.bindings)
                )
            )
            self.endpoints = Endpoints(
                manager=manager,
                coordinator=coordinator,
                aggregator=aggregator,
                registry=registry,
                datastore=datastore,
            )
            log.info("[stack] up: %s", self.endpoints)
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._stack is not None:
            await self._stack.aclose()
            self._stack = None
