"""`propeller-fl demo` and `propeller-fl up`: the whole system in one process, with nothing
installed but this package.

Both start an embedded MQTT broker (`server.embedded_broker`), the five services (`Stack`) and
N proplets sharing one wasmtime engine, and give the proplets the Zig trainer
(`wasm-client/build.py`, built on first use) as image "file://<path>".

- `demo` runs R federated rounds (each a `Manager.StartExperiment` from the previous round's
  model), shows live progress from `Coordinator.WatchRound`, evaluates every global model on
  all proplets' data with numpy, prints one row per round, writes a convergence plot (PNG) and
  a JSON record of the run, and stops everything.
- `up` keeps the same stack running on the familiar ports until Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import importlib.util
import json
import math
import os
import signal
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

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
)
from proplet.app import Proplet
from proplet.config import PropletConfig
from proplet.runner import WasmRuntime
from server.cli.main import set_command
from server.cli.progress import RoundProgress, StatusLine, is_live
from server.config import Endpoints, MqttConfig
from server.datastore.datasets import SCHEMA
from server.embedded_broker import EmbeddedBroker
from server.grpc_server import channel
from server.models import model_uri
from server.stack import Stack, StackConfig
from server.streams import read_model_stream
from server.tensors import Array, Tensors, tensor_from_proto, tensor_to_proto

# Demo defaults: on the seeded synthetic data these make the global log-loss fall clearly
# over 5 rounds (see docs/demo.md for a measured run).
DEFAULT_ROUNDS = 5
DEFAULT_PROPLETS = 3
DEFAULT_EPOCHS = 1
DEFAULT_LR = 0.1
DEFAULT_BATCH_SIZE = 1
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_SAMPLES = 64
DEFAULT_FEATURES = 3
DEFAULT_PLOT = "propeller-fl-demo.png"
DEFAULT_RECORD = "propeller-fl-demo.json"

# The seed's ports, as `propeller-fl up` uses them.
UP_PORTS = {
    "manager": 7070,
    "coordinator": 8086,
    "aggregator": 8085,
    "registry": 8084,
    "datastore": 8083,
    "mqtt": 1883,
}

RPC_TIMEOUT_S = 30.0
READY_TIMEOUT_S = 20.0
# Task results reach the manager over MQTT shortly after the round closes.
TASK_RESULTS_TIMEOUT_S = 5.0
# Same clamps as the trainer (wasm-client/README.md), so the numbers are comparable.
LOGIT_CLAMP = 20.0
PROB_CLIP = 1e-12

_REPO_ROOT = Path(__file__).resolve().parents[2]
WASM_BUILD_SCRIPT = _REPO_ROOT / "wasm-client" / "build.py"


class DemoFailed(Exception):
    """The run cannot go on; the message is the one line the user sees."""


# ---------------------------------------------------------------------------- arguments


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be in 0..65535 (0 = any free port), got {value}")
    return value


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = sub.add_parser(
        "demo",
        help="run a short federated training in one process and show it converge",
        description=(
            "Start an embedded MQTT broker, the five services and N proplets in this process, "
            "run R federated rounds of the Zig/WASM trainer from a zero model, and print one row "
            "per round with the new global model's log-loss and accuracy on all proplets' data. "
            "Writes a convergence plot (PNG) and a JSON record of the run. No broker, registry "
            "or database needs to be installed; services listen on free ports."
        ),
    )
    demo.add_argument(
        "--rounds", type=_positive_int, default=DEFAULT_ROUNDS, metavar="R", help="rounds (5)"
    )
    demo.add_argument(
        "--proplets", type=_positive_int, default=DEFAULT_PROPLETS, metavar="N", help="proplets (3)"
    )
    demo.add_argument(
        "--k-of-n",
        type=_non_negative_int,
        default=0,
        metavar="K",
        help="updates that close a round (default: all proplets)",
    )
    demo.add_argument(
        "--epochs", type=_positive_int, default=DEFAULT_EPOCHS, help="local epochs per round (1)"
    )
    demo.add_argument("--lr", type=_positive_float, default=DEFAULT_LR, help="learning rate (0.1)")
    demo.add_argument(
        "--batch-size",
        type=_positive_int,
        default=DEFAULT_BATCH_SIZE,
        help="mini-batch size (1 = per-example SGD)",
    )
    demo.add_argument(
        "--timeout-s",
        type=_positive_float,
        default=DEFAULT_TIMEOUT_S,
        metavar="S",
        help="round deadline in seconds (60)",
    )
    demo.add_argument(
        "--samples",
        type=_positive_int,
        default=None,
        metavar="N",
        help=f"synthetic samples per proplet ({DEFAULT_SAMPLES})",
    )
    demo.add_argument(
        "--features",
        type=_positive_int,
        default=None,
        metavar="D",
        help=f"synthetic feature count ({DEFAULT_FEATURES})",
    )
    demo.add_argument(
        "--dataset",
        type=Path,
        default=None,
        metavar="FILE",
        help=(
            "train on this CSV or .npy instead of synthetic data: one row per sample, features "
            "then a 0/1 label in the last column; split in row order into one shard per proplet"
        ),
    )
    demo.add_argument(
        "--plot",
        type=Path,
        default=Path(DEFAULT_PLOT),
        metavar="FILE",
        help=f"convergence plot to write ({DEFAULT_PLOT})",
    )
    demo.add_argument(
        "--record",
        type=Path,
        default=Path(DEFAULT_RECORD),
        metavar="FILE",
        help=f"JSON record of the run to write ({DEFAULT_RECORD})",
    )
    demo.add_argument(
        "--wasm",
        type=Path,
        default=None,
        metavar="FILE",
        help="trainer module to use instead of building wasm-client/src/main.zig",
    )
    set_command(demo, cmd_demo)

    up = sub.add_parser(
        "up",
        help="run all services, an embedded MQTT broker and N proplets until Ctrl-C",
        description=(
            "Start an embedded MQTT broker, the five services and N proplets (with seeded "
            "synthetic datasets) in this process on the usual ports, print each address, each "
            "proplet id and the trainer image, then 'ready'; stop cleanly on Ctrl-C or SIGTERM."
        ),
    )
    up.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    for name in ("manager", "coordinator", "aggregator", "registry", "datastore", "mqtt"):
        up.add_argument(
            f"--{name}-port",
            type=_port,
            default=UP_PORTS[name],
            metavar="PORT",
            help=f"({UP_PORTS[name]}; 0 = any free port)",
        )
    up.add_argument(
        "--proplets", type=_positive_int, default=DEFAULT_PROPLETS, metavar="N", help="proplets (3)"
    )
    up.add_argument(
        "--samples", type=_positive_int, default=DEFAULT_SAMPLES, help="samples per proplet (64)"
    )
    up.add_argument(
        "--features",
        type=_positive_int,
        default=DEFAULT_FEATURES,
        help="synthetic feature count (3)",
    )
    up.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help=(
            "keep every service's state (models, datasets, rounds, proplets, tasks, "
            "experiments) in SQLite files in DIR, so a restart with the same DIR carries on "
            "(default: in memory)"
        ),
    )
    up.add_argument(
        "--wasm",
        type=Path,
        default=None,
        metavar="FILE",
        help="trainer module to use instead of building wasm-client/src/main.zig",
    )
    set_command(up, cmd_up)


# ---------------------------------------------------------------------------- trainer


def _build_trainer() -> Path:
    if not WASM_BUILD_SCRIPT.is_file():
        raise DemoFailed(
            f"trainer: {WASM_BUILD_SCRIPT} not found (installed without the source tree?); "
            "pass --wasm FILE"
        )
    spec = importlib.util.spec_from_file_location("wasm_client_build", WASM_BUILD_SCRIPT)
    if spec is None or spec.loader is None:
        raise DemoFailed(f"trainer: cannot load {WASM_BUILD_SCRIPT}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        path = Path(module.build())
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DemoFailed(f"trainer: build failed: {first}") from None
    return path


def _trainer(explicit: Path | None) -> Path:
    if explicit is not None:
        if not explicit.is_file():
            raise DemoFailed(f"--wasm: {explicit} is not a file")
        return explicit.resolve()
    return _build_trainer().resolve()


async def locate_trainer(explicit: Path | None) -> Path:
    """The trainer module: `--wasm FILE`, or wasm-client built (cached) from source."""
    return await asyncio.to_thread(_trainer, explicit)


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Shard:
    proplet_id: str
    features: Array
    labels: Array


def _csv_has_header(path: Path) -> bool:
    with path.open(encoding="utf-8") as f:
        for raw in f:
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            try:
                [float(cell) for cell in line.split(",")]
            except ValueError:
                return True
            return False
    return False


def load_table(path: Path) -> tuple[Array, Array]:
    """Features [n, d] and 0/1 labels [n] from a CSV (optional header row) or a .npy file."""
    if not path.is_file():
        raise DemoFailed(f"--dataset: {path} is not a file")
    try:
        if path.suffix.lower() == ".npy":
            raw = np.load(path, allow_pickle=False)
        else:
            skip = 1 if _csv_has_header(path) else 0
            raw = np.loadtxt(path, delimiter=",", skiprows=skip, ndmin=2, dtype=np.float64)
        table = np.asarray(raw, dtype=np.float64)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DemoFailed(f"--dataset: cannot read {path}: {first}") from None
    if table.ndim != 2 or table.shape[1] < 2:
        raise DemoFailed(
            f"--dataset: {path}: want rows of features then a 0/1 label (at least 2 columns), "
            f"got shape {list(table.shape)}"
        )
    if not np.isfinite(table).all():
        row = int(np.argwhere(~np.isfinite(table))[0][0])
        raise DemoFailed(f"--dataset: {path}: row {row} has a NaN or Inf")
    features, labels = table[:, :-1].copy(), table[:, -1].copy()
    bad = ~((labels == 0.0) | (labels == 1.0))
    if bad.any():
        row = int(np.argmax(bad))
        raise DemoFailed(f"--dataset: {path}: row {row}: label {labels[row]!r} is not 0 or 1")
    return features, labels


def split_shards(features: Array, labels: Array, proplet_ids: Sequence[str]) -> list[Shard]:
    """Consecutive row ranges of equal size (the first ones one row longer when the rows do
    not divide evenly), one per proplet, in row order."""
    n = int(features.shape[0])
    if n < len(proplet_ids):
        raise DemoFailed(f"--dataset: {n} rows cannot make {len(proplet_ids)} non-empty shards")
    parts = np.array_split(np.arange(n), len(proplet_ids))
    return [
        Shard(pid, features[idx], labels[idx]) for pid, idx in zip(proplet_ids, parts, strict=True)
    ]


def evaluate(model: Tensors, features: Array, labels: Array) -> tuple[float, float]:
    """Mean log-loss and accuracy of the logistic model {w, b} on (features, labels), computed
    as the trainer does: logit clamped to +-20, probability clipped to [1e-12, 1 - 1e-12]."""
    w = np.asarray(model["w"], dtype=np.float64)
    b = float(np.asarray(model["b"], dtype=np.float64))
    z = np.clip(features @ w + b, -LOGIT_CLAMP, LOGIT_CLAMP)
    p = np.clip(1.0 / (1.0 + np.exp(-z)), PROB_CLIP, 1.0 - PROB_CLIP)
    loss = -np.mean(labels * np.log(p) + (1.0 - labels) * np.log(1.0 - p))
    accuracy = np.mean((p >= 0.5) == (labels == 1.0))
    return float(loss), float(accuracy)


def _model_json(model: Tensors) -> dict[str, Any]:
    return {name: np.asarray(arr).tolist() for name, arr in model.items()}


# ---------------------------------------------------------------------------- one process


@dataclass
class Clients:
    manager: manager_pb2_grpc.ManagerStub
    coordinator: coordinator_pb2_grpc.CoordinatorStub
    registry: model_registry_pb2_grpc.ModelRegistryStub
    datastore: datastore_pb2_grpc.DataStoreStub


@dataclass
class Running:
    broker: EmbeddedBroker
    stack: Stack
    proplet_ids: list[str]
    clients: Clients

    @property
    def endpoints(self) -> Endpoints:
        return self.stack.endpoints


@contextlib.asynccontextmanager
async def one_process(
    *,
    host: str,
    mqtt_port: int,
    stack_config: StackConfig,
    proplet_ids: Sequence[str],
    work_dir: Path,
    task_timeout_s: float,
) -> AsyncIterator[Running]:
    """Broker, services and proplets up (proplets known and alive to the manager); all of it
    stopped in reverse order on exit."""
    async with contextlib.AsyncExitStack() as stack:
        broker = await stack.enter_async_context(EmbeddedBroker(host, mqtt_port))
        mqtt: MqttConfig = broker.mqtt_config()
        config = StackConfig(
            mqtt=mqtt,
            host=host,
            manager_port=stack_config.manager_port,
            coordinator_port=stack_config.coordinator_port,
            aggregator_port=stack_config.aggregator_port,
            registry_port=stack_config.registry_port,
            datastore_port=stack_config.datastore_port,
            seed_proplet_ids=stack_config.seed_proplet_ids,
            num_samples=stack_config.num_samples,
            num_features=stack_config.num_features,
            state_dir=stack_config.state_dir,
        )
        services = await stack.enter_async_context(Stack(config))
        ep = services.endpoints
        runtime = WasmRuntime.shared()  # one engine and module cache for all proplets
        for i, pid in enumerate(proplet_ids):
            await stack.enter_async_context(
                Proplet(
                    PropletConfig(
                        proplet_id=pid,
                        name=f"proplet-{i + 1}",
                        mqtt=mqtt,
                        endpoints=Endpoints(
                            manager=ep.manager,
                            coordinator=ep.coordinator,
                            aggregator=ep.aggregator,
                            registry=ep.registry,
                            datastore=ep.datastore,
                        ),
                        work_dir=work_dir / "proplets",
                        task_timeout_s=task_timeout_s,
                    ),
                    runtime=runtime,
                )
            )
        channels = {
            name: await stack.enter_async_context(channel(addr))
            for name, addr in (
                ("manager", ep.manager),
                ("coordinator", ep.coordinator),
                ("registry", ep.registry),
                ("datastore", ep.datastore),
            )
        }
        clients = Clients(
            manager=manager_pb2_grpc.ManagerStub(channels["manager"]),
            coordinator=coordinator_pb2_grpc.CoordinatorStub(channels["coordinator"]),
            registry=model_registry_pb2_grpc.ModelRegistryStub(channels["registry"]),
            datastore=datastore_pb2_grpc.DataStoreStub(channels["datastore"]),
        )
        await _wait_alive(clients.manager, proplet_ids)
        yield Running(broker, services, list(proplet_ids), clients)


async def _wait_alive(manager: manager_pb2_grpc.ManagerStub, ids: Sequence[str]) -> None:
    """Until the manager lists every proplet as alive (they announce over MQTT)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + READY_TIMEOUT_S
    want = set(ids)
    alive: set[str] = set()
    while loop.time() < deadline:
        listed = await manager.ListProplets(manager_pb2.ListPropletsRequest(), timeout=10)
        alive = {p.id for p in listed.proplets if p.alive}
        if want <= alive:
            return
        await asyncio.sleep(0.05)
    missing = sorted(want - alive)
    raise DemoFailed(
        f"proplets not registered with the manager within {READY_TIMEOUT_S:g}s: {missing}"
    )


