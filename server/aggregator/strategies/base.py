"""What every strategy is: a plain object that takes the round's updates one at a time and,
given the round's base model and its own state from the previous round, answers the new model
and its new state.

Parameters arrive as one JSON object (`strategy_params_json`) and become a frozen dataclass
per strategy: unknown keys, wrong types and out-of-range values are INVALID_ARGUMENT naming
`strategy_params_json.<key>`. State is named float64 tensors (`state_specs`), so it can be
streamed, stored and sent back next round like a model.
"""

from __future__ import annotations

import dataclasses
import json
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar, get_type_hints

import numpy as np

from server.aggregator.fedavg import all_finite
from server.errors import InvalidArgument
from server.ids import MAX_VALUE_BYTES
from server.messages import json_object
from server.tensors import Array, Spec, Tensors

PARAMS_FIELD = "strategy_params_json"
STATE_DTYPE = np.dtype(np.float64)

P = TypeVar("P", bound="StrategyParams")
T = TypeVar("T")


@dataclass(frozen=True)
class Bound:
    """The range of one parameter, written the way its INVALID_ARGUMENT says it."""

    text: str
    holds: Callable[[float], bool]


POSITIVE = Bound("> 0", lambda v: v > 0.0)
NON_NEGATIVE = Bound(">= 0", lambda v: v >= 0.0)
FRACTION = Bound("in [0, 1)", lambda v: 0.0 <= v < 1.0)


def bounded(default: T, bound: Bound) -> T:
    """A parameter field with its default and its range (checked in field order)."""
    field: T = dataclasses.field(default=default, metadata={"bound": bound})
    return field


@dataclass(frozen=True)
class StrategyParams:
    """Base of every strategy's parameters. Subclasses declare fields with defaults (float,
    int, bool or str), a field's range with `bounded`, and what spans fields in `check` with
    `bad(key, why)`."""

    def check(self) -> None:
        """What the fields' bounds cannot say; types and bounds are already checked."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            bound = f.metadata.get("bound")
            value = getattr(self, f.name)
            if isinstance(bound, Bound) and not bound.holds(value):
                raise bad(f.name, f"must be {bound.text}, got {value}")
        self.check()

    def as_json(self) -> str:
        """The parameters with every default filled in (what a round records)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":"))


def bad(key: str, why: str) -> InvalidArgument:
    return InvalidArgument(f"{PARAMS_FIELD}.{key}: {why}")


def parse_params(cls: type[P], text: str) -> P:
    """`text` (a JSON object, or empty for the defaults) as `cls`; INVALID_ARGUMENT naming
    `strategy_params_json` or `strategy_params_json.<key>`."""
    if len(text.encode()) > MAX_VALUE_BYTES:
        raise InvalidArgument(f"{PARAMS_FIELD}: more than {MAX_VALUE_BYTES} bytes")
    if not text.strip():
        return cls()
    raw = json_object(
        text,
        lambda exc: InvalidArgument(f"{PARAMS_FIELD}: not JSON ({exc})"),
        lambda kind: InvalidArgument(f"{PARAMS_FIELD}: must be a JSON object, got {kind}"),
    )
    hints = get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in fields:
            known = ", ".join(sorted(fields)) or "none"
            raise bad(key, f"unknown parameter (known: {known})")
        values[key] = _typed(key, value, hints[key])
    return cls(**values)


def _typed(key: str, value: Any, kind: Any) -> Any:
    if kind is str:
        if not isinstance(value, str):
            raise bad(key, f"must be a string, got {value!r}")
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise bad(key, f"must be true or false, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad(key, f"must be a number, got {value!r}")
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise bad(key, f"must be an integer, got {value!r}")
        return int(value)
    if not math.isfinite(value):
        raise bad(key, f"must be finite, got {value!r}")
    return float(value)


class Strategy(ABC):
    """One round's aggregation by one rule. `add` validates and takes an update (a rejected
    one changes nothing); `result` answers the new model (in the updates' dtype) and the new
    state (None for a stateless strategy)."""

    name: ClassVar[str]
    params_type: ClassVar[type[StrategyParams]]
    # The rule needs the model the round started from (server-side optimisers).
    needs_base: ClassVar[bool] = False
    # The rule keeps server-side state across rounds (momentum, moments).
    stateful: ClassVar[bool] = False
    # Folds each update in as it arrives (memory O(model size)); otherwise it holds every
    # update until `result` (order statistics), bounded by the aggregator's held-bytes limit.
    incremental: ClassVar[bool] = True

    def __init__(self, params: StrategyParams) -> None:
        self.params = params

    @property
    @abstractmethod
    def count(self) -> int:
        """Updates taken so far."""

    @property
    @abstractmethod
    def total_samples(self) -> int: ...

    @property
    @abstractmethod
    def specs(self) -> list[Spec] | None:
        """The tensors every update must have (the first update's), once known."""

    @abstractmethod
    def add(self, tensors: Mapping[str, Array], num_samples: int) -> None: ...

    async def prepare(self, base: Tensors | None, state: Tensors | None) -> None:
        """Called once every update is in, before `result`: the work a rule does outside this
        process or off the event loop (a WASM strategy pulls and runs its module here).
        Nothing for the built-in rules, which compute in `result`."""
        return None

    @abstractmethod
    def result(self, base: Tensors | None, state: Tensors | None) -> tuple[Tensors, Tensors | None]:
        """The new model and the new state; `state` None means the first round (zeros)."""

    @abstractmethod
    def weights(self) -> list[float]:
        """Each update's weight in the aggregate, in the order they were added (after
        `result`): what the lineage records of each contribution (model_registry.proto,
        `Contribution.weight`)."""

    @classmethod
    def min_updates(cls, params: StrategyParams) -> int:
        """The fewest updates the rule can combine with these parameters (a round configured
        to close with fewer is refused when it is configured)."""
        return 1

    @classmethod
    def state_specs(cls, model: Sequence[Spec]) -> list[Spec]:
        """The tensors of this strategy's state for a model of `model`'s tensors."""
        return []


def model_dtype(specs: Sequence[Spec]) -> np.dtype[np.floating]:
    """The dtype results are answered in: the updates' (they all share update 0's)."""
    return specs[0].dtype


def prefixed_specs(prefixes: Sequence[str], model: Sequence[Spec]) -> list[Spec]:
    """State tensors: for each prefix, one float64 tensor per model tensor, `<prefix>.<name>`."""
    return [Spec(f"{p}.{s.name}", STATE_DTYPE, s.shape) for p in prefixes for s in model]


def cast_checked(values: Mapping[str, Array], specs: Sequence[Spec], field: str) -> Tensors:
    """float64 results as the updates' dtype; INVALID_ARGUMENT if one is not finite there."""
    out: Tensors = {}
    for spec in specs:
        with np.errstate(over="ignore", invalid="ignore"):
            arr = np.asarray(values[spec.name]).astype(spec.dtype, copy=False)
        if not all_finite(arr.reshape(-1)):
            raise InvalidArgument(f"{field}: tensor {spec.name} overflows {spec.dtype}")
        out[spec.name] = arr.reshape(spec.shape)
    return out
