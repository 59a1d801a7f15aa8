"""The whole system in one process: the one stack runner behind `propeller-fl demo`,
`propeller-fl up`, the benchmarks and the test suite's end-to-end runs (compose runs the same
apps one per process).

`Stack` starts, in dependency order and stopping in reverse:
- an embedded MQTT broker when asked for (`broker_port`), else the broker `mqtt` names;
- the five services, each on its own gRPC server (registry, data store, aggregator ->
  coordinator -> manager);
- N proplets (`proplet_ids`) sharing one wasmtime engine, pointed at those services; the stack
  is up once the manager lists every one of them as alive.

With a deployment CA (`ca_dir`, created there when empty) every service, every proplet and
the stack's own operator (`OPERATOR`, whose bundle `operator_tls` names: what `up` prints for
grpcurl) get a bundle of their own in it, and every gRPC hop is mutual TLS; `ca_dir=None` is
plaintext everywhere.
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
from server.config import ENDPOINTS, Endpoints, MqttConfig, TlsConfig
from server.coordinator.app import CoordinatorApp, CoordinatorConfig
from server.coordinator.bounds import DEFAULT_MAX_DISTANCE
from server.datastore.app import DataStoreApp, DataStoreConfig
from server.embedded_broker import EmbeddedBroker
from server.errors import Unavailable, rpc_errors
from server.grpc_server import channel, serving
from server.lifecycle import Lifecycle, ServiceApp
from server.manager.app import ManagerApp, ManagerConfig
from server.paging import all_pages
from server.pki import CertificateAuthority, Identity, Kind
from server.registry.app import RegistryApp, RegistryConfig

log = logging.getLogger(__name__)

# How long the proplets have to announce themselves before the stack gives up.
READY_TIMEOUT_S = 20.0
# The operator identity of the stack itself (its readiness check) and of its user.
OPERATOR = Identity(Kind.OPERATOR, "admin")


def service_tls(
    ca: CertificateAuthority | None, name: str, hosts: Sequence[str] = ()
) -> TlsConfig | None:
    """A bundle (reused or issued, see `CertificateAuthority.ensure`) for service `name`
    reachable at `hosts`, with the CA's revocation list; None without a CA."""
    return _tls(ca, Identity(Kind.SERVICE, name), hosts)


def identity_tls(ca: CertificateAuthority | None, identity: Identity) -> TlsConfig | None:
    """The same for an operator or a proplet."""
    return _tls(ca, identity, ())


