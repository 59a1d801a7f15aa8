"""The Coordinator service: configuration, the app that owns its state and background work,
and the process entry point."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from collections.abc import Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from types import TracebackType

from server.config import MqttConfig, env_float, env_int, env_str
from server.coordinator.clients import GrpcModelBackend
from server.coordinator.coordinator import Coordinator, RetryPolicy
from server.coordinator.service import binding
from server.coordinator.store import MemoryRoundStore, RoundStore
from server.grpc_server import ServiceBinding, channel, serve_until_signal
from server.mqtt import MqttSession

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CoordinatorConfig:
    addr: str = "127.0.0.1:8086"
    aggregator_addr: str = "127.0.0.1:8085"
    registry_addr: str = "127.0.0.1:8084"
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    # Timeout of each call to the aggregator or the registry.
    rpc_timeout_s: float = 30.0
    # A round's timeout when its configuration says 0.
    default_timeout_s: float = 60.0
    # How often the deadline task looks for rounds whose deadline passed.
    tick_s: float = 0.2
    # Aggregation + registry write: attempts, and the first backoff (doubling) between them.
    retry_attempts: int = 5
    retry_backoff_s: float = 0.2

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> CoordinatorConfig:
        env = os.environ if env is None else env
        d = cls()
        return cls(
            addr=env_str(env, "PROPELLER_COORDINATOR_LISTEN", d.addr),
            aggregator_addr=env_str(env, "AGGREGATOR_ADDR", d.aggregator_addr),
            registry_addr=env_str(env, "MODEL_REGISTRY_ADDR", d.registry_addr),
            mqtt=MqttConfig.from_env(env),
            rpc_timeout_s=env_float(env, "PROPELLER_COORDINATOR_RPC_TIMEOUT_S", d.rpc_timeout_s),
            default_timeout_s=env_float(
                env, "PROPELLER_ROUND_DEFAULT_TIMEOUT_S", d.default_timeout_s
            ),
            tick_s=env_float(env, "PROPELLER_COORDINATOR_TICK_S", d.tick_s),
            retry_attempts=env_int(env, "PROPELLER_COORDINATOR_RETRY_ATTEMPTS", d.retry_attempts),
            retry_backoff_s=env_float(
                env, "PROPELLER_COORDINATOR_RETRY_BACKOFF_S", d.retry_backoff_s
            ),
        )


class CoordinatorApp:
    """Async context manager: an MQTT session (publish only), channels to the aggregator and
    the registry, the `Coordinator`, and the background task that closes rounds at their
    deadline. `bindings` is valid inside the block."""

    def __init__(self, config: CoordinatorConfig, store: RoundStore | None = None) -> None:
        self.config = config
        self.store: RoundStore = store if store is not None else MemoryRoundStore()
        self._stack: AsyncExitStack | None = None
        self._coordinator: Coordinator | None = None

    @property
    def coordinator(self) -> Coordinator:
        if self._coordinator is None:
            raise RuntimeError("CoordinatorApp is not entered")
        return self._coordinator

    @property
    def bindings(self) -> list[ServiceBinding]:
        return [binding(self.coordinator)]

    async def __aenter__(self) -> CoordinatorApp:
        cfg = self.config
        async with AsyncExitStack() as stack:
            mqtt = await stack.enter_async_context(
                MqttSession(cfg.mqtt, f"coordinator-{uuid.uuid4().hex[:12]}", clean_session=True)
            )
            registry = channel(cfg.registry_addr)
            stack.push_async_callback(registry.close, None)
            aggregator = channel(cfg.aggregator_addr)
            stack.push_async_callback(aggregator.close, None)
            coordinator = Coordinator(
                self.store,
                GrpcModelBackend(registry, aggregator, timeout_s=cfg.rpc_timeout_s),
                mqtt.publish,
                cfg.mqtt.topics,
                default_timeout_s=cfg.default_timeout_s,
                retry=RetryPolicy(
                    attempts=cfg.retry_attempts, initial_backoff_s=cfg.retry_backoff_s
                ),
            )
            stack.push_async_callback(coordinator.aclose)
            await coordinator.resume()
            deadlines = asyncio.create_task(
                coordinator.run_deadlines(cfg.tick_s), name="coordinator-deadlines"
            )
            stack.push_async_callback(_cancel, deadlines)
            self._coordinator = coordinator
            self._stack = stack.pop_all()
        log.info(
            "[Coordinator] aggregator=%s registry=%s mqtt=%s:%d namespace=%s",
            cfg.aggregator_addr,
            cfg.registry_addr,
            cfg.mqtt.host,
            cfg.mqtt.port,
            cfg.mqtt.topics.base,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stack, self._stack = self._stack, None
        self._coordinator = None
        if stack is not None:
            await stack.aclose()


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def main() -> None:
    config = CoordinatorConfig.from_env()
    async with CoordinatorApp(config) as app:
        await serve_until_signal(config.addr, app.bindings)
