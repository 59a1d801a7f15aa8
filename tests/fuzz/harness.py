"""The fuzz harness: one real in-process `Stack` with known-good state, a generic caller that
sends structured messages or raw bytes to any RPC over real gRPC, the documented status codes,
and the loop that runs Hypothesis and checks every answer and, after each batch, the state.

Hypothesis runs in a worker thread; every request is sent on the test's event loop (where the
servers live) through `run_coroutine_threadsafe`, so the servers keep running between
examples and generating the next request overlaps with serving the last one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from propeller.v1 import (
    coordinator_pb2,
    datastore_pb2,
    manager_pb2,
    model_registry_pb2,
    tensor_pb2,
)
from server.config import MqttConfig
from server.messages import PropletAnnounce
from server.models import model_uri
from server.mqtt import MqttSession
from server.streams import UpdateMeta, model_stream, update_stream
from server.tensors import Tensors, sha256_of, tensor_to_proto
from server.topics import Topics
from tests.fuzz import strategies as S
from tests.support.clients import Clients
from tests.support.cluster import cluster
from tests.support.infra import Mosquitto
from tests.support.waits import eventually

log = logging.getLogger(__name__)

RPC_TIMEOUT = 30.0
# A generous bound for one example (request + answer); more than this is a hang.
EXAMPLE_TIMEOUT = 60.0

# How many requests each RPC gets comes from the Hypothesis profile (tests/conftest.py:
# `ci`, 1,000 per RPC; `dev`, 50): `fuzz` reads `settings().max_examples` when it runs.
FUZZ_SETTINGS = settings(
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=False,
    phases=(Phase.explicit, Phase.generate, Phase.shrink),
    suppress_health_check=list(HealthCheck),
)

# ---- the known-good state ----------------------------------------------------------------

PROPLET = "p-good"  # registered (MQTT announcement), has a seeded dataset, reported in ROUND
PROPLET_TWO = "p-two"  # registered, participant of ROUND that has not reported
DATASET_PUT = "p-put"  # dataset stored through PutDataset
ROUND = "r-good"  # configured and open, one accepted update (PROPLET's)
EXPERIMENT = "exp-good"
EXPERIMENT_ROUND = "r-exp"
V0_URI = model_uri(0)
V1_URI = model_uri(1)
IMAGE = "registry.example:5000/fl-client-wasm:latest"
V1: Tensors = {
    "w": np.array([0.5, -1.25, 2.0], dtype=np.float64),
    "b": np.array(0.75, dtype=np.float64),
}
UPDATE: Tensors = {
    "w": np.array([0.25, 0.5, -0.5], dtype=np.float64),
    "b": np.array(-0.125, dtype=np.float64),
}
PUT_FEATURES = np.array([[1.0, 2.0], [3.0, -4.5], [0.0, 0.25]], dtype=np.float64)
PUT_LABELS = np.array([1.0, 0.0, 1.0], dtype=np.float64)

KNOWN_PROPLETS = (PROPLET, PROPLET_TWO, DATASET_PUT)
KNOWN_DATASETS = (PROPLET, DATASET_PUT)
KNOWN_ROUNDS = (ROUND, EXPERIMENT_ROUND)
KNOWN_URIS = (V0_URI, V1_URI, model_uri(2), model_uri(999))
# ROUND's configuration, as seeded (and started).
SEEDED_ROUND = coordinator_pb2.ConfigureRoundRequest(
    round_id=ROUND,
    experiment_id="exp-manual",
    participants=[PROPLET, PROPLET_TWO],
    k_of_n=2,
    timeout_s=24 * 3600,
    model_ref=V1_URI,
    task_wasm_image=IMAGE,
)

# ---- the documented status codes ---------------------------------------------------------

CP, DS, MP, MR = coordinator_pb2, datastore_pb2, manager_pb2, model_registry_pb2
C = grpc.StatusCode
# What every RPC may answer with all services up. INVALID_ARGUMENT is always possible: an
# undecodable request body is answered with it before the servicer runs.
ALLOWED: dict[str, frozenset[grpc.StatusCode]] = {
    name: frozenset({C.OK, C.INVALID_ARGUMENT, *codes})
    for name, codes in {
        "ModelRegistry.InitModel": {C.ALREADY_EXISTS},
        "ModelRegistry.PutModel": {C.ALREADY_EXISTS, C.FAILED_PRECONDITION},
        "ModelRegistry.GetModel": {C.NOT_FOUND},
        "ModelRegistry.GetModelInfo": {C.NOT_FOUND},
        "ModelRegistry.ListModels": set(),
        "DataStore.GetDataset": {C.NOT_FOUND},
        "DataStore.PutDataset": set(),
        "DataStore.ListDatasets": set(),
        "Aggregator.Aggregate": set(),
        "Coordinator.ConfigureRound": {C.NOT_FOUND, C.ALREADY_EXISTS},
        "Coordinator.StartRound": {C.NOT_FOUND, C.FAILED_PRECONDITION},
        "Coordinator.SubmitUpdate": {C.NOT_FOUND, C.FAILED_PRECONDITION},
        "Coordinator.GetRoundStatus": {C.NOT_FOUND},
        "Coordinator.ListRounds": set(),
        "Coordinator.WatchRound": {C.NOT_FOUND},
        "Manager.StartExperiment": {C.NOT_FOUND, C.ALREADY_EXISTS, C.FAILED_PRECONDITION},
        "Manager.GetExperiment": {C.NOT_FOUND},
        "Manager.ListExperiments": set(),
        "Manager.GetRoundStatus": {C.NOT_FOUND},
        "Manager.ListProplets": set(),
        "Manager.GetProplet": {C.NOT_FOUND},
        "Manager.CreateTask": set(),
        "Manager.StartTask": {C.NOT_FOUND, C.FAILED_PRECONDITION},
        "Manager.StopTask": {C.NOT_FOUND, C.FAILED_PRECONDITION},
        "Manager.GetTask": {C.NOT_FOUND},
        "Manager.ListTasks": set(),
    }.items()
}

# ---- calling any RPC with messages or raw bytes ------------------------------------------

Kind = Literal["unary_unary", "unary_stream", "stream_unary", "stream_stream"]
Body = Message | bytes


@dataclass(frozen=True)
class Rpc:
    service: str  # short name, e.g. "ModelRegistry"
    method: str
    kind: Kind
    request: type[Message]  # the request type, or the chunk type of a request stream
    response: type[Message]
    # Server streams that stay open while the round runs: read the first message, then cancel.
    first_only: bool = False

    @classmethod
    def of(cls, name: str, *, first_only: bool = False) -> Rpc:
        """The RPC "Service.Method" of propeller.v1, as its descriptor declares it."""
        service, method = name.split(".")
        found = descriptor_pool.Default().FindMethodByName(f"propeller.v1.{name}")
        streams = ("stream" if found.client_streaming else "unary") + (
            "_stream" if found.server_streaming else "_unary"
        )
        kinds: dict[str, Kind] = {
            "unary_unary": "unary_unary",
            "unary_stream": "unary_stream",
            "stream_unary": "stream_unary",
            "stream_stream": "stream_stream",
        }
        request = message_factory.GetMessageClass(found.input_type)
        response = message_factory.GetMessageClass(found.output_type)
        return cls(service, method, kinds[streams], request, response, first_only)

    @property
    def name(self) -> str:
        return f"{self.service}.{self.method}"

    @property
    def path(self) -> str:
        return f"/propeller.v1.{self.service}/{self.method}"


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    responses: list[Message]

    @property
    def ok(self) -> bool:
        return self.code == grpc.StatusCode.OK

    @property
    def response(self) -> Any:
        return self.responses[0]


def _serialize(body: Body) -> bytes:
    return body if isinstance(body, bytes) else body.SerializeToString()


def decodes(rpc: Rpc, body: Body) -> bool:
    """Whether the server can parse `body` as the RPC's request (or chunk) type."""
    if not isinstance(body, bytes):
        return True
    try:
        rpc.request.FromString(body)
    except DecodeError:
        return False
    return True


