"""Learning quality: the MLP trained federated vs the same MLP trained centrally, on digits.

Real mosquitto, the five services (`tests.support.cluster`: the product's `Stack`) and N real
proplets in this process, mutual TLS. The train split of scikit-learn's digits
(`server.datastore.catalog`) is partitioned over the proplets (`server.datastore.partition`,
as `propeller-fl datasets partition` does: IID, or Dirichlet over labels) and stored in the
data store; v0 (a 64-32-10 MLP, He-initialised from a fixed seed) in the registry. Each case is
one experiment (`Manager.StartExperiment` with `rounds` and a strategy) of the MLP trainer
(`fl-mlp.wasm`); every round's stored version is scored on the held-out test split.

Central: the same module, run once in the proplet's sandbox (`proplet.runner`) on the whole
train split, for rounds x local epochs epochs (each training sample is visited as often as in
the federated run), with the same learning rate and batch size.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import Recorder
from benchmarks.wasm import mlp_wasm
from propeller.v1 import coordinator_pb2, datastore_pb2, manager_pb2
from proplet import safetensors
from proplet.runner import Invocation, Limits, WasmRuntime
from server.config import MqttConfig
from server.datastore import catalog
from server.datastore.catalog import Corpus, Split
from server.datastore.partition import partition
from server.mlp import evaluate, initial_model
from server.models import model_uri
from server.streams import model_stream
from server.tensors import Tensors, tensor_to_proto
from server.topics import Topics
from tests.support.cluster import Cluster, cluster
from tests.support.infra import mosquitto
from tests.support.security import session_ca

NAME = "quality"
# The model: digits' 64 pixels -> 32 hidden ReLUs -> 10 classes (2,410 parameters).
HIDDEN = 32
INIT_SEED = 0
PARTITION_SEED = 0
# The bounds: federated within this many accuracy points of central.
TARGET_POINTS = {"iid": 1.0, "dirichlet": 3.0}
RPC_S = 60.0
# Each comparison is repeated with other shuffles (the trainer's shuffle is seeded by the
# round id, so by the run's ids): one test sample is 0.28 points, and a single run's gap moves
# by about a point with the shuffle alone.
REPEATS = 3


@dataclass(frozen=True)
class Setup:
    """One data split and training budget."""

    proplets: int
    alpha: float | None  # None: IID
    rounds: int
    epochs: int  # local epochs per round
    lr: float = 0.1
    batch_size: int = 16

    @property
    def partition_name(self) -> str:
        return "iid" if self.alpha is None else f"dirichlet({self.alpha:g})"

    @property
    def central_epochs(self) -> int:
        return self.rounds * self.epochs


@dataclass(frozen=True)
class Strategy:
    name: str
    params: Mapping[str, float] = field(default_factory=dict)
    # Keys for the trainer (FedProx's mu) beside epochs, lr and batch_size.
    trainer: Mapping[str, float] = field(default_factory=dict)

    @property
    def label(self) -> str:
        shown = {**self.params, **self.trainer}
        return self.name + (
            "(" + ", ".join(f"{k}={v:g}" for k, v in shown.items()) + ")" if shown else ""
        )


# Chosen with the numpy reference of the trainer (tests/wasm_client/mlp_reference.py) so that
# central training has converged on digits; see docs/benchmarks.md, "quality".
IID = Setup(proplets=10, alpha=None, rounds=20, epochs=5)
NON_IID = Setup(proplets=10, alpha=0.5, rounds=50, epochs=2)
STRATEGIES = (
    Strategy("fedavg"),
    Strategy("fedprox", {"mu": 0.01}, {"mu": 0.01}),
    Strategy("fedavgm", {"server_learning_rate": 1.0, "server_momentum": 0.5}),
    Strategy("fedadam", {"eta": 0.01, "eta_l": 0.1, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}),
)


def accuracy(model: Tensors, split: Split) -> float:
    return evaluate(model, split.features, split.labels)[1]


def hyperparams_json(setup: Setup, epochs: int, extra: Mapping[str, float]) -> str:
    return json.dumps({"epochs": epochs, "lr": setup.lr, "batch_size": setup.batch_size, **extra})


def train_central(
    wasm: Path, model: Tensors, train: Split, setup: Setup, repeat: int = 0
) -> Tensors:
    """The module on the whole train split for `setup.central_epochs` epochs, in the proplet's
    sandbox (blocking: run it in a thread); `repeat` picks the shuffle."""
    runtime = WasmRuntime()
    compiled = runtime.compile(wasm.read_bytes(), f"central-{wasm.name}")
    stdin = safetensors.encode(model) + safetensors.encode({"x": train.features, "y": train.labels})
    env = {
        "ROUND_ID": f"central-s{repeat}",
        "PROPLET_ID": "central",
        "MODEL_URI": model_uri(0),
        "HYPERPARAMS": hyperparams_json(setup, setup.central_epochs, {}),
    }
    invocation = Invocation(["fl-mlp"], env, Limits(timeout_s=600.0), stdin)
    out = runtime.run_sync(compiled, invocation)
    return dict(safetensors.decode(out.stdout, "stdout").tensors)


async def put_parts(d: Cluster, corpus: Corpus, setup: Setup) -> list[str]:
    """The train split partitioned over `setup.proplets` of the cluster's proplets, stored."""
    ids = d.proplet_ids[: setup.proplets]
    for part in partition(corpus, ids, alpha=setup.alpha, seed=PARTITION_SEED):
        dataset = datastore_pb2.Dataset(
            proplet_id=part.proplet_id,
            schema=part.schema,
            features=tensor_to_proto(part.features),
            labels=tensor_to_proto(part.labels),
            num_classes=part.num_classes,
        )
        await d.datastore.PutDataset(
            datastore_pb2.PutDatasetRequest(dataset=dataset), timeout=RPC_S
        )
    return ids


