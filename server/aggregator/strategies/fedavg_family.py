"""The FedAvg family: every rule here starts from the sample-weighted mean of the updates,
folded in as they arrive by `server.aggregator.fedavg.FedAvg` (memory O(model size) however
many updates), then moves the base model by a server-side optimiser step.

- FedAvg (McMahan et al. 2017) and FedProx (Li et al. 2020; its proximal term `mu` is the
  trainer's, the server side is FedAvg): the mean itself, bit-identical to `FedAvg.result()`.
- FedAvgM (Hsu et al. 2019): server momentum on the pseudo-gradient base - mean.
- FedAdagrad, FedAdam, FedYogi (Reddi et al. 2021, "Adaptive Federated Optimization",
  Algorithm 2): first and second moments of delta = mean - base, x <- x + eta m / (sqrt(v) + tau).

All server-side arithmetic is float64; the model is answered in the updates' dtype, the state
in float64 (docs/strategies.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from server.aggregator.fedavg import FedAvg as FedAvgCore
from server.aggregator.strategies.base import (
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    Strategy,
    StrategyParams,
    bounded,
    cast_checked,
    prefixed_specs,
)
from server.errors import InvalidArgument
from server.tensors import Array, Spec, Tensors

F64 = np.ndarray[tuple[int, ...], np.dtype[np.float64]]


class _MeanStrategy(Strategy):
    """The shared part: the incremental weighted mean."""

    def __init__(self, params: StrategyParams) -> None:
        super().__init__(params)
        self._mean = FedAvgCore()
        self._samples: list[int] = []

    @property
    def count(self) -> int:
        return self._mean.count

    @property
    def total_samples(self) -> int:
        return self._mean.total_samples

    @property
    def specs(self) -> list[Spec] | None:
        return self._mean.specs

    def add(self, tensors: Mapping[str, Array], num_samples: int) -> None:
        self._mean.add(tensors, num_samples)
        self._samples.append(int(num_samples))

    def weights(self) -> list[float]:
        """n_i / sum(n): every rule here moves by the sample-weighted mean."""
        total = self._mean.total_samples
        return [n / total for n in self._samples]

    def _checked_specs(self) -> list[Spec]:
        specs = self._mean.specs
        if specs is None:
            raise InvalidArgument("updates: no updates to aggregate")
        return specs


class FedAvg(_MeanStrategy):
    """The mean itself (no parameters)."""

    name = "fedavg"

    def result(self, base: Tensors | None, state: Tensors | None) -> tuple[Tensors, Tensors | None]:
        return self._mean.result(), None


@dataclass(frozen=True)
class FedProxParams(StrategyParams):
    # The proximal term's weight: the trainer's (it reaches it as a hyperparameter); accepted
    # here so one parameter object describes the strategy.
    mu: float = bounded(0.0, NON_NEGATIVE)


class FedProx(FedAvg):
    """FedAvg at the server; `mu` is the trainer's."""

    name = "fedprox"
    params: FedProxParams


class _ServerOptimiser(_MeanStrategy):
    """Rules that move the base model by a step computed from the mean and the state."""

    needs_base = True
    stateful = True
    state_prefixes: ClassVar[tuple[str, ...]]

    @classmethod
    def state_specs(cls, model: Sequence[Spec]) -> list[Spec]:
        return prefixed_specs(cls.state_prefixes, model)

    def result(self, base: Tensors | None, state: Tensors | None) -> tuple[Tensors, Tensors | None]:
        specs = self._checked_specs()
        if base is None:
            raise InvalidArgument(f"base: strategy {self.name} needs the round's base model")
        mean = self._mean.result(np.float64)
        model: dict[str, F64] = {}
        moved_by_name: dict[str, F64] = {}
        with np.errstate(over="ignore", invalid="ignore"):
            for spec in specs:
                old = {
                    p: (
                        np.zeros(spec.shape, np.float64)
                        if state is None
                        else np.asarray(state[f"{p}.{spec.name}"], np.float64)
                    )
                    for p in self.state_prefixes
                }
                x = np.asarray(base[spec.name], np.float64).reshape(spec.shape)
                new_x, moved = self.step(x, mean[spec.name].astype(np.float64), old)
                model[spec.name] = new_x
                for p in self.state_prefixes:
                    moved_by_name[f"{p}.{spec.name}"] = moved[p]
        # In the order of `state_specs`, which is what comes back next round.
        new_state: Tensors = {s.name: moved_by_name[s.name] for s in self.state_specs(specs)}
        for name, arr in new_state.items():
            if not np.isfinite(arr).all():
                raise InvalidArgument(f"updates: the {self.name} state {name} overflows float64")
        return cast_checked(model, specs, "updates"), new_state

    def step(self, x: F64, mean: F64, state: dict[str, F64]) -> tuple[F64, dict[str, F64]]:
        """One tensor: the new value of `x` and the new state from the round's `mean`."""
        raise NotImplementedError


