"""Round overhead: a whole federated round's wall time minus the slowest proplet's WASM time.

Real mosquitto on loopback; the five services (`server.stack.Stack`) in one child process;
N proplets (`proplet.app.Proplet`) in this process, all sharing one `WasmRuntime` (one
wasmtime Engine, the module compiled once). Each round is `Manager.StartExperiment` with every
proplet as a participant and k_of_n = all, watched with `Coordinator.WatchRound` until
COMPLETED. Its wall time runs from the StartExperiment call to the COMPLETED event; the WASM
time is the longest `_start` run among that round's tasks (as measured by the runtime).
A first round (compiling the module, opening connections) is not counted.

At 3 and 30 proplets two deployments run side by side in one run, one over mutual TLS (a CA
made for the run; every service, proplet and the client with a certificate of their own: the
default) and one over plaintext, their rounds alternating, and a comparison row gives mTLS's
overhead as a ratio of the medians (target: at most 1.2).

**Between rounds** (issue 11, item 10): on the mTLS deployment of each size, one experiment of
several rounds driven by the manager (`StartExperiment` with `rounds`); for each round after
the first, the time from the coordinator's `completed_at` of round r to its `started_at` of
round r + 1 (both the coordinator's clock): the manager seeing round r end (`WatchRound`),
recording it, sampling round r + 1, configuring and starting it on the coordinator. Target:
under 20 ms at 30 proplets.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import Child, Recorder, median
from benchmarks.wasm import trainer_wasm
from propeller.v1 import (
    coordinator_pb2,
    coordinator_pb2_grpc,
    manager_pb2,
    manager_pb2_grpc,
    model_registry_pb2,
    model_registry_pb2_grpc,
)
from proplet.app import Proplet
from proplet.config import PropletConfig
from proplet.runner import CompiledModule, Invocation, RunControl, RunOutput, WasmRuntime
from server.config import Endpoints, MqttConfig
from server.grpc_server import channel
from server.paging import all_pages
from server.pki import CertificateAuthority, Identity, Kind
from server.stack import OPERATOR, identity_tls
from server.topics import Topics
from tests.support.infra import mosquitto

NAME = "round"
TARGET_MS = {3: 50.0, 300: 2000.0}
TARGET_BETWEEN_MS = {30: 20.0}
# Rounds of the between-rounds experiment at each size (gaps: one fewer).
BETWEEN_ROUNDS = {3: 11, 30: 11, 300: 6}
# Sizes measured over both transports, and the most mTLS may cost (overhead ratio).
COMPARED = (3, 30)
TARGET_TLS_RATIO = 1.2
HYPER = coordinator_pb2.Hyperparams(epochs=1, lr=0.01, batch_size=16)


class TimedRuntime(WasmRuntime):
    """The shared runtime, noting how long each round task's `_start` ran."""

    def __init__(self) -> None:
        super().__init__()
        self.runs: dict[str, list[float]] = defaultdict(list)

    async def run(
        self, compiled: CompiledModule, invocation: Invocation, control: RunControl | None = None
    ) -> RunOutput:
        out = await super().run(compiled, invocation, control)
        self.runs[invocation.env.get("ROUND_ID", "")].append(out.duration_s)
        return out


@dataclass
class RoundTiming:
    wall_s: float
    wasm_max_s: float
    start_call_s: float
    aggregate_s: float
    tasks: int

    @property
    def overhead_s(self) -> float:
        return self.wall_s - self.wasm_max_s


@contextlib.asynccontextmanager
async def proplets(
    n: int,
    prefix: str,
    mqtt: MqttConfig,
    endpoints: Endpoints,
    work_dir: Path,
    ca: CertificateAuthority | None,
) -> AsyncIterator[TimedRuntime]:
    runtime = TimedRuntime()
    async with contextlib.AsyncExitStack() as stack:
        tls = [identity_tls(ca, Identity(Kind.PROPLET, f"{prefix}{i}")) for i in range(n)]
        configs = [
            PropletConfig(
                proplet_id=f"{prefix}{i}",
                name=f"bench-{i}",
                mqtt=mqtt.as_identity(tls[i]),
                endpoints=endpoints,
                heartbeat_s=3600.0,  # one beat at start-up; the manager's window is as long
                work_dir=work_dir,
                task_timeout_s=120.0,
                rpc_timeout_s=120.0,
                tls=tls[i],
            )
            for i in range(n)
        ]
        for batch in range(0, n, 50):
            started = await asyncio.gather(
                *(Proplet(c, runtime=runtime).__aenter__() for c in configs[batch : batch + 50])
            )
            for p in started:
                stack.push_async_callback(p.stop)
        yield runtime


