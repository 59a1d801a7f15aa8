"""Client commands of `propeller-fl` (`propeller-fl GROUP ACTION`), usable against any
deployment: experiments, rounds, models, datasets, proplets, tasks, and pushing WASM modules.

Layers, so the demo and tests can reuse the calls without the printing:
- `Addresses` + `Client`: one small async method per RPC (plus stream helpers), errors turned
  into one clear line (`cannot reach model registry at localhost:8084`).
- file helpers: models as .json / .npz, datasets as .csv / .npy, with errors naming the problem.
- `push_wasm`: a module to an OCI registry with oras (media type application/wasm).
- `cmd_*` functions: parse args, call, render (tables for people, `--json` for programs).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import hashlib
import io
import json
import math
import os
import re
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

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
from server.cli.main import set_command
from server.cli.render import (
    Output,
    ago,
    fields,
    message_dict,
    short_name,
    table,
    timestamp,
)
from server.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from server.grpc_server import channel
from server.models import MODEL_URI_PREFIX, model_uri, parse_model_uri
from server.oci import ImageRef, is_loopback
from server.streams import model_stream, read_model_stream
from server.tensors import (
    DEFAULT_CHUNK_SIZE,
    Array,
    Tensors,
    model_to_json,
    sha256_of,
    tensor_from_proto,
    tensor_to_proto,
)

DEFAULT_TIMEOUT_S = 30.0
DEFAULT_WATCH_S = 3600.0
WASM_MEDIA_TYPE = "application/wasm"
WASM_MAGIC = b"\0asm"
FINAL_ROUND_STATES = (coordinator_pb2.ROUND_STATE_COMPLETED, coordinator_pb2.ROUND_STATE_FAILED)
FINAL_EVENTS = (
    coordinator_pb2.ROUND_EVENT_TYPE_COMPLETED,
    coordinator_pb2.ROUND_EVENT_TYPE_FAILED,
)
FINAL_TASK_STATES = (
    manager_pb2.TASK_STATE_COMPLETED,
    manager_pb2.TASK_STATE_FAILED,
    manager_pb2.TASK_STATE_SKIPPED,
    manager_pb2.TASK_STATE_INTERRUPTED,
)


class FileProblem(ValueError):
    """A local input file that cannot be used; the message names the file and the problem."""


# ---------------------------------------------------------------------------------- addresses


@dataclass(frozen=True)
class Addresses:
    """gRPC targets (host:port) of the services the client talks to."""

    manager: str = "localhost:7070"
    coordinator: str = "localhost:8086"
    registry: str = "localhost:8084"
    datastore: str = "localhost:8083"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Addresses:
        env = os.environ if env is None else env
        d = cls()
        return cls(
            manager=env.get("MANAGER_ADDR") or d.manager,
            coordinator=env.get("COORDINATOR_ADDR") or d.coordinator,
            registry=env.get("MODEL_REGISTRY_ADDR") or d.registry,
            datastore=env.get("DATA_STORE_ADDR") or d.datastore,
        )


# service key -> (flag / attribute, env variable, what to call it in messages)
SERVICES: dict[str, tuple[str, str]] = {
    "manager": ("MANAGER_ADDR", "manager"),
    "coordinator": ("COORDINATOR_ADDR", "coordinator"),
    "registry": ("MODEL_REGISTRY_ADDR", "model registry"),
    "datastore": ("DATA_STORE_ADDR", "data store"),
}


def _connect_hint(details: str) -> str:
    low = details.lower()
    if "connection refused" in low:
        return " (connection refused)"
    if "resolv" in low or "dns" in low or "name not found" in low:
        return " (cannot resolve the host name)"
    if "timeout" in low or "timed out" in low:
        return " (connection timed out)"
    return ""


# ------------------------------------------------------------------------------------- client


@dataclass(frozen=True)
class PushResult:
    image: str
    digest: str
    size: int
    media_type: str
    manifest_digest: str

    @property
    def pinned(self) -> str:
        """The image pinned to the pushed manifest: `host/repo@sha256:...`."""
        if not self.manifest_digest:
            return ""
        return f"{self.image.rsplit(':', 1)[0]}@{self.manifest_digest}"

    def to_dict(self) -> dict[str, object]:
        return {
            "image": self.image,
            "digest": self.digest,
            "size": self.size,
            "media_type": self.media_type,
            "manifest_digest": self.manifest_digest,
            "pinned": self.pinned,
        }


class Client:
    """Async client for the manager, coordinator, model registry and data store.

    `async with Client(Addresses(...), timeout=30) as c: await c.list_models()`. Channels open
    lazily, one per service. Every RPC carries `timeout`. A failed call raises either our
    `PropellerError` (unreachable service, client-side deadline) or the server's
    `grpc.aio.AioRpcError` (CODE: details).
    """

    def __init__(self, addresses: Addresses, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        if not (timeout > 0 and math.isfinite(timeout)):
            raise ValueError(f"--timeout: {timeout} must be a positive number of seconds")
        self.addresses = addresses
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

    def _channel(self, service: str) -> grpc.aio.Channel:
        ch = self._channels.get(service)
        if ch is None:
            ch = channel(getattr(self.addresses, service))
            self._channels[service] = ch
        return ch

    @property
    def manager(self) -> Any:
        return manager_pb2_grpc.ManagerStub(self._channel("manager"))

    @property
    def coordinator(self) -> Any:
        return coordinator_pb2_grpc.CoordinatorStub(self._channel("coordinator"))

    @property
    def registry(self) -> Any:
        return model_registry_pb2_grpc.ModelRegistryStub(self._channel("registry"))

    @property
    def datastore(self) -> Any:
        return datastore_pb2_grpc.DataStoreStub(self._channel("datastore"))

    def translate(
        self, err: grpc.aio.AioRpcError, service: str, deadline_note: str | None = None
    ) -> Exception:
        """Our one-line error for failures of the connection itself; the server's status
        otherwise. A server that answered leaves the channel READY; one never reached does not."""
        label = SERVICES[service][1]
        addr = getattr(self.addresses, service)
        code = err.code()
        ch = self._channels.get(service)
        state = ch.get_state(try_to_connect=False) if ch is not None else None
        if code == grpc.StatusCode.UNAVAILABLE and state != grpc.ChannelConnectivity.READY:
            return Unavailable(
                f"cannot reach {label} at {addr}{_connect_hint(err.details() or '')}"
            )
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and err.details() == "Deadline Exceeded":
            return DeadlineExceeded(
                deadline_note or f"{label} at {addr} did not answer within {self.timeout:g}s"
            )
        return err

    @contextlib.asynccontextmanager
    async def _rpc(self, service: str, deadline_note: str | None = None) -> AsyncIterator[None]:
        try:
            yield
        except grpc.aio.AioRpcError as err:
            raise self.translate(err, service, deadline_note) from None

    # -------------------------------------------------------------------------- manager

    async def start_experiment(
        self, request: manager_pb2.StartExperimentRequest
    ) -> manager_pb2.StartExperimentResponse:
        async with self._rpc("manager"):
            resp: manager_pb2.StartExperimentResponse = await self.manager.StartExperiment(
                request, timeout=self.timeout
            )
            return resp

    async def get_experiment(self, experiment_id: str) -> manager_pb2.Experiment:
        async with self._rpc("manager"):
            resp: manager_pb2.Experiment = await self.manager.GetExperiment(
                manager_pb2.GetExperimentRequest(experiment_id=experiment_id),
                timeout=self.timeout,
            )
            return resp

    async def list_experiments(self) -> manager_pb2.ListExperimentsResponse:
        async with self._rpc("manager"):
            resp: manager_pb2.ListExperimentsResponse = await self.manager.ListExperiments(
                manager_pb2.ListExperimentsRequest(), timeout=self.timeout
            )
            return resp

    async def round_status(self, round_id: str) -> coordinator_pb2.RoundStatus:
        """Through the manager, as the seed's user does."""
        async with self._rpc("manager"):
            resp: coordinator_pb2.RoundStatus = await self.manager.GetRoundStatus(
                coordinator_pb2.GetRoundStatusRequest(round_id=round_id), timeout=self.timeout
            )
            return resp

    async def list_proplets(self) -> manager_pb2.ListPropletsResponse:
        async with self._rpc("manager"):
            resp: manager_pb2.ListPropletsResponse = await self.manager.ListProplets(
                manager_pb2.ListPropletsRequest(), timeout=self.timeout
            )
            return resp

    async def create_task(self, request: manager_pb2.CreateTaskRequest) -> manager_pb2.Task:
        async with self._rpc("manager"):
            resp: manager_pb2.Task = await self.manager.CreateTask(request, timeout=self.timeout)
            return resp

    async def start_task(self, task_id: str) -> manager_pb2.Task:
        async with self._rpc("manager"):
            resp: manager_pb2.Task = await self.manager.StartTask(
                manager_pb2.TaskRef(task_id=task_id), timeout=self.timeout
            )
            return resp

    async def stop_task(self, task_id: str) -> manager_pb2.Task:
        async with self._rpc("manager"):
            resp: manager_pb2.Task = await self.manager.StopTask(
                manager_pb2.TaskRef(task_id=task_id), timeout=self.timeout
            )
            return resp

    async def get_task(self, task_id: str) -> manager_pb2.Task:
        async with self._rpc("manager"):
            resp: manager_pb2.Task = await self.manager.GetTask(
                manager_pb2.TaskRef(task_id=task_id), timeout=self.timeout
            )
            return resp

    async def list_tasks(
        self, name_prefix: str = "", proplet_id: str = "", state: int = 0
    ) -> manager_pb2.ListTasksResponse:
        async with self._rpc("manager"):
            resp: manager_pb2.ListTasksResponse = await self.manager.ListTasks(
                manager_pb2.ListTasksRequest(
                    name_prefix=name_prefix,
                    proplet_id=proplet_id,
                    state=state,  # type: ignore[arg-type]  # validated by parse_task_state
                ),
                timeout=self.timeout,
            )
            return resp

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
                state = short_name(manager_pb2.TaskState.Name(task.state), "TASK_STATE_")
                raise DeadlineExceeded(
                    f"task {task_id} still {state} after {max_wait:g}s (--max-wait)"
                )
            await asyncio.sleep(poll_s)

    # ---------------------------------------------------------------------- coordinator

    async def configure_round(
        self, request: coordinator_pb2.ConfigureRoundRequest
    ) -> coordinator_pb2.RoundStatus:
        async with self._rpc("coordinator"):
            resp: coordinator_pb2.RoundStatus = await self.coordinator.ConfigureRound(
                request, timeout=self.timeout
            )
            return resp

    async def list_rounds(self, experiment_id: str = "") -> coordinator_pb2.ListRoundsResponse:
        async with self._rpc("coordinator"):
            resp: coordinator_pb2.ListRoundsResponse = await self.coordinator.ListRounds(
                coordinator_pb2.ListRoundsRequest(experiment_id=experiment_id),
                timeout=self.timeout,
            )
            return resp

    async def watch_round(
        self, round_id: str, max_wait: float = DEFAULT_WATCH_S
    ) -> AsyncGenerator[coordinator_pb2.RoundEvent, None]:
        """The round's events as they happen (a snapshot first), until the coordinator ends
        the stream after COMPLETED or FAILED. The whole watch is bounded by `max_wait`."""
        call = self.coordinator.WatchRound(
            coordinator_pb2.WatchRoundRequest(round_id=round_id), timeout=max_wait
        )
        try:
            async with self._rpc(
                "coordinator", f"round {round_id} did not close within {max_wait:g}s (--max-wait)"
            ):
                async for event in call:
                    yield event
        finally:
            call.cancel()

    # ------------------------------------------------------------------- model registry

    async def list_models(self) -> model_registry_pb2.ListModelsResponse:
        async with self._rpc("registry"):
            resp: model_registry_pb2.ListModelsResponse = await self.registry.ListModels(
                model_registry_pb2.ListModelsRequest(), timeout=self.timeout
            )
            return resp

    async def init_model(self, dimension: int, dtype: int = 0) -> model_registry_pb2.ModelVersion:
        async with self._rpc("registry"):
            resp: model_registry_pb2.ModelVersion = await self.registry.InitModel(
                model_registry_pb2.InitModelRequest(
                    dimension=dimension,
                    dtype=dtype,  # type: ignore[arg-type]  # a DType value
                ),
                timeout=self.timeout,
            )
            return resp

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

    async def get_model(self, ref: str) -> tuple[tensor_pb2.ModelHeader, Tensors]:
        """Stream one version and check it against its header's sha256."""
        request = await self.resolve_model_ref(ref)
        async with self._rpc("registry"):
            header, tensors = await read_model_stream(
                self.registry.GetModel(request, timeout=self.timeout)
            )
        if header.sha256 and sha256_of(tensors) != header.sha256:
            raise Unavailable(
                f"model {header.model_uri}: received bytes do not match sha256 {header.sha256}"
            )
        return header, tensors

    async def put_model(
        self, tensors: Mapping[str, Array], version: int | None = None
    ) -> model_registry_pb2.ModelVersion:
        async with self._rpc("registry"):
            resp: model_registry_pb2.ModelVersion = await self.registry.PutModel(
                model_stream(tensors, DEFAULT_CHUNK_SIZE, version=version), timeout=self.timeout
            )
            return resp

    # ----------------------------------------------------------------------- data store

    async def list_datasets(self) -> datastore_pb2.ListDatasetsResponse:
        async with self._rpc("datastore"):
            resp: datastore_pb2.ListDatasetsResponse = await self.datastore.ListDatasets(
                datastore_pb2.ListDatasetsRequest(), timeout=self.timeout
            )
            return resp

    async def get_dataset(self, proplet_id: str) -> datastore_pb2.Dataset:
        async with self._rpc("datastore"):
            resp: datastore_pb2.Dataset = await self.datastore.GetDataset(
                datastore_pb2.GetDatasetRequest(proplet_id=proplet_id), timeout=self.timeout
            )
            return resp

    async def put_dataset(
        self, proplet_id: str, features: Array, labels: Array
    ) -> datastore_pb2.DatasetInfo:
        dataset = datastore_pb2.Dataset(
            proplet_id=proplet_id,
            features=tensor_to_proto(features),
            labels=tensor_to_proto(labels),
        )
        async with self._rpc("datastore"):
            resp: datastore_pb2.DatasetInfo = await self.datastore.PutDataset(
                datastore_pb2.PutDatasetRequest(dataset=dataset), timeout=self.timeout
            )
            return resp