@dataclass(frozen=True)
class FedAvgMParams(StrategyParams):
    server_learning_rate: float = bounded(1.0, POSITIVE)
    server_momentum: float = bounded(0.0, FRACTION)


class FedAvgM(_ServerOptimiser):
    """v <- beta v + (x - mean); x <- x - lr v (v = 0 before the first round)."""

    name = "fedavgm"
    params: FedAvgMParams
    state_prefixes = ("momentum",)

    def step(self, x: F64, mean: F64, state: dict[str, F64]) -> tuple[F64, dict[str, F64]]:
        p = self.params
        velocity = p.server_momentum * state["momentum"] + (x - mean)
        return x - p.server_learning_rate * velocity, {"momentum": velocity}


@dataclass(frozen=True)
class FedAdagradParams(StrategyParams):
    eta: float = bounded(0.1, POSITIVE)
    # The clients' learning rate (the trainer's `lr`); not used server side.
    eta_l: float = bounded(0.1, POSITIVE)
    beta_1: float = bounded(0.0, FRACTION)
    tau: float = bounded(1e-9, POSITIVE)


@dataclass(frozen=True)
class FedAdamParams(FedAdagradParams):
    """Adagrad's parameters with a first moment by default, and the second moment's decay."""

    beta_1: float = bounded(0.9, FRACTION)
    beta_2: float = bounded(0.99, FRACTION)


@dataclass(frozen=True)
class FedYogiParams(FedAdamParams):
    eta: float = bounded(0.01, POSITIVE)
    eta_l: float = bounded(0.0316, POSITIVE)
    tau: float = bounded(1e-3, POSITIVE)


class _FedOpt(_ServerOptimiser):
    """delta = mean - x; m <- beta_1 m + (1 - beta_1) delta; v by the rule;
    x <- x + eta m / (sqrt(v) + tau). m and v start at 0."""

    params: FedAdagradParams
    state_prefixes = ("m", "v")

    def second_moment(self, v: F64, delta: F64) -> F64:
        raise NotImplementedError

    def step(self, x: F64, mean: F64, state: dict[str, F64]) -> tuple[F64, dict[str, F64]]:
        p = self.params
        delta = mean - x
        m = p.beta_1 * state["m"] + (1.0 - p.beta_1) * delta
        v = self.second_moment(state["v"], delta)
        return x + p.eta * m / (np.sqrt(v) + p.tau), {"m": m, "v": v}


class FedAdagrad(_FedOpt):
    name = "fedadagrad"

    def second_moment(self, v: F64, delta: F64) -> F64:
        out: F64 = v + delta * delta
        return out


class FedAdam(_FedOpt):
    name = "fedadam"
    params: FedAdamParams

    def second_moment(self, v: F64, delta: F64) -> F64:
        decay = self.params.beta_2
        out: F64 = decay * v + (1.0 - decay) * delta * delta
        return out


class FedYogi(FedAdam):
    """Adam's moments with Yogi's second-moment rule (its own defaults)."""

    name = "fedyogi"
    params: FedYogiParams

    def second_moment(self, v: F64, delta: F64) -> F64:
        sq = delta * delta
        out: F64 = v - (1.0 - self.params.beta_2) * sq * np.sign(v - sq)
        return out