async def _eventually_alive(manager: manager_pb2_grpc.ManagerStub, n: int) -> None:
    deadline = time.monotonic() + 120

    async def page(request: manager_pb2.ListPropletsRequest) -> Any:
        return await manager.ListProplets(request, timeout=30)

    while True:
        # Every page: ListProplets answers 100 at a time.
        listed = all_pages(page, manager_pb2.ListPropletsRequest(), lambda r: r.proplets)
        alive = sum([p.alive async for p in listed])
        if alive >= n:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {alive} of {n} alive")
        await asyncio.sleep(0.1)


def experiment_request(
    experiment_id: str, ids: list[str], model_uri: str, image: str, **fields: Any
) -> manager_pb2.StartExperimentRequest:
    """Every proplet a participant, k_of_n = all, the benchmark's hyperparameters."""
    return manager_pb2.StartExperimentRequest(
        experiment_id=experiment_id,
        model_ref=model_uri,
        participants=ids,
        hyperparams=HYPER,
        k_of_n=0,
        timeout_s=300,
        task_wasm_image=image,
        **fields,
    )


async def one_round(
    manager: manager_pb2_grpc.ManagerStub,
    coordinator: coordinator_pb2_grpc.CoordinatorStub,
    runtime: TimedRuntime,
    ids: list[str],
    model_uri: str,
    image: str,
) -> tuple[RoundTiming, str]:
    rid = f"r-{uuid.uuid4().hex[:10]}"
    t0 = time.perf_counter()
    await manager.StartExperiment(
        experiment_request(f"exp-{rid}", ids, model_uri, image, round_id=rid), timeout=300
    )
    t_started = time.perf_counter()
    aggregating_at = completed_at = 0.0
    final: coordinator_pb2.RoundStatus | None = None
    async for event in coordinator.WatchRound(
        coordinator_pb2.WatchRoundRequest(round_id=rid), timeout=300
    ):
        if event.type == coordinator_pb2.ROUND_EVENT_TYPE_AGGREGATING:
            aggregating_at = event.timestamp
        if event.status.state in (
            coordinator_pb2.ROUND_STATE_COMPLETED,
            coordinator_pb2.ROUND_STATE_FAILED,
        ):
            completed_at = event.timestamp
            final = event.status
            break
    t_end = time.perf_counter()
    if final is None or final.state != coordinator_pb2.ROUND_STATE_COMPLETED:
        raise RuntimeError(f"round {rid} did not complete: {final}")
    runs = runtime.runs.pop(rid, [])
    timing = RoundTiming(
        wall_s=t_end - t0,
        wasm_max_s=max(runs, default=0.0),
        start_call_s=t_started - t0,
        aggregate_s=(completed_at - aggregating_at) if aggregating_at else float("nan"),
        tasks=len(runs),
    )
    return timing, final.new_model_uri


async def between_rounds(
    manager: manager_pb2_grpc.ManagerStub,
    coordinator: coordinator_pb2_grpc.CoordinatorStub,
    ids: list[str],
    model_uri: str,
    image: str,
    rounds: int,
) -> tuple[list[float], str]:
    """One experiment of `rounds` rounds; the gaps (seconds) from each round's completion to
    the next one's start, as the coordinator recorded them, and the last version's uri."""
    eid = f"exp-between-{uuid.uuid4().hex[:8]}"
    await manager.StartExperiment(
        experiment_request(eid, ids, model_uri, image, rounds=rounds), timeout=300
    )
    async for event in manager.WatchExperiment(
        manager_pb2.WatchExperimentRequest(experiment_id=eid), timeout=300 + 60 * rounds
    ):
        if event.type == manager_pb2.EXPERIMENT_EVENT_TYPE_ENDED:
            if event.experiment.state != manager_pb2.EXPERIMENT_STATE_COMPLETED:
                raise RuntimeError(f"experiment {eid} did not complete: {event.experiment}")
            break

    async def page(request: coordinator_pb2.ListRoundsRequest) -> Any:
        return await coordinator.ListRounds(request, timeout=30)

    listed = all_pages(
        page, coordinator_pb2.ListRoundsRequest(experiment_id=eid), lambda r: r.rounds
    )
    statuses = sorted([r async for r in listed], key=lambda r: r.started_at)
    if len(statuses) != rounds or any(
        r.state != coordinator_pb2.ROUND_STATE_COMPLETED for r in statuses
    ):
        raise RuntimeError(f"experiment {eid}: {len(statuses)} rounds, not {rounds} completed")
    gaps = [b.started_at - a.completed_at for a, b in itertools.pairwise(statuses)]
    return gaps, statuses[-1].new_model_uri


