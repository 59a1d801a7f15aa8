"""Bounds on what one participant's update may do to the global model, checked by the
coordinator before an update is counted (docs/security.md, "Poisoning bounds"; and
docs/reliability.md for the value bound):

- `num_samples` (its weight in FedAvg) is capped per participant (`NumSamplesCap`): by
  default at the size of that proplet's dataset in the data store; above it the update is
  refused (INVALID_ARGUMENT naming num_samples), never silently re-weighted, so the weight an
  update had is always the one its proplet signed.
- every value is bounded in magnitude (`UpdateBounds.max_abs_value`): values that could
  overflow the aggregation are refused naming the tensor, instead of failing the whole round;
- the update's distance from the base model (the L2 norm of the difference over all its
  tensors, in float64) is bounded (`max_distance`): beyond it the update is refused, or, with
  `clip`, its difference is scaled down to the bound before aggregation (`scaled`).

Plain numpy, no I/O: the CLI's `models verify` recomputes a clipped update with `scaled`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from server.errors import InvalidArgument
from server.tensors import Array, Tensors

# The largest bound on values that can be configured. FedAvg sums n_i * x_i in float64: with
# |x_i| <= 1e100 and every n_i an int64 (< 9.3e18), even a billion updates sum to < 1e129,
# far from float64's 1.8e308, and the mean stays within the bound; so under any bound this
# size the aggregation cannot overflow.
MAX_VALUE_BOUND = 1e100
DEFAULT_MAX_ABS_VALUE = 1e30
DEFAULT_MAX_DISTANCE = 1e4
# Elements per block when measuring a distance (two float64 blocks of 512 KiB).
_BLOCK = 1 << 16


@dataclass(frozen=True)
class UpdateBounds:
    """`max_abs_value`: the largest |value| an update may hold. `max_distance`: the largest
    L2 distance from the base model (0: not bounded); `clip`: scale a farther update down to
    it instead of refusing it."""

    max_abs_value: float = DEFAULT_MAX_ABS_VALUE
    max_distance: float = DEFAULT_MAX_DISTANCE
    clip: bool = False

    def __post_init__(self) -> None:
        if not (0 < self.max_abs_value <= MAX_VALUE_BOUND):
            raise ValueError(
                f"max_update_value: {self.max_abs_value} must be > 0 and <= {MAX_VALUE_BOUND:g} "
                "(larger values could overflow the aggregation)"
            )
        if not (math.isfinite(self.max_distance) and self.max_distance >= 0):
            raise ValueError(
                f"max_update_distance: {self.max_distance} must be >= 0 (0 = not bounded)"
            )
        if self.clip and not self.max_distance:
            raise ValueError("update_distance_action: clip needs max_update_distance > 0")

    @property
    def needs_base(self) -> bool:
        """Whether the checks need the base model's values."""
        return self.max_distance > 0


def check_magnitude(tensors: Mapping[str, Array], bound: float, field: str) -> None:
    """Every value of every tensor within [-bound, bound]; INVALID_ARGUMENT naming the tensor
    otherwise. (Run after the finite check.)"""
    for name, arr in tensors.items():
        if not arr.size:
            continue
        # Two passes without a temporary array (np.abs would make one the update's size).
        largest = max(float(np.max(arr)), -float(np.min(arr)))
        if largest > bound:
            raise InvalidArgument(
                f"{field}.{name}: holds a value of magnitude {largest:.6g}, beyond the "
                f"coordinator's bound {bound:g} (max_update_value: values this large could "
                "overflow the aggregation); update not counted"
            )


def distance(update: Mapping[str, Array], base: Mapping[str, Array]) -> float:
    """The L2 norm of `update - base` over all tensors, computed in float64 (the same names
    and shapes in both: the update has been checked against the base model)."""
    total = 0.0
    # Block by block through two float64 buffers: no temporary the update's size, and no
    # mixed-dtype ufunc (numpy's casting loop for those is ten times slower).
    block = min(_BLOCK, max((a.size for a in update.values()), default=1)) or 1
    x = np.empty(block, np.float64)
    y = np.empty(block, np.float64)
    for name, arr in update.items():
        a = arr.reshape(-1)
        b = np.asarray(base[name]).reshape(-1)
        for start in range(0, a.size, block):
            n = min(block, a.size - start)
            dx, dy = x[:n], y[:n]
            dx[...] = a[start : start + n]
            dy[...] = b[start : start + n]
            np.subtract(dx, dy, out=dx)
            # einsum, not dot: BLAS threads cost more than they bring at this size.
            total += float(np.einsum("i,i->", dx, dx))
    return math.sqrt(total)


def clip_scale(dist: float, bound: float) -> float:
    """The factor that brings a difference of norm `dist` down to `bound` (1: within it)."""
    if bound <= 0 or dist <= bound:
        return 1.0
    return bound / dist


def scaled(update: Mapping[str, Array], base: Mapping[str, Array], scale: float) -> Tensors:
    """`base + (update - base) * scale` per tensor, computed in float64 and cast back to the
    update's dtype: what a clipped update is aggregated as (and what `models verify`
    recomputes, bit for bit)."""
    out: Tensors = {}
    for name, arr in update.items():
        b = np.asarray(base[name], dtype=np.float64)
        diff = np.subtract(arr, b, dtype=np.float64)
        out[name] = (b + diff * scale).astype(arr.dtype)
    return out


@dataclass(frozen=True)
class NumSamplesCap:
    """The policy capping each participant's `num_samples`: "dataset" (the size of its
    dataset in the data store), a fixed number for everyone, or "none"."""

    source: str = "dataset"
    value: int = 0

    @classmethod
    def parse(cls, text: str, key: str = "num_samples_cap") -> NumSamplesCap:
        word = text.strip().lower()
        if word in ("dataset", "none"):
            return cls(word)
        try:
            value = int(word)
        except ValueError:
            value = 0
        if value <= 0:
            raise ValueError(f"{key}: {text!r} must be 'dataset', 'none' or a positive integer")
        return cls("fixed", value)

    def __str__(self) -> str:
        return str(self.value) if self.source == "fixed" else self.source


class DatasetSizes(Protocol):
    """What the cap "dataset" asks the data store."""

    async def size(self, proplet_id: str) -> int:
        """The number of samples in the proplet's dataset; NotFound if it has none."""
        ...
