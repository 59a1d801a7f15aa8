"""The real datasets that ship with the product: read from a package's wheel, never downloaded.

`digits`: scikit-learn's handwritten digits (1,797 8x8 grey images, 10 classes; the file
`sklearn/datasets/data/digits.csv.gz` inside scikit-learn's wheel, read with
`sklearn.datasets.load_digits`). Pixels are 0..16; features are pixel / 16, so in [0, 1].
One fixed global train/test split: stratified (each class's share of the test split as close
to TEST_FRACTION as whole samples allow), seeded with SPLIT_SEED, so every process and machine
holds the same 1,438 training and 359 test samples. The train split is what
`propeller-fl datasets partition` spreads over the proplets; the test split is the held-out
set a trained global model is scored on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from server.errors import InvalidArgument
from server.tensors import Array

Indices = npt.NDArray[np.int64]

# The share of every class held out as the global test split.
TEST_FRACTION = 0.2
# The one seed of the global train/test split (not the partition's --seed: changing how the
# training data is spread must never move a sample between train and test).
SPLIT_SEED = 20_261_201


@dataclass(frozen=True)
class Split:
    """Features [n, d] float64 in [0, 1] and labels [n] float64 holding the class (0..k-1)."""

    features: Array
    labels: Array

    @property
    def size(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class Corpus:
    """A shipped dataset, split once into train and test."""

    name: str
    num_classes: int
    train: Split
    test: Split

    @property
    def num_features(self) -> int:
        return int(self.train.features.shape[1])


def stratified_split(labels: Array, test_fraction: float, seed: int) -> tuple[Indices, Indices]:
    """(train, test) indices, each ascending: of every class, round(count * test_fraction)
    samples (chosen by a generator seeded with `seed`) go to test, the rest to train."""
    rng = np.random.default_rng(seed)
    test: list[Indices] = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        n_test = round(len(members) * test_fraction)
        test.append(rng.permutation(members)[:n_test])
    test_idx = np.sort(np.concatenate(test)) if test else np.empty(0, dtype=np.int64)
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    return train_idx.astype(np.int64), test_idx.astype(np.int64)


def digits() -> Corpus:
    """scikit-learn's digits, scaled to [0, 1] and split (blocking: reads a gzip file)."""
    # Imported here: scikit-learn (and scipy under it) take a second to import, and only this
    # command needs them.
    from sklearn.datasets import load_digits

    bunch = load_digits()
    features = np.asarray(bunch.data, dtype=np.float64) / 16.0
    labels = np.asarray(bunch.target, dtype=np.float64)
    train, test = stratified_split(labels, TEST_FRACTION, SPLIT_SEED)
    return Corpus(
        name="digits",
        num_classes=len(bunch.target_names),
        train=Split(features[train], labels[train]),
        test=Split(features[test], labels[test]),
    )


CORPORA: dict[str, Callable[[], Corpus]] = {"digits": digits}


def load(name: str, field: str = "--dataset") -> Corpus:
    """The shipped dataset `name`; INVALID_ARGUMENT naming `field` for an unknown one."""
    make = CORPORA.get(name)
    if make is None:
        raise InvalidArgument(f"{field}: {name!r} is not one of {', '.join(sorted(CORPORA))}")
    return make()


def held_out_id(name: str) -> str:
    """The data store id the global test split of corpus `name` is stored under ("digits.test"):
    a reserved id, never a proplet's (the partition command refuses it as one)."""
    return f"{name}.test"
