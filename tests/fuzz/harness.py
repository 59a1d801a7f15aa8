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
import logging
import os
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import grpc
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
)
from server.config import MqttConfig
from server.topics import Topics
from tests.fuzz import known
from tests.fuzz import strategies as S
from tests.fuzz.known import RPC_TIMEOUT
from tests.support.clients import Clients
from tests.support.cluster import cluster
from tests.support.infra import Mosquitto

log = logging.getLogger(__name__)

# A generous bound for one example (request + answer); more than this is a hang.
EXAMPLE_TIMEOUT = 60.0

# How many requests each RPC gets is the Hypothesis profile's `max_examples` (tests/conftest.py
# loads `ci`, 1,000 per RPC, or `dev`, 50, before this module is imported): FUZZ_SETTINGS
# inherits it. With `derandomize` the examples are seeded by the source of `fuzz`'s inner test,
# decorator included: leave that text alone or CI fuzzes with other requests than before.
FUZZ_SETTINGS = settings(
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=False,
    phases=(Phase.explicit, Phase.generate, Phase.shrink),
    suppress_health_check=list(HealthCheck),
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
        "ModelRegistry.PutLineage": {C.NOT_FOUND, C.FAILED_PRECONDITION, C.ALREADY_EXISTS},
        "ModelRegistry.GetLineage": {C.NOT_FOUND},
        # FAILED_PRECONDITION: the asked split is empty (a test part of under 5 samples).
        "DataStore.GetDataset": {C.NOT_FOUND, C.FAILED_PRECONDITION},
        "DataStore.PutDataset": set(),
        "DataStore.ListDatasets": set(),
        "DataStore.GetDatasetInfo": {C.NOT_FOUND, C.FAILED_PRECONDITION},
        "DataStore.GetDatasetInfos": set(),
        # Too few updates for krum/multikrum/bulyan; an order-statistic rule over its limit.
        "Aggregator.Aggregate": {C.FAILED_PRECONDITION, C.RESOURCE_EXHAUSTED},
        "Coordinator.ConfigureRound": {C.NOT_FOUND, C.ALREADY_EXISTS},
        "Coordinator.StartRound": {C.NOT_FOUND, C.FAILED_PRECONDITION},
        "Coordinator.SubmitUpdate": {C.NOT_FOUND, C.FAILED_PRECONDITION},
        "Coordinator.GetRoundStatus": {C.NOT_FOUND},
        "Coordinator.ListRounds": set(),
        "Coordinator.WatchRound": {C.NOT_FOUND},
        "Coordinator.ReportParticipantFailure": {C.NOT_FOUND, C.FAILED_PRECONDITION},
        "Manager.StartExperiment": {C.NOT_FOUND, C.ALREADY_EXISTS, C.FAILED_PRECONDITION},
        "Manager.GetExperiment": {C.NOT_FOUND},
        "Manager.ListExperiments": set(),
        "Manager.StopExperiment": {C.NOT_FOUND},
        "Manager.WatchExperiment": {C.NOT_FOUND},
        "Manager.ListExperimentRounds": {C.NOT_FOUND},
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

    async def call(self, rpc: Rpc | str, body: Body | Sequence[Body]) -> Outcome:
        """Send `body` (a message or raw bytes; a sequence of them for a request stream) to
        `rpc` (or the RPC named "Service.Method") and collect the answer. Never raises for a
        status: the status is the outcome."""
        if isinstance(rpc, str):
            rpc = Rpc.of(rpc)
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

    async def check_state(self) -> None:
        """The known-good state is exactly as it was, and every server answers health."""
        now = await known.snapshot(self)
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


def state_dir(factory: pytest.TempPathFactory) -> Path | None:
    """Where the services keep durable state: in memory by default; PROPELLER_FUZZ_DURABLE=1
    fuzzes the SQLite-backed stores instead (same tests, same checks)."""
    if os.environ.get("PROPELLER_FUZZ_DURABLE", "") in ("", "0"):
        return None
    return factory.mktemp("fuzz-state")


@contextlib.asynccontextmanager
async def fuzz_env(
    broker: Mosquitto, factory: pytest.TempPathFactory, image_registry: str
) -> AsyncIterator[FuzzEnv]:
    """The Stack (no proplet: the known ones announce themselves over MQTT in `seed`) with
    the known-good state in it, checked healthy. `image_registry`: where the manager resolves
    `known.IMAGE` (the `seed_image_registry` fixture)."""
    topics = Topics(domain=f"fz{uuid.uuid4().hex[:8]}", channel="fl")
    assert broker.plain_port is not None
    mqtt = MqttConfig(port=broker.plain_port, topics=topics)
    stack = {
        "state_dir": state_dir(factory),
        "seed_proplet_ids": (known.PROPLET,),
        "num_samples": 8,
        "num_features": 3,
        # Known proplets stay alive for the whole run, so experiments really get scheduled.
        "alive_window_s": 24 * 3600,
        "oci_registry": image_registry,
        # The SubmitUpdate fuzzer reports for thousands of participants with no dataset:
        # uncapped, so accepted updates are fuzzed too (the cap has its own tests).
        "num_samples_cap": "none",
    }
    # Plaintext (and the broker's plaintext listener), on purpose: the fuzzers send
    # SubmitUpdate for any proplet id, which over mutual TLS only that proplet's own
    # certificate may do; what they fuzz is the servicers' input handling. Authorization has
    # its own tests (tests/security).
    async with cluster(
        mqtt, factory.mktemp("fuzz"), dimension=None, stack=stack, insecure=True
    ) as c:
        env = FuzzEnv(c.channels, topics=topics, mqtt=mqtt)
        await known.seed(env)
        env.snapshot_at_start = await known.snapshot(env)
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
    bodies: list[Any] = body if isinstance(body, list) else [body]
    if not bodies or decodes(rpc, bodies[0]):
        if not all(decodes(rpc, b) for b in bodies):
            # A stream that goes bad after a message that parsed: the server may refuse it at
            # that message already (streams are checked from their header, as they arrive), so
            # any documented refusal is right; accepting it never is.
            assert outcome.code != grpc.StatusCode.OK, where
        return
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
    examples = FUZZ_SETTINGS.max_examples
    loop = asyncio.get_running_loop()
    sent = 0
    tally: Counter[str] = Counter()

    @FUZZ_SETTINGS
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
