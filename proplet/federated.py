"""The federated-learning side of a task (the seed's "key idea").

A task whose env has ROUND_ID is a training round task. Before the module runs, the proplet
fetches the base model (ModelRegistry.GetModel, MODEL_URI) and its own dataset
(DataStore.GetDataset) and hands them to the module as JSON in MODEL_DATA and DATASET_DATA.
The module prints one JSON update on stdout; the proplet checks it against the round and the
base model and streams it to Coordinator.SubmitUpdate. The module itself never touches the
network.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from propeller.v1 import (
    coordinator_pb2,
    coordinator_pb2_grpc,
    datastore_pb2,
    datastore_pb2_grpc,
    model_registry_pb2,
    model_registry_pb2_grpc,
)
from proplet.errors import TaskFailed
from server.config import Endpoints
from server.errors import InvalidArgument
from server.grpc_server import channel
from server.streams import UpdateMeta, read_model_stream, update_stream
from server.tensors import (
    Tensors,
    check_finite,
    model_from_json,
    model_to_json,
    sha256_of,
    specs_of,
    tensor_from_proto,
)

log = logging.getLogger(__name__)

DATASET_SCHEMA = "fl-demo-dataset-v1"
_SCHEMES = ("grpc://", "http://", "https://", "dns:///")
# Large datasets are turned into JSON off the event loop.
_INLINE_JSON_ELEMENTS = 100_000


def service_address(raw: str, default: str) -> str:
    """A host:port from a task env URL ("grpc://coordinator:8086/", "http://..."), or the
    default when the env does not name one."""
    value = raw.strip()
    if not value:
        return default
    for scheme in _SCHEMES:
        if value.startswith(scheme):
            value = value[len(scheme) :]
            break
    return value.split("/", 1)[0] or default


def is_federated(env: Mapping[str, str]) -> bool:
    return bool(env.get("ROUND_ID", "").strip())


@dataclass(frozen=True)
class FlTask:
    """What a round task's env says: the round, its base model and where the services are."""

    round_id: str
    model_uri: str
    hyperparams: str
    coordinator: str
    registry: str
    datastore: str

    @classmethod
    def from_env(cls, env: Mapping[str, str], endpoints: Endpoints) -> FlTask:
        round_id = env.get("ROUND_ID", "").strip()
        if not round_id:
            raise TaskFailed("ROUND_ID: required for a federated task")
        model_uri = env.get("MODEL_URI", "").strip()
        if not model_uri:
            raise TaskFailed("MODEL_URI: required for a federated task (ROUND_ID is set)")
        hyperparams = env.get("HYPERPARAMS", "")
        if hyperparams.strip():
            try:
                parsed = json.loads(hyperparams)
            except ValueError:
                parsed = None
            if not isinstance(parsed, dict):
                raise TaskFailed(f"HYPERPARAMS: {hyperparams[:80]!r} is not a JSON object")
        return cls(
            round_id=round_id,
            model_uri=model_uri,
            hyperparams=hyperparams,
            coordinator=service_address(env.get("COORDINATOR_URL", ""), endpoints.coordinator),
            registry=service_address(env.get("MODEL_REGISTRY_URL", ""), endpoints.registry),
            datastore=service_address(env.get("DATA_STORE_URL", ""), endpoints.datastore),
        )


@dataclass(frozen=True)
class FlInputs:
    """The base model and the local dataset, as arrays and as the JSON the module reads."""

    model: Tensors
    model_json: str
    dataset_json: str
    dataset_size: int

    def env(self, task_env: Mapping[str, str], proplet_id: str) -> dict[str, str]:
        return {
            **task_env,
            "PROPLET_ID": proplet_id,
            "MODEL_DATA": self.model_json,
            "DATASET_DATA": self.dataset_json,
        }


@dataclass(frozen=True)
class Update:
    meta: UpdateMeta
    tensors: Tensors


def _json_number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else float(value)


