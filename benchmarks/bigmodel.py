"""A round of a big model: the MLP trainer on a 1M- and a 10M-parameter model (f64), every
part its own process, so each one's time and peak memory are its own.

Real mosquitto; registry, aggregator, data store, coordinator and manager as `serve`
processes (the suite's harness, `tests.support.processes`, mutual TLS), and two proplets as
`serve proplet` processes. Per model size a fresh set of processes: v1 is the model
(`PutModel`), each proplet holds a few samples of that many features (training time is
the model's, not the data's), and one round (`StartExperiment`, k_of_n = both) runs to
COMPLETED. Figures: the round's wall time (StartExperiment to the COMPLETED status), and per
process its CPU seconds during the round (/proc/PID/stat) and its peak RSS (VmHWM) before
and after the round.

The proplets run with PROPLET_MEMORY_LIMIT_MB=1024 and PROPLET_OUTPUT_LIMIT_MB=128: the
defaults (256, 16) fit a 1M model but not a 10M one (80 MB update on stdout)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import numpy as np

from benchmarks.common import Recorder, fmt_count
from benchmarks.wasm import mlp_wasm
from propeller.v1 import coordinator_pb2, datastore_pb2, manager_pb2
from server.config import Endpoints, MqttConfig
from server.datastore.datasets import SCHEMA
from server.mlp import initial_model
from server.streams import model_stream
from server.tensors import tensor_to_proto
from server.topics import Topics
from tests.support.clients import Clients, clients
from tests.support.infra import mosquitto
from tests.support.processes import ServiceProcess, mqtt_env, service_process
from tests.support.security import session_ca

NAME = "bigmodel"
PROPLETS = ("big-a", "big-b")
SAMPLES = 8
# Layer sizes: 1000 -> 1000 -> 2 is 1,003,002 parameters; 1000 -> 10000 -> 2 is 10,030,002.
MODELS = {"1M": (1000, 1000, 2), "10M": (1000, 10000, 2)}
SMOKE_MODELS = {"10k": (100, 100, 2)}
HYPER = coordinator_pb2.Hyperparams(epochs=1, lr=0.01, batch_size=4)
PROPLET_ENV = {"PROPLET_MEMORY_LIMIT_MB": "1024", "PROPLET_OUTPUT_LIMIT_MB": "128"}
ROUND_TIMEOUT_S = 600
RPC_S = 300.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def vmhwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def pid_of(p: ServiceProcess) -> int:
    assert p.proc is not None, f"{p.service} is not running"
    return p.proc.pid


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of the process so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


@contextlib.asynccontextmanager
async def service_processes(
    mqtt: MqttConfig, work: Path
) -> AsyncIterator[tuple[dict[str, ServiceProcess], Endpoints]]:
    """Registry, aggregator, data store, coordinator and manager, each a `serve` process,
    started and serving."""
    with contextlib.ExitStack() as stack:

        def serve(name: str, env: dict[str, str]) -> ServiceProcess:
            return stack.enter_context(service_process(name, env, work))

        registry = serve("registry", {})
        aggregator = serve("aggregator", {})
        datastore = serve("datastore", {})
        addresses = {
            "AGGREGATOR_ADDR": aggregator.addr,
            "MODEL_REGISTRY_ADDR": registry.addr,
            "DATA_STORE_ADDR": datastore.addr,
        }
        coordinator = serve(
            "coordinator",
            {**mqtt_env(mqtt), **addresses, "PROPELLER_STATE_DIR": str(work / "coordinator")},
        )
        for p in (registry, aggregator, datastore, coordinator):
            p.start()
        await asyncio.gather(*(p.ready() for p in (registry, aggregator, datastore, coordinator)))
        manager = serve(
            "manager",
            {
                **mqtt_env(mqtt),
                **addresses,
                "PROPELLER_STATE_DIR": str(work / "manager"),
                "COORDINATOR_ADDR": coordinator.addr,
                "PROPELLER_ALIVE_WINDOW_S": "3600",
            },
        )
        await manager.restart()
        procs = {
            "coordinator": coordinator,
            "aggregator": aggregator,
            "registry": registry,
            "datastore": datastore,
            "manager": manager,
        }
        endpoints = Endpoints(
            manager=manager.addr,
            coordinator=coordinator.addr,
            aggregator=aggregator.addr,
            registry=registry.addr,
            datastore=datastore.addr,
        )
        yield procs, endpoints


@contextlib.asynccontextmanager
async def proplet_processes(
    mqtt: MqttConfig, endpoints: Endpoints, work: Path, ids: Sequence[str]
) -> AsyncIterator[list[ServiceProcess]]:
    addresses = {
        "MODEL_REGISTRY_ADDR": endpoints.registry,
        "DATA_STORE_ADDR": endpoints.datastore,
        "COORDINATOR_ADDR": endpoints.coordinator,
        "MANAGER_ADDR": endpoints.manager,
    }
    with contextlib.ExitStack() as stack:
        procs = [
            stack.enter_context(
                service_process(
                    "proplet",
                    {
                        **mqtt_env(mqtt),
                        **addresses,
                        **PROPLET_ENV,
                        "PROPLET_ID": pid,
                        "PROPLET_WORK_DIR": str(work / pid),
                    },
                    work,
                )
            )
            for pid in ids
        ]
        for p in procs:
            p.start()
        yield procs


async def one_round(c: Clients, model_uri: str, image: str) -> float:
    round_id = f"big-{uuid.uuid4().hex[:8]}"
    t0 = time.perf_counter()
    await c.manager.StartExperiment(
        manager_pb2.StartExperimentRequest(
            experiment_id=f"exp-{round_id}",
            round_id=round_id,
            model_ref=model_uri,
            participants=list(PROPLETS),
            hyperparams=HYPER,
            k_of_n=len(PROPLETS),
            timeout_s=ROUND_TIMEOUT_S,
            task_wasm_image=image,
        ),
        timeout=RPC_S,
    )
    status = await c.wait_state(round_id, timeout=ROUND_TIMEOUT_S + 60)
    wall = time.perf_counter() - t0
    if status.state != coordinator_pb2.ROUND_STATE_COMPLETED:
        raise RuntimeError(f"round {round_id}: {status.failure_reason or status.state}")
    return wall


async def measure(
    rec: Recorder, mqtt: MqttConfig, work: Path, label: str, sizes: tuple[int, ...]
) -> None:
    image = f"file://{await asyncio.to_thread(mlp_wasm)}"
    model = initial_model(sizes, seed=1)
    parameters = sum(int(a.size) for a in model.values())
    rng = np.random.default_rng(2)
    async with (
        service_processes(mqtt, work) as (services, endpoints),
        proplet_processes(mqtt, endpoints, work / "proplets", PROPLETS) as proplets,
        clients(endpoints) as c,
    ):
        await c.wait_alive(list(PROPLETS), timeout=120)
        for pid in PROPLETS:
            x = rng.normal(size=(SAMPLES, sizes[0]))
            y = rng.integers(0, 2, size=SAMPLES).astype(np.float64)
            dataset = datastore_pb2.Dataset(
                proplet_id=pid,
                schema=SCHEMA,
                features=tensor_to_proto(x),
                labels=tensor_to_proto(y),
            )
            await c.datastore.PutDataset(
                datastore_pb2.PutDatasetRequest(dataset=dataset), timeout=RPC_S
            )
        put = await c.registry.PutModel(model_stream(model, 1 << 20), timeout=RPC_S)
        del model
        names = {name: pid_of(p) for name, p in services.items()}
        for p in proplets:
            names[f"proplet {p.env['PROPLET_ID']}"] = pid_of(p)
        before = {n: (vmhwm_kib(pid), cpu_s(pid)) for n, pid in names.items()}
        wall = await one_round(c, put.model_uri, image)
        after = {n: (vmhwm_kib(pid), cpu_s(pid)) for n, pid in names.items()}
    per_process = {
        n: {
            "peak_rss_mib_before": round(before[n][0] / 1024, 1),
            "peak_rss_mib": round(after[n][0] / 1024, 1),
            "cpu_s": round(after[n][1] - before[n][1], 2),
        }
        for n in names
    }
    mib = parameters * 8 / (1 << 20)
    rec.record(
        NAME,
        {"model": f"mlp {'-'.join(map(str, sizes))} f64", "parameters": parameters, "proplets": 2},
        {"round_s": round(wall, 2), "model_mib": round(mib, 1), "processes": per_process},
        summary=(
            f"{label} ({fmt_count(parameters)} parameters, {mib:.0f} MiB): round {wall:.2f} s; "
            + ", ".join(
                f"{n} {v['peak_rss_mib']:.0f} MiB/{v['cpu_s']:.1f} s"
                for n, v in per_process.items()
            )
        ),
    )


async def run(rec: Recorder, smoke: bool) -> None:
    models = SMOKE_MODELS if smoke else MODELS
    with tempfile.TemporaryDirectory(prefix="bench-big-round-") as tmp:
        work = Path(tmp)
        with mosquitto(work / "mosquitto", ca=session_ca()) as broker:
            for label, sizes in models.items():
                mqtt = MqttConfig(
                    port=broker.port, topics=Topics(f"big{uuid.uuid4().hex[:8]}", "fl")
                )
                await measure(rec, mqtt, work / label, label, sizes)
