"""Federated averaging: sum_i(n_i * x_i) / sum_i(n_i) for every tensor, accumulated in float64
in arrival order, with memory that stays O(model size) however many updates there are.

Every update is validated when it is added; a rejected update leaves the aggregate exactly as
it was. Errors name the update's index and the field.

How it is fast (see docs/benchmarks.md): accepted updates are held (by reference, not copied)
until a bounded batch of them is reached (`_PENDING_BYTES`, `_PENDING_UPDATES`), then folded
block by block: each float64 block of the running sums is loaded into cache once and every
held update's slice is multiplied and added into it in arrival order. The arithmetic per
element is exactly the sequential `sum += float64(x_i) * n_i`, so results are bit-for-bit the
same as folding one update at a time; only the memory traffic of the sums is shared.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from server.errors import InvalidArgument
from server.tensors import Array, Spec, Tensors, specs_of

# float64 elements per block when folding: the sums' block and the scratch product (2 x 256 KiB)
# stay in a core's L2 cache while every held update is added into them.
_BLOCK = 1 << 15
# Updates held before they are folded in (see `_holding`): at most this many, and at most
# this many bytes (an update bigger than that is folded on its own).
_PENDING_UPDATES = 64
_PENDING_BYTES = 64 << 20
# Sums this small stay in cache anyway: an update is folded as soon as it is added, while its
# own bytes are still in cache too.
_CACHED_SUMS_BYTES = 1 << 18
# Held updates whose elements number at most this in all are folded with a few numpy calls
# (their float64 rows, 1 MiB at most, stay in cache).
_STACK_ELEMENTS = 1 << 17
# Arrays up to this size are checked for NaN/Inf element-wise; bigger ones with a dot product.
_SMALL_CHECK = 1 << 16

Float64Array = npt.NDArray[np.float64]
_Signature = tuple[tuple[str, tuple[int, ...], np.dtype[np.floating]], ...]


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


def all_finite(flat: Array) -> bool:
    """No NaN or Inf in a 1-d float array. A big array is checked with one BLAS dot product,
    which reads it once and writes nothing: x.x is finite exactly when every element is,
    unless it overflows, and only then are the elements checked one by one."""
    if flat.size > _SMALL_CHECK:
        with np.errstate(over="ignore", invalid="ignore"):
            if math.isfinite(float(np.dot(flat, flat))):
                return True
    return int(np.count_nonzero(np.isfinite(flat))) == flat.size


def finite_flats(index: int, tensors: Mapping[str, Array]) -> dict[str, Array]:
    """Update `index`'s tensors, each as its elements in C order, 1-d: a view (a copy only if
    it is not C-contiguous); INVALID_ARGUMENT naming the first that holds NaN or Inf."""
    flats: dict[str, Array] = {}
    for name, arr in tensors.items():
        flat = arr.reshape(-1)
        if not all_finite(flat):
            raise InvalidArgument(f"updates[{index}].tensors.{name}: contains NaN or Inf")
        flats[name] = flat
    return flats


def _holding(elements: int, nbytes: int) -> int:
    """How many updates of `elements` parameters (`nbytes` bytes) to hold before folding."""
    if elements * _PENDING_UPDATES <= _STACK_ELEMENTS:
        return _PENDING_UPDATES  # tiny: folded together, a few numpy calls for all
    if elements * 8 <= _CACHED_SUMS_BYTES:
        return 1  # the sums stay in cache: nothing to share
    return max(1, min(_PENDING_UPDATES, _PENDING_BYTES // max(1, nbytes)))


def _fold_stacked(total: Float64Array, parts: Sequence[tuple[Array, float]]) -> None:
    """Small updates: all of them weighted in one numpy call, then added row by row in
    arrival order (one `+=` per update, so exactly the sequential sums; not a reduction over
    the rows, whose order of additions numpy does not promise)."""
    weights = np.array([w for _, w in parts], dtype=np.float64)[:, None]
    rows = np.multiply(np.stack([x for x, _ in parts]), weights, dtype=np.float64)
    for row in rows:
        np.add(total, row, out=total)


def _fold_blocks(
    total: Float64Array, parts: Sequence[tuple[Array, float]], scratch: Float64Array
) -> None:
    """Large updates: block by block, so the sums' block stays in cache while every update's
    slice is added into it."""
    size = total.size
    for start in range(0, size, _BLOCK):
        stop = min(start + _BLOCK, size)
        acc = total[start:stop]
        part = scratch[: stop - start]
        for x, weight in parts:
            np.multiply(x[start:stop], weight, out=part, dtype=np.float64)
            np.add(acc, part, out=acc)


class Intake:
    """What an aggregation has taken in so far, as every aggregation answers it: the tensors
    every update must have (those of the first update, once known) and the sum of the
    updates' sample counts."""

    _specs: list[Spec] | None = None
    _total_samples: int = 0

    @property
    def total_samples(self) -> int:
        return self._total_samples

    @property
    def specs(self) -> list[Spec] | None:
        return None if self._specs is None else list(self._specs)