@dataclass
class FuzzEnv(Clients):
    """Clients of every service (`Clients.channels` by service name) and the known-good state."""

    topics: Topics
    mqtt: MqttConfig
    task_id: str = ""  # a PENDING task
    scheduled_task_id: str = ""  # a SCHEDULED task (its start was published)
    counts: dict[str, int] = field(default_factory=dict)
    # Rounds a test module added to the known-good state.
    extra_rounds: list[str] = field(default_factory=list)
    snapshot_at_start: dict[str, bytes] = field(default_factory=dict)

    # -- sending --------------------------------------------------------------------------

    async def call(self, rpc: Rpc, body: Body | Sequence[Body]) -> Outcome:
        """Send `body` (a message or raw bytes; a sequence of them for a request stream) and
        collect the answer. Never raises for a status: the status is the outcome."""
        ch = self.channels[rpc.service]
        de = rpc.response.FromString
        responses: list[Message] = []
        try:
            if rpc.kind == "unary_unary":
                uu = ch.unary_unary(rpc.path, _serialize, de)
                assert isinstance(body, Message | bytes)
                responses.append(await uu(body, timeout=RPC_TIMEOUT))
            elif rpc.kind == "stream_unary":
                su = ch.stream_unary(rpc.path, _serialize, de)
                assert not isinstance(body, Message | bytes)
                responses.append(await su(iter(body), timeout=RPC_TIMEOUT))
            elif rpc.kind == "unary_stream":
                us = ch.unary_stream(rpc.path, _serialize, de)
                assert isinstance(body, Message | bytes)
                call = us(body, timeout=RPC_TIMEOUT)
                async for r in call:
                    responses.append(r)
                    if rpc.first_only:
                        call.cancel()
                        break
            else:
                ss = ch.stream_stream(rpc.path, _serialize, de)
                assert not isinstance(body, Message | bytes)
                async for r in ss(iter(body), timeout=RPC_TIMEOUT):
                    responses.append(r)
        except grpc.aio.AioRpcError as err:
            return Outcome(err.code(), err.details() or "", responses)
        return Outcome(grpc.StatusCode.OK, "", responses)

    # -- state ----------------------------------------------------------------------------

    async def snapshot(self) -> dict[str, bytes]:
        """Every piece of known-good state, serialised (deterministically) for comparison."""
        out: dict[str, bytes] = {}
        for version in (0, 1):
            header, data = await self.model_bytes(version)
            assert sha256_of_bytes(data) == header.sha256, f"v{version}: bytes do not hash"
            out[f"model v{version} header"] = _bytes(header)
            out[f"model v{version} bytes"] = data
        coord, mgr, reg, data = self.coordinator, self.manager, self.registry, self.datastore
        reads: list[tuple[str, Any, Message]] = []  # (key, RPC, request)
        for v in (0, 1):
            reads.append((f"model v{v} info", reg.GetModelInfo, MR.GetModelRequest(version=v)))
        for p in KNOWN_DATASETS:
            reads.append((f"dataset {p}", data.GetDataset, DS.GetDatasetRequest(proplet_id=p)))
        for r in (*KNOWN_ROUNDS, *self.extra_rounds):
            request = CP.GetRoundStatusRequest(round_id=r)
            reads.append((f"round {r}", coord.GetRoundStatus, request))
            reads.append((f"round {r} via manager", mgr.GetRoundStatus, request))
        for t in (self.task_id, self.scheduled_task_id):
            reads.append((f"task {t}", mgr.GetTask, MP.TaskRef(task_id=t)))
        for p in (PROPLET, PROPLET_TWO):
            reads.append((f"proplet {p}", mgr.GetProplet, MP.GetPropletRequest(proplet_id=p)))
        experiment = MP.GetExperimentRequest(experiment_id=EXPERIMENT)
        reads.append(("experiment", mgr.GetExperiment, experiment))
        for key, method, message in reads:
            out[key] = _bytes(await method(message, timeout=RPC_TIMEOUT))
        models = await reg.ListModels(MR.ListModelsRequest(), timeout=RPC_TIMEOUT)
        for m in models.models:
            if m.version in (0, 1):
                out[f"listed v{m.version}"] = _bytes(m)
        datasets = await data.ListDatasets(DS.ListDatasetsRequest(), timeout=RPC_TIMEOUT)
        for info in datasets.datasets:
            if info.proplet_id in KNOWN_DATASETS:
                out[f"listed dataset {info.proplet_id}"] = _bytes(info)
        return out

    async def model_bytes(self, version: int) -> tuple[tensor_pb2.ModelHeader, bytes]:
        header: tensor_pb2.ModelHeader | None = None
        data = b""
        async for chunk in self.registry.GetModel(
            MR.GetModelRequest(version=version), timeout=RPC_TIMEOUT
        ):
            if chunk.WhichOneof("part") == "header":
                header = chunk.header
            else:
                data += chunk.data
        assert header is not None
        return header, data

    async def check_state(self) -> None:
        """The known-good state is exactly as it was, and every server answers health."""
        now = await self.snapshot()
        before = self.snapshot_at_start
        changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
        assert not changed, f"accepted state changed: {changed}"
        await self.check_health()

    async def check_health(self) -> None:
        for name, ch in self.channels.items():
            stub = health_pb2_grpc.HealthStub(ch)
            for service in ("", f"propeller.v1.{name}"):
                resp = await stub.Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT
                )
                assert resp.status == health_pb2.HealthCheckResponse.SERVING, (name, service)