# ---------------------------------------------------------------------------- demo


@dataclass
class RoundRow:
    index: int
    round_id: str
    experiment_id: str
    base_model_uri: str
    model_version: int
    model_uri: str
    sha256: str
    k_of_n: int
    participants: list[str]
    reported: list[str]
    closed_by: str
    loss: float
    accuracy: float
    wall_time_s: float
    round_metrics: dict[str, float]
    proplet_metrics: dict[str, dict[str, Any]]
    skipped: dict[str, str] = field(default_factory=dict)


class Table:
    """The per-round table on stdout, one row printed as each round completes."""

    HEADER = ("round", "model", "reported", "loss", "accuracy", "time")

    def __init__(self, out: TextIO, first_width: int) -> None:
        self.out = out
        self.widths = (max(first_width, 9), 6, 8, 8, 8, 7)

    def _line(self, cells: Sequence[str]) -> None:
        parts = [c.ljust(w) for c, w in zip(cells, self.widths, strict=True)]
        self.out.write("  ".join(parts).rstrip() + "\n")
        self.out.flush()

    def header(self) -> None:
        self._line(self.HEADER)

    def row(
        self, label: str, version: int, reported: str, loss: float, acc: float, wall: str
    ) -> None:
        self._line([label, f"v{version}", reported, f"{loss:.4f}", f"{acc:.4f}", wall])


