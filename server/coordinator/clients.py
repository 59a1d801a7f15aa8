"""The coordinator's `ModelBackend` over gRPC: the ModelRegistry through its generated stub and
the Aggregator through its one client (`server.aggregator.client`); and the data store's
dataset sizes (`DataStoreSizes`, the num_samples cap). Every call has a timeout; failures come
back as our own errors (`rpc_errors`), keeping the downstream status code."""

from __future__ import annotations

import asyncio
import itertools
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping

import grpc

from propeller.v1 import (
    datastore_pb2,
    datastore_pb2_grpc,
    model_registry_pb2,
    model_registry_pb2_grpc,
)
from server.aggregator.client import Aggregated, AggregatorClient, UpdateInput
from server.aggregator.strategies import strategy_class
from server.coordinator.backend import FEDAVG, BaseModel, Lineage, StateLineage, StrategyRun
from server.coordinator.rounds import Update
from server.coordinator.store import RoundUpdates, each_update, update_headers
from server.coordinator.wire import audit_record_to_proto
from server.errors import NotFound, Unavailable, rpc_errors
from server.lifecycle import cancel_and_wait
from server.models import model_uri
from server.paging import all_pages
from server.streams import UpdateMeta, model_stream, read_model_stream, update_header
from server.tensors import (
    DEFAULT_CHUNK_SIZE,
    Array,
    Tensors,
    digest_of,
    iter_chunks,
    sha256_of,
    specs_from_proto,
    specs_of,
    tensor_from_proto,
    total_bytes,
)

# Base models kept in memory for the distance bound: rounds in flight share a few.
BASE_MODELS_KEPT = 2


