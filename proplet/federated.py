"""The federated-learning side of a task (the seed's "key idea").

A task whose env has ROUND_ID is a training round task. Before the module runs, the proplet
fetches the base model (ModelRegistry.GetModel, MODEL_URI) and its own dataset
(DataStore.GetDataset) and hands them to the module in the trainer contract the module
declares (wasm-client/README.md): v1, JSON in MODEL_DATA and DATASET_DATA, answered by one
JSON update on stdout; v2 (the module exports `propeller_contract_v2`), two safetensors
containers on stdin, answered by one safetensors container on stdout. The proplet checks the
update against the round and the base model (`proplet.task_output`) and streams it to
Coordinator.SubmitUpdate. The module itself never touches the network.

A task whose env also has FL_TASK=evaluate is an evaluation task (federated evaluation): the
proplet fetches the model and the `test` split of its dataset, runs the module with
HYPERPARAMS plus {"task": "evaluate"}, submits nothing, and reports the module's
{"num_samples", "metrics"} as the task's results. A training task (FL_TASK "" or "train") may
say FL_SPLIT=train to train on the train split only ("" / "all": the whole dataset, as the
seed does).

Provenance (docs/security.md): a round task names the module its round pinned (env
MODULE_DIGEST); the proplet refuses to run any other (`FlTask.check_module`). Every update
carries the base model's sha256 and the digest of the module that produced it, and is signed
with the proplet's own key (its TLS bundle's `tls.key`) over `server.provenance.Claim`.

Every call to those services is retried while it fails with a transient status (UNAVAILABLE,
DEADLINE_EXCEEDED), with exponential backoff and jitter (`Backoff`), until the round's deadline
(env ROUND_DEADLINE; a task without one: the task timeout from the task's start). Each attempt
has its own timeout. Any other status is the service's answer and fails the task at once.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import grpc
from cryptography.hazmat.primitives.asymmetric import ec

from propeller.v1 import (
    coordinator_pb2,
    coordinator_pb2_grpc,
    datastore_pb2,
    datastore_pb2_grpc,
    model_registry_pb2,
)
from proplet import safetensors
from proplet.errors import TaskFailed
from proplet.runner import MAX_FUEL
from server import tracing
from server.config import Endpoints, TlsConfig
from server.downloads import model_download_call, read_model_download
from server.errors import DataLoss, InvalidArgument, RemoteError, as_remote_error, rpc_errors
from server.grpc_server import channel
from server.pki import PkiError, load_private_key
from server.provenance import Claim, check_module_digest, sign
from server.streams import UpdateMeta, update_stream
from server.tensors import (
    GRPC_OPTIONS,
    Array,
    Tensors,
    model_to_json,
    nbytes_of,
    offload_if_big,
    sha256_of,
    tensor_from_proto,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

DATASET_SCHEMA = "fl-demo-dataset-v1"
# A generated stub class (`FederatedClient._stub`).
S = TypeVar("S")
_SCHEMES = ("grpc://", "http://", "https://", "dns:///")
# The trainer contracts (wasm-client/README.md): v1 is JSON in env vars, v2 safetensors on
# stdin and stdout; a module says it speaks v2 by exporting CONTRACT_V2_EXPORT.
CONTRACT_V1, CONTRACT_V2 = 1, 2
# The env vars that carry v1's inputs; a v2 module never gets them.
_V1_INPUTS = ("MODEL_DATA", "DATASET_DATA")

# Statuses worth another attempt: the service is down, restarting, or did not answer in time,
# or the call was CANCELLED by gRPC itself (the proplet cancels its calls only through asyncio,
# which ends them with CancelledError, never this status; gRPC's core cancelled ~1 % of the
# downloads of a 3,000-proplet fleet under load, docs/benchmarks.md "Fleet"). Every call the
# proplet retries is idempotent (reads, and an update the coordinator counts once). Every
# other status is an answer and final: INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION (a
# rejected update stays rejected), and RESOURCE_EXHAUSTED, which our services and gRPC use for
# size limits that no retry changes.
TRANSIENT_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)
# An attempt's timeout is the RPC timeout cut to the time left before the deadline, but never
# below this (nor above the RPC timeout): the first attempt is always a real one, even when
# the deadline is (nearly) past, and the coordinator has the last word on a late update.
MIN_ATTEMPT_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class Backoff:
    """Delays between attempts at one call: exponential with "equal jitter". The n-th delay
    (n = 1, 2, ...) is drawn uniformly from [c/2, c] with c = min(max_s, initial_s * 2**(n-1)),
    so proplets that lost a service together do not retry in lockstep, and no delay is longer
    than max_s."""

    initial_s: float = 0.2
    max_s: float = 5.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.initial_s) and self.initial_s > 0):
            raise ValueError(f"retry_backoff_s: {self.initial_s} must be > 0")
        if not (math.isfinite(self.max_s) and self.max_s >= self.initial_s):
            raise ValueError(f"retry_max_backoff_s: {self.max_s} must be >= {self.initial_s}")

    def ceiling(self, attempt: int) -> float:
        """The largest delay after failed attempt number `attempt` (from 1)."""
        return min(self.max_s, self.initial_s * 2.0 ** min(max(attempt - 1, 0), 64))

    def delay(self, attempt: int, rng: random.Random) -> float:
        cap = self.ceiling(attempt)
        return cap / 2 + rng.random() * cap / 2

    def delays(self, rng: random.Random) -> Iterator[float]:
        """The delays after attempt 1, 2, 3, ... as `rng` draws them."""
        for attempt in itertools.count(1):
            yield self.delay(attempt, rng)


class CallFailed(Exception):
    """A call given up on: its last status, how many attempts were made and over how long."""

    def __init__(
        self, code: grpc.StatusCode, details: str, attempts: int, elapsed_s: float
    ) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.attempts = attempts
        self.elapsed_s = elapsed_s

    @property
    def transient(self) -> bool:
        return self.code in TRANSIENT_CODES

    def reason(self, service: str, address: str, call: str) -> str:
        """The task's failure reason: the service unreachable, or its answer."""
        if self.transient:
            times = "attempt" if self.attempts == 1 else "attempts"
            return (
                f"{service} at {address} unreachable after {self.attempts} {times} over "
                f"{self.elapsed_s:.1f}s: {self}"
            )
        return f"{service} {address}: {call}: {self}"