async def put_initial(d: Cluster, model: Tensors) -> str:
    put = await d.registry.PutModel(model_stream(model, 1 << 20), timeout=RPC_S)
    uri: str = put.model_uri
    return uri


async def run_federated(
    d: Cluster,
    participants: list[str],
    base_uri: str,
    setup: Setup,
    strategy: Strategy,
    image: str,
    repeat: int = 0,
) -> list[Tensors]:
    """One experiment of `setup.rounds` rounds from `base_uri` with `strategy`: each round's
    stored model, in order. `repeat` picks the shuffles (through the experiment's id)."""
    # Fixed ids: the trainer's shuffle is seeded by the round id (and the proplet's), so the
    # same setup and strategy train the same way on every run.
    name = f"quality-{setup.partition_name}-{strategy.name}-s{repeat}"
    experiment_id = name.replace("(", "").replace(")", "")
    extra = json.dumps(dict(strategy.trainer)) if strategy.trainer else ""
    await d.manager.StartExperiment(
        manager_pb2.StartExperimentRequest(
            experiment_id=experiment_id,
            model_ref=base_uri,
            participants=participants,
            hyperparams=coordinator_pb2.Hyperparams(
                epochs=setup.epochs, lr=setup.lr, batch_size=setup.batch_size, extra_json=extra
            ),
            k_of_n=len(participants),
            timeout_s=120,
            task_wasm_image=image,
            rounds=setup.rounds,
            strategy_name=strategy.name,
            strategy_params_json=json.dumps(dict(strategy.params)),
        ),
        timeout=RPC_S,
    )
    get = manager_pb2.GetExperimentRequest(experiment_id=experiment_id)
    while True:
        experiment = await d.manager.GetExperiment(get, timeout=RPC_S)
        if experiment.state != manager_pb2.EXPERIMENT_STATE_RUNNING:
            break
        await asyncio.sleep(0.2)
    if experiment.state != manager_pb2.EXPERIMENT_STATE_COMPLETED:
        raise RuntimeError(f"experiment {experiment_id} ended: {experiment.end.detail}")
    rounds: list[manager_pb2.ExperimentRound] = []
    token = ""
    while True:
        page = await d.manager.ListExperimentRounds(
            manager_pb2.ListExperimentRoundsRequest(experiment_id=experiment_id, page_token=token),
            timeout=RPC_S,
        )
        rounds.extend(page.rounds)
        token = page.next_page_token
        if not token:
            break
    if len(rounds) != setup.rounds:
        raise RuntimeError(f"experiment {experiment_id}: {len(rounds)} of {setup.rounds} rounds")
    return [await d.model(int(r.new_model_version)) for r in rounds]


