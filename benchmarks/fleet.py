"""A simulated fleet (issue 13, item 6): round wall time and coordinator CPU per update at
fleet sizes, flat and hierarchical.

Every part is a real process on loopback: mosquitto; the registry, data store and aggregator
in one child (`services`); the manager in one; a flat coordinator in one; a root coordinator
and `sites` site coordinators one per process; and the proplets, real `proplet.app.Proplet`s
(each its own MQTT session, announcing itself and heartbeating every 10 s, taking its task
from the manager over MQTT, fetching model and dataset, running the real linear wasm trainer
from one shared wasmtime engine and compiled module, submitting its update over gRPC and
reporting the task result over MQTT), many per process (`fleet`): at least BENCH_FLEET_PROCS
(2) processes, at most PER_PROCESS proplets each.

**Plaintext** throughout: mutual TLS at this scale would mean a certificate per proplet and
a TLS handshake per connection; the round benchmark measures mTLS against plaintext
side by side (docs/benchmarks.md).

Each size gets a fleet (and services) of its own, every proplet a participant; a round
waits for all of them but goes on when up to 1 % fail (`quorum`).

- **flat**: `Manager.StartExperiment` with the n proplets as participants on the flat
  coordinator; wall time from the call to the coordinator's COMPLETED (new version
  stored).
- **hierarchical**: `sites` site coordinators, proplet i in site i mod sites. The manager does
  not drive hierarchical rounds (docs/architecture.md), so the benchmark does what an operator
  does: `ConfigureRound` on the root (participants: the sites), then on each site (its
  proplets), then one round task per proplet through the manager (`CreateTask` +
  `StartTask`, COORDINATOR_URL its site's); wall time from the root's ConfigureRound to the
  root's COMPLETED.

Coordinator CPU per update: the coordinator processes' user + system CPU time
(`/proc/<pid>/stat`) over the round, divided by the updates it received (flat: n; root plus
sites: n + sites). Medians of BENCH_FLEET_ROUNDS (3) rounds after one warm-up round per
topology and size; sizes BENCH_FLEET_SIZES (default 1000; 1000,3000,10000 for every
size), sites BENCH_FLEET_SITES (10), topologies BENCH_FLEET_TOPOLOGIES (both).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import Child, Json, Recorder, median
from benchmarks.rounds import HYPER, _eventually_alive, experiment_request
from benchmarks.wasm import trainer_wasm
from propeller.v1 import (
    coordinator_pb2,
    coordinator_pb2_grpc,
    manager_pb2,
    manager_pb2_grpc,
    model_registry_pb2,
    model_registry_pb2_grpc,
)
from server.grpc_server import channel
from tests.support.infra import mosquitto

NAME = "fleet"
# Round wall time targets (issue 13): 1,000 proplets flat, 10,000 hierarchical.
TARGET_S = {("flat", 1000): 2.0, ("hierarchical", 10000): 10.0}
PREFIX = "f"
CLK_TCK = os.sysconf("SC_CLK_TCK")
HYPER_JSON = json.dumps({"epochs": HYPER.epochs, "lr": HYPER.lr, "batch_size": HYPER.batch_size})
# Tasks created and started at once by the benchmark in a hierarchical round.
TASK_CONCURRENCY = 64
# The most proplets one fleet process holds (file descriptors: see `run`). A process's
# proplets share one HTTP/2 connection per service (gRPC's global subchannel pool), unlike
# devices; at 1,500 a process their downloads stalled on it, some until their 300 s
# timeout, on the loaded 2-core machine (docs/benchmarks.md, "Fleet"); 1,000 ran.
PER_PROCESS = 1000


def cpu_s(pid: int) -> float:
    """utime + stime of process `pid`, seconds (fields 14 and 15 of /proc/<pid>/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


@dataclass
class Measured:
    wall_s: float
    cpu_s: float  # every coordinator process of the topology, together
    root_cpu_s: float  # the flat or root coordinator alone
    updates: int  # what the coordinators received: n (+ one partial per site)
    reported: int  # proplets whose update the round took (fewer if some failed)
    # CPU seconds of every other part over the round: where a 2-core machine's time went.
    roles: dict[str, float]


class Fleet:
    """The running processes and the clients the benchmark drives them with."""

    def __init__(
        self, workdir: Path, size: int, sites: int, procs: int, broker_port: int, broker_pid: int
    ):
        self.broker_pid = broker_pid
        self.workdir = workdir
        self.size = size
        self.sites = sites
        self.procs = procs
        self.broker_port = broker_port
        self.domain = f"fleet{uuid.uuid4().hex[:8]}"
        self.ids = [f"{PREFIX}{i}" for i in range(size)]
        self.kids: list[Child] = []
        self.image = f"file://{trainer_wasm()}"
        self.uri = {"flat": "", "hierarchical": ""}

    def _child(self, kind: str, args: Json, log: str) -> Child:
        base = {"mqtt_port": self.broker_port, "domain": self.domain, "id_prefix": PREFIX}
        kid = Child(
            kind, {**base, **args}, log_path=self.workdir / f"{log}.log", ready_timeout_s=600
        )
        self.kids.append(kid)
        return kid

    def start(self) -> None:
        everyone = {"first": 0, "end": self.size}
        self.services = self._child("services", everyone, "services").ready
        svc = {k: self.services[k] for k in ("registry", "datastore", "aggregator")}
        self.flat = self._child("coordinator", svc, "coordinator-flat")
        self.root = self._child("coordinator", {**svc, "tier": "root"}, "coordinator-root")
        root_addr = self.root.ready["coordinator"]
        self.site_kids = [
            self._child(
                "coordinator",
                {**svc, "tier": "site", "upstream": root_addr, "site_id": f"site{s}"},
                f"coordinator-site{s}",
            )
            for s in range(self.sites)
        ]
        flat_addr = self.flat.ready["coordinator"]
        self.manager = self._child("manager", {**svc, "coordinator": flat_addr}, "manager")
        self.manager_addr = self.manager.ready["manager"]
        per = -(-self.size // self.procs)
        # Started one after the other: each process's CONNECT storm in turn.
        self.fleet_kids = []
        for p in range(self.procs):
            first, end = p * per, min(self.size, (p + 1) * per)
            kid = self._child(
                "fleet",
                {
                    **svc,
                    "coordinator": flat_addr,
                    "first": first,
                    "end": end,
                    "work_dir": str(self.workdir / "proplets"),
                },
                f"fleet-{p}",
            )
            self.fleet_kids.append(kid)

    def role_pids(self) -> dict[str, list[int]]:
        """The other parts' processes by role (the benchmark itself: "driver")."""
        return {
            "manager": [self.manager.proc.pid],
            "services": [self.kids[0].proc.pid],
            "proplets": [k.proc.pid for k in self.fleet_kids],
            "mosquitto": [self.broker_pid],
            "driver": [os.getpid()],
        }

    def stop(self) -> None:
        for kid in reversed(self.kids):
            kid.stop()

    def site_of(self, index: int) -> int:
        return index % self.sites

    async def measure(self, topology: str, n: int) -> Measured:
        ids = self.ids[:n]
        coordinators = [self.flat] if topology == "flat" else [self.root, *self.site_kids]
        pids = [c.proc.pid for c in coordinators]
        roles = self.role_pids()
        before = [cpu_s(p) for p in pids]
        roles_before = {r: sum(cpu_s(p) for p in ps) for r, ps in roles.items()}
        t0 = time.perf_counter()
        if topology == "flat":
            self.uri["flat"], reported = await self._flat_round(ids)
        else:
            self.uri["hierarchical"], reported = await self._hierarchical_round(ids)
        wall = time.perf_counter() - t0
        after = [cpu_s(p) for p in pids]
        spent = [a - b for a, b in zip(after, before, strict=True)]
        other = {r: sum(cpu_s(p) for p in ps) - roles_before[r] for r, ps in roles.items()}
        updates = n if topology == "flat" else n + min(self.sites, n)
        return Measured(wall, sum(spent), spent[0], updates, reported, other)

    async def open(self) -> None:
        async with channel(self.manager_addr, None) as mch:
            await _eventually_alive(manager_pb2_grpc.ManagerStub(mch), self.size)
        async with channel(self.services["registry"], None) as rch:
            registry = model_registry_pb2_grpc.ModelRegistryStub(rch)
            v0 = await registry.InitModel(
                model_registry_pb2.InitModelRequest(dimension=3), timeout=30
            )
        self.uri = {"flat": v0.model_uri, "hierarchical": v0.model_uri}

    async def _flat_round(self, ids: list[str]) -> tuple[str, int]:
        rid = f"r-{uuid.uuid4().hex[:10]}"
        async with (
            channel(self.manager_addr, None) as mch,
            channel(self.flat.ready["coordinator"], None) as cch,
        ):
            manager = manager_pb2_grpc.ManagerStub(mch)
            coordinator = coordinator_pb2_grpc.CoordinatorStub(cch)
            request = experiment_request(
                f"exp-{rid}", ids, self.uri["flat"], self.image, round_id=rid
            )
            request.timeout_s = 600
            request.min_k_of_n = quorum(len(ids))
            await manager.StartExperiment(request, timeout=600)
            return await completed(coordinator, rid)

    async def _hierarchical_round(self, ids: list[str]) -> tuple[str, int]:
        rid = f"r-{uuid.uuid4().hex[:10]}"
        sites = sorted({self.site_of(i) for i in range(len(ids))})
        base = self.uri["hierarchical"]
        async with contextlib.AsyncExitStack() as stack:
            rch = await stack.enter_async_context(channel(self.root.ready["coordinator"], None))
            root = coordinator_pb2_grpc.CoordinatorStub(rch)
            site_stubs = []
            for s in sites:
                sch = await stack.enter_async_context(
                    channel(self.site_kids[s].ready["coordinator"], None)
                )
                site_stubs.append(coordinator_pb2_grpc.CoordinatorStub(sch))
            mch = await stack.enter_async_context(channel(self.manager_addr, None))
            manager = manager_pb2_grpc.ManagerStub(mch)

            def configure(
                participants: Sequence[str], timeout_s: int, min_k: int = 0
            ) -> coordinator_pb2.ConfigureRoundRequest:
                return coordinator_pb2.ConfigureRoundRequest(
                    round_id=rid,
                    participants=list(participants),
                    min_k_of_n=min_k,
                    model_ref=base,
                    hyperparams=HYPER,
                    timeout_s=timeout_s,
                    start=True,
                )

            await root.ConfigureRound(configure([f"site{s}" for s in sites], 900), timeout=60)
            done = asyncio.create_task(completed(root, rid))
            members = {s: [p for i, p in enumerate(ids) if self.site_of(i) == s] for s in sites}
            await asyncio.gather(
                *(
                    stub.ConfigureRound(
                        configure(members[s], 600, quorum(len(members[s]))), timeout=60
                    )
                    for s, stub in zip(sites, site_stubs, strict=True)
                )
            )
            gate = asyncio.Semaphore(TASK_CONCURRENCY)

            async def task(index: int, pid: str) -> None:
                site = self.site_kids[self.site_of(index)].ready["coordinator"]
                request = manager_pb2.CreateTaskRequest(
                    name=f"fl-{rid}-{pid}",
                    image_url=self.image,
                    proplet_id=pid,
                    env={
                        "ROUND_ID": rid,
                        "MODEL_URI": base,
                        "HYPERPARAMS": HYPER_JSON,
                        "COORDINATOR_URL": site,
                        "MODEL_REGISTRY_URL": self.services["registry"],
                        "DATA_STORE_URL": self.services["datastore"],
                    },
                )
                async with gate:
                    created = await manager.CreateTask(request, timeout=120)
                    await manager.StartTask(manager_pb2.TaskRef(task_id=created.id), timeout=120)

            await asyncio.gather(*(task(i, p) for i, p in enumerate(ids)))
            uri, _ = await done
            # The root counts sites; the proplets are in each site's contributors.
            return uri, sum(
                len(u)
                for u in await asyncio.gather(*(contributors(stub, rid) for stub in site_stubs))
            )


def quorum(n: int) -> int:
    """min_k_of_n: a round goes on when up to 1 % of its proplets fail (a fleet this size
    always has a few), every one that can still report is waited for."""
    return n - n // 100


async def contributors(coordinator: coordinator_pb2_grpc.CoordinatorStub, rid: str) -> list[str]:
    status = await coordinator.GetRoundStatus(
        coordinator_pb2.GetRoundStatusRequest(round_id=rid), timeout=60
    )
    return list(status.reported)


async def completed(coordinator: coordinator_pb2_grpc.CoordinatorStub, rid: str) -> tuple[str, int]:
    """Watches round `rid` until it ends; its new model's uri and how many reported
    (RuntimeError if it failed)."""
    async for event in coordinator.WatchRound(
        coordinator_pb2.WatchRoundRequest(round_id=rid, brief=True), timeout=900
    ):
        state = event.status.state
        if state == coordinator_pb2.ROUND_STATE_COMPLETED:
            return str(event.status.new_model_uri), len(event.status.reported)
        if state == coordinator_pb2.ROUND_STATE_FAILED:
            raise RuntimeError(f"round {rid} failed: {event.status.failure_reason}")
    raise RuntimeError(f"round {rid}: the watch ended before the round did")


def raise_file_limit(n: int) -> int:
    """Raise this process's open-file limit to its hard limit (the children and mosquitto
    inherit it): mosquitto holds one socket per proplet, a fleet process up to four per
    proplet. Returns the limit; RuntimeError if even the hard limit cannot hold `n`."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    need = max(n, 4 * min(n, PER_PROCESS)) + 1000
    if hard != resource.RLIM_INFINITY and hard < need:
        raise RuntimeError(f"ulimit -n: {hard} open files; {n} proplets need about {need}")
    return hard


def topologies_from_env() -> list[str]:
    """BENCH_FLEET_TOPOLOGIES: "flat,hierarchical" (the default), or one of them (10,000
    proplets flat take a machine like this one too long to be worth the wait)."""
    raw = os.environ.get("BENCH_FLEET_TOPOLOGIES", "flat,hierarchical")
    chosen = [t.strip() for t in raw.split(",") if t.strip()]
    unknown = set(chosen) - {"flat", "hierarchical"}
    if unknown or not chosen:
        raise ValueError(f"BENCH_FLEET_TOPOLOGIES: {raw!r}; flat, hierarchical or both")
    return chosen


def sizes_from_env(smoke: bool) -> list[int]:
    if smoke:
        return [6]
    raw = os.environ.get("BENCH_FLEET_SIZES", "1000")
    return [int(x) for x in raw.split(",") if x.strip()]


async def run(rec: Recorder, smoke: bool) -> None:
    sizes = sizes_from_env(smoke)
    sites = 2 if smoke else int(os.environ.get("BENCH_FLEET_SITES", "10"))
    procs = 1 if smoke else int(os.environ.get("BENCH_FLEET_PROCS", "2"))
    rounds = 1 if smoke else int(os.environ.get("BENCH_FLEET_ROUNDS", "3"))
    topologies = topologies_from_env()
    raise_file_limit(max(sizes))
    # BENCH_FLEET_WORKDIR: the processes' logs kept there (a fleet that failed says why).
    kept = os.environ.get("BENCH_FLEET_WORKDIR", "")
    with contextlib.ExitStack() as dirs:
        if kept:
            workdir = Path(kept)
        else:
            workdir = Path(dirs.enter_context(tempfile.TemporaryDirectory(prefix="bench-fleet-")))
        with mosquitto(workdir / "mosquitto") as broker:
            assert broker.proc is not None
            for n in sorted(sizes):
                # A fleet of its own per size: no idle proplets heartbeating into the figures.
                # At most PER_PROCESS proplets a process: each holds an MQTT connection and
                # up to three gRPC channels (registry, data store, coordinator) open.
                fleet = Fleet(
                    workdir / str(n),
                    n,
                    sites,
                    max(procs, -(-n // PER_PROCESS)),
                    broker.port,
                    broker.proc.pid,
                )
                try:
                    started = time.perf_counter()
                    await asyncio.to_thread(fleet.start)
                    await fleet.open()
                    up_s = time.perf_counter() - started
                    for topology in topologies:
                        await fleet.measure(topology, n)  # warm-up
                        runs = [await fleet.measure(topology, n) for _ in range(rounds)]
                        _record(rec, n, topology, runs, fleet, up_s)
                finally:
                    await asyncio.to_thread(fleet.stop)


def _record(
    rec: Recorder, n: int, topology: str, runs: list[Measured], fleet: Fleet, up_s: float
) -> None:
    wall = median([r.wall_s for r in runs])
    per_update_ms = median([r.cpu_s / r.updates for r in runs]) * 1000
    root_ms = median([r.root_cpu_s / r.updates for r in runs]) * 1000
    sites = 0 if topology == "flat" else min(fleet.sites, n)
    figures = {
        "proplets": n,
        "rounds": len(runs),
        "reported_min": min(r.reported for r in runs),
        "wall_s": round(wall, 3),
        "wall_s_all": [round(r.wall_s, 3) for r in runs],
        "coordinator_cpu_ms_per_update": round(per_update_ms, 3),
        "root_cpu_ms_per_update": round(root_ms, 3),
        "coordinator_cpu_s": round(median([r.cpu_s for r in runs]), 3),
        "cpu_s_by_role": {
            role: round(median([r.roles[role] for r in runs]), 3) for role in runs[0].roles
        },
        "fleet_size": fleet.size,
        "fleet_procs": fleet.procs,
        "fleet_up_s": round(up_s, 1),
    }
    target = TARGET_S.get((topology, n))
    rec.record(
        NAME,
        {"proplets": n, "topology": topology, "sites": sites, "transport": "plaintext"},
        figures,
        targets={f"< {target:g} s": wall < target} if target else None,
        summary=(
            f"{n:>5} proplets, {topology:<12}{f' ({sites} sites)' if sites else '':<11}: "
            f"round {wall:7.2f} s, coordinator CPU {per_update_ms:.2f} ms/update "
            f"({'root' if sites else 'flat'} alone {root_ms:.2f} ms)"
        ),
    )
