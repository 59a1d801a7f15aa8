"""The CLI's RPC client: one small async method per RPC of the manager, coordinator, model
registry and data store (plus the stream helpers), shared by the client commands and the demo.

`async with Client(endpoints, timeout=30) as c: await c.list_models()`. Channels open lazily,
one per service; every RPC carries `timeout`. A list method follows the pages of its List RPC
and answers with every entry. A failed call leaves as one of our errors (through
`server.errors.rpc_errors`): a service that cannot be reached is `Unavailable` ("cannot reach
model registry at localhost:8084 (connection refused)"), one that does not answer in time is
`DeadlineExceeded`, and any status a server answered with is kept as it came (`RemoteError`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import re
import time
from collections.abc import AsyncGenerator, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from propeller.v1 import (
    coordinator_pb2,
    coordinator_pb2_grpc,
    datastore_pb2,
    datastore_pb2_grpc,
    manager_pb2,
    manager_pb2_grpc,
    model_registry_pb2,
    model_registry_pb2_grpc,
    tensor_pb2,
)
from server.cli.render import task_state
from server.config import INSECURE_ENV, TLS_DIR_ENV, Endpoints, TlsConfig
from server.errors import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    PropellerError,
    RemoteError,
    Unavailable,
    rpc_errors,
)
from server.grpc_server import channel
from server.models import MODEL_URI_PREFIX, model_uri, parse_model_uri
from server.paging import all_pages
from server.streams import model_stream, read_model_stream
from server.tensors import DEFAULT_CHUNK_SIZE, Array, Tensors, sha256_of, tensor_to_proto

R = TypeVar("R", bound=Message)

DEFAULT_TIMEOUT_S = 30.0
DEFAULT_WATCH_S = 3600.0
# The seed's ports on localhost: where the CLI looks when neither a flag nor the environment
# names a service.
CLI_ENDPOINTS = Endpoints.on("localhost")
FINAL_TASK_STATES = (
    manager_pb2.TASK_STATE_COMPLETED,
    manager_pb2.TASK_STATE_FAILED,
    manager_pb2.TASK_STATE_SKIPPED,
    manager_pb2.TASK_STATE_INTERRUPTED,
)
_STUBS: dict[str, Callable[[grpc.aio.Channel], Any]] = {
    "manager": manager_pb2_grpc.ManagerStub,
    "coordinator": coordinator_pb2_grpc.CoordinatorStub,
    "registry": model_registry_pb2_grpc.ModelRegistryStub,
    "datastore": datastore_pb2_grpc.DataStoreStub,
}


def add_tls_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--tls-dir and --insecure: how a client command proves who it is."""
    parser.add_argument(
        "--tls-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help=f"certificate bundle (ca.crt, tls.crt, tls.key) to call with (env {TLS_DIR_ENV})",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help=f"plaintext, no certificate (env {INSECURE_ENV}=1): only for insecure services",
    )