@dataclass
class Deployment:
    """What a running deployment offers: the next round, timed; an experiment's gaps."""

    next_round: Callable[[], Awaitable[RoundTiming]]
    experiment: Callable[[int], Awaitable[list[float]]]


@contextlib.asynccontextmanager
async def deployment(
    n: int, broker_port: int, workdir: Path, ca: CertificateAuthority | None
) -> AsyncIterator[Deployment]:
    """The stack (a child process) and `n` proplets, over mutual TLS from `ca` (None:
    plaintext), warmed up by one round; yields what runs the next round and experiments."""
    transport = "mtls" if ca else "plaintext"
    domain = f"bench{uuid.uuid4().hex[:8]}"
    prefix = f"{transport}-p"
    mqtt = MqttConfig(port=broker_port, topics=Topics(domain, "fl"))
    image = f"file://{trainer_wasm()}"
    tls = identity_tls(ca, OPERATOR)
    stack = Child(
        "stack",
        {
            "mqtt_port": broker_port,
            "domain": domain,
            "id_prefix": prefix,
            "proplets": n,
            "ca_dir": "" if ca is None else str(ca.dir),
        },
        log_path=workdir / f"stack-{n}-{transport}.log",
    )
    try:
        ep = stack.ready
        endpoints = Endpoints(
            manager=ep["manager"],
            coordinator=ep["coordinator"],
            aggregator=ep["aggregator"],
            registry=ep["registry"],
            datastore=ep["datastore"],
        )
        async with (
            channel(endpoints.manager, tls) as mch,
            channel(endpoints.coordinator, tls) as cch,
            channel(endpoints.registry, tls) as rch,
            proplets(n, prefix, mqtt, endpoints, workdir / "proplet", ca) as runtime,
        ):
            manager = manager_pb2_grpc.ManagerStub(mch)
            coordinator = coordinator_pb2_grpc.CoordinatorStub(cch)
            registry = model_registry_pb2_grpc.ModelRegistryStub(rch)
            await _eventually_alive(manager, n)
            v0 = await registry.InitModel(
                model_registry_pb2.InitModelRequest(dimension=3), timeout=30
            )
            ids = [f"{prefix}{i}" for i in range(n)]
            uri = v0.model_uri
            _, uri = await one_round(manager, coordinator, runtime, ids, uri, image)  # warm-up

            async def next_round() -> RoundTiming:
                nonlocal uri
                timing, uri = await one_round(manager, coordinator, runtime, ids, uri, image)
                if timing.tasks != n:
                    raise RuntimeError(f"{timing.tasks} WASM runs for {n} proplets")
                return timing

            async def experiment(rounds: int) -> list[float]:
                nonlocal uri
                gaps, uri = await between_rounds(manager, coordinator, ids, uri, image, rounds)
                return gaps

            yield Deployment(next_round, experiment)
    finally:
        stack.stop()


