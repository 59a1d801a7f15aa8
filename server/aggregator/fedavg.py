"""Federated averaging: sum_i(n_i * x_i) / sum_i(n_i) for every tensor, folded in one update
at a time so memory stays O(model size) however many updates there are.

Every update is validated before it touches the running sums; a rejected update leaves the
aggregate exactly as it was. Errors name the update's index and the field.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from server.errors import InvalidArgument
from server.tensors import Array, Spec, Tensors, specs_of

# Elements per block when folding a tensor in: keeps the scratch buffer small and in cache.
_BLOCK = 1 << 16

Float64Array = npt.NDArray[np.float64]


def check_num_samples(index: int, num_samples: int) -> None:
    if isinstance(num_samples, bool) or not isinstance(num_samples, int | np.integer):
        raise InvalidArgument(
            f"updates[{index}].num_samples: must be an integer, got {type(num_samples).__name__}"
        )
    if num_samples <= 0:
        raise InvalidArgument(f"updates[{index}].num_samples: must be > 0, got {num_samples}")


def check_specs(index: int, specs: Sequence[Spec], reference: Sequence[Spec] | None) -> None:
    """`specs` of update `index` must be non-empty floats and match `reference` (update 0's)."""
    if not specs:
        raise InvalidArgument(f"updates[{index}].tensors: must list at least one tensor")
    for spec in specs:
        if spec.dtype.kind != "f":
            raise InvalidArgument(
                f"updates[{index}].tensors.{spec.name}.dtype: must be a float type, "
                f"got {spec.dtype}"
            )
    if reference is None:
        return
    names = [s.name for s in specs]
    ref_names = [s.name for s in reference]
    if names != ref_names:
        raise InvalidArgument(
            f"updates[{index}].tensors: names {names} differ from updates[0]'s {ref_names}"
        )
    for spec, ref in zip(specs, reference, strict=True):
        if spec.shape != ref.shape:
            raise InvalidArgument(
                f"updates[{index}].tensors.{spec.name}.shape: {list(spec.shape)}, "
                f"updates[0] has {list(ref.shape)}"
            )
        if spec.dtype != ref.dtype:
            raise InvalidArgument(
                f"updates[{index}].tensors.{spec.name}.dtype: {spec.dtype}, "
                f"updates[0] has {ref.dtype}"
            )


def _check_finite(index: int, tensors: Mapping[str, Array]) -> None:
    for name, arr in tensors.items():
        if not np.isfinite(arr).all():
            raise InvalidArgument(f"updates[{index}].tensors.{name}: contains NaN or Inf")


def _fold(total: Float64Array, arr: Array, weight: float, scratch: Float64Array) -> None:
    """total += arr * weight, in float64, block by block without full-size temporaries."""
    flat_total = total.reshape(-1)
    flat = np.ascontiguousarray(arr).reshape(-1)
    for start in range(0, flat.size, _BLOCK):
        stop = min(start + _BLOCK, flat.size)
        part = scratch[: stop - start]
        np.multiply(flat[start:stop], weight, out=part, dtype=np.float64)
        np.add(flat_total[start:stop], part, out=flat_total[start:stop])


class FedAvg:
    """Incremental weighted mean of updates, weighted by their sample counts."""

    def __init__(self) -> None:
        self._specs: list[Spec] | None = None
        self._sums: dict[str, Float64Array] = {}
        self._scratch: Float64Array = np.empty(0, dtype=np.float64)
        self._total_samples = 0
        self._count = 0

    @property
    def count(self) -> int:
        """Updates folded in so far."""
        return self._count

    @property
    def total_samples(self) -> int:
        return self._total_samples

    @property
    def specs(self) -> list[Spec] | None:
        """The tensors every update must have (those of the first update), once known."""
        return None if self._specs is None else list(self._specs)

    def add(self, tensors: Mapping[str, Array], num_samples: int) -> None:
        """Fold one update in; InvalidArgument (and no change) if it is not acceptable."""
        index = self._count
        check_num_samples(index, num_samples)
        specs = specs_of(tensors)
        check_specs(index, specs, self._specs)
        _check_finite(index, tensors)
        if self._specs is None:
            self._specs = specs
            self._sums = {s.name: np.zeros(s.shape, dtype=np.float64) for s in specs}
            largest = max(math.prod(s.shape) for s in specs)
            self._scratch = np.empty(min(largest, _BLOCK), dtype=np.float64)
        weight = float(num_samples)
        # Overflow to Inf is caught when the result is taken, not warned about here.
        with np.errstate(over="ignore", invalid="ignore"):
            for name, arr in tensors.items():
                _fold(self._sums[name], arr, weight, self._scratch)
        self._total_samples += int(num_samples)
        self._count += 1

    def result(self, dtype: npt.DTypeLike | None = None) -> Tensors:
        """The weighted mean of everything added, cast to `dtype` (default: the updates')."""
        if self._specs is None:
            raise InvalidArgument("updates: no updates to aggregate")
        out: Tensors = {}
        for spec in self._specs:
            target = spec.dtype if dtype is None else np.dtype(dtype)
            with np.errstate(over="ignore", invalid="ignore"):
                mean = np.divide(self._sums[spec.name], float(self._total_samples))
                cast = mean.astype(target, copy=False)
            if not np.isfinite(cast).all():
                raise InvalidArgument(
                    f"updates: the weighted mean of tensor {spec.name} overflows {target}"
                )
            out[spec.name] = cast
        return out


def aggregate_fedavg(updates: Sequence[tuple[Mapping[str, Array], int]]) -> Tensors:
    """FedAvg of (tensors, num_samples) pairs, in the updates' dtype."""
    fedavg = FedAvg()
    for tensors, num_samples in updates:
        fedavg.add(tensors, num_samples)
    return fedavg.result()