def tls_of(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> TlsConfig | None:
    """The flags win over the environment (`TlsConfig.from_env`); one of them must say."""
    if args.insecure:
        return None
    if args.tls_dir is not None:
        tls = TlsConfig.bundle(args.tls_dir)
        tls.check_readable()
        return tls
    try:
        return TlsConfig.from_env(os.environ if env is None else env)
    except ValueError as exc:
        raise ValueError(f"--tls-dir / {exc}") from None


def _connect_hint(details: str) -> str:
    low = details.lower()
    if "ssl" in low or "handshake" in low or "certificate" in low or "socket closed" in low:
        return " (TLS handshake failed: is --tls-dir a bundle of this deployment's CA?)"
    if "connection refused" in low:
        return " (connection refused)"
    if "resolv" in low or "dns" in low or "name not found" in low:
        return " (cannot resolve the host name)"
    if "timeout" in low or "timed out" in low:
        return " (connection timed out)"
    return ""


class Client:
    """Async client for the manager, coordinator, model registry and data store."""

    def __init__(
        self, endpoints: Endpoints, *, tls: TlsConfig | None, timeout: float = DEFAULT_TIMEOUT_S
    ) -> None:
        if not (timeout > 0 and math.isfinite(timeout)):
            raise ValueError(f"--timeout: {timeout} must be a positive number of seconds")
        self.endpoints = endpoints
        self.tls = tls
        self.timeout = timeout
        self._channels: dict[str, grpc.aio.Channel] = {}

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for ch in channels:
            await ch.close(None)

    def _stub(self, service: str) -> Any:
        ch = self._channels.get(service)
        if ch is None:
            ch = channel(getattr(self.endpoints, service), self.tls)
            self._channels[service] = ch
        return _STUBS[service](ch)

    def _rpc(
        self, service: str, deadline_note: str | None = None
    ) -> contextlib.AbstractContextManager[None]:
        """Calls to `service` inside fail as our errors (see the module docstring)."""

        def translate(err: grpc.aio.AioRpcError, _what: str) -> PropellerError:
            # A server that answered leaves the channel READY; one never reached does not.
            where = self.endpoints.label(service)
            ch = self._channels.get(service)
            state = ch.get_state(try_to_connect=False) if ch is not None else None
            code, details = err.code(), err.details() or ""
            if code == grpc.StatusCode.UNAVAILABLE and state != grpc.ChannelConnectivity.READY:
                return Unavailable(f"cannot reach {where}{_connect_hint(details)}")
            if code == grpc.StatusCode.DEADLINE_EXCEEDED and details == "Deadline Exceeded":
                return DeadlineExceeded(
                    deadline_note or f"{where} did not answer within {self.timeout:g}s"
                )
            return RemoteError(code, details)

        return rpc_errors(service, translate)

    async def _unary(self, service: str, method: str, request: Message, reply: type[R]) -> R:
        """`service.method(request)`, answered with a `reply`."""
        with self._rpc(service):
            response: R = await getattr(self._stub(service), method)(request, timeout=self.timeout)
        return response

    async def _watch(
        self, service: str, method: str, request: Message, max_wait: float, late: str
    ) -> AsyncGenerator[Any, None]:
        """`service.method(request)`'s stream as it comes, the whole of it bounded by
        `max_wait` (`late`: what running out of it says); the call is cancelled when the
        caller stops reading."""
        call = getattr(self._stub(service), method)(request, timeout=max_wait)
        try:
            with self._rpc(service, late):
                async for event in call:
                    yield event
        finally:
            call.cancel()

    async def _list(
        self, service: str, method: str, request: Message, reply: type[R], entries: str
    ) -> R:
        """Every page of a List RPC as one `reply` holding all the entries (its repeated
        field `entries`), so a list shows everything however many pages it takes."""

        async def page(request: Message) -> R:
            return await self._unary(service, method, request, reply)

        whole = reply()
        listed = getattr(whole, entries)
        async for entry in all_pages(page, request, lambda r: getattr(r, entries)):
            listed.append(entry)
        return whole

    # -------------------------------------------------------------------------- manager

    async def start_experiment(
        self, request: manager_pb2.StartExperimentRequest
    ) -> manager_pb2.StartExperimentResponse:
        return await self._unary(
            "manager", "StartExperiment", request, manager_pb2.StartExperimentResponse
        )

    async def get_experiment(self, experiment_id: str) -> manager_pb2.Experiment:
        request = manager_pb2.GetExperimentRequest(experiment_id=experiment_id)
        return await self._unary("manager", "GetExperiment", request, manager_pb2.Experiment)

    async def stop_experiment(self, experiment_id: str) -> manager_pb2.Experiment:
        request = manager_pb2.StopExperimentRequest(experiment_id=experiment_id)
        return await self._unary("manager", "StopExperiment", request, manager_pb2.Experiment)

    async def experiment_rounds(
        self, experiment_id: str
    ) -> manager_pb2.ListExperimentRoundsResponse:
        """Every round of the experiment (all pages)."""
        request = manager_pb2.ListExperimentRoundsRequest(experiment_id=experiment_id)
        return await self._list(
            "manager",
            "ListExperimentRounds",
            request,
            manager_pb2.ListExperimentRoundsResponse,
            "rounds",
        )

    def watch_experiment(
        self, experiment_id: str, max_wait: float = DEFAULT_WATCH_S, limit: str = "--max-wait"
    ) -> AsyncGenerator[manager_pb2.ExperimentEvent, None]:
        """The experiment's events as they happen (a snapshot first), until the manager ends
        the stream after the experiment ends; the whole watch bounded by `max_wait`."""
        request = manager_pb2.WatchExperimentRequest(experiment_id=experiment_id)
        late = f"experiment {experiment_id} did not end within {max_wait:g}s ({limit})"
        return self._watch("manager", "WatchExperiment", request, max_wait, late)

    async def list_experiments(self) -> manager_pb2.ListExperimentsResponse:
        request = manager_pb2.ListExperimentsRequest()
        return await self._list(
            "manager",
            "ListExperiments",
            request,
            manager_pb2.ListExperimentsResponse,
            "experiments",
        )

    async def round_status(self, round_id: str) -> coordinator_pb2.RoundStatus:
        """Through the manager, as the seed's user does."""
        request = coordinator_pb2.GetRoundStatusRequest(round_id=round_id)
        return await self._unary("manager", "GetRoundStatus", request, coordinator_pb2.RoundStatus)

    async def list_proplets(self) -> manager_pb2.ListPropletsResponse:
        request = manager_pb2.ListPropletsRequest()
        return await self._list(
            "manager", "ListProplets", request, manager_pb2.ListPropletsResponse, "proplets"
        )

    async def create_task(self, request: manager_pb2.CreateTaskRequest) -> manager_pb2.Task:
        return await self._unary("manager", "CreateTask", request, manager_pb2.Task)

    async def start_task(self, task_id: str) -> manager_pb2.Task:
        request = manager_pb2.TaskRef(task_id=task_id)
        return await self._unary("manager", "StartTask", request, manager_pb2.Task)

    async def stop_task(self, task_id: str) -> manager_pb2.Task:
        request = manager_pb2.TaskRef(task_id=task_id)
        return await self._unary("manager", "StopTask", request, manager_pb2.Task)

    async def get_task(self, task_id: str) -> manager_pb2.Task:
        request = manager_pb2.TaskRef(task_id=task_id)
        return await self._unary("manager", "GetTask", request, manager_pb2.Task)

    async def list_tasks(
        self, name_prefix: str = "", proplet_id: str = "", state: int = 0
    ) -> manager_pb2.ListTasksResponse:
        request = manager_pb2.ListTasksRequest(
            name_prefix=name_prefix,
            proplet_id=proplet_id,
            state=state,  # type: ignore[arg-type]  # validated by parse_task_state
        )
        return await self._list(
            "manager", "ListTasks", request, manager_pb2.ListTasksResponse, "tasks"
        )

    async def wait_task(
        self, task_id: str, max_wait: float, poll_s: float = 0.2
    ) -> manager_pb2.Task:
        """Poll the task until it is Completed, Failed, Skipped or Interrupted."""
        deadline = time.monotonic() + max_wait
        while True:
            task = await self.get_task(task_id)
            if task.state in FINAL_TASK_STATES:
                return task
            if time.monotonic() > deadline:
                raise DeadlineExceeded(
                    f"task {task_id} still {task_state(task.state)} after {max_wait:g}s "
                    "(--max-wait)"
                )
            await asyncio.sleep(poll_s)

    # ---------------------------------------------------------------------- coordinator

    async def configure_round(
        self, request: coordinator_pb2.ConfigureRoundRequest
    ) -> coordinator_pb2.RoundStatus:
        return await self._unary(
            "coordinator", "ConfigureRound", request, coordinator_pb2.RoundStatus
        )

    async def list_rounds(self, experiment_id: str = "") -> coordinator_pb2.ListRoundsResponse:
        request = coordinator_pb2.ListRoundsRequest(experiment_id=experiment_id)
        return await self._list(
            "coordinator", "ListRounds", request, coordinator_pb2.ListRoundsResponse, "rounds"
        )

    def watch_round(
        self, round_id: str, max_wait: float = DEFAULT_WATCH_S, limit: str = "--max-wait"
    ) -> AsyncGenerator[coordinator_pb2.RoundEvent, None]:
        """The round's events as they happen (a snapshot first), until the coordinator ends
        the stream after COMPLETED or FAILED. The whole watch is bounded by `max_wait` (the
        `limit` a timeout message names)."""
        request = coordinator_pb2.WatchRoundRequest(round_id=round_id)
        late = f"round {round_id} did not close within {max_wait:g}s ({limit})"
        return self._watch("coordinator", "WatchRound", request, max_wait, late)

    # ------------------------------------------------------------------- model registry

    async def list_models(self) -> model_registry_pb2.ListModelsResponse:
        request = model_registry_pb2.ListModelsRequest()
        return await self._list(
            "registry", "ListModels", request, model_registry_pb2.ListModelsResponse, "models"
        )

    async def init_model(self, dimension: int, dtype: int = 0) -> model_registry_pb2.ModelVersion:
        request = model_registry_pb2.InitModelRequest(
            dimension=dimension,
            dtype=dtype,  # type: ignore[arg-type]  # a DType value
        )
        return await self._unary("registry", "InitModel", request, model_registry_pb2.ModelVersion)

    async def resolve_model_ref(self, ref: str) -> model_registry_pb2.GetModelRequest:
        """`3`, `v3`, `fl/models/global_model_v3` or `latest` -> a GetModelRequest."""
        text = ref.strip()
        if text == "latest":
            models = (await self.list_models()).models
            if not models:
                raise NotFound("the model registry holds no models yet (models init)")
            return model_registry_pb2.GetModelRequest(version=models[-1].version)
        m = re.fullmatch(r"v?(\d{1,18})", text)
        if m is not None:
            return model_registry_pb2.GetModelRequest(version=int(m.group(1)))
        if text.startswith(MODEL_URI_PREFIX):
            parse_model_uri(text, "VERSION_OR_URI")
            return model_registry_pb2.GetModelRequest(model_uri=text)
        raise InvalidArgument(
            f"VERSION_OR_URI: {ref!r} is not a version (3, v3, latest) or a model reference "
            f"like '{model_uri(0)}'"
        )

    async def get_model(self, ref: str | int) -> tuple[tensor_pb2.ModelHeader, Tensors]:
        """Stream one version (a number, or any reference `resolve_model_ref` takes) and
        check it against its header's sha256."""
        if isinstance(ref, int):
            request = model_registry_pb2.GetModelRequest(version=ref)
        else:
            request = await self.resolve_model_ref(ref)
        with self._rpc("registry"):
            header, tensors = await read_model_stream(
                self._stub("registry").GetModel(request, timeout=self.timeout)
            )
        if header.sha256 and sha256_of(tensors) != header.sha256:
            raise Unavailable(
                f"model {header.model_uri}: received bytes do not match sha256 {header.sha256}"
            )
        return header, tensors

    async def model_info(self, version: int) -> model_registry_pb2.ModelVersion:
        request = model_registry_pb2.GetModelRequest(version=version)
        return await self._unary(
            "registry", "GetModelInfo", request, model_registry_pb2.ModelVersion
        )

    async def lineage(self, version: int) -> AsyncGenerator[model_registry_pb2.LineageChunk, None]:
        """A version's lineage stream (GetLineage): its header, then its updates' bytes."""
        request = model_registry_pb2.GetModelRequest(version=version)
        with self._rpc("registry"):
            async for chunk in self._stub("registry").GetLineage(request, timeout=self.timeout):
                yield chunk

    async def put_model(
        self, tensors: Mapping[str, Array], version: int | None = None
    ) -> model_registry_pb2.ModelVersion:
        with self._rpc("registry"):
            response: model_registry_pb2.ModelVersion = await self._stub("registry").PutModel(
                model_stream(tensors, DEFAULT_CHUNK_SIZE, version=version), timeout=self.timeout
            )
        return response

    # ----------------------------------------------------------------------- data store

    async def list_datasets(self) -> datastore_pb2.ListDatasetsResponse:
        request = datastore_pb2.ListDatasetsRequest()
        return await self._list(
            "datastore", "ListDatasets", request, datastore_pb2.ListDatasetsResponse, "datasets"
        )

    async def get_dataset(self, proplet_id: str) -> datastore_pb2.Dataset:
        request = datastore_pb2.GetDatasetRequest(proplet_id=proplet_id)
        return await self._unary("datastore", "GetDataset", request, datastore_pb2.Dataset)

    async def put_dataset(
        self,
        proplet_id: str,
        features: Array,
        labels: Array,
        schema: str = "",
        num_classes: int = 0,
    ) -> datastore_pb2.DatasetInfo:
        dataset = datastore_pb2.Dataset(
            proplet_id=proplet_id,
            schema=schema,
            features=tensor_to_proto(features),
            labels=tensor_to_proto(labels),
            num_classes=num_classes,
        )
        request = datastore_pb2.PutDatasetRequest(dataset=dataset)
        return await self._unary("datastore", "PutDataset", request, datastore_pb2.DatasetInfo)