async def run(rec: Recorder, smoke: bool) -> None:
    sizes = [3] if smoke else [3, 30, 300]
    with tempfile.TemporaryDirectory(prefix="bench-round-") as tmp:
        workdir = Path(tmp)
        ca = await asyncio.to_thread(CertificateAuthority.create, workdir / "ca")
        # TLS with the CA's certificates and the ACL for the mTLS deployments (MQTT included),
        # the plaintext listener for the plaintext ones.
        with mosquitto(workdir / "mosquitto", ca=ca, plain=True) as broker:
            assert broker.plain_port is not None
            ports = {"mtls": broker.port, "plaintext": broker.plain_port}
            for n in sizes:
                rounds = 2 if smoke else (10 if n <= 30 else 5)
                transports = {"mtls": ca, "plaintext": None} if n in COMPARED else {"mtls": ca}
                timings: dict[str, list[RoundTiming]] = {t: [] for t in transports}
                async with contextlib.AsyncExitStack() as both:
                    # Both deployments up at once, their rounds alternating: whatever else
                    # the machine does weighs on both alike.
                    runners = {
                        t: await both.enter_async_context(deployment(n, ports[t], workdir, tls_ca))
                        for t, tls_ca in transports.items()
                    }
                    for _ in range(rounds):
                        for t, runner in runners.items():
                            timings[t].append(await runner.next_round())
                    gaps = await runners["mtls"].experiment(3 if smoke else BETWEEN_ROUNDS[n])
                overheads = {t: _record(rec, n, t, timings[t]) for t in transports}
                _record_between(rec, n, gaps)
                if len(overheads) == 2:
                    _compare(rec, n, overheads)


def _compare(rec: Recorder, n: int, overheads: dict[str, float]) -> None:
    ratio = overheads["mtls"] / overheads["plaintext"]
    rec.record(
        NAME,
        {"proplets": n, "compare": "mtls / plaintext"},
        {
            "mtls_overhead_ms": round(overheads["mtls"], 2),
            "plaintext_overhead_ms": round(overheads["plaintext"], 2),
            "ratio": round(ratio, 3),
        },
        targets={f"<= {TARGET_TLS_RATIO:g}x plaintext": ratio <= TARGET_TLS_RATIO},
        summary=(
            f"{n:>3} proplets: mTLS overhead {overheads['mtls']:.1f} ms vs plaintext "
            f"{overheads['plaintext']:.1f} ms: x{ratio:.2f}"
        ),
    )


def _record(rec: Recorder, n: int, transport: str, timings: list[RoundTiming]) -> float:
    """One size's figures over one transport; the median overhead in ms."""
    overhead = median([t.overhead_s for t in timings]) * 1000
    figures = {
        "proplets": n,
        "rounds": len(timings),
        "overhead_ms": round(overhead, 2),
        "overhead_ms_all": [round(t.overhead_s * 1000, 2) for t in timings],
        "wall_ms": round(median([t.wall_s for t in timings]) * 1000, 2),
        "wasm_max_ms": round(median([t.wasm_max_s for t in timings]) * 1000, 3),
        "start_experiment_ms": round(median([t.start_call_s for t in timings]) * 1000, 2),
        "aggregate_ms": round(median([t.aggregate_s for t in timings]) * 1000, 2),
    }
    target = TARGET_MS.get(n)
    targets = {f"< {target:g} ms": overhead < target} if target else None
    rec.record(
        NAME,
        {
            "proplets": n,
            "model": "w[3] f64 + b",
            "samples": 64,
            "image": "file://",
            "transport": transport,
        },
        figures,
        targets=targets,
        summary=(
            f"{n:>3} proplets, {transport:<9}: overhead {overhead:8.1f} ms (wall "
            f"{figures['wall_ms']:.1f} ms, slowest WASM {figures['wasm_max_ms']:.2f} "
            f"ms, StartExperiment {figures['start_experiment_ms']:.1f} ms, "
            f"aggregate+store {figures['aggregate_ms']:.1f} ms)"
        ),
    )
    return overhead


def _record_between(rec: Recorder, n: int, gaps: list[float]) -> None:
    between = median(gaps) * 1000
    target = TARGET_BETWEEN_MS.get(n)
    rec.record(
        NAME,
        {"proplets": n, "measure": "between rounds", "transport": "mtls"},
        {
            "gaps": len(gaps),
            "between_ms": round(between, 2),
            "between_ms_max": round(max(gaps) * 1000, 2),
            "between_ms_all": [round(g * 1000, 2) for g in gaps],
        },
        targets={f"< {target:g} ms": between < target} if target else None,
        summary=(
            f"{n:>3} proplets, between rounds: {between:8.1f} ms median, "
            f"{max(gaps) * 1000:.1f} ms max over {len(gaps)} (round r completed -> r + 1 started)"
        ),
    )