@dataclass
class Comparison:
    """A setup's central accuracy per repeat, and each strategy's per-round accuracies per
    repeat."""

    setup: Setup
    central: list[float] = field(default_factory=list)
    federated: dict[str, list[list[float]]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def central_mean(self) -> float:
        return float(np.mean(self.central))

    def finals(self, label: str) -> list[float]:
        return [run[-1] for run in self.federated[label]]

    def final(self, label: str) -> float:
        """The last round's accuracy, the mean over the repeats."""
        return float(np.mean(self.finals(label)))

    def per_round(self, label: str) -> list[float]:
        return [float(a) for a in np.mean(np.array(self.federated[label]), axis=0)]

    def gap_points(self, label: str) -> float:
        """Central minus federated (last round), in accuracy points, both means over the
        repeats."""
        return (self.central_mean - self.final(label)) * 100


async def compare(
    d: Cluster,
    corpus: Corpus,
    setup: Setup,
    strategies: tuple[Strategy, ...],
    wasm: Path,
    repeats: int = 1,
) -> Comparison:
    """Per repeat: central once, then one federated experiment per strategy, all from the
    same v0 and the same partition."""
    model = initial_model((corpus.num_features, HIDDEN, corpus.num_classes), INIT_SEED)
    result = Comparison(setup)
    participants = await put_parts(d, corpus, setup)
    base = await put_initial(d, model)
    for repeat in range(repeats):
        central = await asyncio.to_thread(train_central, wasm, model, corpus.train, setup, repeat)
        result.central.append(accuracy(central, corpus.test))
        for strategy in strategies:
            t0 = time.perf_counter()
            models = await run_federated(
                d, participants, base, setup, strategy, f"file://{wasm}", repeat
            )
            took = time.perf_counter() - t0
            result.seconds[strategy.label] = result.seconds.get(strategy.label, 0.0) + took
            runs = result.federated.setdefault(strategy.label, [])
            runs.append([accuracy(m, corpus.test) for m in models])
    return result


@contextlib.asynccontextmanager
async def deployment(workdir: Path, proplets: int) -> AsyncIterator[Cluster]:
    """Mosquitto, the stack and `proplets` proplets over mutual TLS, no model yet."""
    with mosquitto(workdir / "mosquitto", ca=session_ca()) as broker:
        mqtt = MqttConfig(port=broker.port, topics=Topics(f"q{uuid.uuid4().hex[:8]}", "fl"))
        ids = [f"proplet-{i + 1}" for i in range(proplets)]
        async with cluster(mqtt, workdir, proplets=ids, dimension=None) as d:
            yield d


async def run(rec: Recorder, smoke: bool) -> None:
    wasm = await asyncio.to_thread(mlp_wasm)
    corpus = await asyncio.to_thread(catalog.digits)
    setups: list[tuple[Setup, tuple[Strategy, ...]]]
    if smoke:
        setups = [(Setup(proplets=3, alpha=None, rounds=2, epochs=1), STRATEGIES[:1])]
    else:
        setups = [(IID, STRATEGIES), (NON_IID, STRATEGIES)]
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        async with deployment(Path(tmp), max(s.proplets for s, _ in setups)) as d:
            for setup, strategies in setups:
                repeats = 1 if smoke else REPEATS
                _record(rec, await compare(d, corpus, setup, strategies, wasm, repeats))


def _record(rec: Recorder, result: Comparison) -> None:
    setup = result.setup
    target = TARGET_POINTS["iid" if setup.alpha is None else "dirichlet"]
    best = min(result.federated, key=result.gap_points)
    for label in result.federated:
        accuracies = result.per_round(label)
        gap = result.gap_points(label)
        case: dict[str, Any] = {
            "dataset": "digits",
            "model": f"mlp 64-{HIDDEN}-10",
            "partition": setup.partition_name,
            "proplets": setup.proplets,
            "rounds": setup.rounds,
            "local_epochs": setup.epochs,
            "lr": setup.lr,
            "batch_size": setup.batch_size,
            "strategy": label,
        }
        figures = {
            "repeats": len(result.central),
            "central_accuracy": round(result.central_mean, 4),
            "central_accuracy_each": [round(a, 4) for a in result.central],
            "central_epochs": setup.central_epochs,
            "federated_accuracy": round(result.final(label), 4),
            "federated_accuracy_each": [round(a, 4) for a in result.finals(label)],
            "best_round_accuracy": round(max(accuracies), 4),
            "gap_points": round(gap, 2),
            "accuracy_per_round": [round(a, 4) for a in accuracies],
            "seconds": round(result.seconds[label], 1),
        }
        met = {f"within {target:g} points (best strategy)": gap <= target}
        targets = met if label == best and not rec.smoke else None
        rec.record(
            NAME,
            case,
            figures,
            targets=targets,
            summary=(
                f"{setup.partition_name:<15} {setup.proplets} proplets x {setup.rounds} rounds x "
                f"{setup.epochs} epochs, {label:<28}: federated "
                f"{result.final(label) * 100:5.2f} % vs "
                f"central {result.central_mean * 100:5.2f} % ({setup.central_epochs} epochs; mean "
                f"of {len(result.central)}): "
                f"{gap:+.2f} points ({result.seconds[label]:.0f} s)"
            ),
        )
