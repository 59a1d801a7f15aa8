"""Prometheus metrics: every metric of every process defined once, here, and the `/metrics`
endpoint a process serves when `PROPELLER_METRICS_ADDR` is set (docs/operations.md says what
each metric means, docs/security.md what the endpoint exposes).

The metrics live in prometheus_client's process-wide registry, so a process that hosts several
services (`propeller-fl up`, the test stack) shows them all on its one endpoint. Instrumented
code calls the small functions below, one line per event, and never touches a metric object:
names, labels and buckets stay in this module.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import grpc
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server

from server.config import setting, settings_from_env

log = logging.getLogger(__name__)

METRICS_ADDR_ENV = "PROPELLER_METRICS_ADDR"

# Seconds, from a loopback round (tens of milliseconds) to a slow edge fleet (minutes).
_PHASE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

ROUNDS = Counter(
    "propeller_rounds",
    "Rounds that entered each state (coordinator): pending, open, aggregating, completed, "
    "failed. Rounds in a state now = entered it - entered a later one.",
    ["state"],
)
UPDATES = Counter(
    "propeller_updates",
    "Updates a coordinator answered (SubmitUpdate): outcome accepted, duplicate or rejected; a "
    "rejection's gRPC status code and the request field its message names.",
    ["outcome", "code", "field"],
)
ROUND_PHASE_SECONDS = Histogram(
    "propeller_round_phase_seconds",
    "How long each phase of a round took: fan_out (manager: round configured and opened, "
    "task starts published), training (proplet: inputs fetched, module run, update parsed), "
    "upload (proplet: SubmitUpdate), aggregation and store (coordinator).",
    ["phase"],
    buckets=_PHASE_BUCKETS,
)
PROPLETS_ALIVE = Gauge(
    "propeller_proplets_alive",
    "Proplets the manager has heard from within its liveness window.",
)
TASKS = Counter(
    "propeller_tasks",
    "Tasks that entered each state (manager): pending, scheduled, running, completed, failed, "
    "skipped, interrupted.",
    ["state"],
)
STREAM_BYTES = Counter(
    "propeller_stream_bytes",
    "Tensor bytes in gRPC chunk streams: stream model or update, direction in (read, whole "
    "streams only) or out (sent).",
    ["stream", "direction"],
)
WASM_RUN_SECONDS = Histogram(
    "propeller_wasm_run_seconds",
    "Wall time of a WASM module run in wasmtime (proplet), whatever its outcome.",
    buckets=_PHASE_BUCKETS,
)
WASM_FUEL = Counter(
    "propeller_wasm_fuel",
    "Fuel units WASM module runs consumed in wasmtime (proplet; about one per wasm "
    "instruction), whatever their outcome.",
)
MQTT_RECONNECTS = Counter(
    "propeller_mqtt_reconnects",
    "MQTT connections made after a session's first one (a lost or refused broker).",
)

AUDITS = Counter(
    "propeller_audits",
    "Updates the coordinator's re-execution audit re-ran (docs/verifiability.md), by outcome: "
    "match, mismatch (the re-run gave another update), error (the auditor could not re-run it).",
    ["outcome"],
)

Phase = Literal["fan_out", "training", "upload", "aggregation", "store"]
PHASES: tuple[Phase, ...] = ("fan_out", "training", "upload", "aggregation", "store")

# "field: message" or "field.sub[0]: message": what our status messages start with.
_FIELD = re.compile(r"^([A-Za-z_][\w.]*(?:\[[^\]]*\][\w.]*)*):\s")
_INDEX = re.compile(r"\[[^\]]*\]")
_MAX_FIELD = 64


# ---- the events ----------------------------------------------------------------------


def round_entered(state: str) -> None:
    ROUNDS.labels(state.lower()).inc()


def task_entered(state: str) -> None:
    TASKS.labels(state.lower()).inc()


def phase_took(phase: Phase, started: float) -> None:
    """`phase` ran from `started` (a `time.perf_counter()` reading) until now."""
    ROUND_PHASE_SECONDS.labels(phase).observe(time.perf_counter() - started)


def audited(outcome: str) -> None:
    AUDITS.labels(outcome).inc()


def wasm_ran(seconds: float, fuel: int = 0) -> None:
    WASM_RUN_SECONDS.observe(seconds)
    WASM_FUEL.inc(fuel)


def streamed(stream: Literal["model", "update"], direction: Literal["in", "out"], n: int) -> None:
    STREAM_BYTES.labels(stream, direction).inc(n)


def mqtt_connected(connects: int) -> None:
    """A session made its `connects`-th connection."""
    if connects > 1:
        MQTT_RECONNECTS.inc()


def update_answered(duplicate: bool) -> None:
    UPDATES.labels("duplicate" if duplicate else "accepted", "OK", "").inc()


def update_rejected(code: grpc.StatusCode | None, details: str | None) -> None:
    """A SubmitUpdate that ended with status `code`; the field is what `details` names."""
    m = _FIELD.match(details or "")
    # Indexes and keys come from the request: `tensors[]`, so a sender cannot mint labels.
    field = _INDEX.sub("[]", m[1])[:_MAX_FIELD] if m else ""
    UPDATES.labels("rejected", code.name if code else "UNKNOWN", field).inc()


S = TypeVar("S")
R = TypeVar("R")
Ctx = Any  # grpc.aio.ServicerContext[Any, Any]


def counts_updates(
    method: Callable[[S, Any, Ctx], Awaitable[R]],
) -> Callable[[S, Any, Ctx], Awaitable[R]]:
    """Decorates the SubmitUpdate servicer method: every answer is counted, a rejection under
    the status code and field its servicer aborted with (`grpc_errors` already turned the
    domain error into that status, so it is read back from the context)."""

    @functools.wraps(method)
    async def counted(self: S, request: Any, context: Ctx) -> R:
        try:
            response = await method(self, request, context)
        except grpc.aio.AbortError:
            update_rejected(context.code(), context.details())
            raise
        update_answered(bool(getattr(response, "duplicate", False)))
        return response

    return counted


def proplets_alive_from(count: Callable[[], int]) -> None:
    """The alive-proplet gauge reads `count()` at every scrape (on the endpoint's thread)."""
    PROPLETS_ALIVE.set_function(count)


# ---- the endpoint --------------------------------------------------------------------


@dataclass(frozen=True)
class MetricsConfig:
    """Where this process serves `/metrics`: "" (the default) serves nothing; host:port
    (port 0: any free port, logged) serves plaintext HTTP there."""

    addr: str = setting(METRICS_ADDR_ENV, "")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> MetricsConfig:
        config = cls(**settings_from_env(cls, env))
        if config.addr:
            config.listen_on()  # a malformed address is refused before anything starts
        return config

    def listen_on(self) -> tuple[str, int]:
        """(host, port) of `addr` (an IPv6 host in brackets); ValueError naming the variable."""
        host, sep, port = self.addr.strip().rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ValueError(
                f"{METRICS_ADDR_ENV}: {self.addr.strip()!r} is not host:port (port 0..65535)"
            )
        return host, int(port)


@dataclass(frozen=True)
class MetricsEndpoint:
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"


@contextlib.contextmanager
def serving_metrics(config: MetricsConfig) -> Iterator[MetricsEndpoint | None]:
    """Serve `/metrics` on `config.addr` for the duration of the block (None: not set). The
    HTTP server runs on a daemon thread of its own, so a scrape never waits for the loop."""
    if not config.addr:
        yield None
        return
    host, port = config.listen_on()
    try:
        server, thread = start_http_server(port, addr=host, registry=REGISTRY)
    except OSError as exc:
        why = exc.strerror or str(exc)
        raise ValueError(f"{METRICS_ADDR_ENV}: cannot listen on {config.addr}: {why}") from None
    endpoint = MetricsEndpoint(host, int(server.server_port))
    log.info("[metrics] serving %s", endpoint.url)
    try:
        yield endpoint
    finally:
        server.shutdown()
        server.server_close()
        if thread is not threading.current_thread():
            thread.join(timeout=5)
