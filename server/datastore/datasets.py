"""Per-proplet datasets: what a valid one is, and the synthetic ones seeded at start-up.

Two schemas. `SCHEMA` ("fl-demo-dataset-v1", the seed's): labels exactly 0 or 1, what the
seed's linear trainer learns. `CLASSES_SCHEMA` ("fl-classes-dataset-v1"): k classes
(`num_classes`, 2..MAX_CLASSES), labels the integers 0..k-1. Labels stay float tensors in both
(exact integers; float64 holds every class index exactly): the tensor codec, the SQLite rows and
the proplet's DATASET_DATA carry both schemas alike, and a trainer reads the class as a number.
k is stored, not inferred from the labels: a non-IID part may miss some classes entirely, and
the model it trains still has k outputs. Any schema other than CLASSES_SCHEMA is held to the
binary rule, as before there were two.

Synthetic data: every proplet's labels come from one fixed "true" logistic model, so
federated training over all proplets learns that model; each proplet's features are shifted
by a mean of its own, so the proplets' data is not identically distributed (non-IID). The
generator is seeded from sha256 of the proplet id, so a proplet gets the same data in every
process and on every machine (Python's hash() is salted per process and must not be used).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

import numpy as np

from server.errors import FailedPrecondition, InvalidArgument
from server.tensors import Array

SCHEMA = "fl-demo-dataset-v1"
CLASSES_SCHEMA = "fl-classes-dataset-v1"
# The most classes a CLASSES_SCHEMA dataset may declare (a bound on what a client may claim).
MAX_CLASSES = 1000
DEFAULT_NUM_SAMPLES = 64
DEFAULT_NUM_FEATURES = 3
# Seed of the one logistic model all proplets' labels are drawn from.
_TRUE_MODEL_SEED = 0x5EED_F1
# Spread of the per-proplet feature mean shift (the non-IID part).
_SHIFT_SCALE = 1.0


@dataclass(frozen=True)
class Dataset:
    """One proplet's local dataset: features [n, d] and labels [n], in {0, 1} for the binary
    schema and in 0..num_classes-1 for CLASSES_SCHEMA (num_classes is 2 for the binary one)."""

    proplet_id: str
    features: Array
    labels: Array
    schema: str = SCHEMA
    num_classes: int = 2

    @property
    def size(self) -> int:
        return int(self.features.shape[0])

    @property
    def num_features(self) -> int:
        return int(self.features.shape[1])


def true_model(num_features: int) -> tuple[Array, float]:
    """The logistic model (w, b) every synthetic label is drawn from."""
    rng = np.random.default_rng(_TRUE_MODEL_SEED)
    b = float(rng.normal(0.0, 0.5))
    w = rng.normal(0.0, 2.0, size=num_features)
    return w, b


def _proplet_rng(proplet_id: str) -> np.random.Generator:
    digest = hashlib.sha256(proplet_id.encode("utf-8")).digest()
    return np.random.default_rng(int.from_bytes(digest, "big"))


def synthetic_dataset(
    proplet_id: str,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    num_features: int = DEFAULT_NUM_FEATURES,
) -> tuple[Array, Array]:
    """Deterministic features float64 [num_samples, num_features] and labels float64
    [num_samples] with values exactly 0.0 or 1.0, for one proplet."""
    if not proplet_id:
        raise InvalidArgument("proplet_id: must not be empty")
    if num_samples < 1:
        raise InvalidArgument(f"num_samples: must be >= 1, got {num_samples}")
    if num_features < 1:
        raise InvalidArgument(f"num_features: must be >= 1, got {num_features}")
    w, b = true_model(num_features)
    rng = _proplet_rng(proplet_id)
    shift = rng.normal(0.0, _SHIFT_SCALE, size=num_features)
    features = rng.normal(0.0, 1.0, size=(num_samples, num_features)) + shift
    # The same (w, b) for every proplet: only the feature distribution differs.
    logits = features @ w + b
    p = 1.0 / (1.0 + np.exp(-np.clip(logits, -30.0, 30.0)))
    labels = (rng.random(num_samples) < p).astype(np.float64)
    return features.astype(np.float64), labels


def seeded_dataset(proplet_id: str, num_samples: int, num_features: int) -> Dataset:
    features, labels = synthetic_dataset(proplet_id, num_samples, num_features)
    return Dataset(proplet_id, features, labels)


def validate_dataset(dataset: Dataset, field: str = "dataset") -> Dataset:
    """The dataset itself if valid; InvalidArgument naming the offending field otherwise."""
    if not dataset.proplet_id:
        raise InvalidArgument(f"{field}.proplet_id: must not be empty")
    features, labels = dataset.features, dataset.labels
    if not np.issubdtype(features.dtype, np.floating):
        raise InvalidArgument(f"{field}.features.dtype: must be a float type, got {features.dtype}")
    if not np.issubdtype(labels.dtype, np.floating):
        raise InvalidArgument(f"{field}.labels.dtype: must be a float type, got {labels.dtype}")
    if features.ndim != 2:
        raise InvalidArgument(
            f"{field}.features.shape: must be [size, num_features], got {list(features.shape)}"
        )
    n, d = features.shape
    if n < 1:
        raise InvalidArgument(f"{field}.features.shape: needs at least one sample, got {n}")
    if d < 1:
        raise InvalidArgument(f"{field}.features.shape: needs at least one feature, got {d}")
    if labels.shape != (n,):
        raise InvalidArgument(
            f"{field}.labels.shape: must be [{n}] (one label per sample), got {list(labels.shape)}"
        )
    if not np.isfinite(features).all():
        raise InvalidArgument(f"{field}.features: contains NaN or Inf")
    if dataset.schema == CLASSES_SCHEMA:
        k = dataset.num_classes
        if not 2 <= k <= MAX_CLASSES:
            raise InvalidArgument(
                f"{field}.num_classes: must be 2..{MAX_CLASSES} for schema {CLASSES_SCHEMA!r}, "
                f"got {k}"
            )
        # NaN fails every comparison, so it is caught here too.
        bad = ~((labels >= 0) & (labels < k) & (labels == np.floor(labels)))
        if bad.any():
            first = int(np.argmax(bad))
            raise InvalidArgument(
                f"{field}.labels: must be integers 0..{k - 1} (num_classes {k}), "
                f"labels[{first}] is {float(labels[first])!r}"
            )
        return dataset
    if dataset.num_classes != 2:
        raise InvalidArgument(
            f"{field}.num_classes: schema {dataset.schema!r} has 2 classes (labels 0 or 1), "
            f"got {dataset.num_classes}; k classes need schema {CLASSES_SCHEMA!r}"
        )
    bad = ~((labels == 0.0) | (labels == 1.0))
    if bad.any():
        first = int(np.argmax(bad))
        raise InvalidArgument(
            f"{field}.labels: must be exactly 0 or 1, labels[{first}] is {labels[first]!r}"
        )
    return dataset


# The dataset parts a GetDataset/GetDatasetInfo may ask for ("" = "all": the whole dataset).
SPLITS = ("", "all", "train", "test")
# The share of a dataset held out as its "test" part: floor(size / TEST_DENOMINATOR) samples,
# so 20%; a dataset of fewer than TEST_DENOMINATOR samples has no test part.
TEST_DENOMINATOR = 5


def check_split(split: str, field: str = "split") -> str:
    if split not in SPLITS:
        raise InvalidArgument(f"{field}: {split!r} is not one of '', 'all', 'train', 'test'")
    return split


def split_indices(proplet_id: str, size: int) -> tuple[Array, Array]:
    """(train, test) sample indices of a proplet's dataset of `size` samples: a permutation of
    0..size-1 seeded by sha256("split:" + proplet_id); its last floor(size/5) entries are the
    test part, the rest the train part, each in data order (ascending). It depends on the
    proplet id and the size only, so generated and uploaded datasets split alike, the same in
    every process, and the two parts never overlap."""
    digest = hashlib.sha256(b"split:" + proplet_id.encode("utf-8")).digest()
    order = np.random.default_rng(int.from_bytes(digest, "big")).permutation(size)
    n_test = size // TEST_DENOMINATOR
    return np.sort(order[: size - n_test]), np.sort(order[size - n_test :])


def split_size(proplet_id: str, size: int, split: str) -> int:
    """How many samples the (checked) `split` of a dataset of `size` samples holds;
    FAILED_PRECONDITION when that part is empty (a test part of a dataset under five
    samples)."""
    n_test = size // TEST_DENOMINATOR
    n = {"": size, "all": size, "train": size - n_test, "test": n_test}[split]
    if n == 0:
        raise FailedPrecondition(
            f"split: the {split!r} part of {proplet_id!r}'s dataset of {size} samples is empty "
            f"(the test part is size // {TEST_DENOMINATOR} samples)"
        )
    return n


def dataset_split(dataset: Dataset, split: str) -> Dataset:
    """The part of `dataset` a (checked) `split` names (see `split_indices`)."""
    split_size(dataset.proplet_id, dataset.size, split)
    if split in ("", "all"):
        return dataset
    train, test = split_indices(dataset.proplet_id, dataset.size)
    idx = train if split == "train" else test
    return replace(dataset, features=dataset.features[idx], labels=dataset.labels[idx])