class FedAvg(Intake):
    """Incremental weighted mean of updates, weighted by their sample counts.

    `add` keeps a reference to the update's arrays until they are folded in (at the latest in
    `result`): the caller must not change them afterwards."""

    def __init__(self) -> None:
        self._specs: list[Spec] | None = None
        self._signature: _Signature | None = None
        self._sums: dict[str, Float64Array] = {}
        self._scratch: Float64Array = np.empty(0, dtype=np.float64)
        self._pending: list[tuple[dict[str, Array], float]] = []
        self._pending_bytes = 0
        self._hold = 1
        self._total_samples = 0
        self._count = 0

    @property
    def count(self) -> int:
        """Updates added so far."""
        return self._count

    def add(self, tensors: Mapping[str, Array], num_samples: int) -> None:
        """Take one update in; InvalidArgument (and no change) if it is not acceptable."""
        index = self._count
        if type(num_samples) is not int or num_samples <= 0:
            check_num_samples(index, num_samples)
        signature = tuple((name, arr.shape, arr.dtype) for name, arr in tensors.items())
        if signature != self._signature:
            # The first update, or one that differs: the full checks say what is wrong.
            specs = specs_of(tensors)
            check_specs(index, specs, self._specs)
        flats = finite_flats(index, tensors)
        nbytes = sum(flat.nbytes for flat in flats.values())
        if self._specs is None:
            self._specs = specs
            self._signature = signature
            self._sums = {s.name: np.zeros(math.prod(s.shape), dtype=np.float64) for s in specs}
            largest = max(math.prod(s.shape) for s in specs)
            self._scratch = np.empty(max(1, min(largest, _BLOCK)), dtype=np.float64)
            self._hold = _holding(sum(math.prod(s.shape) for s in specs), nbytes)
        self._pending.append((flats, float(num_samples)))
        self._pending_bytes += nbytes
        self._total_samples += int(num_samples)
        self._count += 1
        if len(self._pending) >= self._hold:
            self._fold()

    def _fold(self) -> None:
        """sums += float64(x) * n for every held update, in arrival order."""
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        if not pending:
            return
        # Overflow to Inf is caught when the result is taken, not warned about here.
        with np.errstate(over="ignore", invalid="ignore"):
            for name, total in self._sums.items():
                if len(pending) > 1 and total.size * len(pending) <= _STACK_ELEMENTS:
                    _fold_stacked(total, [(f[name], w) for f, w in pending])
                else:
                    _fold_blocks(total, [(f[name], w) for f, w in pending], self._scratch)

    def result(self, dtype: npt.DTypeLike | None = None) -> Tensors:
        """The weighted mean of everything added, cast to `dtype` (default: the updates')."""
        if self._specs is None:
            raise InvalidArgument("updates: no updates to aggregate")
        self._fold()
        out: Tensors = {}
        for spec in self._specs:
            target = spec.dtype if dtype is None else np.dtype(dtype)
            mean = np.empty(spec.shape, dtype=target)
            with np.errstate(over="ignore", invalid="ignore"):
                # Divided in float64, then cast: the same as (sums / total).astype(target).
                np.divide(
                    self._sums[spec.name],
                    float(self._total_samples),
                    out=mean.reshape(-1),
                    casting="same_kind",
                )
            if not all_finite(mean.reshape(-1)):
                raise InvalidArgument(
                    f"updates: the weighted mean of tensor {spec.name} overflows {target}"
                )
            out[spec.name] = mean
        return out


def aggregate_fedavg(updates: Sequence[tuple[Mapping[str, Array], int]]) -> Tensors:
    """FedAvg of (tensors, num_samples) pairs, in the updates' dtype."""
    fedavg = FedAvg()
    for tensors, num_samples in updates:
        fedavg.add(tensors, num_samples)
    return fedavg.result()