def dataset_to_json(proplet_id: str, schema: str, features: Any, labels: Any) -> str:
    """The seed's DATASET_DATA: {"schema", "proplet_id", "data": [{"x", "y"}...], "size"}."""
    rows = features.tolist()
    ys = [_json_number(y) for y in labels.tolist()]
    data = [{"x": x, "y": y} for x, y in zip(rows, ys, strict=True)]
    return json.dumps(
        {
            "schema": schema or DATASET_SCHEMA,
            "proplet_id": proplet_id,
            "data": data,
            "size": len(data),
        }
    )


def _dataset_arrays(ds: datastore_pb2.Dataset) -> tuple[Any, Any]:
    try:
        features = tensor_from_proto(ds.features, "dataset.features")
        labels = tensor_from_proto(ds.labels, "dataset.labels")
    except InvalidArgument as exc:
        raise TaskFailed(f"data store: bad dataset: {exc}") from None
    if features.ndim != 2 or labels.ndim != 1 or features.shape[0] != labels.shape[0]:
        raise TaskFailed(
            f"data store: bad dataset: features shape {list(features.shape)} and labels shape "
            f"{list(labels.shape)} do not describe [size, num_features] and [size]"
        )
    return features, labels


def _rpc_failure(what: str, err: grpc.aio.AioRpcError) -> TaskFailed:
    return TaskFailed(f"{what}: {err.code().name}: {err.details()}")


def _bad_update(message: str) -> TaskFailed:
    return TaskFailed(f"invalid update: {message}")


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def parse_update(
    stdout: bytes, fl: FlTask, proplet_id: str, base: Tensors, dataset_size: int
) -> Update:
    """Check the module's stdout against the round and the base model; the update to submit."""
    try:
        text = stdout.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise _bad_update("stdout is not UTF-8") from None
    if not text:
        raise _bad_update("the module printed nothing on stdout")
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise _bad_update(f"stdout is not one JSON object ({exc}): {text[:80]!r}") from None
    if not isinstance(value, dict):
        raise _bad_update(f"stdout is JSON {type(value).__name__}, not an object")
    if value.get("round_id") != fl.round_id:
        raise _bad_update(f"round_id {value.get('round_id')!r}, the task is for {fl.round_id!r}")
    for key, expected in (("proplet_id", proplet_id), ("base_model_uri", fl.model_uri)):
        got = value.get(key, "")
        if got not in ("", expected):
            raise _bad_update(f"{key} {got!r}, expected {expected!r}")
    num_samples = value.get("num_samples")
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples <= 0:
        raise _bad_update(f"num_samples {num_samples!r} is not a positive integer")
    if num_samples > dataset_size:
        raise _bad_update(
            f"num_samples {num_samples} exceeds the {dataset_size} samples in DATASET_DATA"
        )
    metrics = value.get("metrics") or {}
    if not isinstance(metrics, dict) or not all(
        isinstance(k, str) and _is_number(v) and math.isfinite(v) for k, v in metrics.items()
    ):
        raise _bad_update(f"metrics {metrics!r} is not an object of finite numbers")
    if "update" not in value:
        raise _bad_update("no 'update' object")
    try:
        tensors = model_from_json(value["update"], specs_of(base), "update")
        check_finite(tensors, "update")
    except InvalidArgument as exc:
        raise _bad_update(str(exc)) from None
    meta = UpdateMeta(
        round_id=fl.round_id,
        proplet_id=proplet_id,
        base_model_uri=fl.model_uri,
        num_samples=num_samples,
        metrics={k: float(v) for k, v in metrics.items()},
    )
    return Update(meta, tensors)


def summary(update: Update, response: coordinator_pb2.SubmitUpdateResponse) -> str:
    """The task result of a round task: what was sent and what the coordinator said."""
    return json.dumps(
        {
            "round_id": update.meta.round_id,
            "num_samples": update.meta.num_samples,
            "metrics": update.meta.metrics,
            "accepted": response.accepted,
            "duplicate": response.duplicate,
            "num_updates": response.num_updates,
            "k_of_n": response.k_of_n,
            "round_state": coordinator_pb2.RoundState.Name(response.state),
        }
    )


