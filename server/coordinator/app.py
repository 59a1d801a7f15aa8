"""The Coordinator service: configuration, the app that owns its state and background work,
and the process entry point."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

from server.config import MqttConfig, TlsConfig, env_float, env_int, env_str
from server.coordinator.clients import GrpcModelBackend
from server.coordinator.coordinator import Coordinator, RetryPolicy
from server.coordinator.service import binding
from server.coordinator.store import STATE_FILE, MemoryRoundStore, RoundStore, SqliteRoundStore
from server.grpc_server import ServiceBinding, channel
from server.lifecycle import ServiceApp, for_serve, run_service, start_task, state_dir_from_env
from server.mqtt import MqttSession
from server.round_spec import DEFAULT_TIMEOUT_S
from server.tensors import GRPC_OPTIONS

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
    default_timeout_s: float = DEFAULT_TIMEOUT_S
    # How often the deadline task looks for rounds whose deadline passed.
    tick_s: float = 0.2
    # Aggregation + registry write: attempts, the first backoff (doubling) between them, and
    # the cap on one backoff (also the longest the channels wait before reconnecting).
    retry_attempts: int = 5
    retry_backoff_s: float = 0.2
    retry_max_backoff_s: float = 5.0
    # Where the rounds and accepted updates survive a restart (`coordinator.sqlite` in it);
    # None keeps them in memory (tests, the demo).
    state_dir: Path | None = None
    # Mutual TLS, server and the registry / aggregator channels (None: plaintext).
    tls: TlsConfig | None = field(kw_only=True)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> CoordinatorConfig:
        env = os.environ if env is None else env
        d = cls(tls=None)
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
            retry_max_backoff_s=env_float(
                env, "PROPELLER_COORDINATOR_RETRY_MAX_BACKOFF_S", d.retry_max_backoff_s
            ),
            state_dir=state_dir_from_env(env),
            tls=TlsConfig.from_env(env),
        )

    @property
    def state_file(self) -> Path | None:
        return None if self.state_dir is None else self.state_dir / STATE_FILE

    @property
    def retry(self) -> RetryPolicy:
        return RetryPolicy(
            attempts=self.retry_attempts,
            initial_backoff_s=self.retry_backoff_s,
            max_backoff_s=self.retry_max_backoff_s,
        )

    def channel_options(self) -> list[tuple[str, int]]:
        """While the aggregator or registry is down, reconnect at least every
        `retry_max_backoff_s`, so a retry soon after it is back finds the channel ready."""
        max_ms = max(100, int(self.retry_max_backoff_s * 1000))
        return [
            *GRPC_OPTIONS,
            ("grpc.initial_reconnect_backoff_ms", min(1000, max_ms)),
            ("grpc.max_reconnect_backoff_ms", max_ms),
        ]


class CoordinatorApp(ServiceApp):
    """Async context manager: the round store, an MQTT session (publish only), channels to the
    aggregator and the registry, the `Coordinator` (resumed from the store), and the
    background task that closes rounds at their deadline. `bindings` is valid inside the block.

    The store is `store` when given (the caller owns it), else a `SqliteRoundStore` in
    `config.state_dir` (opened on entry, closed on exit), else a `MemoryRoundStore`.

    On exit (SIGTERM via `serve_until_signal`) aggregations in flight are cancelled: their
    rounds stay AGGREGATING in the store and the next start aggregates them again; every
    write already issued finishes before the state file is closed."""

    def __init__(self, config: CoordinatorConfig, store: RoundStore | None = None) -> None:
        self.config = config
        self._store: RoundStore | None = store
        if store is None and config.state_dir is None:
            self._store = MemoryRoundStore()
        self._coordinator: Coordinator | None = None

    @property
    def store(self) -> RoundStore:
        """The round store: a given or memory one at any time, a SQLite one inside the block."""
        if self._store is None:
            raise RuntimeError("CoordinatorApp: its state file opens on entry")
        return self._store

    @property
    def coordinator(self) -> Coordinator:
        return self._entered(self._coordinator)

    @property
    def bindings(self) -> list[ServiceBinding]:
        return [binding(self.coordinator)]

    async def _open(self, stack: AsyncExitStack) -> None:
        cfg = self.config
        store = self._store
        if store is None:
            assert cfg.state_file is not None
            sqlite_store = SqliteRoundStore(cfg.state_file)
            await sqlite_store.open()
            store = self._store = sqlite_store
            # Closed last: after the coordinator's tasks are cancelled and awaited.
            stack.push_async_callback(self._close_store, sqlite_store)
        mqtt = await stack.enter_async_context(
            MqttSession(cfg.mqtt, f"coordinator-{uuid.uuid4().hex[:12]}", clean_session=True)
        )
        options = cfg.channel_options()
        registry = channel(cfg.registry_addr, cfg.tls, options)
        stack.push_async_callback(registry.close, None)
        aggregator = channel(cfg.aggregator_addr, cfg.tls, options)
        stack.push_async_callback(aggregator.close, None)
        coordinator = Coordinator(
            store,
            GrpcModelBackend(registry, aggregator, timeout_s=cfg.rpc_timeout_s),
            mqtt.publish,
            cfg.mqtt.topics,
            default_timeout_s=cfg.default_timeout_s,
            retry=cfg.retry,
        )
        stack.push_async_callback(coordinator.aclose)
        await coordinator.resume()
        start_task(stack, coordinator.run_deadlines(cfg.tick_s), "coordinator-deadlines")
        # Publishes what a crash left in the outbox, and retries failed publishes.
        start_task(stack, coordinator.run_outbox(cfg.retry_max_backoff_s), "coordinator-outbox")
        self._coordinator = coordinator
        log.info(
            "[Coordinator] aggregator=%s registry=%s mqtt=%s:%d namespace=%s state=%s",
            cfg.aggregator_addr,
            cfg.registry_addr,
            cfg.mqtt.host,
            cfg.mqtt.port,
            cfg.mqtt.topics.base,
            cfg.state_file or "memory",
        )

    async def _close_store(self, store: SqliteRoundStore) -> None:
        await store.close()
        if self._store is store:
            self._store = None


async def main() -> None:
    config = for_serve(CoordinatorConfig.from_env(), "Coordinator")
    await run_service(CoordinatorApp(config), config.addr, config.tls)
