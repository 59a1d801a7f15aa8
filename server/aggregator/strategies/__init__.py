"""The aggregation strategies by name: the one registry both the aggregator (which runs them)
and the coordinator (which checks a round's strategy when it is configured) use."""

from __future__ import annotations

from dataclasses import dataclass

from server.aggregator.strategies.base import (
    STATE_DTYPE,
    Strategy,
    StrategyParams,
    parse_params,
)
from server.aggregator.strategies.fedavg_family import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedProx,
    FedYogi,
)
from server.aggregator.strategies.robust import (
    Bulyan,
    FedMedian,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
)
from server.aggregator.strategies.wasm import WasmStrategy
from server.errors import InvalidArgument

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (
        FedAvg,
        FedAvgM,
        FedProx,
        FedAdam,
        FedYogi,
        FedAdagrad,
        FedMedian,
        FedTrimmedAvg,
        Krum,
        MultiKrum,
        Bulyan,
        WasmStrategy,
    )
}
DEFAULT_STRATEGY = FedAvg.name


@dataclass(frozen=True)
class StrategyChoice:
    """A strategy by name with its parsed parameters: what a round is configured with."""

    cls: type[Strategy]
    params: StrategyParams

    @property
    def name(self) -> str:
        return self.cls.name

    @property
    def min_updates(self) -> int:
        return self.cls.min_updates(self.params)

    def start(self) -> Strategy:
        """A fresh aggregation of one round by this strategy."""
        return self.cls(self.params)


def strategy_class(name: str, field: str = "strategy_name") -> type[Strategy]:
    try:
        return STRATEGIES[name or DEFAULT_STRATEGY]
    except KeyError:
        raise InvalidArgument(
            f"{field}: unknown strategy {name!r} (known: {', '.join(STRATEGIES)})"
        ) from None


def choose_strategy(name: str, params_json: str, field: str = "strategy_name") -> StrategyChoice:
    """The strategy `name` (empty: FedAvg) with `params_json` parsed; INVALID_ARGUMENT naming
    `field` or `strategy_params_json.<key>`."""
    cls = strategy_class(name, field)
    return StrategyChoice(cls, parse_params(cls.params_type, params_json))


__all__ = [
    "DEFAULT_STRATEGY",
    "STATE_DTYPE",
    "STRATEGIES",
    "Strategy",
    "StrategyChoice",
    "StrategyParams",
    "choose_strategy",
    "strategy_class",
]
