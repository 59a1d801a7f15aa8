"""Order-statistic rules: they need every update of the round at once, so they hold them
(as received: the arrays the intake decoded, no float64 copy) until `result`. What they may
hold is bounded by the aggregator (`max_held_bytes`, refused from the update's header beyond
it; docs/strategies.md). The rules are unweighted, as in their papers: a Byzantine client can
claim any num_samples, so the sample counts must not steer a robust rule.

- FedMedian (Yin et al. 2018): the coordinate-wise median.
- FedTrimmedAvg (Yin et al. 2018): per coordinate, drop the floor(beta K) smallest and largest
  values and average the rest.
- Krum (Blanchard et al. 2017): the update whose summed squared distance to its K - f - 2
  nearest others is smallest; MultiKrum: the mean of the m best-scored.
- Bulyan (El Mhamdi et al. 2018): theta = K - 2f updates chosen by Krum one at a time (each
  removed from the pool before the next), then per coordinate the mean of the theta - 2f
  values closest to the chosen ones' median.

Coordinate-wise work runs in blocks of coordinates so the float64 scratch is K x block.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from server.aggregator.fedavg import Intake, check_num_samples, check_specs, finite_flats
from server.aggregator.strategies.base import (
    NON_NEGATIVE,
    Bound,
    Strategy,
    StrategyParams,
    bounded,
    cast_checked,
)
from server.errors import FailedPrecondition, InvalidArgument
from server.tensors import Array, Spec, Tensors, specs_of

F64 = np.ndarray[tuple[int, ...], np.dtype[np.float64]]
# float64 scratch per coordinate block: K rows of the block (bounds the work memory).
_SCRATCH_BYTES = 32 << 20


def _block(k: int) -> int:
    return max(256, _SCRATCH_BYTES // (8 * max(1, k)))


class _HeldStrategy(Intake, Strategy):
    incremental = False

    def __init__(self, params: StrategyParams) -> None:
        super().__init__(params)
        self._specs: list[Spec] | None = None
        self._updates: list[dict[str, Array]] = []
        self._total_samples = 0
        # The updates the rule combined, by position (all of them unless it selects).
        self._chosen: list[int] | None = None

    @property
    def count(self) -> int:
        return len(self._updates)

    def add(self, tensors: Mapping[str, Array], num_samples: int) -> None:
        index = len(self._updates)
        check_num_samples(index, num_samples)
        specs = specs_of(tensors)
        check_specs(index, specs, self._specs)
        flats = finite_flats(index, tensors)
        if self._specs is None:
            self._specs = specs
        self._updates.append(flats)
        self._total_samples += int(num_samples)

    def _checked_specs(self) -> list[Spec]:
        if self._specs is None:
            raise InvalidArgument("updates: no updates to aggregate")
        return self._specs

    def result(self, base: Tensors | None, state: Tensors | None) -> tuple[Tensors, Tensors | None]:
        specs = self._checked_specs()
        rows, reduce = self.rule()
        self._chosen = list(rows)
        return cast_checked(self._coordinatewise(rows, reduce, specs), specs, "updates"), None

    def rule(self) -> tuple[Sequence[int], Callable[[F64], F64]]:
        """The updates the rule combines (by position) and how, per coordinate: a (rows,
        block) float64 array to its (block,) values."""
        raise NotImplementedError

    def weights(self) -> list[float]:
        """Unweighted: 1/m for each of the m updates the rule combined (every update for the
        coordinate-wise rules), 0 for one a selecting rule left out."""
        chosen = range(self.count) if self._chosen is None else self._chosen
        share = 1.0 / max(1, len(chosen))
        kept = set(chosen)
        return [share if i in kept else 0.0 for i in range(self.count)]

    def _coordinatewise(
        self, rows_of: Sequence[int], reduce: Callable[[F64], F64], specs: Sequence[Spec]
    ) -> dict[str, F64]:
        """reduce((len(rows_of), block) float64) -> (block,) over every coordinate block."""
        block = _block(len(rows_of))
        out: dict[str, F64] = {}
        for spec in specs:
            size = math.prod(spec.shape)
            values = np.empty(size, np.float64)
            for start in range(0, size, block):
                stop = min(size, start + block)
                rows = np.stack([self._updates[i][spec.name][start:stop] for i in rows_of]).astype(
                    np.float64, copy=False
                )
                values[start:stop] = reduce(rows)
            out[spec.name] = values.reshape(spec.shape)
        return out

    def _distances(self) -> F64:
        """Squared Euclidean distances between every two updates, over all tensors, summed
        in float64 as sum((x_i - x_j)^2) (not via the Gram matrix, which cancels)."""
        specs = self._checked_specs()
        k = len(self._updates)
        block = _block(k)
        dist = np.zeros((k, k), np.float64)
        for spec in specs:
            size = math.prod(spec.shape)
            for start in range(0, size, block):
                stop = min(size, start + block)
                rows = np.stack([u[spec.name][start:stop] for u in self._updates]).astype(
                    np.float64, copy=False
                )
                for i in range(k - 1):  # each pair once: the matrix is symmetric
                    diff = rows[i + 1 :] - rows[i]
                    d = np.einsum("ij,ij->i", diff, diff)
                    dist[i, i + 1 :] += d
                    dist[i + 1 :, i] += d
        return dist


def krum_scores(dist: F64, candidates: Sequence[int], num_malicious: int) -> list[float]:
    """Krum's score of each candidate among `candidates`: the sum of its squared distances to
    its max(1, n - f - 2) nearest other candidates (n = len(candidates))."""
    n = len(candidates)
    nearest = min(max(1, n - num_malicious - 2), n - 1)
    among = dist[np.ix_(candidates, candidates)]
    np.fill_diagonal(among, np.inf)  # a candidate is not its own neighbour
    return [float(x) for x in np.sort(among, axis=1)[:, :nearest].sum(axis=1)]


def _median(rows: F64) -> F64:
    out: F64 = np.median(rows, axis=0)
    return out


def _mean(rows: F64) -> F64:
    out: F64 = rows.mean(axis=0)
    return out


def _ranked(scores: Sequence[float]) -> list[int]:
    """Positions by ascending score, ties by position (a stable order: reproducible)."""
    return [int(i) for i in np.argsort(np.asarray(scores), kind="stable")]


class FedMedian(_HeldStrategy):
    """The coordinate-wise median (no parameters)."""

    name = "fedmedian"

    def rule(self) -> tuple[Sequence[int], Callable[[F64], F64]]:
        return range(self.count), _median


@dataclass(frozen=True)
class FedTrimmedAvgParams(StrategyParams):
    # The fraction cut from each end, per coordinate.
    beta: float = bounded(0.2, Bound("in [0, 0.5)", lambda v: 0.0 <= v < 0.5))


class FedTrimmedAvg(_HeldStrategy):
    name = "fedtrimmedavg"
    params: FedTrimmedAvgParams

    def rule(self) -> tuple[Sequence[int], Callable[[F64], F64]]:
        k = self.count
        cut = int(self.params.beta * k)

        def trimmed_mean(rows: F64) -> F64:
            ordered = np.sort(rows, axis=0)
            out: F64 = ordered[cut : k - cut].mean(axis=0)
            return out

        return range(k), trimmed_mean


@dataclass(frozen=True)
class KrumParams(StrategyParams):
    # f: how many of the round's updates may be Byzantine.
    num_malicious: int = bounded(0, NON_NEGATIVE)


@dataclass(frozen=True)
class MultiKrumParams(KrumParams):
    # m: how many best-scored updates are averaged; 0 means K - f.
    num_to_keep: int = bounded(0, NON_NEGATIVE)


class _KrumFamily(_HeldStrategy):
    """Rules that score updates by Krum and tolerate f Byzantine ones out of at least
    `factor` f + 3."""

    params: KrumParams
    factor: ClassVar[int]

    @classmethod
    def min_updates(cls, params: StrategyParams) -> int:
        assert isinstance(params, KrumParams)
        return cls.factor * params.num_malicious + 3

    def _counts(self) -> tuple[int, int]:
        """(K, f); FAILED_PRECONDITION if the round has too few updates for f."""
        k, f = self.count, self.params.num_malicious
        if k < self.factor * f + 3:
            raise FailedPrecondition(
                f"updates: {self.name} with num_malicious={f} needs at least "
                f"{self.factor * f + 3} updates ({self.factor}f + 3), got {k}"
            )
        return k, f


class Krum(_KrumFamily):
    name = "krum"
    factor = 2

    def rule(self) -> tuple[Sequence[int], Callable[[F64], F64]]:
        k, f = self._counts()
        candidates = list(range(k))
        order = _ranked(krum_scores(self._distances(), candidates, f))
        return [candidates[i] for i in order[: self._keep(k, f)]], _mean

    def _keep(self, k: int, f: int) -> int:
        return 1


class MultiKrum(Krum):
    name = "multikrum"
    params: MultiKrumParams

    @classmethod
    def min_updates(cls, params: StrategyParams) -> int:
        assert isinstance(params, MultiKrumParams)
        return max(super().min_updates(params), params.num_to_keep)

    def _keep(self, k: int, f: int) -> int:
        m = self.params.num_to_keep or k - f
        if m > k:
            raise FailedPrecondition(
                f"strategy_params_json.num_to_keep: {m}, more than the round's {k} updates"
            )
        return m


class Bulyan(_KrumFamily):
    name = "bulyan"
    factor = 4

    def rule(self) -> tuple[Sequence[int], Callable[[F64], F64]]:
        k, f = self._counts()
        dist = self._distances()
        pool = list(range(k))
        chosen: list[int] = []
        for _ in range(k - 2 * f):
            best = pool[_ranked(krum_scores(dist, pool, f))[0]]
            chosen.append(best)
            pool.remove(best)
        keep = len(chosen) - 2 * f

        def closest_to_median(rows: F64) -> F64:
            median = np.median(rows, axis=0)
            nearest = np.argsort(np.abs(rows - median), axis=0, kind="stable")[:keep]
            out: F64 = np.take_along_axis(rows, nearest, axis=0).mean(axis=0)
            return out

        return chosen, closest_to_median