async def _get_model(
    registry: model_registry_pb2_grpc.ModelRegistryStub, version: int
) -> tuple[str, Tensors]:
    stream = registry.GetModel(
        model_registry_pb2.GetModelRequest(version=version), timeout=RPC_TIMEOUT_S
    )
    header, tensors = await read_model_stream(stream)
    return header.sha256, tensors


async def _fetch_data(
    datastore: datastore_pb2_grpc.DataStoreStub, ids: Sequence[str]
) -> tuple[Array, Array, dict[str, int]]:
    xs, ys, sizes = [], [], {}
    for pid in ids:
        ds = await datastore.GetDataset(
            datastore_pb2.GetDatasetRequest(proplet_id=pid), timeout=RPC_TIMEOUT_S
        )
        x = tensor_from_proto(ds.features, "features")
        y = tensor_from_proto(ds.labels, "labels")
        xs.append(x)
        ys.append(y)
        sizes[pid] = int(y.shape[0])
    return np.concatenate(xs, axis=0), np.concatenate(ys, axis=0), sizes


async def _upload_shards(datastore: datastore_pb2_grpc.DataStoreStub, shards: list[Shard]) -> None:
    for s in shards:
        await datastore.PutDataset(
            datastore_pb2.PutDatasetRequest(
                dataset=datastore_pb2.Dataset(
                    proplet_id=s.proplet_id,
                    schema=SCHEMA,
                    features=tensor_to_proto(np.ascontiguousarray(s.features)),
                    labels=tensor_to_proto(np.ascontiguousarray(s.labels)),
                )
            ),
            timeout=RPC_TIMEOUT_S,
        )


