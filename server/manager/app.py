"""The Manager service process: configuration, state, the MQTT session and the coordinator
channel, wired to the servicer."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

from propeller.v1 import coordinator_pb2_grpc, manager_pb2
from propeller.v1 import manager_pb2_grpc as manager_grpc
from server import metrics
from server.config import Endpoints, MqttConfig, TlsConfig, read_by, setting, settings_from_env
from server.errors import Unavailable
from server.grpc_server import ServiceBinding, channel
from server.lifecycle import ServiceApp, for_serve, run_service, start_task, state_dir_from_env
from server.manager.coordinator import CoordinatorClient
from server.manager.driver import ExperimentLoop
from server.manager.experiments import ExperimentStore, InMemoryExperimentStore
from server.manager.modules import ModuleResolver
from server.manager.orchestrator import Manager
from server.manager.pg_store import PostgresManagerDatabase
from server.manager.proplets import InMemoryPropletStore, Proplets, PropletStore
from server.manager.replicas import (
    DEFAULT_LEASE_S,
    DEFAULT_REFRESH_S,
    Replica,
    default_replica_id,
)
from server.manager.service import ManagerServicer
from server.manager.sqlite_store import ManagerDatabase
from server.manager.tasks import InMemoryTaskStore, Tasks, TaskStore
from server.messages import ResultAck
from server.mqtt import MqttSession
from server.oci import oci_insecure_from_env
from server.pki import MANAGER_REPLICAS

SERVICE_NAME: str = manager_pb2.DESCRIPTOR.services_by_name["Manager"].full_name


@dataclass(frozen=True)
class ManagerConfig:
    addr: str = setting("PROPELLER_MANAGER_LISTEN", "127.0.0.1:7070")
    coordinator_addr: str = setting("COORDINATOR_ADDR", "127.0.0.1:8086")
    mqtt: MqttConfig = field(default_factory=MqttConfig, metadata=read_by(MqttConfig.from_env))
    # Proplets heartbeat every 10 s by default: a window of three intervals means a live
    # proplet never flaps to dead because one heartbeat arrived a little late.
    alive_window_s: float = setting("PROPELLER_ALIVE_WINDOW_S", 30.0)
    # The addresses written into federated tasks' environment, as the proplets reach them
    # (service host names under compose).
    task_endpoints: Endpoints = field(
        default_factory=Endpoints, metadata=read_by(Endpoints.from_env)
    )
    rpc_timeout_s: float = setting("PROPELLER_RPC_TIMEOUT_S", 30.0)
    # Proplets, tasks and experiments in `<state_dir>/manager.sqlite`; None keeps them in
    # memory only.
    state_dir: Path | None = field(default=None, metadata=read_by(state_dir_from_env))
    # A PostgreSQL DSN: the same records live there instead (`server.manager.pg_store`).
    database_url: str = setting("PROPELLER_DATABASE_URL", "", secret=True)
    # On PostgreSQL every manager is a replica (`server.manager.replicas`): its id ("" =
    # hostname-pid), how long an experiment it drives stays leased to it without renewal (a
    # dead replica's experiments are taken over after at most this), and how often it reads
    # what the other replicas changed. An id given explicitly also names its MQTT session
    # (each replica needs its own); without one the session keeps the single manager's name.
    # Under mutual TLS a replica's certificate is the service `manager-{replica_id}` and the
    # id is read from it (`from_env`): the broker makes the certificate's name the client id.
    replica_id: str = setting("PROPELLER_MANAGER_REPLICA_ID", "")
    lease_s: float = setting("PROPELLER_MANAGER_LEASE_S", DEFAULT_LEASE_S)
    refresh_s: float = setting("PROPELLER_MANAGER_REFRESH_S", DEFAULT_REFRESH_S)
    # Reconciliation, every `reconcile_interval_s`: a task left SCHEDULED or RUNNING this long
    # after its start (without ROUND_DEADLINE), or this long after its round's deadline, is
    # interrupted with a reason (`Manager.reconcile`).
    task_deadline_s: float = setting("PROPELLER_TASK_DEADLINE_S", 900.0)
    report_grace_s: float = setting("PROPELLER_REPORT_GRACE_S", 30.0)
    reconcile_interval_s: float = setting("PROPELLER_RECONCILE_INTERVAL_S", 5.0)
    # The OCI registry StartExperiment resolves task_wasm_image in to pin its digest: the
    # address every image's registry is reached at ("" = the host the image names) and
    # whether over plain HTTP (None: for loopback addresses only).
    oci_registry: str = setting("PROPELLER_OCI_REGISTRY", "")
    oci_insecure: bool | None = field(default=None, metadata=read_by(oci_insecure_from_env))
    # Mutual TLS, server and the coordinator channel (None: plaintext); see TlsConfig.
    tls: TlsConfig | None = field(kw_only=True, metadata=read_by(TlsConfig.from_env))

    def __post_init__(self) -> None:
        if not self.alive_window_s > 0:
            raise ValueError(f"alive_window_s: {self.alive_window_s} must be > 0")
        if not self.rpc_timeout_s > 0:
            raise ValueError(f"rpc_timeout_s: {self.rpc_timeout_s} must be > 0")
        for name in (
            "task_deadline_s",
            "report_grace_s",
            "reconcile_interval_s",
            "lease_s",
            "refresh_s",
        ):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name}: {value} must be a finite number > 0")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ManagerConfig:
        values = settings_from_env(cls, env)
        tls = values["tls"]
        values["replica_id"] = MANAGER_REPLICAS.replica_id_from(
            values["replica_id"], None if tls is None else tls.cert, "PROPELLER_MANAGER_REPLICA_ID"
        )
        return cls(**values)

    @property
    def replica(self) -> Replica | None:
        """This manager as a replica: on PostgreSQL only (a state file is one process's)."""
        if not self.database_url:
            return None
        return Replica(self.replica_id or default_replica_id(), self.lease_s, self.refresh_s)


log = logging.getLogger(__name__)


class ManagerApp(ServiceApp):
    """Async context manager owning the manager's state, its MQTT session (every proplet's
    announcements, heartbeats and results; result acknowledgements out), the reconciliation
    loop and its channel to the coordinator. Serve `bindings` while inside."""

    def __init__(
        self,
        config: ManagerConfig,
        *,
        proplet_store: PropletStore | None = None,
        task_store: TaskStore | None = None,
        experiment_store: ExperimentStore | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.clock = clock
        # The durable state: PostgreSQL when there is a DSN, else SQLite when there is a state
        # directory (stores given explicitly win).
        self.database: ManagerDatabase | None = None
        self.shared: PostgresManagerDatabase | None = None
        if config.database_url:
            self.database = self.shared = PostgresManagerDatabase(config.database_url)
        elif config.state_dir is not None:
            self.database = ManagerDatabase(config.state_dir)
        db = self.database
        self.proplets = Proplets(
            proplet_store or (db.proplets if db else InMemoryPropletStore()),
            config.alive_window_s,
            clock,
        )
        metrics.proplets_alive_from(self.proplets.alive_count)
        self.tasks = Tasks(task_store or (db.tasks if db else InMemoryTaskStore()), clock)
        self.experiment_store: ExperimentStore = experiment_store or (
            db.experiments if db else InMemoryExperimentStore()
        )
        self._manager: Manager | None = None
        self._loop: ExperimentLoop | None = None
        self._session: MqttSession | None = None
        # Acknowledgements of handled results, sent in the background (never from the MQTT
        # handler, which must not wait on the connection it runs on): (proplet id, ack).
        self._acks: asyncio.Queue[tuple[str, ResultAck]] = asyncio.Queue()

    @property
    def manager(self) -> Manager:
        return self._entered(self._manager)

    @property
    def bindings(self) -> list[ServiceBinding]:
        return [
            ServiceBinding(
                SERVICE_NAME,
                ManagerServicer(
                    self.manager, persisted=self.persisted, loop=self._entered(self._loop)
                ),
                manager_grpc.add_ManagerServicer_to_server,
            )
        ]

    async def persisted(self) -> None:
        """Wait until every state change made so far is on disk (at once without a state
        directory)."""
        if self.database is not None:
            await self.database.flush()

    async def _on_message(self, topic: str, payload: bytes) -> None:
        if self._closing:
            # Shutting down: a result is sent again until acknowledged (by the next manager
            # or replica), announcements and heartbeats recur; handling it now would reach
            # state being released.
            log.debug("[Manager] shutting down: %s not handled", topic)
            return
        ack = await self.manager.handle_message(topic, payload)
        await self.persisted()
        if ack is not None:
            # On disk first: an acknowledged result is never lost by a manager crash.
            self._acks.put_nowait(ack)

    async def _send_acks(self) -> None:
        """Acknowledgements go out at QoS 0 (at most once): one that is lost costs a result
        sent again, which the proplet does anyway until it has one (every
        PROPLET_RESULT_RESEND_S, and after every reconnection, when an ack queued for it would
        be lost too), and which is acknowledged again. QoS 1 would cost two more packets per
        result (the broker's and the proplet's PUBACK) and a wait for the broker's on every
        ack, to guard against nothing more (docs/benchmarks.md, "Fleet")."""
        topics = self.config.mqtt.topics
        while True:
            proplet_id, ack = await self._acks.get()
            try:
                await self._publish(topics.result_ack_for(proplet_id), ack.to_json(), qos=0)
            except Unavailable as exc:  # the proplet sends the result again: acked then
                log.warning("[Manager.results] ack to %s not sent: %s", proplet_id, exc)

    async def _reconcile(self) -> None:
        while True:
            await asyncio.sleep(self.config.reconcile_interval_s)
            try:
                await self.manager.reconcile()
                await self.persisted()
            except Exception:  # logged; the next round of reconciliation may succeed
                log.exception("[Manager.reconcile] failed")

    async def _refresh(self) -> None:
        """With replicas: read what the others changed every `refresh_s` (WatchExperiment's
        events, liveness, the evaluation's results), besides before each answer."""
        while True:
            await asyncio.sleep(self.config.refresh_s)
            try:
                await self.manager.fresh()
            except Exception:  # logged; the next refresh may succeed
                log.exception("[Manager.state] refresh failed")

    async def _publish(self, topic: str, payload: bytes, *, qos: int = 1) -> None:
        if self._closing:  # as when the broker is away: the callers retry or report it
            raise Unavailable(f"manager: shutting down, {topic} not published")
        await self._entered(self._session).publish(topic, payload, qos=qos)

    async def _open(self, stack: AsyncExitStack) -> None:
        topics = self.config.mqtt.topics
        # The state is loaded before the MQTT session opens: a persistent session delivers
        # the results queued while the manager was down at once.
        if self.database is not None:
            await self.database.open()
            stack.push_async_callback(self.database.close)
        chan = channel(self.config.coordinator_addr, self.config.tls)
        stack.push_async_callback(chan.close, None)
        modules = ModuleResolver(
            registry=self.config.oci_registry,
            insecure=self.config.oci_insecure,
            timeout_s=self.config.rpc_timeout_s,
        )
        stack.callback(modules.close)
        self._manager = Manager(
            proplets=self.proplets,
            tasks=self.tasks,
            experiments=self.experiment_store,
            rounds=CoordinatorClient(
                coordinator_pb2_grpc.CoordinatorStub(chan), self.config.rpc_timeout_s
            ),
            publish=self._publish,
            topics=topics,
            task_endpoints=self.config.task_endpoints,
            modules=modules,
            clock=self.clock,
            task_deadline_s=self.config.task_deadline_s,
            report_grace_s=self.config.report_grace_s,
            persisted=self.persisted,
            replica=self.config.replica if self.shared is not None else None,
            shared=self.shared,
        )
        stack.push_async_callback(self._manager.aclose)
        # A stable client id (per namespace; with TLS, the certificate's user name, a
        # replica's own: `service:manager-{replica_id}`): a restarted manager resumes its
        # persistent session and receives the results queued while it was down.
        client_id = f"propeller-manager-{topics.domain}-{topics.channel}"
        if self.shared is not None and self.config.replica_id:
            client_id += f"-{self.config.replica_id}"
        self._session = await stack.enter_async_context(
            MqttSession(
                self.config.mqtt,
                client_id,
                topics.reports,
                self._on_message,
            )
        )
        start_task(stack, self._send_acks(), "manager-acks")
        start_task(stack, self._reconcile(), "manager-reconcile")
        if self.shared is None:
            # Recovery: finish the fan-out of any experiment a crash left half-started. With
            # replicas the driver that takes an experiment's lease does it.
            start_task(stack, self._manager.run_fan_outs(), "manager-fan-outs")
        else:
            start_task(stack, self._refresh(), "manager-refresh")
        # Experiments of many rounds: each one's next round, by itself (also after a restart).
        self._loop = ExperimentLoop(self._manager)
        start_task(stack, self._loop.run(), "manager-experiments")


async def main() -> None:
    config = for_serve(ManagerConfig.from_env(), "Manager")
    await run_service(ManagerApp(config), config.addr, config.tls)
