"""The Coordinator service: configuration, the app that owns its state and background work,
and the process entry point."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

from proplet.runner import Limits
from server.config import MqttConfig, TlsConfig, read_by, setting, settings_from_env
from server.coordinator import bounds as B
from server.coordinator.audit import Auditor, ModuleFetcher, Sources
from server.coordinator.clients import DataStoreSizes, GrpcModelBackend
from server.coordinator.coordinator import Coordinator, RetryPolicy
from server.coordinator.pg_store import PostgresRoundStore
from server.coordinator.replicas import DEFAULT_LEASE_S, Replica, default_replica_id
from server.coordinator.service import binding
from server.coordinator.site import SITE, GrpcUpstream, Hierarchy
from server.coordinator.store import STATE_FILE, MemoryRoundStore, RoundStore, SqliteRoundStore
from server.grpc_server import ServiceBinding, channel
from server.lifecycle import ServiceApp, for_serve, run_service, start_task, state_dir_from_env
from server.mqtt import MqttSession
from server.oci import oci_insecure_from_env
from server.pki import COORDINATOR_REPLICAS
from server.round_spec import DEFAULT_TIMEOUT_S
from server.tensors import GRPC_OPTIONS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CoordinatorConfig:
    addr: str = setting("PROPELLER_COORDINATOR_LISTEN", "127.0.0.1:8086")
    aggregator_addr: str = setting("AGGREGATOR_ADDR", "127.0.0.1:8085")
    registry_addr: str = setting("MODEL_REGISTRY_ADDR", "127.0.0.1:8084")
    # The data store, asked for a participant's dataset size when num_samples_cap is
    # "dataset".
    datastore_addr: str = setting("DATA_STORE_ADDR", "127.0.0.1:8083")
    mqtt: MqttConfig = field(default_factory=MqttConfig, metadata=read_by(MqttConfig.from_env))
    # Timeout of each call to the aggregator or the registry.
    rpc_timeout_s: float = setting("PROPELLER_COORDINATOR_RPC_TIMEOUT_S", 30.0)
    # A round's timeout when its configuration says 0.
    default_timeout_s: float = setting("PROPELLER_ROUND_DEFAULT_TIMEOUT_S", DEFAULT_TIMEOUT_S)
    # How often the deadline task looks for rounds whose deadline passed.
    tick_s: float = setting("PROPELLER_COORDINATOR_TICK_S", 0.2)
    # Aggregation + registry write: attempts, the first backoff (doubling) between them, and
    # the cap on one backoff (also the longest the channels wait before reconnecting).
    retry_attempts: int = setting("PROPELLER_COORDINATOR_RETRY_ATTEMPTS", 5)
    retry_backoff_s: float = setting("PROPELLER_COORDINATOR_RETRY_BACKOFF_S", 0.2)
    retry_max_backoff_s: float = setting("PROPELLER_COORDINATOR_RETRY_MAX_BACKOFF_S", 5.0)
    # Where the rounds and accepted updates survive a restart (`coordinator.sqlite` in it);
    # None keeps them in memory (tests, the demo).
    state_dir: Path | None = field(default=None, metadata=read_by(state_dir_from_env))
    # A PostgreSQL DSN: the rounds and updates live there instead (`server.coordinator.pg_store`).
    database_url: str = setting("PROPELLER_DATABASE_URL", "", secret=True)
    # On PostgreSQL every coordinator is a replica (`server.coordinator.replicas`): its id
    # ("" = hostname-pid), how long the deadline or aggregation it claims stays leased to it
    # without renewal (a dead replica's rounds are taken over after at most this), and how
    # often a WatchRound reads what other replicas changed.
    # Under mutual TLS a replica's certificate is the service `coordinator-{replica_id}` and
    # the id is read from it (`from_env`): the broker makes the certificate's name the client
    # id, so each replica needs its own.
    replica_id: str = setting("PROPELLER_COORDINATOR_REPLICA_ID", "")
    lease_s: float = setting("PROPELLER_COORDINATOR_LEASE_S", DEFAULT_LEASE_S)
    watch_poll_s: float = setting("PROPELLER_COORDINATOR_WATCH_POLL_S", 0.5)
    # Poisoning bounds (`server.coordinator.bounds`): each participant's num_samples cap
    # ("dataset": its dataset's size in the data store; "none"; or a number), the largest
    # |value| in an update, the largest L2 distance of an update from its base model (0: no
    # bound) and what to do beyond it ("reject" or "clip").
    num_samples_cap: str = setting("PROPELLER_NUM_SAMPLES_CAP", "dataset")
    max_update_value: float = setting("PROPELLER_MAX_UPDATE_VALUE", B.DEFAULT_MAX_ABS_VALUE)
    max_update_distance: float = setting("PROPELLER_MAX_UPDATE_DISTANCE", B.DEFAULT_MAX_DISTANCE)
    update_distance_action: str = setting("PROPELLER_UPDATE_DISTANCE_ACTION", "reject")
    # Hierarchical aggregation (docs/architecture.md): "flat"; "root" (its rounds'
    # participants are sites, whose coordinators submit their partials); or "site" (acts for
    # site `site_id` of the root coordinator at `upstream_addr`; over TLS its certificate is
    # service `site-{site_id}`).
    tier: str = setting("PROPELLER_COORDINATOR_TIER", "flat")
    upstream_addr: str = setting("PROPELLER_COORDINATOR_UPSTREAM", "")
    site_id: str = setting("PROPELLER_COORDINATOR_SITE_ID", "")
    # The re-execution audit of the rounds that ask for one (docs/verifiability.md): the OCI
    # registry the round modules are fetched from ("" = the host the image names; plain HTTP
    # for a loopback address), one re-run's limits (as a proplet's task: wall time, memory
    # and tables together, stdout) and how many re-runs at a time.
    oci_registry: str = setting("PROPELLER_OCI_REGISTRY", "")
    oci_insecure: bool | None = field(default=None, metadata=read_by(oci_insecure_from_env))
    audit_timeout_s: float = setting("PROPELLER_AUDIT_TIMEOUT_S", 300.0)
    audit_memory_mb: int = setting("PROPELLER_AUDIT_MEMORY_MB", 256)
    audit_output_mb: int = setting("PROPELLER_AUDIT_OUTPUT_MB", 16)
    audit_parallel: int = setting("PROPELLER_AUDIT_PARALLEL", 1)
    # Mutual TLS, server and the registry / aggregator channels (None: plaintext).
    tls: TlsConfig | None = field(kw_only=True, metadata=read_by(TlsConfig.from_env))

    def __post_init__(self) -> None:
        if self.update_distance_action not in ("reject", "clip"):
            raise ValueError(
                f"update_distance_action: {self.update_distance_action!r} must be 'reject' "
                "or 'clip'"
            )
        self.samples_cap  # noqa: B018 - checks the settings now rather than at the first update
        self.bounds  # noqa: B018
        self.audit_limits  # noqa: B018
        if self.audit_parallel < 1:
            raise ValueError(f"audit_parallel: {self.audit_parallel} must be >= 1")
        if (self.hierarchy.tier == SITE) != bool(self.upstream_addr):
            raise ValueError(
                "upstream_addr: a site coordinator (tier 'site'), and only one, names its root "
                "coordinator (PROPELLER_COORDINATOR_UPSTREAM)"
            )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> CoordinatorConfig:
        values = settings_from_env(cls, env)
        tls = values["tls"]
        values["replica_id"] = COORDINATOR_REPLICAS.replica_id_from(
            values["replica_id"],
            None if tls is None else tls.cert,
            "PROPELLER_COORDINATOR_REPLICA_ID",
        )
        return cls(**values)

    @property
    def hierarchy(self) -> Hierarchy:
        return Hierarchy(self.tier, self.site_id)

    @property
    def samples_cap(self) -> B.NumSamplesCap:
        return B.NumSamplesCap.parse(self.num_samples_cap)

    @property
    def bounds(self) -> B.UpdateBounds:
        return B.UpdateBounds(
            max_abs_value=self.max_update_value,
            max_distance=self.max_update_distance,
            clip=self.update_distance_action == "clip",
        )

    @property
    def audit_limits(self) -> Limits:
        """One audit re-run's limits (ValueError naming the one out of range)."""
        return Limits(
            timeout_s=self.audit_timeout_s,
            memory_bytes=self.audit_memory_mb << 20,
            output_bytes=self.audit_output_mb << 20,
        )

    @property
    def replica(self) -> Replica | None:
        """This coordinator as a replica: on PostgreSQL only (a state file is one process's)."""
        if not self.database_url:
            return None
        return Replica(self.replica_id or default_replica_id(), self.lease_s, self.watch_poll_s)

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

    The store is `store` when given (the caller owns it), else a `PostgresRoundStore` when
    `config.database_url` is set, else a `SqliteRoundStore` in `config.state_dir` (either
    opened on entry, closed on exit), else a `MemoryRoundStore`.

    On exit (SIGTERM via `serve_until_signal`) aggregations in flight are cancelled: their
    rounds stay AGGREGATING in the store and the next start aggregates them again; every
    write already issued finishes before the state file is closed."""

    def __init__(self, config: CoordinatorConfig, store: RoundStore | None = None) -> None:
        self.config = config
        self._store: RoundStore | None = store
        if store is None and config.state_dir is None and not config.database_url:
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
            durable: SqliteRoundStore | PostgresRoundStore
            if cfg.database_url:
                durable = PostgresRoundStore(cfg.database_url)
            else:
                assert cfg.state_file is not None
                durable = SqliteRoundStore(cfg.state_file)
            await durable.open()
            store = self._store = durable
            # Closed last: after the coordinator's tasks are cancelled and awaited.
            stack.push_async_callback(self._close_store, durable)
        mqtt = await stack.enter_async_context(
            MqttSession(cfg.mqtt, f"coordinator-{uuid.uuid4().hex[:12]}", clean_session=True)
        )
        options = cfg.channel_options()
        registry = channel(cfg.registry_addr, cfg.tls, options)
        stack.push_async_callback(registry.close, None)
        aggregator = channel(cfg.aggregator_addr, cfg.tls, options)
        stack.push_async_callback(aggregator.close, None)
        samples_cap = cfg.samples_cap
        # The data store: the dataset sizes of the "dataset" cap, the audit's datasets (a
        # channel connects at its first call).
        datastore = channel(cfg.datastore_addr, cfg.tls, options)
        stack.push_async_callback(datastore.close, None)
        data_store = DataStoreSizes(datastore, timeout_s=cfg.rpc_timeout_s)
        stack.push_async_callback(data_store.aclose)
        datasets = data_store if samples_cap.source == "dataset" else None
        backend = GrpcModelBackend(registry, aggregator, timeout_s=cfg.rpc_timeout_s)
        modules = ModuleFetcher(
            registry=cfg.oci_registry, insecure=cfg.oci_insecure, timeout_s=cfg.rpc_timeout_s
        )
        stack.callback(modules.close)
        auditor = Auditor(
            Sources(modules, data_store),
            backend,
            limits=cfg.audit_limits,
            parallel=cfg.audit_parallel,
        )
        hierarchy = cfg.hierarchy
        upstream = None
        if hierarchy.tier == SITE:
            key = hierarchy.signing_key(cfg.tls)
            root = channel(cfg.upstream_addr, cfg.tls, options)
            stack.push_async_callback(root.close, None)
            upstream = GrpcUpstream(root, key, timeout_s=cfg.rpc_timeout_s)
        coordinator = Coordinator(
            store,
            backend,
            mqtt.publish,
            cfg.mqtt.topics,
            default_timeout_s=cfg.default_timeout_s,
            retry=cfg.retry,
            bounds=cfg.bounds,
            samples_cap=samples_cap,
            datasets=datasets,
            hierarchy=hierarchy,
            upstream=upstream,
            replica=cfg.replica if isinstance(store, PostgresRoundStore) else None,
            auditor=auditor,
        )
        stack.push_async_callback(coordinator.aclose)
        await coordinator.resume()
        start_task(stack, coordinator.run_deadlines(cfg.tick_s), "coordinator-deadlines")
        # Publishes what a crash left in the outbox, and retries failed publishes.
        start_task(stack, coordinator.run_outbox(cfg.retry_max_backoff_s), "coordinator-outbox")
        self._coordinator = coordinator
        log.info(
            "[Coordinator] tier=%s%s aggregator=%s registry=%s num_samples_cap=%s "
            "max_update_value=%g max_update_distance=%g (%s) mqtt=%s:%d namespace=%s state=%s",
            hierarchy.tier,
            f" site_id={hierarchy.site_id} upstream={cfg.upstream_addr}" if upstream else "",
            cfg.aggregator_addr,
            cfg.registry_addr,
            samples_cap,
            cfg.max_update_value,
            cfg.max_update_distance,
            cfg.update_distance_action,
            cfg.mqtt.host,
            cfg.mqtt.port,
            cfg.mqtt.topics.base,
            f"postgresql replica={coordinator.replica.replica_id}"
            if coordinator.replica is not None
            else "postgresql"
            if cfg.database_url
            else cfg.state_file or "memory",
        )

    async def _close_store(self, store: SqliteRoundStore | PostgresRoundStore) -> None:
        await store.close()
        if self._store is store:
            self._store = None


async def main() -> None:
    config = for_serve(CoordinatorConfig.from_env(), "Coordinator")
    await run_service(CoordinatorApp(config), config.addr, config.tls)