async def _watch_round(
    clients: Clients, round_id: str, progress: RoundProgress, timeout_s: float
) -> coordinator_pb2.RoundStatus:
    """Follow the round's events until it completes or fails; its final status."""
    final = (coordinator_pb2.ROUND_STATE_COMPLETED, coordinator_pb2.ROUND_STATE_FAILED)
    ticker: asyncio.Task[None] | None = None
    if progress.line.live:

        async def tick() -> None:
            while True:
                progress.render()
                await asyncio.sleep(0.1)

        ticker = asyncio.create_task(tick())
    last: coordinator_pb2.RoundStatus | None = None
    try:
        call = clients.coordinator.WatchRound(
            coordinator_pb2.WatchRoundRequest(round_id=round_id), timeout=timeout_s
        )
        async for event in call:
            progress.on_event(event)
            last = event.status
            if last.state in final:
                break
    finally:
        if ticker is not None:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
    if last is None or last.state not in final:
        last = await clients.manager.GetRoundStatus(
            coordinator_pb2.GetRoundStatusRequest(round_id=round_id), timeout=RPC_TIMEOUT_S
        )
    return last


async def _hopeless(
    manager: manager_pb2_grpc.ManagerStub, round_id: str, scheduled: Sequence[str], k: int
) -> str:
    """Returns (with the first task error) once so many of the round's tasks have failed
    that k updates can no longer arrive, rather than waiting for the deadline; runs until
    cancelled otherwise."""
    names = {f"fl-round-{round_id}-{pid}": pid for pid in scheduled}
    ended = (manager_pb2.TASK_STATE_FAILED, manager_pb2.TASK_STATE_INTERRUPTED)
    while True:
        await asyncio.sleep(0.2)
        listed = await manager.ListTasks(
            manager_pb2.ListTasksRequest(name_prefix=f"fl-round-{round_id}-"),
            timeout=RPC_TIMEOUT_S,
        )
        failed = [
            (names[t.name], t.error) for t in listed.tasks if t.name in names and t.state in ended
        ]
        if failed and len(names) - len(failed) < k:
            pid, error = failed[0]
            reason = error or "no reason given"
            return f"{len(failed)} of {len(names)} tasks failed; {pid}: {reason}"