class FederatedClient:
    """gRPC clients for the round services, one channel per address, kept across tasks."""

    def __init__(self, proplet_id: str, rpc_timeout_s: float) -> None:
        self.proplet_id = proplet_id
        self.rpc_timeout_s = rpc_timeout_s
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _channel(self, target: str) -> grpc.aio.Channel:
        ch = self._channels.get(target)
        if ch is None:
            ch = channel(target)
            self._channels[target] = ch
        return ch

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for ch in channels:
            await ch.close(None)

    async def fetch_model(self, fl: FlTask) -> Tensors:
        stub = model_registry_pb2_grpc.ModelRegistryStub(self._channel(fl.registry))
        call = stub.GetModel(
            model_registry_pb2.GetModelRequest(model_uri=fl.model_uri),
            timeout=self.rpc_timeout_s,
            wait_for_ready=True,
        )
        try:
            header, tensors = await read_model_stream(call, "model")
        except grpc.aio.AioRpcError as err:
            raise _rpc_failure(
                f"model registry {fl.registry}: GetModel {fl.model_uri}", err
            ) from None
        except InvalidArgument as exc:
            raise TaskFailed(f"model registry: bad model stream: {exc}") from None
        if header.sha256 and header.sha256 != sha256_of(tensors):
            raise TaskFailed(f"model registry: {fl.model_uri} arrived with a wrong sha256")
        return tensors

    async def fetch_dataset(self, fl: FlTask) -> datastore_pb2.Dataset:
        stub = datastore_pb2_grpc.DataStoreStub(self._channel(fl.datastore))
        try:
            ds: datastore_pb2.Dataset = await stub.GetDataset(
                datastore_pb2.GetDatasetRequest(proplet_id=self.proplet_id),
                timeout=self.rpc_timeout_s,
                wait_for_ready=True,
            )
        except grpc.aio.AioRpcError as err:
            raise _rpc_failure(
                f"data store {fl.datastore}: GetDataset {self.proplet_id}", err
            ) from None
        return ds

    async def fetch_inputs(self, fl: FlTask) -> FlInputs:
        model_task = asyncio.ensure_future(self.fetch_model(fl))
        try:
            ds = await self.fetch_dataset(fl)
            model = await model_task
        finally:
            if not model_task.done():
                model_task.cancel()
            await asyncio.wait({model_task})
            if not model_task.cancelled():
                model_task.exception()  # retrieved: the first failure is the one reported
        features, labels = _dataset_arrays(ds)
        model_json = json.dumps(model_to_json(model))
        if features.size > _INLINE_JSON_ELEMENTS:
            dataset_json = await asyncio.to_thread(
                dataset_to_json, self.proplet_id, ds.schema, features, labels
            )
        else:
            dataset_json = dataset_to_json(self.proplet_id, ds.schema, features, labels)
        return FlInputs(model, model_json, dataset_json, int(labels.shape[0]))

    async def submit(self, fl: FlTask, update: Update) -> coordinator_pb2.SubmitUpdateResponse:
        stub = coordinator_pb2_grpc.CoordinatorStub(self._channel(fl.coordinator))
        try:
            response: coordinator_pb2.SubmitUpdateResponse = await stub.SubmitUpdate(
                update_stream(update.meta, update.tensors),
                timeout=self.rpc_timeout_s,
                wait_for_ready=True,
            )
        except grpc.aio.AioRpcError as err:
            code = err.code()
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise _rpc_failure(f"coordinator {fl.coordinator} unreachable", err) from None
            raise _rpc_failure("coordinator rejected update", err) from None
        log.info(
            "[proplet.federated] round=%s proplet=%s submitted num_samples=%d duplicate=%s "
            "num_updates=%d/%d",
            fl.round_id,
            self.proplet_id,
            update.meta.num_samples,
            response.duplicate,
            response.num_updates,
            response.k_of_n,
        )
        return response
