"""FedAvg holds small batches of updates and folds them together for speed; the result must be
exactly (bit for bit) the sequential float64 fold the tests' reference computes, whatever the
batch boundaries, and a rejected update must still change nothing."""

from __future__ import annotations

import numpy as np
import pytest

from server.aggregator import fedavg as F
from server.errors import InvalidArgument
from server.tensors import Tensors


def sequential(updates: list[tuple[Tensors, int]]) -> Tensors:
    total = sum(n for _, n in updates)
    out: Tensors = {}
    for name, first in updates[0][0].items():
        acc = np.zeros(first.shape, dtype=np.float64)
        for tensors, n in updates:
            acc += tensors[name].astype(np.float64) * n
        out[name] = (acc / total).astype(first.dtype)
    return out


def updates_of(k: int, d: int, dtype: str, seed: int) -> list[tuple[Tensors, int]]:
    rng = np.random.default_rng(seed)
    out: list[tuple[Tensors, int]] = []
    for _ in range(k):
        # A wide range of magnitudes, so any change in the order of additions would show.
        w = rng.standard_normal(d) * np.exp(rng.uniform(-20, 20, d))
        b = np.asarray(rng.standard_normal() * 1e3)
        out.append(({"w": w.astype(dtype), "b": b.astype(dtype)}, int(rng.integers(1, 10**6))))
    return out


# d = 100 and 2048: folded 64 at a time in three numpy calls; 5000: one at a time, the sums in
# cache; 40000: held in batches and folded block by block.
@pytest.mark.parametrize("d", [1, 100, 2048, 5000, 40_000])
@pytest.mark.parametrize("k", [1, 3, 65, 130])
@pytest.mark.parametrize("dtype", ["<f4", "<f8"])
def test_batched_folds_equal_the_sequential_fold(d: int, k: int, dtype: str) -> None:
    updates = updates_of(k, d, dtype, seed=d * 1000 + k)
    got = F.aggregate_fedavg(updates)
    want = sequential(updates)
    for name in want:
        assert got[name].dtype == want[name].dtype
        np.testing.assert_array_equal(got[name], want[name])


def test_a_rejected_update_between_held_ones_changes_nothing() -> None:
    updates = updates_of(10, 100, "<f4", seed=5)
    fedavg = F.FedAvg()
    for tensors, n in updates[:5]:
        fedavg.add(tensors, n)
    bad = {"w": updates[0][0]["w"].copy(), "b": updates[0][0]["b"]}
    bad["w"][-1] = np.inf
    with pytest.raises(InvalidArgument, match=r"updates\[5\]\.tensors\.w: contains NaN or Inf"):
        fedavg.add(bad, 3)
    huge = {"w": np.full(100_000, 3e38, np.float32), "b": np.asarray(1.0, np.float32)}
    with pytest.raises(InvalidArgument, match=r"updates\[5\]\.tensors\.w"):
        fedavg.add(huge, 1)  # wrong shape: rejected before its values are looked at
    for tensors, n in updates[5:]:
        fedavg.add(tensors, n)
    assert fedavg.count == 10
    got = fedavg.result()
    for name, want in sequential(updates).items():
        np.testing.assert_array_equal(got[name], want)


def test_finite_check_of_big_arrays_with_huge_but_finite_values() -> None:
    # x.x overflows float32 here; the element-wise check must still accept the update.
    w = np.full(200_000, 3e38, np.float32)
    fedavg = F.FedAvg()
    fedavg.add({"w": w}, 1)
    assert F.all_finite(w)
    w_bad = w.copy()
    w_bad[123_456] = np.nan
    assert not F.all_finite(w_bad)
    np.testing.assert_array_equal(fedavg.result()["w"], w)