async def _proplet_metrics(
    manager: manager_pb2_grpc.ManagerStub, round_id: str, reported: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Each reporting proplet's own numbers (samples, local loss/accuracy before and after),
    from its round task's result; waits briefly for the results to arrive over MQTT."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TASK_RESULTS_TIMEOUT_S
    names = {f"fl-round-{round_id}-{pid}": pid for pid in reported}
    found: dict[str, dict[str, Any]] = {}
    while True:
        listed = await manager.ListTasks(
            manager_pb2.ListTasksRequest(name_prefix=f"fl-round-{round_id}-"),
            timeout=RPC_TIMEOUT_S,
        )
        for task in listed.tasks:
            pid = names.get(task.name)
            if pid is None or task.state != manager_pb2.TASK_STATE_COMPLETED:
                continue
            try:
                result = json.loads(task.results)
            except ValueError:
                continue
            found[pid] = {
                "task_id": task.id,
                "num_samples": result.get("num_samples"),
                "metrics": result.get("metrics", {}),
            }
        if len(found) == len(names) or loop.time() >= deadline:
            return {pid: found[pid] for pid in reported if pid in found}
        await asyncio.sleep(0.05)


def write_plot(path: Path, rows: list[dict[str, Any]], title: str) -> None:
    """Loss and accuracy of the global model against the round (0 = the initial model)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rounds = [r["round"] for r in rows]
    fig = Figure(figsize=(9.0, 3.8), dpi=110)
    FigureCanvasAgg(fig)
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.plot(rounds, [r["loss"] for r in rows], marker="o", label="global (all data)")
    local = [(r["round"], r["local_loss"]) for r in rows if r.get("local_loss") is not None]
    if local:
        ax_loss.plot(
            [x for x, _ in local],
            [y for _, y in local],
            marker=".",
            linestyle="--",
            label="trainers' local, after training",
        )
    ax_loss.set_xlabel("round")
    ax_loss.set_ylabel("log-loss")
    ax_loss.set_title("log-loss")
    ax_loss.legend()
    ax_acc.plot(rounds, [r["accuracy"] for r in rows], marker="o", color="tab:green")
    ax_acc.set_xlabel("round")
    ax_acc.set_ylabel("accuracy")
    ax_acc.set_ylim(0.0, 1.0)
    ax_acc.set_title("accuracy")
    for ax in (ax_loss, ax_acc):
        ax.set_xticks(rounds)
        ax.grid(True, alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def _atomic_write(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


RECORD_ORDER = (
    "command",
    "created_at",
    "status",
    "error",
    "config",
    "trainer",
    "proplet_ids",
    "data",
    "initial",
    "rounds",
    "final_model",
    "models",
    "timings",
)


def write_record(path: Path, record: dict[str, Any]) -> None:
    ordered = {k: record[k] for k in RECORD_ORDER if k in record}
    ordered.update((k, v) for k, v in record.items() if k not in ordered)
    text = json.dumps(ordered, indent=2) + "\n"
    _atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


async def cmd_demo(args: argparse.Namespace) -> int:
    try:
        return await _demo(args)
    except DemoFailed as exc:
        sys.stdout.flush()
        print(f"propeller-fl demo: {exc}", file=sys.stderr)
        return 1


async def _demo(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    created = datetime.now(UTC).isoformat(timespec="seconds")
    n = args.proplets
    k_of_n = args.k_of_n or n
    if k_of_n > n:
        raise DemoFailed(f"--k-of-n: {k_of_n} is more than --proplets {n}")
    if args.dataset is not None and (args.samples is not None or args.features is not None):
        raise DemoFailed("--samples and --features describe synthetic data; not with --dataset")
    samples = args.samples or DEFAULT_SAMPLES
    features = args.features or DEFAULT_FEATURES
    # Fixed ids and round ids: the demo is the same run every time it is run.
    proplet_ids = [f"proplet-{i + 1}" for i in range(n)]
    shards: list[Shard] | None = None
    if args.dataset is not None:
        x_all, y_all = await asyncio.to_thread(load_table, args.dataset)
        shards = split_shards(x_all, y_all, proplet_ids)
        features = int(x_all.shape[1])
    stdout, stderr = sys.stdout, sys.stderr
    line = StatusLine(stderr, is_live(stdout, stderr))

    if args.wasm is None:
        line.show("building the trainer module (wasm-client)...")
    trainer = await locate_trainer(args.wasm)
    line.clear()
    t_built = time.perf_counter()
    image = f"file://{trainer}"
    hyper = coordinator_pb2.Hyperparams(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size)
    config = {
        "rounds": args.rounds,
        "proplets": n,
        "k_of_n": k_of_n,
        "epochs": args.epochs,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "timeout_s": args.timeout_s,
        "dataset": str(args.dataset) if args.dataset is not None else None,
        "samples_per_proplet": None if shards is not None else samples,
        "features": features,
    }
    record: dict[str, Any] = {
        "command": "propeller-fl demo",
        "created_at": created,
        "status": "running",
        "config": config,
        "trainer": {
            "path": str(trainer),
            "image": image,
            "sha256": await asyncio.to_thread(_file_sha256, trainer),
        },
        "proplet_ids": proplet_ids,
    }
    rows: list[RoundRow] = []
    plot_rows: list[dict[str, Any]] = []
    timings: dict[str, float] = {"trainer_s": round(t_built - t_start, 4)}
    record["timings"] = timings
    models: list[dict[str, Any]] = []
    record["models"] = models

    with tempfile.TemporaryDirectory(prefix="propeller-fl-demo-") as work:
        stack_config = StackConfig(
            seed_proplet_ids=tuple(proplet_ids) if shards is None else (),
            num_samples=samples,
            num_features=features,
        )
        line.show(f"starting broker, services and {n} proplets...")
        try:
            async with one_process(
                host="127.0.0.1",
                mqtt_port=0,
                stack_config=stack_config,
                proplet_ids=proplet_ids,
                work_dir=Path(work),
                task_timeout_s=args.timeout_s,
            ) as running:
                line.clear()
                c = running.clients
                if shards is not None:
                    await _upload_shards(c.datastore, shards)
                x, y, sizes = await _fetch_data(c.datastore, proplet_ids)
                record["data"] = {
                    "source": "file" if shards is not None else "synthetic",
                    "generator": None
                    if shards is not None
                    else "server.datastore.datasets.synthetic_dataset",
                    "num_features": int(x.shape[1]),
                    "total_samples": int(y.shape[0]),
                    "samples_per_proplet": sizes,
                    "positive_fraction": float(np.mean(y)),
                }
                await c.registry.InitModel(
                    model_registry_pb2.InitModelRequest(dimension=int(x.shape[1])),
                    timeout=RPC_TIMEOUT_S,
                )
                sha0, model = await _get_model(c.registry, 0)
                loss0, acc0 = await asyncio.to_thread(evaluate, model, x, y)
                models.append(
                    {
                        "version": 0,
                        "model_uri": model_uri(0),
                        "sha256": sha0,
                        "tensors": _model_json(model),
                    }
                )
                record["initial"] = {
                    "model_version": 0,
                    "model_uri": model_uri(0),
                    "sha256": sha0,
                    "loss": loss0,
                    "accuracy": acc0,
                }
                plot_rows.append({"round": 0, "loss": loss0, "accuracy": acc0})
                t_ready = time.perf_counter()
                timings["startup_s"] = round(t_ready - t_built, 4)

                round_ids = [f"demo-r{r}" for r in range(1, args.rounds + 1)]
                table = Table(stdout, max(len(rid) for rid in round_ids))
                table.header()
                table.row("initial", 0, "-", loss0, acc0, "-")
                version = 0
                for index, round_id in enumerate(round_ids, start=1):
                    row = await _run_round(
                        c,
                        index=index,
                        total=args.rounds,
                        round_id=round_id,
                        base_version=version,
                        participants=proplet_ids,
                        hyper=hyper,
                        k_of_n=k_of_n,
                        timeout_s=args.timeout_s,
                        image=image,
                        line=line,
                        record=record,
                        rows=rows,
                    )
                    sha, model = await _get_model(c.registry, row.model_version)
                    loss, acc = await asyncio.to_thread(evaluate, model, x, y)
                    row.sha256, row.loss, row.accuracy = sha, loss, acc
                    models.append(
                        {
                            "version": row.model_version,
                            "model_uri": row.model_uri,
                            "sha256": sha,
                            "tensors": _model_json(model),
                        }
                    )
                    plot_rows.append(
                        {
                            "round": index,
                            "loss": loss,
                            "accuracy": acc,
                            "local_loss": row.round_metrics.get("loss"),
                        }
                    )
                    line.clear()
                    table.row(
                        round_id,
                        row.model_version,
                        f"{len(row.reported)}/{row.k_of_n}",
                        loss,
                        acc,
                        f"{row.wall_time_s:.2f}s",
                    )
                    version = row.model_version
                timings["rounds_s"] = round(time.perf_counter() - t_ready, 4)
                record["final_model"] = models[-1]
                line.show("stopping...")
                t_stop = time.perf_counter()
            line.clear()
            timings["shutdown_s"] = round(time.perf_counter() - t_stop, 4)
        except (DemoFailed, grpc.aio.AioRpcError) as exc:
            line.clear()
            reason = (
                f"{exc.code().name}: {exc.details()}"
                if isinstance(exc, grpc.aio.AioRpcError)
                else str(exc)
            )
            record["status"] = "failed"
            record["error"] = reason
            _finish_record(record, rows, timings, t_start)
            with contextlib.suppress(OSError):
                await asyncio.to_thread(write_record, args.record, record)
            raise DemoFailed(reason) from None

    record["status"] = "completed"
    title = (
        f"propeller-fl demo: {n} proplets, {args.rounds} rounds, epochs {args.epochs}, "
        f"lr {args.lr:g}, batch {args.batch_size}"
    )
    t_plot = time.perf_counter()
    await asyncio.to_thread(write_plot, args.plot, plot_rows, title)
    timings["plot_s"] = round(time.perf_counter() - t_plot, 4)
    _finish_record(record, rows, timings, t_start)
    await asyncio.to_thread(write_record, args.record, record)
    first, last = plot_rows[0], plot_rows[-1]
    stdout.write(
        f"\nlog-loss {first['loss']:.4f} -> {last['loss']:.4f}, "
        f"accuracy {first['accuracy']:.4f} -> {last['accuracy']:.4f} "
        f"over {args.rounds} rounds ({n} proplets, {record['data']['total_samples']} samples)\n"
        f"plot    {args.plot}\nrecord  {args.record}\n"
        f"time    {timings['total_s']:.2f}s\n"
    )
    stdout.flush()
    return 0


def _finish_record(
    record: dict[str, Any], rows: list[RoundRow], timings: dict[str, float], t_start: float
) -> None:
    record["rounds"] = [
        {
            "round": r.index,
            "round_id": r.round_id,
            "experiment_id": r.experiment_id,
            "base_model_uri": r.base_model_uri,
            "model_version": r.model_version,
            "model_uri": r.model_uri,
            "sha256": r.sha256,
            "k_of_n": r.k_of_n,
            "participants": r.participants,
            "skipped": r.skipped,
            "reported": r.reported,
            "num_reported": len(r.reported),
            "closed_by": r.closed_by,
            "loss": r.loss,
            "accuracy": r.accuracy,
            "wall_time_s": round(r.wall_time_s, 4),
            "round_metrics": r.round_metrics,
            "proplet_metrics": r.proplet_metrics,
        }
        for r in rows
        if r.sha256  # evaluated
    ]
    timings["total_s"] = round(time.perf_counter() - t_start, 4)


async def _run_round(
    c: Clients,
    *,
    index: int,
    total: int,
    round_id: str,
    base_version: int,
    participants: list[str],
    hyper: coordinator_pb2.Hyperparams,
    k_of_n: int,
    timeout_s: float,
    image: str,
    line: StatusLine,
    record: dict[str, Any],
    rows: list[RoundRow],
) -> RoundRow:
    experiment_id = f"exp-{round_id}"
    base = model_uri(base_version)
    progress = RoundProgress(line, index, total, round_id, len(participants))
    t0 = time.perf_counter()
    try:
        started = await c.manager.StartExperiment(
            manager_pb2.StartExperimentRequest(
                experiment_id=experiment_id,
                round_id=round_id,
                model_ref=base,
                participants=participants,
                hyperparams=hyper,
                k_of_n=k_of_n,
                timeout_s=timeout_s,
                task_wasm_image=image,
            ),
            timeout=RPC_TIMEOUT_S,
        )
    except grpc.aio.AioRpcError as exc:
        raise DemoFailed(
            f"round {index} ({round_id}) could not start: {exc.code().name}: {exc.details()}"
        ) from None
    skipped = {s.proplet_id: s.reason for s in started.skipped}
    scheduled = [s.proplet_id for s in started.scheduled]
    k = started.round.k_of_n or len(scheduled)
    # The deadline counts from the start; allow for aggregation on top.
    watch = asyncio.create_task(_watch_round(c, round_id, progress, timeout_s + RPC_TIMEOUT_S))
    doomed = asyncio.create_task(_hopeless(c.manager, round_id, scheduled, k))
    try:
        await asyncio.wait({watch, doomed}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (watch, doomed):
            if not task.done():
                task.cancel()
        await asyncio.wait({watch, doomed})
    if not watch.done() or watch.cancelled():
        raise DemoFailed(f"round {index} ({round_id}) cannot reach k_of_n {k}: {doomed.result()}")
    status = watch.result()
    wall = time.perf_counter() - t0
    if status.state != coordinator_pb2.ROUND_STATE_COMPLETED:
        reason = status.failure_reason or coordinator_pb2.RoundState.Name(status.state)
        raise DemoFailed(f"round {index} ({round_id}) failed: {reason}")
    per_proplet = await _proplet_metrics(c.manager, round_id, list(status.reported))
    row = RoundRow(
        index=index,
        round_id=round_id,
        experiment_id=experiment_id,
        base_model_uri=base,
        model_version=int(status.new_model_version),
        model_uri=status.new_model_uri,
        sha256="",
        k_of_n=status.k_of_n,
        participants=list(status.participants),
        reported=list(status.reported),
        closed_by=status.closed_by,
        loss=math.nan,
        accuracy=math.nan,
        wall_time_s=wall,
        round_metrics=dict(status.metrics),
        proplet_metrics=per_proplet,
        skipped=skipped,
    )
    rows.append(row)
    return row


# ---------------------------------------------------------------------------- up


async def cmd_up(args: argparse.Namespace) -> int:
    try:
        return await _up(args)
    except DemoFailed as exc:
        sys.stdout.flush()
        print(f"propeller-fl up: {exc}", file=sys.stderr)
        return 1


def check_ports_free(host: str, ports: dict[str, int]) -> None:
    """Fail at once, naming the flag, when a fixed port is taken. (gRPC servers bind with
    SO_REUSEPORT, so a second `up` would otherwise share the ports of the first one.)"""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for name, port in ports.items():
        if not port:
            continue
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as exc:
                raise DemoFailed(
                    f"--{name}-port: cannot listen on {host}:{port}: {exc.strerror or exc}"
                ) from None


async def _up(args: argparse.Namespace) -> int:
    check_ports_free(args.host, {name: getattr(args, f"{name}_port") for name in UP_PORTS})
    trainer = await locate_trainer(args.wasm)
    proplet_ids = [str(uuid.uuid4()) for _ in range(args.proplets)]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        with tempfile.TemporaryDirectory(prefix="propeller-fl-up-") as work:
            async with one_process(
                host=args.host,
                mqtt_port=args.mqtt_port,
                stack_config=StackConfig(
                    manager_port=args.manager_port,
                    coordinator_port=args.coordinator_port,
                    aggregator_port=args.aggregator_port,
                    registry_port=args.registry_port,
                    datastore_port=args.datastore_port,
                    seed_proplet_ids=tuple(proplet_ids),
                    num_samples=args.samples,
                    num_features=args.features,
                    state_dir=args.state_dir,
                ),
                proplet_ids=proplet_ids,
                work_dir=Path(work),
                task_timeout_s=300.0,
            ) as running:
                ep = running.endpoints
                lines = [
                    ("mqtt", running.broker.address),
                    ("manager", ep.manager),
                    ("coordinator", ep.coordinator),
                    ("aggregator", ep.aggregator),
                    ("registry", ep.registry),
                    ("datastore", ep.datastore),
                    ("trainer", f"file://{trainer}"),
                    *(("proplet", pid) for pid in proplet_ids),
                ]
                for name, value in lines:
                    print(f"{name:<12} {value}", flush=True)
                print("ready", flush=True)
                await stop.wait()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
    return 0