def _tls(
    ca: CertificateAuthority | None, identity: Identity, hosts: Sequence[str]
) -> TlsConfig | None:
    if ca is None:
        return None
    bundle = ca.ensure(identity, hosts=[h for h in hosts if h not in ("0.0.0.0", "::")])
    return TlsConfig.bundle(bundle.dir, crl=ca.crl_path)


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
    # Where the manager resolves round modules (ManagerConfig.oci_registry / oci_insecure).
    oci_registry: str = ""
    oci_insecure: bool | None = None
    # The coordinator's num_samples cap (CoordinatorConfig.num_samples_cap).
    num_samples_cap: str = "dataset"
    # The coordinator's distance bound (CoordinatorConfig.max_update_distance, 0 = none) and
    # what it does beyond it ("reject" or "clip").
    max_update_distance: float = DEFAULT_MAX_DISTANCE
    update_distance_action: str = "reject"
    # The deployment CA (a directory; one is created there when it holds none) the stack
    # issues every bundle from; None: plaintext on every hop.
    ca_dir: Path | None = field(kw_only=True)


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
        self.ca: CertificateAuthority | None = None
        # The stack's operator credentials (None: plaintext).
        self.operator_tls: TlsConfig | None = None

    def _addr(self, port: int) -> str:
        return f"{self.config.host}:{port}"

    async def _serve(
        self, stack: contextlib.AsyncExitStack, app: ServiceApp, port: int, tls: TlsConfig | None
    ) -> str:
        """Start `app` and its gRPC server; the address it listens on."""
        await stack.enter_async_context(app)
        bound = await stack.enter_async_context(serving(self._addr(port), app.bindings, tls))
        return self._addr(bound)

    async def _credentials(self) -> dict[str, TlsConfig | None]:
        """Each service's TLS (and the operator's), from the CA in `ca_dir`."""
        cfg = self.config
        if cfg.ca_dir is None:
            return dict.fromkeys((*ENDPOINTS, "operator", "mqtt"))
        ca_dir = cfg.ca_dir

        def issue() -> dict[str, TlsConfig | None]:
            self.ca = CertificateAuthority.open_or_create(ca_dir)
            tls = {name: service_tls(self.ca, name, [cfg.host]) for name in ENDPOINTS}
            # The embedded broker's own certificate, for the host the clients reach it at.
            tls["mqtt"] = service_tls(self.ca, "mqtt", [cfg.host])
            return {**tls, "operator": identity_tls(self.ca, OPERATOR)}

        return await asyncio.to_thread(issue)

    async def _open(self, stack: contextlib.AsyncExitStack) -> None:
        cfg = self.config
        tls = await self._credentials()
        self.operator_tls = tls["operator"]
        if cfg.broker_port is not None:
            self.broker = await stack.enter_async_context(
                EmbeddedBroker(cfg.host, cfg.broker_port, tls=tls["mqtt"])
            )
            self.mqtt = self.broker.mqtt_config(cfg.mqtt.topics)
        self.registry = RegistryApp(
            RegistryConfig(
                self._addr(cfg.registry_port), state_dir=cfg.state_dir, tls=tls["registry"]
            )
        )
        registry = await self._serve(stack, self.registry, cfg.registry_port, tls["registry"])
        self.datastore = DataStoreApp(
            DataStoreConfig(
                self._addr(cfg.datastore_port),
                seed_proplet_ids=cfg.seed_proplet_ids,
                num_samples=cfg.num_samples,
                num_features=cfg.num_features,
                state_dir=cfg.state_dir,
                tls=tls["datastore"],
            )
        )
        datastore = await self._serve(stack, self.datastore, cfg.datastore_port, tls["datastore"])
        aggregator = await self._serve(
            stack,
            AggregatorApp(AggregatorConfig(self._addr(cfg.aggregator_port), tls=tls["aggregator"])),
            cfg.aggregator_port,
            tls["aggregator"],
        )
        self.coordinator = CoordinatorApp(
            CoordinatorConfig(
                addr=self._addr(cfg.coordinator_port),
                aggregator_addr=aggregator,
                registry_addr=registry,
                datastore_addr=datastore,
                num_samples_cap=cfg.num_samples_cap,
                max_update_distance=cfg.max_update_distance,
                update_distance_action=cfg.update_distance_action,
                mqtt=self.mqtt.as_identity(tls["coordinator"]),
                tick_s=cfg.coordinator_tick_s,
                state_dir=cfg.state_dir,
                tls=tls["coordinator"],
            )
        )
        coordinator = await self._serve(
            stack, self.coordinator, cfg.coordinator_port, tls["coordinator"]
        )
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
                mqtt=self.mqtt.as_identity(tls["manager"]),
                alive_window_s=cfg.alive_window_s,
                task_endpoints=services,
                state_dir=cfg.state_dir,
                oci_registry=cfg.oci_registry,
                oci_insecure=cfg.oci_insecure,
                tls=tls["manager"],
            )
        )
        manager = await self._serve(stack, self.manager, cfg.manager_port, tls["manager"])
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
                    ca=self.ca,
                    task_timeout_s=cfg.proplet_task_timeout_s,
                )
            )
            await wait_alive(self.endpoints.manager, cfg.proplet_ids, self.operator_tls)


@contextlib.asynccontextmanager
async def proplets(
    endpoints: Endpoints,
    mqtt: MqttConfig,
    ids: Sequence[str],
    work_dir: Path,
    *,
    ca: CertificateAuthority | None,
    task_timeout_s: float = 300.0,
    heartbeat_s: float = 10.0,
) -> AsyncIterator[list[Proplet]]:
    """Proplets `proplet-1..N` in this process, one wasmtime engine and module cache for all,
    pointed at `endpoints`, each with a bundle of its own from `ca` (None: plaintext); stopped
    (their tasks Interrupted) on exit."""
    runtime = WasmRuntime.shared()
    tls = await asyncio.to_thread(
        lambda: [identity_tls(ca, Identity(Kind.PROPLET, pid)) for pid in ids]
    )
    async with contextlib.AsyncExitStack() as stack:
        started = []
        for i, pid in enumerate(ids):
            config = PropletConfig(
                proplet_id=pid,
                name=f"proplet-{i + 1}",
                mqtt=mqtt.as_identity(tls[i]),
                endpoints=endpoints,
                heartbeat_s=heartbeat_s,
                work_dir=work_dir / "proplets",
                task_timeout_s=task_timeout_s,
                tls=tls[i],
            )
            started.append(await stack.enter_async_context(Proplet(config, runtime=runtime)))
        yield started


async def wait_alive(manager: str, ids: Sequence[str], tls: TlsConfig | None) -> None:
    """Until the manager at `manager` lists every proplet in `ids` as alive (they announce
    over MQTT); Unavailable naming the missing ones after READY_TIMEOUT_S."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + READY_TIMEOUT_S
    want = set(ids)
    alive: set[str] = set()
    async with channel(manager, tls) as ch:
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