def sha256_of_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _bytes(message: Message) -> bytes:
    return message.SerializeToString(deterministic=True)


async def seed(env: FuzzEnv) -> None:
    """Put the known-good state in through the public interfaces."""
    v0 = await env.init_model(3)
    assert v0.model_uri == V0_URI
    v1 = await env.registry.PutModel(model_stream(V1, 16), timeout=RPC_TIMEOUT)
    assert v1.model_uri == V1_URI and v1.sha256 == sha256_of(V1)

    await env.datastore.PutDataset(
        DS.PutDatasetRequest(
            dataset=DS.Dataset(
                proplet_id=DATASET_PUT,
                features=tensor_to_proto(PUT_FEATURES),
                labels=tensor_to_proto(PUT_LABELS),
            )
        ),
        timeout=RPC_TIMEOUT,
    )

    async with MqttSession(
        env.mqtt, f"fuzz-announcer-{uuid.uuid4().hex[:8]}", clean_session=True
    ) as s:
        for pid in (PROPLET, PROPLET_TWO):
            announce = PropletAnnounce(proplet_id=pid, name=f"{pid}-name", metadata={"os": "fz"})
            await s.publish(env.topics.proplet_create, announce.to_json())
    await eventually(
        lambda: env.proplets(),
        lambda ps: {PROPLET, PROPLET_TWO} <= {p.id for p in ps},
        timeout=30,
        what="the known proplets registered",
    )

    configure = CP.ConfigureRoundRequest()
    configure.CopyFrom(SEEDED_ROUND)
    configure.start = True
    await env.coordinator.ConfigureRound(configure, timeout=RPC_TIMEOUT)
    meta = UpdateMeta(ROUND, PROPLET, V1_URI, 10, {"loss": 0.5})
    accepted = await env.coordinator.SubmitUpdate(update_stream(meta, UPDATE), timeout=RPC_TIMEOUT)
    assert accepted.accepted and not accepted.duplicate and accepted.num_updates == 1

    started = await env.manager.StartExperiment(
        MP.StartExperimentRequest(
            experiment_id=EXPERIMENT,
            round_id=EXPERIMENT_ROUND,
            model_ref=V0_URI,
            participants=[PROPLET, "p-unknown"],
            k_of_n=1,
            timeout_s=24 * 3600,
            task_wasm_image=IMAGE,
        ),
        timeout=RPC_TIMEOUT,
    )
    assert [s.proplet_id for s in started.scheduled] == [PROPLET]

    task = await env.manager.CreateTask(
        MP.CreateTaskRequest(
            name="fz-task", image_url=IMAGE, env={"A": "1"}, cli_args=["x"], proplet_id=PROPLET
        ),
        timeout=RPC_TIMEOUT,
    )
    env.task_id = task.id
    other = await env.manager.CreateTask(
        MP.CreateTaskRequest(name="fz-scheduled", file=b"\x00asm", proplet_id=PROPLET),
        timeout=RPC_TIMEOUT,
    )
    scheduled = await env.manager.StartTask(MP.TaskRef(task_id=other.id), timeout=RPC_TIMEOUT)
    assert scheduled.state == MP.TASK_STATE_SCHEDULED
    env.scheduled_task_id = other.id


