"""gRPC clients of the services for tests: one channel per service, a stub for each, and the
calls tests make through them (models, rounds, experiments, tasks, proplets). Every call is
bounded by a timeout; every wait is `eventually`.

The channels carry the suite's operator certificate (`tests.support.security`) unless
`insecure`; an update is submitted with the certificate of the proplet it is from, over a
channel of that proplet's own, as a real proplet would: carrying a module digest
(`TEST_MODULE` unless the update names one) and the base model's sha256, and signed with that
proplet's key (`signed_meta`)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import grpc

from propeller.v1 import (
    aggregator_pb2_grpc,
    coordinator_pb2,
    coordinator_pb2_grpc,
    datastore_pb2_grpc,
    manager_pb2,
    manager_pb2_grpc,
    model_registry_pb2,
    model_registry_pb2_grpc,
)
from server.config import Endpoints, TlsConfig
from server.coordinator.rounds import Update
from server.errors import PropellerError
from server.grpc_server import channel, channel_credentials
from server.models import model_uri
from server.paging import all_pages
from server.pki import Identity, Kind, load_private_key
from server.provenance import Claim, module_digest, sign
from server.streams import UpdateMeta, read_model_stream, update_stream
from server.tensors import GRPC_OPTIONS, Tensors, sha256_of
from tests.support.security import operator_tls, proplet_tls
from tests.support.waits import eventually

T = TypeVar("T")
V0 = model_uri(0)
HYPER = coordinator_pb2.Hyperparams(epochs=1, lr=0.01, batch_size=16)
CLOSED = (coordinator_pb2.ROUND_STATE_COMPLETED, coordinator_pb2.ROUND_STATE_FAILED)
FINISHED = (manager_pb2.TASK_STATE_COMPLETED, manager_pb2.TASK_STATE_FAILED)
RPC_S = 10.0
# The proplet that sends an update whose proplet id no certificate can carry.
SENDER = "test-sender"
# Uploads and StartExperiment (which waits for the broker to publish the tasks) get longer.
LONG_RPC_S = 60.0
# The module digest test updates claim unless they name one (a round pins none unless a test
# configures one).
TEST_MODULE = module_digest(b"propeller-fl test module")

# gRPC service name -> (the Endpoints field with its address, its stub).
SERVICES: dict[str, tuple[str, Callable[[grpc.aio.Channel], Any]]] = {
    "Manager": ("manager", manager_pb2_grpc.ManagerStub),
    "Coordinator": ("coordinator", coordinator_pb2_grpc.CoordinatorStub),
    "Aggregator": ("aggregator", aggregator_pb2_grpc.AggregatorStub),
    "ModelRegistry": ("registry", model_registry_pb2_grpc.ModelRegistryStub),
    "DataStore": ("datastore", datastore_pb2_grpc.DataStoreStub),
}


def experiment_request(
    round_id: str,
    participants: Sequence[str],
    image: str,
    *,
    k_of_n: int = 0,
    timeout_s: float = 60.0,
    model_ref: str = V0,
    experiment_id: str = "",
    hyperparams: coordinator_pb2.Hyperparams = HYPER,
    min_k_of_n: int = 0,
) -> manager_pb2.StartExperimentRequest:
    return manager_pb2.StartExperimentRequest(
        experiment_id=experiment_id,
        round_id=round_id,
        model_ref=model_ref,
        participants=participants,
        hyperparams=hyperparams,
        k_of_n=k_of_n,
        timeout_s=timeout_s,
        task_wasm_image=image,
        min_k_of_n=min_k_of_n,
    )


def sync_channel(
    addr: str, tls: TlsConfig | None, options: Sequence[tuple[str, int]] = GRPC_OPTIONS
) -> grpc.Channel:
    """A blocking (not grpc.aio) channel without the 4 MB ceiling, with `tls` (None:
    plaintext): for uploads a server refuses before they end, whose status grpc.aio clients
    may report as "INTERNAL: Internal error from Core" instead (grpc/grpc#36066)."""
    if tls is None:
        return grpc.insecure_channel(addr, options=list(options))
    return grpc.secure_channel(addr, channel_credentials(tls), options=list(options))


async def header_and_data(chunks: AsyncIterable[Any]) -> tuple[Any, bytes]:
    """A chunk stream as it came: its header and its data chunks joined (the stream's bytes
    exactly, not decoded)."""
    header: Any = None
    data = b""
    async for chunk in chunks:
        if chunk.WhichOneof("part") == "header":
            header = chunk.header
        else:
            data += chunk.data
    assert header is not None
    return header, data


async def every(method: Any, request: Any, entries: Callable[[Any], Iterable[T]]) -> list[T]:
    """Every entry of a List RPC (`method`, a stub's), following its pages."""
    return [e async for e in all_pages(lambda r: method(r, timeout=RPC_S), request, entries)]


@dataclass
class Clients:
    """Channels by gRPC service name ("Manager", "ModelRegistry", ...) and a stub for each
    (the generated stubs are untyped, hence Any); a service without a channel has no stub."""

    channels: dict[str, grpc.aio.Channel]
    # Where the coordinator is, and the operator's TLS (None: plaintext): a submitted update
    # goes over a channel with its proplet's own certificate.
    coordinator_addr: str = field(default="", kw_only=True)
    tls: TlsConfig | None = field(default=None, kw_only=True)
    as_proplet: dict[str, grpc.aio.Channel] = field(default_factory=dict, kw_only=True)
    manager: Any = field(init=False, repr=False)
    coordinator: Any = field(init=False, repr=False)
    aggregator: Any = field(init=False, repr=False)
    registry: Any = field(init=False, repr=False)
    datastore: Any = field(init=False, repr=False)

    def __post_init__(self) -> None:
        for service, (name, stub) in SERVICES.items():
            if service in self.channels:
                setattr(self, name, stub(self.channels[service]))

    # -- models (ModelRegistry) -------------------------------------------------------------

    async def init_model(self, dimension: int = 3) -> model_registry_pb2.ModelVersion:
        version: model_registry_pb2.ModelVersion = await self.registry.InitModel(
            model_registry_pb2.InitModelRequest(dimension=dimension), timeout=LONG_RPC_S
        )
        return version

    async def models(self) -> list[model_registry_pb2.ModelVersion]:
        """Every version (all pages)."""
        return await every(
            self.registry.ListModels, model_registry_pb2.ListModelsRequest(), lambda r: r.models
        )

    async def versions(self) -> list[int]:
        return [m.version for m in await self.models()]

    async def model(self, version: int) -> Tensors:
        call = self.registry.GetModel(
            model_registry_pb2.GetModelRequest(version=version), timeout=LONG_RPC_S
        )
        _header, tensors = await read_model_stream(call)
        return tensors

    async def lineage(self, version: int) -> model_registry_pb2.Lineage:
        """The version's lineage as the registry keeps it (its header; no tensors)."""
        async for chunk in self.registry.GetLineage(
            model_registry_pb2.GetModelRequest(version=version), timeout=LONG_RPC_S
        ):
            if chunk.HasField("header"):
                header: model_registry_pb2.Lineage = chunk.header
                return header
        raise AssertionError(f"no lineage header for v{version}")

    # -- rounds (Coordinator; the manager passes GetRoundStatus through) --------------------

    async def configure(self, round_id: str = "r1", **fields: Any) -> coordinator_pb2.RoundStatus:
        """ConfigureRound: participants a, b, c from v0, started, unless `fields` say else."""
        request: dict[str, Any] = {
            "round_id": round_id,
            "participants": ["a", "b", "c"],
            "model_ref": V0,
            "start": True,
            **fields,
        }
        status: coordinator_pb2.RoundStatus = await self.coordinator.ConfigureRound(
            coordinator_pb2.ConfigureRoundRequest(**request), timeout=RPC_S
        )
        return status

    async def submit(
        self, round_id: str, update: Update, chunk_size: int = 0
    ) -> coordinator_pb2.SubmitUpdateResponse:
        """SubmitUpdate of `update` as its proplet would send it (`signed_meta`)."""
        meta = await self.signed_meta(round_id, update)
        resp: coordinator_pb2.SubmitUpdateResponse = await self.coordinator_as(
            update.proplet_id
        ).SubmitUpdate(update_stream(meta, update.tensors, chunk_size), timeout=LONG_RPC_S)
        return resp

    async def base_sha256(self, round_id: str, base_model_uri: str) -> str:
        """The sha256 of the base model an update names: from the registry, else from the
        round's status, else "" (a test of an unknown round or model)."""
        calls: list[Any] = []
        if "ModelRegistry" in self.channels:
            request = model_registry_pb2.GetModelRequest(model_uri=base_model_uri)
            calls.append(lambda: self.registry.GetModelInfo(request, timeout=RPC_S))
        if "Coordinator" in self.channels:
            status = coordinator_pb2.GetRoundStatusRequest(round_id=round_id)
            calls.append(lambda: self.coordinator.GetRoundStatus(status, timeout=RPC_S))
        for call in calls:
            try:
                answer = await call()
            except grpc.aio.AioRpcError:
                continue
            return str(getattr(answer, "sha256", "") or getattr(answer, "base_model_sha256", ""))
        return ""

    async def signed_meta(
        self, round_id: str, update: Update, *, key_of: str | None = None
    ) -> UpdateMeta:
        """`update`'s header as a proplet sends it: its module digest (TEST_MODULE unless it
        names one), the base model's sha256, and, with TLS, the signature by the key of
        proplet `key_of` (default: its own) over its tensors as given (tests send them in the
        base model's order)."""
        base_sha = update.base_model_sha256 or await self.base_sha256(
            round_id, update.base_model_uri
        )
        meta = UpdateMeta(
            round_id,
            update.proplet_id,
            update.base_model_uri,
            update.num_samples,
            dict(update.metrics),
            base_model_sha256=base_sha,
            module_digest=update.module_digest or TEST_MODULE,
            contributors=update.contributors,
            fuel_consumed=update.fuel_consumed,
        )
        if self.tls is None:
            return meta
        signer = key_of or update.proplet_id
        try:
            Identity(Kind.PROPLET, signer)
        except ValueError:
            signer = SENDER
        key = load_private_key(proplet_tls(signer).key)
        claim = Claim.of(
            meta,
            round_id=round_id,
            base_model_sha256=base_sha,
            update_sha256=sha256_of(update.tensors),
        )
        try:
            signature = sign(key, claim)
        except PropellerError:  # a claim that cannot be encoded (a test of bad headers)
            signature = b""
        return dataclasses.replace(meta, signature=signature)

    def connection(self) -> dict[str, Any]:
        """The keyword arguments that give a subclass made from these clients' `channels`
        the same way of calling as a proplet."""
        return {
            "coordinator_addr": self.coordinator_addr,
            "tls": self.tls,
            "as_proplet": self.as_proplet,
        }

    def coordinator_as(self, proplet_id: str) -> Any:
        """A Coordinator stub calling as proplet `proplet_id` (its own certificate); the
        operator's stub on plaintext. An id no certificate can carry (empty, say: a test of
        the coordinator's own checks) is sent by a proplet named SENDER."""
        if self.tls is None:
            return self.coordinator
        ch = self.as_proplet.get(proplet_id)
        if ch is None:
            assert self.coordinator_addr, "no coordinator address to call as a proplet"
            try:
                sender = Identity(Kind.PROPLET, proplet_id).name
            except ValueError:
                sender = SENDER
            ch = self.as_proplet[proplet_id] = channel(self.coordinator_addr, proplet_tls(sender))
        return coordinator_pb2_grpc.CoordinatorStub(ch)

    async def close_proplet_channels(self) -> None:
        channels, self.as_proplet = list(self.as_proplet.values()), {}
        for ch in channels:
            await ch.close(None)

    async def status(
        self, round_id: str = "r1", via: Literal["coordinator", "manager"] = "coordinator"
    ) -> coordinator_pb2.RoundStatus:
        stub = self.coordinator if via == "coordinator" else self.manager
        status: coordinator_pb2.RoundStatus = await stub.GetRoundStatus(
            coordinator_pb2.GetRoundStatusRequest(round_id=round_id), timeout=RPC_S
        )
        return status

    async def wait_state(
        self,
        round_id: str,
        *states: int,
        timeout: float = 30.0,
        via: Literal["coordinator", "manager"] = "coordinator",
    ) -> coordinator_pb2.RoundStatus:
        """The round's status once it is in one of `states` (any closed state by default)."""
        wanted = states or CLOSED
        return await eventually(
            lambda: self.status(round_id, via),
            lambda s: s.state in wanted,
            timeout=timeout,
            what=f"round {round_id} in {wanted}",
        )

    # -- experiments, tasks, proplets (Manager) ---------------------------------------------

    async def start_experiment(
        self, round_id: str, participants: Sequence[str], image: str, **fields: Any
    ) -> manager_pb2.StartExperimentResponse:
        """StartExperiment of `experiment_request(round_id, participants, image, **fields)`."""
        resp: manager_pb2.StartExperimentResponse = await self.manager.StartExperiment(
            experiment_request(round_id, participants, image, **fields), timeout=LONG_RPC_S
        )
        return resp

    async def experiment_ended(
        self, experiment_id: str, timeout: float = 120.0
    ) -> manager_pb2.Experiment:
        """The experiment once it is no longer RUNNING (waiting at most `timeout` s)."""

        async def get() -> manager_pb2.Experiment:
            e: manager_pb2.Experiment = await self.manager.GetExperiment(
                manager_pb2.GetExperimentRequest(experiment_id=experiment_id), timeout=RPC_S
            )
            return e

        return await eventually(
            get,
            lambda e: e.state != manager_pb2.EXPERIMENT_STATE_RUNNING,
            timeout=timeout,
            what=f"experiment {experiment_id} ended",
        )

    async def round_tasks(self, round_id: str) -> list[manager_pb2.Task]:
        request = manager_pb2.ListTasksRequest(name_prefix=f"fl-round-{round_id}")
        return await every(self.manager.ListTasks, request, lambda r: r.tasks)

    async def task(self, task_id: str) -> manager_pb2.Task:
        task: manager_pb2.Task = await self.manager.GetTask(
            manager_pb2.TaskRef(task_id=task_id), timeout=RPC_S
        )
        return task

    async def run_task(self, request: manager_pb2.CreateTaskRequest) -> manager_pb2.Task:
        """CreateTask, then StartTask; the task as StartTask answered."""
        task = await self.manager.CreateTask(request, timeout=RPC_S)
        started: manager_pb2.Task = await self.manager.StartTask(
            manager_pb2.TaskRef(task_id=task.id), timeout=RPC_S
        )
        return started

    async def finished(self, task_id: str, timeout: float = 60.0) -> manager_pb2.Task:
        """The task once it is Completed or Failed."""
        return await eventually(
            lambda: self.task(task_id),
            lambda t: t.state in FINISHED,
            timeout=timeout,
            what=f"task {task_id} finished",
        )

    async def proplets(self) -> list[manager_pb2.Proplet]:
        """Every proplet the manager knows (all pages)."""
        return await every(
            self.manager.ListProplets, manager_pb2.ListPropletsRequest(), lambda r: r.proplets
        )

    async def alive(self) -> set[str]:
        return {p.id for p in await self.proplets() if p.alive}

    async def wait_alive(self, ids: Sequence[str], timeout: float = 60.0) -> set[str]:
        """Until exactly `ids` are listed alive."""
        return await eventually(
            self.alive, lambda a: a == set(ids), timeout=timeout, what=f"{list(ids)} alive"
        )


@contextlib.asynccontextmanager
async def clients(
    addresses: Endpoints | Mapping[str, str],
    *,
    tls: TlsConfig | None = None,
    insecure: bool = False,
) -> AsyncIterator[Clients]:
    """Clients with a channel to each service `addresses` names (an Endpoints names all five;
    a mapping like {"coordinator": addr} only those), as the suite's operator (or with `tls`;
    `insecure`: plaintext)."""
    named = dataclasses.asdict(addresses) if isinstance(addresses, Endpoints) else addresses
    creds = None if insecure else tls or operator_tls()
    async with contextlib.AsyncExitStack() as stack:
        channels = {
            service: await stack.enter_async_context(channel(named[field], creds))
            for service, (field, _) in SERVICES.items()
            if named.get(field)
        }
        made = Clients(channels, coordinator_addr=named.get("coordinator", ""), tls=creds)
        stack.push_async_callback(made.close_proplet_channels)
        yield made
