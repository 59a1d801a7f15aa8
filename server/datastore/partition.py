"""Spreading a training split over proplets: IID, or non-IID by a Dirichlet over labels.

Both take the labels of the split and return one array of sample indices per proplet (each
ascending); every sample goes to exactly one proplet, and the same (labels, count, seed,
alpha) give the same parts on every machine (numpy's seeded PCG64 generator).

- IID (stratified): each class's samples, shuffled, are dealt out in turn (the deal goes on
  from class to class), so every part's size is within one of every other's and its count of
  each class within one of that class's count / `count`: each part's label histogram is the
  split's, as closely as whole samples allow.
- Dirichlet(alpha) (Hsu et al. 2019, "Measuring the effects of non-identical data
  distribution"; NIID-Bench's label-skew partition): for each class, the shares of its samples
  the proplets get are drawn from Dirichlet(alpha, ..., alpha), and the class's (shuffled)
  samples are cut in those shares. Small alpha (0.1) gives most proplets few classes; large
  alpha (100) approaches IID. A draw that leaves any proplet with fewer than `min_samples`
  is drawn again (from the same generator, so still reproducible), up to MAX_DRAWS times.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from server.datastore.catalog import Corpus, Indices, Split, held_out_id
from server.datastore.datasets import CLASSES_SCHEMA, Dataset
from server.errors import FailedPrecondition, InvalidArgument
from server.ids import MAX_PARTICIPANTS, check_ids

# The fewest samples a proplet's part may hold by default: enough for the data store's
# per-proplet held-out split (a fifth of the part; empty under five samples) to hold two.
DEFAULT_MIN_SAMPLES = 10
# Dirichlet draws tried before giving up on the minimum (each draw costs microseconds).
MAX_DRAWS = 1000


def _check(num_samples: int, count: int, min_samples: int, seed: int) -> None:
    if seed < 0:
        raise InvalidArgument(f"--seed: must be >= 0, got {seed}")
    if count < 1:
        raise InvalidArgument(f"--proplets: must be >= 1, got {count}")
    if min_samples < 1:
        raise InvalidArgument(f"--min-samples: must be >= 1, got {min_samples}")
    if count * min_samples > num_samples:
        raise InvalidArgument(
            f"--proplets: {count} proplets x --min-samples {min_samples} need "
            f"{count * min_samples} samples, the train split has {num_samples}"
        )


def iid_parts(
    labels: npt.NDArray[np.floating], count: int, seed: int, min_samples: int = 1
) -> list[Indices]:
    """`count` stratified parts (see the module docstring)."""
    n = int(labels.shape[0])
    _check(n, count, min_samples, seed)
    rng = np.random.default_rng(seed)
    order = np.concatenate(
        [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    )
    return [np.sort(order[i::count]).astype(np.int64) for i in range(count)]


def dirichlet_parts(
    labels: npt.NDArray[np.floating],
    count: int,
    alpha: float,
    seed: int,
    min_samples: int = DEFAULT_MIN_SAMPLES,
) -> list[Indices]:
    """`count` label-skewed parts (see the module docstring); FAILED_PRECONDITION when
    MAX_DRAWS draws all leave some proplet under `min_samples`."""
    if not (math.isfinite(alpha) and alpha > 0):
        raise InvalidArgument(f"--dirichlet: alpha must be a number > 0, got {alpha}")
    n = int(labels.shape[0])
    _check(n, count, min_samples, seed)
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    smallest = 0
    for _ in range(MAX_DRAWS):
        pieces: list[list[Indices]] = [[] for _ in range(count)]
        for idx in members:
            shares = rng.dirichlet(np.full(count, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(np.int64)
            for piece, chunk in zip(pieces, np.split(rng.permutation(idx), cuts), strict=True):
                piece.append(chunk)
        parts = [np.sort(np.concatenate(p)).astype(np.int64) for p in pieces]
        smallest = min(len(p) for p in parts)
        if smallest >= min_samples:
            return parts
    raise FailedPrecondition(
        f"--dirichlet: {MAX_DRAWS} draws with alpha {alpha:g} over {count} proplets all left a "
        f"proplet under --min-samples {min_samples} (the last: {smallest}); use a larger "
        "alpha, fewer proplets or a smaller --min-samples"
    )


def label_histogram(labels: npt.NDArray[np.floating], num_classes: int) -> npt.NDArray[np.int64]:
    """How many samples of each class 0..num_classes-1 `labels` hold."""
    return np.bincount(labels.astype(np.int64), minlength=num_classes).astype(np.int64)


def dataset_of(dataset_id: str, corpus: Corpus, split: Split) -> Dataset:
    """`split` (or a part of it) as a k-class dataset stored under `dataset_id`."""
    return Dataset(
        dataset_id, split.features, split.labels, CLASSES_SCHEMA, num_classes=corpus.num_classes
    )


def partition(
    corpus: Corpus,
    proplet_ids: Sequence[str],
    *,
    alpha: float | None,
    seed: int,
    min_samples: int = DEFAULT_MIN_SAMPLES,
) -> list[Dataset]:
    """One dataset per proplet from `corpus`'s train split, in `proplet_ids`' order: IID when
    `alpha` is None, Dirichlet(alpha) otherwise. The ids are checked (unique, each an id, none
    the reserved id of the corpus's test split)."""
    check_ids(proplet_ids, "--ids", MAX_PARTICIPANTS)
    seen: set[str] = set()
    for i, pid in enumerate(proplet_ids):
        if pid in seen:
            raise InvalidArgument(f"--ids[{i}]: {pid!r} is given twice")
        if pid == held_out_id(corpus.name):
            raise InvalidArgument(
                f"--ids[{i}]: {pid!r} is reserved for the {corpus.name} test split"
            )
        seen.add(pid)
    labels = corpus.train.labels
    if alpha is None:
        parts = iid_parts(labels, len(proplet_ids), seed, min_samples)
    else:
        parts = dirichlet_parts(labels, len(proplet_ids), alpha, seed, min_samples)
    return [
        dataset_of(pid, corpus, Split(corpus.train.features[idx], labels[idx]))
        for pid, idx in zip(proplet_ids, parts, strict=True)
    ]