def state_dir(factory: pytest.TempPathFactory) -> Path | None:
    """Where the services keep durable state: in memory by default; PROPELLER_FUZZ_DURABLE=1
    fuzzes the SQLite-backed stores instead (same tests, same checks)."""
    if os.environ.get("PROPELLER_FUZZ_DURABLE", "") in ("", "0"):
        return None
    return factory.mktemp("fuzz-state")


@contextlib.asynccontextmanager
async def fuzz_env(broker: Mosquitto, factory: pytest.TempPathFactory) -> AsyncIterator[FuzzEnv]:
    """The Stack (no proplet: the known ones announce themselves over MQTT in `seed`) with
    the known-good state in it, checked healthy."""
    topics = Topics(domain=f"fz{uuid.uuid4().hex[:8]}", channel="fl")
    mqtt = MqttConfig(port=broker.port, topics=topics)
    stack = {
        "state_dir": state_dir(factory),
        "seed_proplet_ids": (PROPLET,),
        "num_samples": 8,
        "num_features": 3,
        # Known proplets stay alive for the whole run, so experiments really get scheduled.
        "alive_window_s": 24 * 3600,
    }
    async with cluster(mqtt, factory.mktemp("fuzz"), dimension=None, stack=stack) as c:
        env = FuzzEnv(c.channels, topics=topics, mqtt=mqtt)
        await seed(env)
        env.snapshot_at_start = await env.snapshot()
        await env.check_health()
        yield env