def dataset_arrays(msg: datastore_pb2.Dataset) -> tuple[Array, Array]:
    """Features [n, d] and labels [n] of a Dataset message."""
    return (
        tensor_from_proto(msg.features, "dataset.features"),
        tensor_from_proto(msg.labels, "dataset.labels"),
    )


# ---------------------------------------------------------------------------- model files


def _as_float_array(value: object, what: str) -> Array:
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError):
        raise FileProblem(f"{what}: not a number or a (nested) list of numbers") from None
    if arr.dtype == object or arr.dtype.kind not in "iuf":
        raise FileProblem(f"{what}: not a number or a rectangular (nested) list of numbers")
    return arr


def read_model_file(path: Path, dtype: str | None = None) -> Tensors:
    """A model from .json ({"w": [...], "b": x}, or {"model": {...}} as `models get --json`
    writes) or .npz (one array per tensor). dtype "float32"/"float64" converts; default: the
    .npz's own float type, float64 for JSON and integer arrays."""
    suffix = path.suffix.lower()
    tensors: Tensors = {}
    if suffix == ".json":
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise FileProblem(
                f"{path}: not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
            ) from None
        except UnicodeDecodeError:
            raise FileProblem(f"{path}: not a UTF-8 text file") from None
        except FileNotFoundError:
            raise FileProblem(f"{path}: no such file") from None
        if isinstance(value, dict) and isinstance(value.get("model"), dict):
            value = value["model"]
        if not isinstance(value, dict) or not value:
            raise FileProblem(
                f'{path}: expected a JSON object of tensors like {{"w": [0.0, 0.0], "b": 0.0}}'
            )
        for name, raw in value.items():
            arr = _as_float_array(raw, f"{path}: tensor {name!r}")
            tensors[str(name)] = arr.astype(np.float64)
    elif suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as npz:
                names = list(npz.files)
                for name in names:
                    tensors[name] = _as_float_array(npz[name], f"{path}: array {name!r}")
        except (ValueError, OSError, EOFError) as exc:
            if isinstance(exc, FileProblem):
                raise
            if isinstance(exc, FileNotFoundError):
                raise FileProblem(f"{path}: no such file") from None
            raise FileProblem(f"{path}: not a readable .npz archive ({exc})") from None
        if not tensors:
            raise FileProblem(f"{path}: the archive holds no arrays")
    else:
        raise FileProblem(f"{path}: unsupported model file type {suffix!r} (use .json or .npz)")
    out: Tensors = {}
    for name, arr in tensors.items():
        if dtype is not None:
            arr = arr.astype(np.dtype(dtype))
        if arr.dtype.kind != "f" or arr.dtype.itemsize not in (4, 8):
            arr = arr.astype(np.float64)
        # astype, not ascontiguousarray: that would turn a scalar into shape [1].
        arr = arr.astype(arr.dtype.newbyteorder("<"), order="C")
        if not np.isfinite(arr).all():
            raise FileProblem(f"{path}: tensor {name!r} contains NaN or Inf")
        out[name] = arr
    return out


