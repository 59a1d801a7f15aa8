"""Shared pieces for the coordinator tests: a numpy FedAvg reference, update builders, and an
in-process `ModelBackend` whose failures a test can script."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np

from server.aggregator.client import Aggregated
from server.aggregator.strategies import choose_strategy
from server.coordinator.backend import FEDAVG, StrategyRun
from server.coordinator.coordinator import BaseModel, Lineage
from server.coordinator.rounds import Update
from server.coordinator.store import RoundUpdates, each_update
from server.errors import AlreadyExists, NotFound, PropellerError
from server.models import model_uri, parse_model_uri
from server.round_spec import RoundSpec
from server.tensors import Tensors, sha256_of, specs_of
from tests.support.clients import TEST_MODULE


def fedavg(updates: Sequence[Update]) -> Tensors:
    """Sample-weighted mean of the updates' tensors (the reference the aggregator must meet)."""
    total = sum(u.num_samples for u in updates)
    out: Tensors = {}
    for name, first in updates[0].tensors.items():
        acc = np.zeros(first.shape, dtype=np.float64)
        for u in updates:
            acc += u.tensors[name].astype(np.float64) * u.num_samples
        out[name] = (acc / total).astype(first.dtype)
    return out


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class MemoryBackend:
    """Registry + aggregator in process memory. `aggregate_errors` / `put_errors` are raised,
    one per call, before the call succeeds; `put_lands` makes a failing put store anyway (the
    reply was lost)."""

    def __init__(self, dimension: int = 3) -> None:
        self.models: dict[int, Tensors] = {0: {"w": np.zeros(dimension), "b": np.array(0.0)}}
        self.aggregate_errors: list[PropellerError] = []
        self.put_errors: list[PropellerError] = []
        self.put_lands = False
        self.aggregate_calls = 0
        self.put_calls = 0
        self.gate: asyncio.Event | None = None
        # Each version's lineage as the coordinator sent it: (round id, proplets, clips).
        self.lineages: dict[int, Lineage] = {}
        # Every aggregation's strategy, base and state, in call order.
        self.runs: list[StrategyRun] = []

    async def resolve(self, model_ref: str) -> BaseModel:
        version = parse_model_uri(model_ref) if model_ref else max(self.models)
        if version not in self.models:
            raise NotFound(f"model_ref: {model_ref!r}: NOT_FOUND: no such version")
        tensors = self.models[version]
        return BaseModel(model_uri(version), specs_of(tensors), sha256_of(tensors))

    async def base_tensors(self, model_uri: str) -> Tensors:
        return self.models[parse_model_uri(model_uri)]

    async def put_lineage(self, lineage: Lineage) -> None:
        """As the registry: the same round's lineage again is fine, another is refused."""
        known = self.lineages.get(lineage.version)
        if known is not None and known.round.round_id != lineage.round.round_id:
            raise AlreadyExists(f"version: {lineage.version} already has another lineage")
        self.lineages[lineage.version] = lineage

    async def aggregate(
        self, round_id: str, updates: RoundUpdates, run: StrategyRun = FEDAVG
    ) -> Aggregated:
        """FedAvg as the reference computes it; another strategy by the aggregator's own
        strategy objects, in process."""
        self.aggregate_calls += 1
        self.runs.append(run)
        if self.gate is not None:
            await self.gate.wait()
        if self.aggregate_errors:
            raise self.aggregate_errors.pop(0)
        received = [u async for u in each_update(updates)]
        if not run.name:
            tensors = fedavg(received)
            total = sum(u.num_samples for u in received)
            weights = [u.num_samples / total for u in received]
            return Aggregated(tensors, sha256_of(tensors), None, weights)
        strategy = choose_strategy(run.name, run.params_json).start()
        for u in received:
            strategy.add(u.tensors, u.num_samples)
        tensors, state = strategy.result(run.base, run.state)
        return Aggregated(tensors, sha256_of(tensors), state, strategy.weights())

    async def put(self, tensors: Tensors, sha256: str) -> tuple[int, str]:
        self.put_calls += 1
        if self.put_errors:
            err = self.put_errors.pop(0)
            if self.put_lands:
                self._store(tensors)
            raise err
        return self._store(tensors)

    def _store(self, tensors: Tensors) -> tuple[int, str]:
        version = max(self.models) + 1
        self.models[version] = tensors
        return version, model_uri(version)

    async def find(self, sha256: str, after_version: int) -> tuple[int, str] | None:
        for version, tensors in sorted(self.models.items()):
            if version > after_version and sha256_of(tensors) == sha256:
                return version, model_uri(version)
        return None


def make_update(
    proplet: str,
    w: Sequence[float],
    b: float,
    num_samples: int,
    base: str = "fl/models/global_model_v0",
    loss: float = 0.5,
) -> Update:
    return Update(
        proplet_id=proplet,
        base_model_uri=base,
        num_samples=num_samples,
        metrics={"loss": loss},
        tensors={"w": np.array(w, dtype=np.float64), "b": np.array(b, dtype=np.float64)},
        module_digest=TEST_MODULE,
    )


# Three participants' updates over v0 (a, b and c with 10, 30 and 60 samples).
UPDATES = [
    make_update("a", [1.0, 2.0, 3.0], 1.0, 10, loss=0.9),
    make_update("b", [0.0, -1.0, 4.0], -2.0, 30, loss=0.3),
    make_update("c", [5.0, 5.0, 5.0], 0.5, 60, loss=0.1),
]


def round_of_three(round_id: str, k_of_n: int = 3) -> RoundSpec:
    """A round of a, b and c (those of UPDATES) over v0, closing after 10 s."""
    return RoundSpec(
        round_id=round_id,
        participants=("a", "b", "c"),
        k_of_n=k_of_n,
        timeout_s=10,
        model_ref="fl/models/global_model_v0",
    )


class FedAdamReference:
    """FedAdam as Reddi et al. 2021 (Algorithm 2) state it, over the model flattened into one
    vector, in plain numpy: delta = mean - x; m = b1 m + (1 - b1) delta;
    v = b2 v + (1 - b2) delta^2; x = x + eta m / (sqrt(v) + tau); m and v start at 0. One
    `step` per round, with the round's updates (sample-weighted mean)."""

    def __init__(
        self, base: Tensors, *, eta: float, beta_1: float, beta_2: float, tau: float
    ) -> None:
        self.names = list(base)
        self.shapes = {n: np.shape(base[n]) for n in base}
        self.x = self._flat(base)
        self.m = np.zeros_like(self.x)
        self.v = np.zeros_like(self.x)
        self.eta, self.beta_1, self.beta_2, self.tau = eta, beta_1, beta_2, tau

    def _flat(self, t: Tensors) -> np.ndarray:
        return np.concatenate([np.asarray(t[n], np.float64).ravel() for n in self.names])

    def step(self, updates: Sequence[Update]) -> Tensors:
        total = sum(u.num_samples for u in updates)
        mean = sum(self._flat(u.tensors) * u.num_samples for u in updates) / total
        delta = mean - self.x
        self.m = self.beta_1 * self.m + (1 - self.beta_1) * delta
        self.v = self.beta_2 * self.v + (1 - self.beta_2) * delta**2
        self.x = self.x + self.eta * self.m / (np.sqrt(self.v) + self.tau)
        out: Tensors = {}
        at = 0
        for n in self.names:
            size = int(np.prod(self.shapes[n]))
            out[n] = self.x[at : at + size].reshape(self.shapes[n])
            at += size
        return out