class GrpcModelBackend:
    """`ModelBackend` over a registry channel and an aggregator channel (owned by the caller)."""

    def __init__(
        self,
        registry: grpc.aio.Channel,
        aggregator: grpc.aio.Channel,
        *,
        timeout_s: float,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        self._registry = model_registry_pb2_grpc.ModelRegistryStub(registry)
        self._aggregator = AggregatorClient(aggregator, timeout_s=timeout_s, chunk_size=chunk_size)
        self._timeout_s = timeout_s
        self._chunk_size = chunk_size
        # uri -> its tensors being fetched or fetched (versions never change).
        self._bases: OrderedDict[str, asyncio.Task[Tensors]] = OrderedDict()

    async def _list_models(self) -> list[model_registry_pb2.ModelVersion]:
        """Every stored version (all the pages of ListModels)."""

        async def page(
            request: model_registry_pb2.ListModelsRequest,
        ) -> model_registry_pb2.ListModelsResponse:
            with rpc_errors("registry.ListModels"):
                response: model_registry_pb2.ListModelsResponse = await self._registry.ListModels(
                    request, timeout=self._timeout_s
                )
            return response

        request = model_registry_pb2.ListModelsRequest()
        return [m async for m in all_pages(page, request, lambda r: r.models)]

    async def resolve(self, model_ref: str) -> BaseModel:
        if model_ref:
            with rpc_errors(f"model_ref: {model_ref!r}"):
                info = await self._registry.GetModelInfo(
                    model_registry_pb2.GetModelRequest(model_uri=model_ref),
                    timeout=self._timeout_s,
                )
        else:
            models = await self._list_models()
            if not models:
                raise NotFound("model_ref: empty, and the registry holds no model yet")
            info = max(models, key=lambda m: m.version)
        specs = specs_from_proto(info.tensors, "registry.tensors")
        return BaseModel(info.model_uri or model_uri(info.version), specs, info.sha256)

    async def base_tensors(self, model_uri: str) -> Tensors:
        """The version's tensors, fetched once and kept (the last BASE_MODELS_KEPT)."""
        task = self._bases.get(model_uri)
        if task is None or (task.done() and (task.cancelled() or task.exception())):
            task = asyncio.ensure_future(self._fetch(model_uri))
            self._bases[model_uri] = task
            while len(self._bases) > BASE_MODELS_KEPT:
                self._bases.popitem(last=False)
        else:
            self._bases.move_to_end(model_uri)
        # Shielded: a caller that goes away does not cancel the fetch the others wait for.
        return await asyncio.shield(task)

    async def _fetch(self, uri: str) -> Tensors:
        with rpc_errors(f"registry.GetModel {uri}"):
            call = self._registry.GetModel(
                model_registry_pb2.GetModelRequest(model_uri=uri), timeout=self._timeout_s
            )
            header, tensors = await read_model_stream(call, "base model")
        digest = await digest_of(tensors)
        if header.sha256 != digest:
            raise Unavailable(f"registry.GetModel {uri}: the bytes do not match its sha256")
        return tensors

    async def aggregate(
        self, round_id: str, updates: RoundUpdates, run: StrategyRun = FEDAVG
    ) -> Aggregated:
        """Stream the strategy, its base and state, then the updates to the Aggregator one at
        a time: stored updates are read from the state store just before they are sent, so
        only one update's arrays are in memory."""
        return await self._aggregator.aggregate_round(
            round_id,
            _inputs(round_id, updates),
            strategy_name=run.name,
            strategy_params_json=run.params_json,
            base=run.base,
            state=run.state,
        )

    async def put(self, tensors: Tensors, sha256: str) -> tuple[int, str]:
        # No version in the header: the registry assigns the next one from what it stores.
        with rpc_errors("registry.PutModel"):
            info = await self._registry.PutModel(
                model_stream(tensors, self._chunk_size, sha256=sha256), timeout=self._timeout_s
            )
        return info.version, info.model_uri or model_uri(info.version)

    async def find(self, sha256: str, after_version: int) -> tuple[int, str] | None:
        for m in await self._list_models():
            if m.version > after_version and m.sha256 == sha256:
                return m.version, m.model_uri or model_uri(m.version)
        return None

    async def put_lineage(self, lineage: Lineage) -> None:
        with rpc_errors("registry.PutLineage"):
            await self._registry.PutLineage(
                lineage_chunks(lineage, self._chunk_size), timeout=self._timeout_s
            )


def lineage_header(lineage: Lineage) -> model_registry_pb2.Lineage:
    """The Lineage message the registry keeps: every update's header as its proplet sent it
    (tensors in the base model's order, signature included), sha256, certificate, clip."""
    rnd = lineage.round
    specs = list(rnd.specs)
    headers = update_headers(lineage.updates)
    weights = list(lineage.weights) or [0.0] * len(headers)
    return model_registry_pb2.Lineage(
        version=lineage.version,
        model_sha256=lineage.model_sha256,
        round_id=rnd.round_id,
        base_model_uri=rnd.model_ref,
        base_model_sha256=rnd.base_model_sha256,
        module_digest=rnd.module_digest,
        strategy=strategy_class(rnd.strategy_name).name,
        experiment_id=rnd.experiment_id,
        parent_version=rnd.base_version,
        strategy_params_json=rnd.strategy_params_json,
        state=None if lineage.state is None else state_record(lineage.state),
        audits=[audit_record_to_proto(a) for a in lineage.audits],
        contributions=[
            model_registry_pb2.Contribution(
                header=update_header(meta_of(rnd.round_id, u), specs),
                sha256=u.sha256,
                certificate=u.certificate,
                clip_scale=u.clip_scale,
                received_at=u.received_at,
                weight=weight,
            )
            for u, weight in zip(headers, weights, strict=True)
        ],
    )


def state_record(state: StateLineage) -> model_registry_pb2.LineageState:
    """The lineage's record of a stateful strategy's state (its bytes follow the updates')."""
    record = model_registry_pb2.LineageState(result_sha256=state.result_sha256)
    if state.from_version is not None and state.start is not None:
        specs = specs_of(state.start)
        record.from_version = state.from_version
        record.tensors.extend(s.to_proto() for s in specs)
        record.total_bytes = total_bytes(specs)
        record.sha256 = sha256_of(state.start)
    return record


async def lineage_chunks(
    lineage: Lineage, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> AsyncIterator[model_registry_pb2.LineageChunk]:
    """A PutLineage stream: the header, then each update's bytes in order (stored updates
    read one at a time)."""
    yield model_registry_pb2.LineageChunk(header=lineage_header(lineage))
    async for u in each_update(lineage.updates):
        for data in iter_chunks(u.tensors, chunk_size):
            yield model_registry_pb2.LineageChunk(data=data)
        del u
    state = lineage.state
    if state is not None and state.from_version is not None and state.start is not None:
        for data in iter_chunks(state.start, chunk_size):
            yield model_registry_pb2.LineageChunk(data=data)


def meta_of(round_id: str, u: Update) -> UpdateMeta:
    """An accepted update's header fields, as its proplet sent (and signed) them."""
    return UpdateMeta(
        round_id,
        u.proplet_id,
        u.base_model_uri,
        u.num_samples,
        dict(u.metrics),
        base_model_sha256=u.base_model_sha256,
        module_digest=u.module_digest,
        signature=u.signature,
        fuel_consumed=u.fuel_consumed,
    )


# The most proplets one GetDatasetInfos call names (the data store's limit).
SIZES_PER_CALL = 1000


class DataStoreSizes:
    """The data store as the coordinator asks it: `bounds.DatasetSizes` (a proplet's dataset
    size), and a proplet's whole dataset for the re-execution audit (`audit`), over a data
    store channel (owned by the caller; `aclose` before closing it).

    Sizes are asked with GetDatasetInfos, one call for all the lookups that arrived while the
    previous call was out: every lookup is still answered by a call made after it began (no
    size is remembered), but a burst of updates costs a few calls instead of one each (one
    GetDatasetInfo per update cost the coordinator and the data store ~0.2 s each per 1,000
    updates: docs/benchmarks.md, "Fleet")."""

    def __init__(self, channel: grpc.aio.Channel, *, timeout_s: float) -> None:
        self._stub = datastore_pb2_grpc.DataStoreStub(channel)
        self._timeout_s = timeout_s
        # Lookups not asked yet: proplet id -> their futures.
        self._waiting: dict[str, list[asyncio.Future[int]]] = {}
        self._asking: asyncio.Task[None] | None = None

    async def size(self, proplet_id: str) -> int:
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(proplet_id, []).append(waiter)
        if self._asking is None:
            self._asking = asyncio.create_task(self._ask(), name="datastore-sizes")
        return await waiter

    async def aclose(self) -> None:
        """Stop asking; lookups still waiting fail with Unavailable."""
        if self._asking is not None:
            await cancel_and_wait(self._asking)
        self._stop({})  # a task cancelled before it began ran no `finally`

    async def _ask(self) -> None:
        """Ask for the waiting lookups, in calls of at most SIZES_PER_CALL proplets, until
        none waits."""
        batch: dict[str, list[asyncio.Future[int]]] = {}
        try:
            while self._waiting:
                ids = list(itertools.islice(self._waiting, SIZES_PER_CALL))
                batch = {p: self._waiting.pop(p) for p in ids}
                try:
                    with rpc_errors("data store: GetDatasetInfos"):
                        answer = await self._stub.GetDatasetInfos(
                            datastore_pb2.GetDatasetInfosRequest(proplet_ids=ids),
                            timeout=self._timeout_s,
                        )
                except Exception as exc:  # the call's failure is each lookup's
                    _settle(batch, dict.fromkeys(batch, exc))
                else:
                    sizes = {d.proplet_id: int(d.size) for d in answer.datasets}
                    _settle(
                        batch,
                        {
                            p: sizes[p]
                            if p in sizes
                            else NotFound(f"proplet_id: no dataset for {p!r}")
                            for p in batch
                        },
                    )
                batch = {}
        finally:
            self._stop(batch)

    def _stop(self, asked: dict[str, list[asyncio.Future[int]]]) -> None:
        """No call out any more: the lookups `asked` (a call cut short) and those waiting
        fail with Unavailable."""
        self._asking = None
        left = {**asked, **self._waiting}
        self._waiting = {}
        stopped = Unavailable("data store: lookup stopped (the coordinator is stopping)")
        _settle(left, dict.fromkeys(left, stopped))

    async def dataset(self, proplet_id: str) -> tuple[Array, Array, str]:
        """The proplet's whole dataset, as a round task fetches it (split ""): features,
        labels and schema."""
        with rpc_errors("data store: GetDataset"):
            ds = await self._stub.GetDataset(
                datastore_pb2.GetDatasetRequest(proplet_id=proplet_id), timeout=self._timeout_s
            )
        features = tensor_from_proto(ds.features, "dataset.features")
        labels = tensor_from_proto(ds.labels, "dataset.labels")
        return features, labels, str(ds.schema)


def _settle(
    lookups: dict[str, list[asyncio.Future[int]]], answers: Mapping[str, int | Exception]
) -> None:
    """Answer each lookup still waited for with its proplet's answer: a size or an error."""
    for proplet_id, waiters in lookups.items():
        answer = answers[proplet_id]
        for waiter in waiters:
            if waiter.done():  # its caller gave up
                continue
            if isinstance(answer, Exception):
                waiter.set_exception(answer)
            else:
                waiter.set_result(answer)


async def _inputs(round_id: str, updates: RoundUpdates) -> AsyncIterator[UpdateInput]:
    async for u in each_update(updates):
        yield meta_of(round_id, u), u.tensors
        del u  # not held while the next one is read