# ---- the fuzz loop -----------------------------------------------------------------------

Check = Callable[[Any, Outcome], None]
# One line per fuzzed RPC (requests, time, status codes), printed at the end of the session.
RESULTS: list[str] = []


def check_status(rpc: Rpc, body: Any, outcome: Outcome) -> None:
    """The answer's status is one the RPC documents; never UNKNOWN or INTERNAL."""
    where = f"{rpc.name}: {outcome.code.name}: {outcome.details[:300]!r}"
    assert outcome.code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), where
    assert outcome.code in ALLOWED[rpc.name], where
    bodies: Iterable[Any] = body if isinstance(body, list) else [body]
    if not all(decodes(rpc, b) for b in bodies):
        assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, where


class CrashLog(logging.Handler):
    """Collects log records that carry a traceback: an exception nobody expected."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info is not None and record.exc_info[0] is not None:
            self.records.append(record)


@contextlib.contextmanager
def quiet_and_watching() -> Iterator[CrashLog]:
    """Only warnings and worse are logged during a batch (a thousand rejected requests
    would otherwise fill the captured log), and tracebacks are collected."""
    root = logging.getLogger()
    crashes = CrashLog()
    old = root.level
    root.setLevel(logging.WARNING)
    root.addHandler(crashes)
    try:
        yield crashes
    finally:
        root.removeHandler(crashes)
        root.setLevel(old)


async def fuzz(
    env: FuzzEnv,
    rpc: Rpc,
    requests: st.SearchStrategy[Any],
    check: Check | None = None,
) -> None:
    """Send at least the profile's `max_examples` generated requests to `rpc`, check each
    answer, then check that the known-good state is unchanged and every server is healthy."""
    examples = settings().max_examples
    loop = asyncio.get_running_loop()
    sent = 0
    tally: Counter[str] = Counter()

    @settings(FUZZ_SETTINGS, max_examples=examples)
    @given(requests)
    def one(body: Any) -> None:
        nonlocal sent
        sent += 1
        future = asyncio.run_coroutine_threadsafe(env.call(rpc, body), loop)
        try:
            outcome = future.result(timeout=EXAMPLE_TIMEOUT)
        except TimeoutError:
            future.cancel()
            raise AssertionError(f"{rpc.name}: no answer within {EXAMPLE_TIMEOUT}s") from None
        tally[outcome.code.name] += 1
        check_status(rpc, body, outcome)
        if check is not None:
            check(body, outcome)

    started = time.monotonic()
    with quiet_and_watching() as crashes:
        await asyncio.to_thread(one)
        await env.check_state()
    elapsed = time.monotonic() - started
    env.counts[rpc.name] = sent
    codes = " ".join(f"{k}={v}" for k, v in sorted(tally.items()))
    log.warning("[fuzz] %s: %d requests in %.1fs: %s", rpc.name, sent, elapsed, codes)
    RESULTS.append(f"{rpc.name}: {sent} requests in {elapsed:.1f}s: {codes}")
    assert not crashes.records, [f"{r.name}: {r.getMessage()[:300]}" for r in crashes.records[:5]]
    assert sent >= examples, f"{rpc.name}: only {sent} requests generated"


async def fuzz_messages(
    env: FuzzEnv, rpc: Rpc, requests: st.SearchStrategy[Any], check: Check | None = None
) -> None:
    """`fuzz` with `requests` (messages; lists of chunks for a request stream) and, mixed in,
    wire-level variants of them (junk, corrupted serialisations, messages of other types)."""
    streamed = rpc.kind.startswith("stream")
    raw = S.raw_streams(requests) if streamed else S.raw_bodies(requests)
    await fuzz(env, rpc, S.requests_or_raw(requests, raw), check)


async def fuzz_empty_request(env: FuzzEnv, rpc: Rpc) -> None:
    """`fuzz` for an RPC whose request has no fields: mostly wire-level junk."""
    structured = st.builds(rpc.request)
    await fuzz(env, rpc, S.weighted((1, structured), (8, S.raw_bodies(structured))))


def all_methods(service: str) -> set[str]:
    """Every RPC of the propeller.v1 service, "Service.Method"."""
    found = descriptor_pool.Default().FindServiceByName(f"propeller.v1.{service}")
    return {f"{service}.{m.name}" for m in found.methods}