def write_model_file(path: Path, tensors: Mapping[str, Array]) -> None:
    suffix = path.suffix.lower()
    if suffix == ".json":
        path.write_text(json.dumps(model_to_json(tensors)) + "\n", encoding="utf-8")
    elif suffix == ".npz":
        with open(path, "wb") as f:
            np.savez(f, **dict(tensors))  # type: ignore[arg-type]  # name -> array
    else:
        raise FileProblem(f"{path}: unsupported model file type {suffix!r} (use .json or .npz)")


def check_model_output(path: Path) -> None:
    if path.suffix.lower() not in (".json", ".npz"):
        raise FileProblem(
            f"{path}: unsupported model file type {path.suffix!r} (use .json or .npz)"
        )


# -------------------------------------------------------------------------- dataset files


def _parse_number(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:
        return None


def read_dataset_csv(path: Path) -> tuple[Array, Array]:
    """CSV rows `feature,...,feature,label`; an optional header line; label 0 or 1."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise FileProblem(f"{path}: not a UTF-8 text (CSV) file") from None
    reader = csv.reader(io.StringIO(text))
    rows: list[tuple[int, list[float]]] = []
    width = 0
    first_line = 0
    header_seen = False
    try:
        for cells in reader:
            line = reader.line_num
            cells = [c.strip() for c in cells]
            if not any(cells):
                continue
            values = [_parse_number(c) for c in cells]
            if not rows and not header_seen and any(v is None for v in values):
                header_seen = True  # a header: names, not numbers
                width, first_line = len(cells), line
                continue
            for j, (cell, v) in enumerate(zip(cells, values, strict=True)):
                if v is None:
                    raise FileProblem(
                        f"{path}: line {line}, column {j + 1}: {cell!r} is not a number"
                    )
                if not math.isfinite(v):
                    raise FileProblem(
                        f"{path}: line {line}, column {j + 1}: {cell!r} is not a finite number"
                    )
            if width == 0:
                width, first_line = len(cells), line
            if len(cells) != width:
                raise FileProblem(
                    f"{path}: line {line}: {len(cells)} columns, expected {width} "
                    f"as on line {first_line}"
                )
            rows.append((line, [v for v in values if v is not None]))
    except csv.Error as exc:
        raise FileProblem(f"{path}: line {reader.line_num}: malformed CSV ({exc})") from None
    if not rows:
        raise FileProblem(f"{path}: no data rows (expected feature,...,label lines)")
    if width < 2:
        raise FileProblem(
            f"{path}: line {rows[0][0]}: needs at least 2 columns (features..., label), got 1"
        )
    data = np.asarray([v for _, v in rows], dtype=np.float64)
    lines = [ln for ln, _ in rows]
    features = np.ascontiguousarray(data[:, :-1])
    labels = np.ascontiguousarray(data[:, -1])
    bad = ~((labels == 0.0) | (labels == 1.0))
    if bad.any():
        i = int(np.argmax(bad))
        raise FileProblem(
            f"{path}: line {lines[i]}: label {labels[i]:g} must be 0 or 1 "
            "(the last column is the label)"
        )
    return features, labels


def read_dataset_npy(path: Path) -> tuple[Array, Array]:
    """A 2-D .npy array [samples, features + 1]; the last column is the 0/1 label."""
    try:
        arr = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise FileProblem(f"{path}: no such file") from None
    except (ValueError, OSError, EOFError) as exc:
        raise FileProblem(f"{path}: not a readable .npy array ({exc})") from None
    if not isinstance(arr, np.ndarray):
        raise FileProblem(f"{path}: not a single .npy array")
    if arr.dtype.kind not in "iufb":
        raise FileProblem(f"{path}: array of {arr.dtype} is not numeric")
    if arr.ndim != 2:
        raise FileProblem(
            f"{path}: expected a 2-D array [samples, features + label], got shape {list(arr.shape)}"
        )
    if arr.shape[1] < 2:
        raise FileProblem(
            f"{path}: needs at least 2 columns (features..., label), got {arr.shape[1]}"
        )
    if arr.shape[0] < 1:
        raise FileProblem(f"{path}: no rows")
    data = arr.astype(np.float64)
    finite = np.isfinite(data)
    if not finite.all():
        r, c = (int(x) for x in np.argwhere(~finite)[0])
        raise FileProblem(f"{path}: row {r}, column {c}: {data[r, c]!r} is not a finite number")
    labels = np.ascontiguousarray(data[:, -1])
    bad = ~((labels == 0.0) | (labels == 1.0))
    if bad.any():
        i = int(np.argmax(bad))
        raise FileProblem(
            f"{path}: row {i}: label {labels[i]:g} must be 0 or 1 (the last column is the label)"
        )
    return np.ascontiguousarray(data[:, :-1]), labels


def read_dataset_file(path: Path) -> tuple[Array, Array]:
    suffix = path.suffix.lower()
    if not path.is_file():
        raise FileProblem(f"{path}: no such file")
    if suffix == ".npy":
        return read_dataset_npy(path)
    if suffix in (".csv", ".txt"):
        return read_dataset_csv(path)
    raise FileProblem(f"{path}: unsupported dataset file type {suffix!r} (use .csv or .npy)")


def write_dataset_file(path: Path, features: Array, labels: Array) -> None:
    suffix = path.suffix.lower()
    if suffix == ".npy":
        with open(path, "wb") as f:
            np.save(f, np.column_stack([features.astype(np.float64), labels.astype(np.float64)]))
    elif suffix == ".csv":
        with open(path, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow([f"x{i}" for i in range(features.shape[1])] + ["label"])
            for row, label in zip(features.tolist(), labels.tolist(), strict=True):
                writer.writerow([repr(float(v)) for v in row] + [str(int(label))])
    else:
        raise FileProblem(f"{path}: unsupported dataset file type {suffix!r} (use .csv or .npy)")


def check_dataset_output(path: Path) -> None:
    if path.suffix.lower() not in (".csv", ".npy"):
        raise FileProblem(
            f"{path}: unsupported dataset file type {path.suffix!r} (use .csv or .npy)"
        )


def read_wasm_file(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileProblem(f"{path}: no such file") from None
    except IsADirectoryError:
        raise FileProblem(f"{path}: is a directory, not a .wasm file") from None
    if not data.startswith(WASM_MAGIC):
        raise FileProblem(f"{path}: not a WebAssembly module (no \\0asm header)")
    return data


# ------------------------------------------------------------------------------- OCI push


def parse_image(image: str) -> tuple[str, str, str]:
    """`host[:port]/repo[:tag]` -> (host, repo, tag); tag defaults to latest. A push names a
    tag: a digest is what the registry gives back."""
    ref = ImageRef.parse(image, "--image")
    if ref.digest:
        raise InvalidArgument(f"--image: {image!r}: push to a tag, not a digest")
    return ref.host, ref.repository, ref.tag


def push_wasm(
    path: Path, image: str, *, plain_http: bool | None = None, timeout: float = DEFAULT_TIMEOUT_S
) -> PushResult:
    """Push one WASM module as an OCI artifact (layer media type application/wasm), as the
    seed's `oras push IMAGE fl-client.wasm:application/wasm`. Blocking: call via to_thread.
    plain_http None -> plain HTTP for loopback registries, HTTPS otherwise."""
    import oras.client

    data = read_wasm_file(path)
    host, repo, tag = parse_image(image)
    insecure = is_loopback(host) if plain_http is None else plain_http
    target = f"{host}/{repo}:{tag}"

    class _Refused(Exception):
        pass

    class _OciClient(oras.client.OrasClient):  # type: ignore[misc]  # oras is untyped
        """One bounded attempt per request (oras retries for minutes), no log lines."""

        def do_request(
            self,
            url: str,
            method: str = "GET",
            data: Any = None,
            headers: dict[str, str] | None = None,
            json: Any = None,
            stream: bool = False,
        ) -> Any:
            headers = dict(headers or {})

            def send() -> Any:
                return self.session.request(
                    method,
                    url,
                    data=data,
                    json=json,
                    headers=headers,
                    stream=stream,
                    verify=self._tls_verify,
                    timeout=timeout,
                )

            response = send()
            if response.status_code in (401, 403):
                headers, changed = self.auth.authenticate_request(response, headers)
                if changed:
                    response = send()
            return response

        def _check_200_response(self, response: Any) -> None:
            if response.status_code not in (200, 201, 202):
                detail = ""
                with contextlib.suppress(Exception):
                    errors = response.json().get("errors") or []
                    detail = "; ".join(
                        f"{e.get('code', '')}: {e.get('message', '')}" for e in errors
                    )
                raise _Refused(f"HTTP {response.status_code}" + (f" ({detail})" if detail else ""))

    client = _OciClient(hostname=host, insecure=insecure)
    scheme = "http" if insecure else "https"
    try:
        response = client.push(
            target=target,
            files=[f"{path}:{WASM_MEDIA_TYPE}"],
            disable_path_validation=True,
            quiet=True,
        )
    except _Refused as exc:
        raise FailedPrecondition(f"OCI registry at {host} refused the push: {exc}") from None
    except OSError as exc:  # requests' connection, TLS and timeout errors
        hint = ""
        if not insecure and "ssl" in str(exc).lower():
            hint = " (TLS failed: use --plain-http for a plain-HTTP registry)"
        raise Unavailable(f"cannot reach OCI registry at {host} over {scheme}{hint}") from None
    finally:
        client.session.close()
    return PushResult(
        image=target,
        digest="sha256:" + hashlib.sha256(data).hexdigest(),
        size=len(data),
        media_type=WASM_MEDIA_TYPE,
        manifest_digest=str(response.headers.get("Docker-Content-Digest", "")),
    )


# --------------------------------------------------------------------------------- parsing


def addresses_of(args: argparse.Namespace) -> Addresses:
    env = Addresses.from_env()
    return Addresses(
        manager=args.manager or env.manager,
        coordinator=args.coordinator or env.coordinator,
        registry=args.registry or env.registry,
        datastore=args.datastore or env.datastore,
    )


def client_of(args: argparse.Namespace) -> Client:
    return Client(addresses_of(args), timeout=args.timeout)


def participants_of(args: argparse.Namespace) -> list[str]:
    out: list[str] = list(args.participant or [])
    for group in args.participants or []:
        out.extend(p.strip() for p in group.split(",") if p.strip())
    return out


def hyperparams_of(args: argparse.Namespace) -> coordinator_pb2.Hyperparams:
    return coordinator_pb2.Hyperparams(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size)


def parse_task_state(text: str) -> int:
    """`running`, `RUNNING` or `TASK_STATE_RUNNING` -> the enum value."""
    name = text.strip().upper().replace("-", "_")
    if not name.startswith("TASK_STATE_"):
        name = "TASK_STATE_" + name
    names = [n for n in manager_pb2.TaskState.keys() if n != "TASK_STATE_UNSPECIFIED"]  # noqa: SIM118
    if name not in names:
        choices = ", ".join(short_name(n, "TASK_STATE_").lower() for n in names)
        raise InvalidArgument(f"--state: {text!r} is not one of {choices}")
    return manager_pb2.TaskState.Value(name)


def parse_env_pairs(pairs: Sequence[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in pairs:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidArgument(f"--env: {item!r} is not KEY=VALUE")
        env[key] = value
    return env


def _dtype_arg(text: str | None) -> int:
    return {
        None: tensor_pb2.DTYPE_UNSPECIFIED,
        "float32": tensor_pb2.DTYPE_FLOAT32,
        "float64": tensor_pb2.DTYPE_FLOAT64,
    }[text]


# ------------------------------------------------------------------------------- rendering


def _state(value: int) -> str:
    return short_name(coordinator_pb2.RoundState.Name(value), "ROUND_STATE_")


def _task_state(value: int) -> str:
    return short_name(manager_pb2.TaskState.Name(value), "TASK_STATE_")


def _specs_text(specs: Sequence[tensor_pb2.TensorSpec]) -> str:
    parts = []
    for s in specs:
        dtype = short_name(tensor_pb2.DType.Name(s.dtype), "DTYPE_").lower()
        parts.append(f"{s.name}:{dtype}{list(s.shape)}")
    return " ".join(parts)


def render_round(st: coordinator_pb2.RoundStatus) -> str:
    hp = st.hyperparams
    pairs: list[tuple[str, object]] = [
        ("round", st.round_id),
        ("experiment", st.experiment_id),
        ("state", _state(st.state)),
        ("completed", st.completed),
        ("updates", f"{st.num_updates}/{st.k_of_n}"),
        ("participants", ", ".join(st.participants)),
        ("reported", ", ".join(st.reported)),
        ("model", st.model_ref),
        ("hyperparams", f"epochs={hp.epochs} lr={hp.lr:g} batch_size={hp.batch_size}"),
        ("image", st.task_wasm_image),
        ("timeout", f"{st.timeout_s:g}s"),
        ("started", timestamp(st.started_at)),
        ("deadline", timestamp(st.deadline)),
        ("completed at", timestamp(st.completed_at)),
        ("closed by", st.closed_by),
        ("new model", st.new_model_uri),
    ]
    if st.failure_reason:
        pairs.append(("reason", st.failure_reason))
    for name in sorted(st.metrics):
        pairs.append((f"metric {name}", f"{st.metrics[name]:.6g}"))
    return fields(pairs)


def render_rounds(rounds: Sequence[coordinator_pb2.RoundStatus]) -> str:
    return table(
        ["ROUND", "EXPERIMENT", "STATE", "UPDATES", "PARTICIPANTS", "MODEL", "NEW MODEL", "CLOSED"],
        [
            [
                r.round_id,
                r.experiment_id,
                _state(r.state),
                f"{r.num_updates}/{r.k_of_n}",
                len(r.participants),
                r.model_ref,
                r.new_model_uri,
                r.closed_by,
            ]
            for r in rounds
        ],
    )


def event_line(ev: coordinator_pb2.RoundEvent) -> str:
    """One live line of a round watch: time, event, updates/k_of_n, state, proplet, outcome."""
    when = time.strftime("%H:%M:%S", time.localtime(ev.timestamp or time.time()))
    kind = short_name(coordinator_pb2.RoundEventType.Name(ev.type), "ROUND_EVENT_TYPE_")
    st = ev.status
    parts = [
        when,
        kind.ljust(15),
        f"{st.num_updates}/{st.k_of_n}".ljust(5),
        _state(st.state).ljust(11),
    ]
    if ev.proplet_id:
        parts.append(f"proplet={ev.proplet_id}")
    if st.state == coordinator_pb2.ROUND_STATE_COMPLETED:
        parts.append(f"model={st.new_model_uri} closed_by={st.closed_by}")
    if st.state == coordinator_pb2.ROUND_STATE_FAILED:
        parts.append(f"reason={st.failure_reason}")
    return "  ".join(parts).rstrip()


def render_experiment_response(resp: manager_pb2.StartExperimentResponse) -> str:
    st = resp.round
    head = fields(
        [
            ("experiment", resp.experiment_id),
            ("round", resp.round_id),
            ("state", _state(st.state)),
            ("k_of_n", st.k_of_n),
            ("timeout", f"{st.timeout_s:g}s"),
            ("deadline", timestamp(st.deadline)),
        ]
    )
    scheduled = table(
        ["PROPLET", "TASK ID", "TASK NAME"],
        [[s.proplet_id, s.task_id, s.task_name] for s in resp.scheduled],
    )
    blocks = [head, "", f"scheduled ({len(resp.scheduled)}):", scheduled]
    if resp.skipped:
        blocks += [
            "",
            f"skipped ({len(resp.skipped)}):",
            table(["PROPLET", "REASON"], [[s.proplet_id, s.reason] for s in resp.skipped]),
        ]
    else:
        blocks += ["", "skipped: none"]
    return "\n".join(blocks)


def render_experiments(exps: Sequence[manager_pb2.Experiment]) -> str:
    return table(
        ["EXPERIMENT", "ROUND", "MODEL", "SCHEDULED", "SKIPPED", "CREATED"],
        [
            [
                e.experiment_id,
                e.config.round_id,
                e.config.model_ref,
                len(e.scheduled),
                len(e.skipped),
                timestamp(e.created_at),
            ]
            for e in exps
        ],
    )


def render_experiment(e: manager_pb2.Experiment) -> str:
    c = e.config
    head = fields(
        [
            ("experiment", e.experiment_id),
            ("round", c.round_id),
            ("model", c.model_ref),
            ("participants", ", ".join(c.participants)),
            ("k_of_n", c.k_of_n),
            ("timeout", f"{c.timeout_s:g}s"),
            ("image", c.task_wasm_image),
            ("created", timestamp(e.created_at)),
        ]
    )
    rows = [[s.proplet_id, "scheduled", s.task_name] for s in e.scheduled]
    rows += [[s.proplet_id, "skipped", s.reason] for s in e.skipped]
    return head + "\n\n" + table(["PROPLET", "OUTCOME", "TASK / REASON"], rows)


def render_proplets(proplets: Sequence[manager_pb2.Proplet], now: float | None = None) -> str:
    return table(
        ["ID", "NAME", "ALIVE", "LAST SEEN", "TASKS"],
        [[p.id, p.name, p.alive, ago(p.last_seen, now), p.task_count] for p in proplets],
    )


def render_tasks(tasks: Sequence[manager_pb2.Task]) -> str:
    return table(
        ["ID", "NAME", "STATE", "PROPLET", "UPDATED"],
        [
            [t.id, t.name, _task_state(t.state), t.proplet_id or "(any)", timestamp(t.updated_at)]
            for t in tasks
        ],
    )


def render_task(t: manager_pb2.Task) -> str:
    module = t.image_url if t.image_url else f"(inline module, {len(t.file)} bytes)"
    pairs: list[tuple[str, object]] = [
        ("id", t.id),
        ("name", t.name),
        ("state", _task_state(t.state)),
        ("proplet", t.proplet_id or "(any)"),
        ("module", module),
    ]
    pairs += [("env", f"{k}={v}") for k, v in sorted(t.env.items())]
    if t.cli_args:
        pairs.append(("args", " ".join(t.cli_args)))
    pairs += [
        ("created", timestamp(t.created_at)),
        ("started", timestamp(t.started_at)),
        ("finished", timestamp(t.finished_at)),
    ]
    if t.error:
        pairs.append(("error", t.error))
    text = fields(pairs)
    if t.results:
        text += "\nresults:\n" + t.results.rstrip("\n")
    return text


def render_models(models: Sequence[model_registry_pb2.ModelVersion]) -> str:
    return table(
        ["VERSION", "URI", "SHA256", "TENSORS", "BYTES", "CREATED"],
        [
            [
                m.version,
                m.model_uri,
                m.sha256[:12],
                _specs_text(m.tensors),
                m.total_bytes,
                timestamp(m.created_at),
            ]
            for m in models
        ],
    )


def render_model_version(m: model_registry_pb2.ModelVersion) -> str:
    return fields(
        [
            ("version", m.version),
            ("uri", m.model_uri),
            ("sha256", m.sha256),
            ("tensors", _specs_text(m.tensors)),
            ("bytes", m.total_bytes),
            ("created", timestamp(m.created_at)),
        ]
    )


def model_json(header: tensor_pb2.ModelHeader, tensors: Tensors) -> dict[str, object]:
    """`models get --json`: {"version", "model_uri", "sha256", "tensors": [specs],
    "model": {"w": [...], "b": x}} (the seed's model JSON under "model")."""
    return {
        "version": header.version,
        "model_uri": header.model_uri,
        "sha256": header.sha256,
        "tensors": [message_dict(s) for s in header.tensors],
        "model": model_to_json(tensors),
    }


def dataset_json(msg: datastore_pb2.Dataset) -> dict[str, object]:
    """`datasets get --json`: {"proplet_id", "schema", "size", "num_features",
    "features": [[...], ...], "labels": [...]}."""
    features, labels = dataset_arrays(msg)
    return {
        "proplet_id": msg.proplet_id,
        "schema": msg.schema,
        "size": int(features.shape[0]),
        "num_features": int(features.shape[1]),
        "features": features.tolist(),
        "labels": labels.tolist(),
    }


def render_datasets(infos: Sequence[datastore_pb2.DatasetInfo]) -> str:
    return table(
        ["PROPLET", "SCHEMA", "SIZE", "FEATURES"],
        [[d.proplet_id, d.schema, d.size, d.num_features] for d in infos],
    )


def render_dataset_info(d: datastore_pb2.DatasetInfo) -> str:
    return fields(
        [
            ("proplet", d.proplet_id),
            ("schema", d.schema),
            ("size", d.size),
            ("features", d.num_features),
        ]
    )


def render_dataset(msg: datastore_pb2.Dataset) -> str:
    features, labels = dataset_arrays(msg)
    head = fields(
        [
            ("proplet", msg.proplet_id),
            ("schema", msg.schema),
            ("size", features.shape[0]),
            ("features", features.shape[1]),
        ]
    )
    headers = [f"x{i}" for i in range(features.shape[1])] + ["LABEL"]
    rows = [
        [f"{v:.6g}" for v in row] + [int(lab)]
        for row, lab in zip(features.tolist(), labels.tolist(), strict=True)
    ]
    return head + "\n\n" + table(headers, rows)


def render_push(r: PushResult) -> str:
    return fields(
        [
            ("image", r.image),
            ("digest", r.digest),
            ("media type", r.media_type),
            ("size", r.size),
            ("manifest", r.manifest_digest),
            ("pinned", r.pinned),
        ]
    )


def _fail(args: argparse.Namespace, message: str) -> int:
    sys.stderr.write(f"propeller-fl {args.command}: {message}\n")
    sys.stderr.flush()
    return 1


# -------------------------------------------------------------------------------- commands


async def follow_round(client: Client, round_id: str, args: argparse.Namespace) -> int:
    """Print the round's events live until it closes: 0 on COMPLETED, 1 on FAILED."""
    out = Output()
    final: coordinator_pb2.RoundStatus | None = None
    async with contextlib.aclosing(client.watch_round(round_id, args.max_wait)) as events:
        async for ev in events:
            if args.json:
                out.json_line(message_dict(ev))
            else:
                out.text(event_line(ev))
            if ev.type in FINAL_EVENTS or (
                ev.type == coordinator_pb2.ROUND_EVENT_TYPE_SNAPSHOT
                and ev.status.state in FINAL_ROUND_STATES
            ):
                final = ev.status
                break
    if final is None:
        raise Unavailable(f"coordinator: the watch of round {round_id} ended before it closed")
    if final.state == coordinator_pb2.ROUND_STATE_FAILED:
        return _fail(args, f"round {round_id} FAILED: {final.failure_reason or 'no reason given'}")
    return 0


async def cmd_experiment_start(args: argparse.Namespace) -> int:
    image = args.image or os.environ.get("TASK_WASM_IMAGE", "")
    request = manager_pb2.StartExperimentRequest(
        experiment_id=args.experiment_id,
        round_id=args.round_id,
        model_ref=args.model_ref,
        participants=participants_of(args),
        hyperparams=hyperparams_of(args),
        k_of_n=args.k_of_n,
        timeout_s=args.timeout_s,
        task_wasm_image=image,
    )
    out = Output()
    async with client_of(args) as client:
        resp = await client.start_experiment(request)
        if args.json:
            if args.watch:
                out.json_line(message_dict(resp))
            else:
                out.json(message_dict(resp))
        else:
            out.text(render_experiment_response(resp))
        if not args.watch:
            return 0
        if not args.json:
            out.text("")
        return await follow_round(client, resp.round_id, args)


async def cmd_experiment_get(args: argparse.Namespace) -> int:
    async with client_of(args) as client:
        e = await client.get_experiment(args.experiment_id)
    out = Output()
    out.json(message_dict(e)) if args.json else out.text(render_experiment(e))
    return 0


async def cmd_experiment_list(args: argparse.Namespace) -> int:
    async with client_of(args) as client:
        resp = await client.list_experiments()
    out = Output()
    out.json(message_dict(resp)) if args.json else out.text(render_experiments(resp.experiments))
    return 0


async def cmd_round_status(args: argparse.Namespace) -> int:
    async with client_of(args) as client:
        st = await client.round_status(args.round_id)
    out = Output()
    out.json(message_dict(st)) if args.json else out.text(render_round(st))
    return 0


async def cmd_round_watch(args: argparse.Namespace) -> int:
    async with client_of(args) as client:
        return await follow_round(client, args.round_id, args)


async def cmd_round_list(args: argparse.Namespace) -> int:
    async with client_of(args) as client:
        resp = await client.list_rounds(args.experiment_id)
    out = Output()
    out.json(message_dict(resp)) if args.json else out.text(render_rounds(resp.rounds))
    return 0


async def cmd_round_configure(args: argparse.Namespace) -> int:
    request = coordinator_pb2.ConfigureRoundRequest(
        round_id=args.round_id,
        experiment_id=args.experiment_id,
        participants=participants_of(args),
        k_of_n=args.k_of_n,
        timeout_s=args.timeout_s,
        model_ref=args.model_ref,
        hyperparams=hyperparams_of(args),
        task_wasm_image=args.image or os.environ.get("TASK_WASM_IMAGE", ""),
        start=args.start,
    )
    async with client_of(args) as client:
        st = await client.configure_round(request)
    out = Output()
    out.json(message_dict(st)) if args.json else out.text(render_round(st))
    return 0


async def cmd_models_list(args: argparse.Namespace) -> int:
    async with client_of(args) as client:
        resp = await client.list_models()
    out = Output()
    out.json(message_dict(resp)) if args.json else out.text(render_models(resp.models))
    return 0


async def cmd_models_get(args: argparse.Namespace) -> int:
    output = Path(args.output) if args.output else None
    if output is not None:
        check_model_output(output)
    async with client_of(args) as client:
        header, tensors = await client.get_model(args.ref)
    out = Output()
    doc = model_json(header, tensors)
    if output is not None:
        await asyncio.to_thread(write_model_file, output, tensors)
        if args.json:
            doc.pop("model")
            out.json({**doc, "output": str(output)})
        else:
            out.text(
                fields(
                    [
                        ("version", header.version),
                        ("uri", header.model_uri),
                        ("sha256", header.sha256),
                        ("wrote", str(output)),
                    ]
                )
            )
        return 0
    if args.json:
        out.json(doc)
    else:
        out.text(
            fields(
                [
                    ("version", header.version),
                    ("uri", header.model_uri),
                    ("sha256", header.sha256),
                    ("tensors", _specs_text(header.tensors)),
                ]
            )
        )
        out.text(json.dumps(model_to_json(tensors)))
    return 0


async def cmd_models_init(args: argparse.Namespace) -> int:
    async with client_of(args) as client:
        mv = await client.init_model(args.dimension, _dtype_arg(args.dtype))
    out = Output()
    out.json(message_dict(mv)) if args.json else out.text(render_model_version(mv))
    return 0


async def cmd_models_put(args: argparse.Namespace) -> int:
    tensors = await asyncio.to_thread(read_model_file, Path(args.file), args.dtype)
    async with client_of(args) as client:
        mv = await client.put_model(tensors, args.version)
    out = Output()
    out.json(message_dict(mv)) if args.json else out.text(render_model_version(mv))
    return 0


async def cmd_datasets_list(args: argparse.Namespace) -> int:
    async with client_of(args) as client:
        resp = await client.list_datasets()
    out = Output()
    out.json(message_dict(resp)) if args.json else out.text(render_datasets(resp.datasets))
    return 0


async def cmd_datasets_get(args: argparse.Namespace) -> int:
    output = Path(args.output) if args.output else None
    if output is not None:
        check_dataset_output(output)
    async with client_of(args) as client:
        msg = await client.get_dataset(args.proplet_id)
    out = Output()
    if output is not None:
        features, labels = dataset_arrays(msg)
        await asyncio.to_thread(write_dataset_file, output, features, labels)
        info = {
            "proplet_id": msg.proplet_id,
            "schema": msg.schema,
            "size": int(features.shape[0]),
            "num_features": int(features.shape[1]),
            "output": str(output),
        }
        if args.json:
            out.json(info)
        else:
            out.text(
                fields(
                    [
                        ("proplet", msg.proplet_id),
                        ("schema", msg.schema),
                        ("size", info["size"]),
                        ("features", info["num_features"]),
                        ("wrote", str(output)),
                    ]
                )
            )
        return 0
    out.json(dataset_json(msg)) if args.json else out.text(render_dataset(msg))
    return 0


async def cmd_datasets_put(args: argparse.Namespace) -> int:
    if not args.proplet_id.strip():
        raise InvalidArgument("PROPLET_ID: must not be empty")
    features, labels = await asyncio.to_thread(read_dataset_file, Path(args.file))
    async with client_of(args) as client:
        info = await client.put_dataset(args.proplet_id, features, labels)
    out = Output()
    out.json(message_dict(info)) if args.json else out.text(render_dataset_info(info))
    return 0


async def cmd_proplets_list(args: argparse.Namespace) -> int:
    async with client_of(args) as client:
        resp = await client.list_proplets()
    out = Output()
    if args.ids:
        # For scripts: the alive proplets' ids, comma-separated, ready for --participants.
        out.text(",".join(p.id for p in resp.proplets if p.alive))
        return 0
    out.json(message_dict(resp)) if args.json else out.text(render_proplets(resp.proplets))
    return 0


async def cmd_tasks_list(args: argparse.Namespace) -> int:
    state = parse_task_state(args.state) if args.state else 0
    async with client_of(args) as client:
        resp = await client.list_tasks(args.name_prefix, args.proplet, state)
    out = Output()
    out.json(message_dict(resp)) if args.json else out.text(render_tasks(resp.tasks))
    return 0


async def cmd_tasks_get(args: argparse.Namespace) -> int:
    async with client_of(args) as client:
        task = await client.get_task(args.task_id)
    out = Output()
    out.json(message_dict(task)) if args.json else out.text(render_task(task))
    return 0


async def cmd_tasks_create(args: argparse.Namespace) -> int:
    file = b""
    if args.file:
        file = await asyncio.to_thread(read_wasm_file, Path(args.file))
    request = manager_pb2.CreateTaskRequest(
        name=args.name,
        image_url=args.image or "",
        file=file,
        env=parse_env_pairs(args.env or []),
        cli_args=list(args.arg or []),
        proplet_id=args.proplet,
    )
    async with client_of(args) as client:
        task = await client.create_task(request)
    out = Output()
    out.json(message_dict(task)) if args.json else out.text(render_task(task))
    return 0


async def cmd_tasks_start(args: argparse.Namespace) -> int:
    out = Output()
    async with client_of(args) as client:
        task = await client.start_task(args.task_id)
        if args.wait:
            task = await client.wait_task(args.task_id, args.max_wait)
    out.json(message_dict(task)) if args.json else out.text(render_task(task))
    if args.wait and task.state != manager_pb2.TASK_STATE_COMPLETED:
        return _fail(
            args, f"task {task.id} {_task_state(task.state)}: {task.error or 'no reason given'}"
        )
    return 0


async def cmd_tasks_stop(args: argparse.Namespace) -> int:
    async with client_of(args) as client:
        task = await client.stop_task(args.task_id)
    out = Output()
    out.json(message_dict(task)) if args.json else out.text(render_task(task))
    return 0


async def cmd_wasm_push(args: argparse.Namespace) -> int:
    if not (args.timeout > 0 and math.isfinite(args.timeout)):
        raise ValueError(f"--timeout: {args.timeout} must be a positive number of seconds")
    result = await asyncio.to_thread(
        push_wasm, Path(args.file), args.image, plain_http=args.plain_http, timeout=args.timeout
    )
    out = Output()
    out.json(result.to_dict()) if args.json else out.text(render_push(result))
    return 0


# -------------------------------------------------------------------------------- argparse


def _common_parser() -> argparse.ArgumentParser:
    """Flags every client command takes: where the services are, the RPC timeout, --json."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("connection")
    d = Addresses()
    for service in ("manager", "coordinator", "registry", "datastore"):
        env, label = SERVICES[service]
        g.add_argument(
            f"--{service}",
            metavar="HOST:PORT",
            default=None,
            help=f"{label} address (env {env}; default {getattr(d, service)})",
        )
    g.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help=f"per-RPC timeout (default {DEFAULT_TIMEOUT_S:g})",
    )
    p.add_argument(
        "--json", action="store_true", help="machine-readable JSON on stdout instead of tables"
    )
    return p


def _add_round_config(p: argparse.ArgumentParser, *, model_required: bool) -> None:
    p.add_argument("--round-id", required=True, help="round id (no whitespace)")
    p.add_argument(
        "--experiment-id", default="", help="experiment id (default: exp-ROUND_ID for experiments)"
    )
    p.add_argument(
        "--model-ref",
        required=model_required,
        default="",
        help="base model, e.g. fl/models/global_model_v0"
        + ("" if model_required else " (default: the latest stored version)"),
    )
    p.add_argument(
        "--participant",
        action="append",
        metavar="PROPLET_ID",
        help="a participating proplet id (repeatable)",
    )
    p.add_argument(
        "--participants", action="append", metavar="ID,ID,...", help="comma-separated proplet ids"
    )
    p.add_argument("--epochs", type=int, default=1, help="local epochs (default 1)")
    p.add_argument("--lr", type=float, default=0.01, help="learning rate (default 0.01)")
    p.add_argument("--batch-size", type=int, default=16, help="mini-batch size (default 16)")
    p.add_argument(
        "--k-of-n",
        type=int,
        default=0,
        help="updates that close the round (default 0 = every scheduled participant)",
    )
    p.add_argument(
        "--timeout-s", type=float, default=60.0, help="round deadline in seconds (default 60)"
    )
    p.add_argument(
        "--image",
        default="",
        metavar="IMAGE",
        help="the training module's OCI reference (env TASK_WASM_IMAGE)",
    )


def _add_watch_limit(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-wait",
        type=float,
        default=DEFAULT_WATCH_S,
        metavar="SECONDS",
        help=f"give up watching after this long (default {DEFAULT_WATCH_S:g})",
    )


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the client command groups to the `propeller-fl` parser."""
    common = _common_parser()

    def group(name: str, help_: str) -> argparse._SubParsersAction[argparse.ArgumentParser]:
        gp = sub.add_parser(name, help=help_, description=help_)
        return gp.add_subparsers(dest="action", metavar="ACTION", required=True)

    def action(
        actions: argparse._SubParsersAction[argparse.ArgumentParser],
        group_name: str,
        name: str,
        help_: str,
        func: Any,
    ) -> argparse.ArgumentParser:
        p = actions.add_parser(name, help=help_, description=help_, parents=[common])
        set_command(p, func)
        # Error lines name the full command: "propeller-fl models list: ...".
        p.set_defaults(command=f"{group_name} {name}")
        return p

    # experiment
    g = group("experiment", "federated-learning experiments (one round each)")
    p = action(
        g,
        "experiment",
        "start",
        "start a round: the manager schedules one training task per alive participant. "
        "With --json: the StartExperimentResponse; with --watch --json, JSON lines: the "
        "response, then one RoundEvent per line.",
        cmd_experiment_start,
    )
    _add_round_config(p, model_required=True)
    p.add_argument("--watch", action="store_true", help="then follow the round like `round watch`")
    _add_watch_limit(p)
    p = action(g, "experiment", "get", "one experiment", cmd_experiment_get)
    p.add_argument("experiment_id", metavar="EXPERIMENT_ID")
    action(g, "experiment", "list", "all experiments", cmd_experiment_list)

    # round
    g = group("round", "rounds on the coordinator")
    p = action(g, "round", "status", "a round's status (via the manager)", cmd_round_status)
    p.add_argument("round_id", metavar="ROUND_ID")
    p = action(
        g,
        "round",
        "watch",
        "print the round's events live until it completes (exit 0) or fails (exit 1); "
        "with --json one RoundEvent object per line",
        cmd_round_watch,
    )
    p.add_argument("round_id", metavar="ROUND_ID")
    _add_watch_limit(p)
    p = action(g, "round", "list", "rounds the coordinator knows", cmd_round_list)
    p.add_argument("--experiment-id", default="", help="only this experiment's rounds")
    p = action(
        g,
        "round",
        "configure",
        "configure a round directly on the coordinator (for manual federated tasks)",
        cmd_round_configure,
    )
    _add_round_config(p, model_required=False)
    p.add_argument(
        "--start", action="store_true", help="open the round now (its deadline counts from now)"
    )

    # models
    g = group("models", "global model versions in the model registry")
    action(g, "models", "list", "stored versions, oldest first", cmd_models_list)
    p = action(
        g,
        "models",
        "get",
        'one version: the model as JSON {"w": [...], "b": x} with version and sha256; '
        '--json: {"version", "model_uri", "sha256", "tensors", "model"}',
        cmd_models_get,
    )
    p.add_argument(
        "ref", metavar="VERSION_OR_URI", help="3, v3, latest or fl/models/global_model_v3"
    )
    p.add_argument(
        "--output", "-o", metavar="FILE", help="write the model to FILE.json or FILE.npz"
    )
    p = action(g, "models", "init", "create version 0 as zeros", cmd_models_init)
    p.add_argument("--dimension", type=int, default=3, help="length of w (default 3)")
    p.add_argument("--dtype", choices=["float32", "float64"], help="default float64")
    p = action(
        g, "models", "put", "store a model from FILE.json or FILE.npz as a version", cmd_models_put
    )
    p.add_argument("file", metavar="FILE", help='.json {"w": [...], "b": x} or .npz')
    p.add_argument("--version", type=int, default=None, help="this version (default: the next one)")
    p.add_argument("--dtype", choices=["float32", "float64"], help="convert the tensors")

    # datasets
    g = group("datasets", "per-proplet training datasets in the data store")
    action(g, "datasets", "list", "datasets held", cmd_datasets_list)
    p = action(
        g,
        "datasets",
        "get",
        'one proplet\'s dataset; --json: {"proplet_id", "schema", "size", "num_features", '
        '"features", "labels"}',
        cmd_datasets_get,
    )
    p.add_argument("proplet_id", metavar="PROPLET_ID")
    p.add_argument(
        "--output",
        "-o",
        metavar="FILE",
        help="write FILE.csv (header x0..,label) or FILE.npy ([n, d+1], label last)",
    )
    p = action(
        g,
        "datasets",
        "put",
        "store a proplet's dataset from FILE.csv (optional header; last column the 0/1 label) "
        "or FILE.npy (2-D, last column the label)",
        cmd_datasets_put,
    )
    p.add_argument("proplet_id", metavar="PROPLET_ID")
    p.add_argument("file", metavar="FILE")

    # proplets
    g = group("proplets", "edge agents known to the manager")
    p = action(g, "proplets", "list", "proplets, alive or not", cmd_proplets_list)
    p.add_argument(
        "--ids", action="store_true", help="print only the alive proplets' ids, comma-separated"
    )

    # tasks
    g = group("tasks", "WASM tasks on the manager")
    p = action(g, "tasks", "list", "tasks, optionally filtered", cmd_tasks_list)
    p.add_argument("--name-prefix", default="", metavar="P", help="names starting with P")
    p.add_argument("--proplet", default="", metavar="ID", help="tasks for this proplet")
    p.add_argument("--state", default="", help="pending, scheduled, running, completed, ...")
    p = action(g, "tasks", "get", "one task, with its results", cmd_tasks_get)
    p.add_argument("task_id", metavar="ID")
    p = action(g, "tasks", "create", "create a task (state PENDING)", cmd_tasks_create)
    p.add_argument("--name", required=True)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", metavar="URL", help="OCI reference host:port/repo:tag")
    src.add_argument("--file", metavar="PATH", help="a local .wasm module sent inline")
    p.add_argument("--proplet", default="", metavar="ID", help="run on this proplet (default any)")
    p.add_argument(
        "--env", action="append", metavar="K=V", help="environment variable (repeatable)"
    )
    p.add_argument("--arg", action="append", metavar="A", help="module argument (repeatable)")
    p = action(g, "tasks", "start", "start a task", cmd_tasks_start)
    p.add_argument("task_id", metavar="ID")
    p.add_argument(
        "--wait",
        action="store_true",
        help="wait until it finishes; exit 1 unless it completed",
    )
    _add_watch_limit(p)
    p = action(g, "tasks", "stop", "stop a task", cmd_tasks_stop)
    p.add_argument("task_id", metavar="ID")

    # wasm
    g = group("wasm", "WASM modules in an OCI registry")
    p = action(
        g,
        "wasm",
        "push",
        "push a module with oras (layer media type application/wasm); prints the image and "
        'the layer digest; --json: {"image", "digest", "size", "media_type", '
        '"manifest_digest", "pinned"}',
        cmd_wasm_push,
    )
    p.add_argument("file", metavar="FILE", help="the .wasm module")
    p.add_argument("--image", required=True, metavar="HOST:PORT/REPO:TAG")
    p.add_argument(
        "--plain-http",
        "--insecure",
        dest="plain_http",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="plain HTTP instead of HTTPS (default: on for localhost / 127.x / ::1 only)",
    )


__all__ = [
    "Addresses",
    "Client",
    "FileProblem",
    "PushResult",
    "dataset_arrays",
    "push_wasm",
    "read_dataset_file",
    "read_model_file",
    "register",
    "write_dataset_file",
    "write_model_file",
]