@dataclass
class RetryLog:
    """What `call_with_retries` did, attempt by attempt (for logs and tests)."""

    timeouts: list[float] = field(default_factory=list)
    delays: list[float] = field(default_factory=list)


async def call_with_retries(
    attempt: Callable[[float], Awaitable[T]],
    *,
    deadline: float,
    rpc_timeout_s: float,
    backoff: Backoff,
    rng: random.Random,
    what: str = "call",
    record: RetryLog | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """`await attempt(timeout)` until it returns, retrying transient failures (gRPC status in
    TRANSIENT_CODES, or no answer within `timeout`) after `backoff` delays for as long as the
    next attempt would start before `deadline` (a `clock()` time). Each attempt gets
    min(rpc_timeout_s, time left) but at least MIN_ATTEMPT_TIMEOUT_S (capped at rpc_timeout_s)
    and is cut off at that timeout even if the call ignores it. Raises CallFailed."""
    started = clock()
    for n in itertools.count(1):
        left = deadline - clock()
        timeout = min(rpc_timeout_s, max(left, MIN_ATTEMPT_TIMEOUT_S))
        if record is not None:
            record.timeouts.append(timeout)
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation.
            async with asyncio.timeout(timeout):
                with rpc_errors(what, as_remote_error):
                    return await attempt(timeout)
        except RemoteError as err:
            code, details = err.code, str(err)
        except TimeoutError:
            code, details = grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer within {timeout:g}s"
        failure = CallFailed(code, details, n, clock() - started)
        if not failure.transient:
            raise failure
        delay = backoff.delay(n, rng)
        left = deadline - clock()
        if delay >= left:
            raise failure
        if record is not None:
            record.delays.append(delay)
        log.warning(
            "[proplet.federated] %s: attempt %d failed: %s; retrying in %.2fs (%.1fs left)",
            what,
            n,
            failure,
            delay,
            left,
        )
        await asyncio.sleep(delay)
    raise AssertionError("unreachable")  # itertools.count never ends


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


TRAIN = "train"
EVALUATE = "evaluate"
# The HYPERPARAMS key (and its value) that asks the module to evaluate instead of training
# (wasm-client/README.md).
EVALUATE_HYPERPARAMS = {"task": EVALUATE}
# The data store splits a task may ask for, per kind of task: an evaluation always uses the
# held-out part, a training task never does.
_SPLITS = {TRAIN: ("", "all", "train"), EVALUATE: ("", "test")}


def _task_kind(env: Mapping[str, str]) -> tuple[str, str]:
    """(FL_TASK, the data store split) of a round task's env; TaskFailed naming the variable
    for values that are not allowed."""
    kind = env.get("FL_TASK", "").strip() or TRAIN
    if kind not in (TRAIN, EVALUATE):
        raise TaskFailed(f"FL_TASK: {kind[:40]!r} is not 'train' or 'evaluate'")
    split = env.get("FL_SPLIT", "").strip()
    allowed = _SPLITS[kind]
    if split not in allowed:
        raise TaskFailed(
            f"FL_SPLIT: {split[:40]!r} is not allowed for FL_TASK={kind} "
            f"(one of {', '.join(repr(a) for a in allowed)})"
        )
    if kind == EVALUATE:
        split = "test"
    return kind, split


@dataclass(frozen=True)
class FlTask:
    """What a round task's env says: the round, its base model and where the services are."""

    round_id: str
    model_uri: str
    hyperparams: str
    coordinator: str
    registry: str
    datastore: str
    # Unix seconds (env ROUND_DEADLINE, the coordinator's deadline for the round); None for a
    # task that does not say (a manual task).
    round_deadline: float | None = None
    # The module the round pinned (env MODULE_DIGEST, "sha256:<hex>"); "" for a task that
    # does not say (a manual task: any module, whose digest the update still carries).
    module_digest: str = ""
    # "train" (the seed's round task) or "evaluate" (env FL_TASK).
    kind: str = TRAIN
    # The part of the dataset to fetch: "" (all) or "train" for training, "test" to evaluate.
    split: str = ""
    # The round's fuel budget for a run (env FUEL_BUDGET; 0: the proplet's own limit).
    fuel_budget: int = 0

    @property
    def evaluates(self) -> bool:
        return self.kind == EVALUATE

    def module_env(self, env: Mapping[str, str]) -> dict[str, str]:
        """The task's env as the module sees it: an evaluation's HYPERPARAMS ask for
        evaluation."""
        if not self.evaluates:
            return dict(env)
        hyperparams = json.loads(self.hyperparams) if self.hyperparams.strip() else {}
        return {**env, "HYPERPARAMS": json.dumps({**hyperparams, **EVALUATE_HYPERPARAMS})}

    def check_module(self, sha256: str) -> str:
        """The digest of the module about to run (`sha256`: hex of its bytes), once it is the
        pinned one; TaskFailed before anything runs otherwise."""
        digest = f"sha256:{sha256}"
        if self.module_digest and digest != self.module_digest:
            raise TaskFailed(
                f"module digest mismatch: the task's module is {digest}, round "
                f"{self.round_id!r} pinned {self.module_digest}; not run"
            )
        return digest

    def retry_deadline(self, task_timeout_s: float) -> float:
        """Until when (a time.monotonic() time) the round's services are retried: the round's
        deadline, or `task_timeout_s` from now for a task without one."""
        now = time.monotonic()
        if self.round_deadline is None:
            return now + task_timeout_s
        return now + (self.round_deadline - time.time())

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
        else:
            parsed = {}
        kind, split = _task_kind(env)
        # FL_TASK says what the task is; a HYPERPARAMS "task" saying otherwise would make the
        # module print what the proplet does not expect.
        if "task" in parsed and parsed["task"] != kind:
            raise TaskFailed(
                f"HYPERPARAMS: its 'task' {str(parsed['task'])[:40]!r} contradicts "
                f"FL_TASK={kind}; leave it out (the proplet sets it)"
            )
        try:
            module_digest = check_module_digest(
                env.get("MODULE_DIGEST", "").strip(), "MODULE_DIGEST"
            )
        except InvalidArgument as exc:
            raise TaskFailed(str(exc)) from None
        return cls(
            kind=kind,
            split=split,
            fuel_budget=_fuel_budget(env.get("FUEL_BUDGET", "")),
            round_deadline=_round_deadline(env.get("ROUND_DEADLINE", "")),
            module_digest=module_digest,
            round_id=round_id,
            model_uri=model_uri,
            hyperparams=hyperparams,
            coordinator=service_address(env.get("COORDINATOR_URL", ""), endpoints.coordinator),
            registry=service_address(env.get("MODEL_REGISTRY_URL", ""), endpoints.registry),
            datastore=service_address(env.get("DATA_STORE_URL", ""), endpoints.datastore),
        )


def _fuel_budget(raw: str) -> int:
    """FUEL_BUDGET as a fuel count; empty or 0: none (the proplet's own limit)."""
    text = raw.strip()
    if not text:
        return 0
    if not (text.isascii() and text.isdigit()) or int(text) > MAX_FUEL:
        raise TaskFailed(f"FUEL_BUDGET: {text[:40]!r} is not a fuel count (0 to {MAX_FUEL})")
    return int(text)


def _round_deadline(raw: str) -> float | None:
    """ROUND_DEADLINE as unix seconds; empty or 0: none."""
    text = raw.strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise TaskFailed(f"ROUND_DEADLINE: {text[:40]!r} is not a time in unix seconds")
    return value or None


@dataclass(frozen=True)
class FlInputs:
    """The base model and the local dataset, handed to the module in the contract it speaks
    (wasm-client/README.md): v1 as JSON in MODEL_DATA and DATASET_DATA, v2 as two
    safetensors containers on stdin."""

    model: Tensors
    features: Array
    labels: Array
    schema: str = ""
    # The base model's sha256 (hex), checked against what the registry said on fetch.
    model_sha256: str = ""

    @property
    def dataset_size(self) -> int:
        return int(self.labels.shape[0])

    def env(self, task_env: Mapping[str, str], proplet_id: str) -> dict[str, str]:
        """Contract v1: the task env with the model and the dataset as JSON."""
        return {
            **task_env,
            "PROPLET_ID": proplet_id,
            "MODEL_DATA": json.dumps(model_to_json(self.model)),
            "DATASET_DATA": dataset_to_json(proplet_id, self.schema, self.features, self.labels),
        }

    def stdin(self) -> bytes:
        """Contract v2: the model's container, then the dataset's (`x` [n, d], `y` [n])."""
        return safetensors.encode(self.model) + safetensors.encode(
            {"x": self.features, "y": self.labels}
        )

    async def invocation_inputs(
        self, contract: int, task_env: Mapping[str, str], proplet_id: str
    ) -> tuple[dict[str, str], bytes]:
        """(env, stdin) for a module speaking `contract`; the encoding runs off the event
        loop when the data is big."""
        nbytes = nbytes_of(self.model) + self.features.nbytes
        if contract == CONTRACT_V2:
            env = {k: v for k, v in task_env.items() if k not in _V1_INPUTS}
            stdin = await offload_if_big(nbytes * 2, self.stdin)
            return {**env, "PROPLET_ID": proplet_id}, stdin
        # JSON text is ~20 bytes per number: worth a thread much sooner than raw bytes.
        return await offload_if_big(nbytes * 20, self.env, task_env, proplet_id), b""


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


def signed(update: Update, key: ec.EllipticCurvePrivateKey) -> Update:
    """`update` with its signature: over its claims and the sha256 of its bytes (in the base
    model's order, the order `parse_update` put them in)."""
    meta = update.meta
    claim = Claim.of(
        meta,
        round_id=meta.round_id,
        base_model_sha256=meta.base_model_sha256,
        update_sha256=sha256_of(update.tensors),
    )
    return Update(replace(meta, signature=sign(key, claim)), update.tensors)


def summary(update: Update, response: coordinator_pb2.SubmitUpdateResponse) -> str:
    """The task result of a round task: what was sent and what the coordinator said."""
    return json.dumps(
        {
            "round_id": update.meta.round_id,
            "num_samples": update.meta.num_samples,
            "metrics": update.meta.metrics,
            "fuel_consumed": update.meta.fuel_consumed,
            "accepted": response.accepted,
            "duplicate": response.duplicate,
            "num_updates": response.num_updates,
            "k_of_n": response.k_of_n,
            "round_state": coordinator_pb2.RoundState.Name(response.state),
        }
    )


class FederatedClient:
    """gRPC clients for the round services, one channel per address, kept across tasks.

    Every call is retried on transient failures (see `call_with_retries`) until the deadline
    given (a time.monotonic() time; None: one RPC timeout from now)."""

    def __init__(
        self,
        proplet_id: str,
        rpc_timeout_s: float,
        *,
        backoff: Backoff | None = None,
        rng: random.Random | None = None,
        tls: TlsConfig | None,
    ) -> None:
        self.proplet_id = proplet_id
        self.tls = tls
        self.rpc_timeout_s = rpc_timeout_s
        self.backoff = backoff or Backoff()
        # Seeded from the OS per proplet: two proplets draw different delays.
        self.rng = rng or random.Random()
        self._channels: dict[str, grpc.aio.Channel] = {}
        # (address, stub class) -> its stub over the address's channel: a stub builds a
        # callable per method, more than the call itself costs the proplet's loop.
        self._stubs: dict[tuple[str, Callable[[grpc.aio.Channel], Any]], Any] = {}
        self._key: ec.EllipticCurvePrivateKey | None = None

    async def signing_key(self) -> ec.EllipticCurvePrivateKey | None:
        """The proplet's own key (its TLS bundle's), read once; None over plaintext."""
        if self.tls is None:
            return None
        if self._key is None:
            try:
                self._key = await asyncio.to_thread(load_private_key, self.tls.key)
            except PkiError as exc:
                raise TaskFailed(f"cannot sign the update: {exc}") from None
        return self._key

    def _channel(self, target: str) -> grpc.aio.Channel:
        ch = self._channels.get(target)
        if ch is None:
            # While a service is down the channel tries to reconnect at least every
            # backoff.max_s (gRPC's default grows to 120 s), so an attempt soon after the
            # service is back finds it.
            ch = channel(
                target,
                self.tls,
                [
                    *GRPC_OPTIONS,
                    (
                        "grpc.initial_reconnect_backoff_ms",
                        max(1, int(self.backoff.initial_s * 1000)),
                    ),
                    ("grpc.max_reconnect_backoff_ms", max(1, int(self.backoff.max_s * 1000))),
                ],
            )
            self._channels[target] = ch
        return ch

    def _stub(self, target: str, stub_class: Callable[[grpc.aio.Channel], S]) -> S:
        """The `stub_class` stub over the channel to `target`, made once."""
        stub: S | None = self._stubs.get((target, stub_class))
        if stub is None:
            stub = self._stubs[(target, stub_class)] = stub_class(self._channel(target))
        return stub

    async def close(self) -> None:
        self._stubs = {}
        channels, self._channels = list(self._channels.values()), {}
        for ch in channels:
            await ch.close(None)

    async def _call(
        self, attempt: Callable[[float], Awaitable[T]], deadline: float | None, what: str
    ) -> T:
        if deadline is None:
            deadline = time.monotonic() + self.rpc_timeout_s
        return await call_with_retries(
            attempt,
            deadline=deadline,
            rpc_timeout_s=self.rpc_timeout_s,
            backoff=self.backoff,
            rng=self.rng,
            what=f"proplet={self.proplet_id} {what}",
        )

    @tracing.traced("fetch model")
    async def fetch_model(self, fl: FlTask, deadline: float | None = None) -> tuple[Tensors, str]:
        """The base model and its sha256 (hex), the bytes checked against the header's digest
        as they arrive (`server.downloads.read_model_download`: BLAKE3 when the registry states
        it, else sha256)."""
        registry = self._channel(fl.registry)
        call_name = f"GetModel {fl.model_uri}"

        async def attempt(timeout: float) -> tuple[Any, Tensors]:
            request = model_registry_pb2.GetModelRequest(model_uri=fl.model_uri)
            call = model_download_call(registry, request, timeout=timeout)
            return await read_model_download(call, "model")

        try:
            header, tensors = await self._call(
                attempt, deadline, f"model registry at {fl.registry}: {call_name}"
            )
        except CallFailed as failed:
            raise TaskFailed(failed.reason("model registry", fl.registry, call_name)) from None
        except DataLoss as exc:
            raise TaskFailed(f"model registry: {fl.model_uri} arrived damaged: {exc}") from None
        except InvalidArgument as exc:
            raise TaskFailed(f"model registry: bad model stream: {exc}") from None
        return tensors, header.sha256

    @tracing.traced("fetch dataset")
    async def fetch_dataset(
        self, fl: FlTask, deadline: float | None = None
    ) -> datastore_pb2.Dataset:
        stub = self._stub(fl.datastore, datastore_pb2_grpc.DataStoreStub)
        call_name = f"GetDataset {self.proplet_id}" + (f" split={fl.split}" if fl.split else "")
        request = datastore_pb2.GetDatasetRequest(proplet_id=self.proplet_id, split=fl.split)

        async def attempt(timeout: float) -> datastore_pb2.Dataset:
            ds: datastore_pb2.Dataset = await stub.GetDataset(request, timeout=timeout)
            return ds

        try:
            return await self._call(attempt, deadline, f"data store at {fl.datastore}: {call_name}")
        except CallFailed as failed:
            raise TaskFailed(failed.reason("data store", fl.datastore, call_name)) from None

    async def fetch_inputs(self, fl: FlTask, deadline: float | None = None) -> FlInputs:
        model_task = asyncio.ensure_future(self.fetch_model(fl, deadline))
        try:
            ds = await self.fetch_dataset(fl, deadline)
            model, model_sha256 = await model_task
        finally:
            if not model_task.done():
                model_task.cancel()
            await asyncio.wait({model_task})
            if not model_task.cancelled():
                model_task.exception()  # retrieved: the first failure is the one reported
        features, labels = _dataset_arrays(ds)
        return FlInputs(model, features, labels, ds.schema, model_sha256)

    @tracing.traced("SubmitUpdate")
    async def submit(
        self, fl: FlTask, update: Update, deadline: float | None = None
    ) -> coordinator_pb2.SubmitUpdateResponse:
        """Sign the update (with TLS) and stream it to the coordinator. A retry after a lost
        reply is safe: the coordinator counts each participant once and answers
        `duplicate`."""
        stub = self._stub(fl.coordinator, coordinator_pb2_grpc.CoordinatorStub)
        key = await self.signing_key()
        if key is not None:
            update = await asyncio.to_thread(signed, update, key)

        async def attempt(timeout: float) -> coordinator_pb2.SubmitUpdateResponse:
            response: coordinator_pb2.SubmitUpdateResponse = await stub.SubmitUpdate(
                update_stream(update.meta, update.tensors), timeout=timeout
            )
            return response

        try:
            response = await self._call(
                attempt, deadline, f"coordinator at {fl.coordinator}: SubmitUpdate"
            )
        except CallFailed as failed:
            if failed.transient:
                raise TaskFailed(
                    failed.reason("coordinator", fl.coordinator, "SubmitUpdate")
                ) from None
            raise TaskFailed(f"coordinator rejected update: {failed}") from None
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
