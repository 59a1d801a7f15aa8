"""The shipped digits dataset, its global train/test split, and the IID / Dirichlet partitions
`propeller-fl datasets partition` spreads it with (pure functions, no service)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.datastore import catalog
from server.datastore.catalog import Corpus
from server.datastore.datasets import CLASSES_SCHEMA, validate_dataset
from server.datastore.partition import (
    MAX_DRAWS,
    dirichlet_parts,
    iid_parts,
    label_histogram,
    partition,
)
from server.errors import FailedPrecondition, InvalidArgument

IDS = [f"proplet-{i + 1}" for i in range(10)]


@pytest.fixture(scope="module")
def digits() -> Corpus:
    return catalog.digits()


def total_variation(hist: np.ndarray, reference: np.ndarray) -> float:
    """Half the L1 distance between two label distributions: 0 equal, 1 disjoint."""
    return 0.5 * float(np.abs(hist / hist.sum() - reference / reference.sum()).sum())


def test_digits_is_split_once_stratified_and_scaled(digits: Corpus) -> None:
    assert (digits.name, digits.num_classes, digits.num_features) == ("digits", 10, 64)
    assert digits.train.size + digits.test.size == 1797
    assert (digits.train.size, digits.test.size) == (1438, 359)
    for part in (digits.train, digits.test):
        assert part.features.min() >= 0.0 and part.features.max() <= 1.0
        assert part.features.dtype == np.float64 and part.labels.dtype == np.float64
    # Stratified: every class holds about a fifth of its samples out.
    train_h = label_histogram(digits.train.labels, 10)
    test_h = label_histogram(digits.test.labels, 10)
    shares = test_h / (train_h + test_h)
    assert np.all(np.abs(shares - catalog.TEST_FRACTION) < 0.01), shares
    # No test image is also a training image (digits' 1,797 images are all distinct).
    train_rows = {row.tobytes() for row in digits.train.features}
    assert not any(row.tobytes() in train_rows for row in digits.test.features)
    # The same split in every call (fixed seed), not a fresh one per process.
    again = catalog.digits()
    np.testing.assert_array_equal(again.test.features, digits.test.features)
    np.testing.assert_array_equal(again.train.labels, digits.train.labels)


def test_digits_are_the_wheels_own_file(digits: Corpus) -> None:
    from sklearn.datasets import load_digits

    raw = load_digits()
    pooled = np.concatenate([digits.train.features, digits.test.features]) * 16.0
    assert sorted(map(bytes, pooled.astype(np.uint8))) == sorted(
        map(bytes, raw.data.astype(np.uint8))
    )


@pytest.mark.parametrize("alpha", [None, 0.1, 0.5, 100.0])
def test_every_train_sample_goes_to_exactly_one_proplet(
    digits: Corpus, alpha: float | None
) -> None:
    labels = digits.train.labels
    if alpha is None:
        parts = iid_parts(labels, len(IDS), seed=7, min_samples=10)
    else:
        parts = dirichlet_parts(labels, len(IDS), alpha, seed=7, min_samples=10)
    assert len(parts) == len(IDS)
    assert all(len(p) >= 10 for p in parts)
    joined = np.concatenate(parts)
    np.testing.assert_array_equal(np.sort(joined), np.arange(digits.train.size))


@pytest.mark.parametrize("alpha", [None, 0.1])
def test_partition_is_reproducible_from_the_seed(digits: Corpus, alpha: float | None) -> None:
    first = partition(digits, IDS, alpha=alpha, seed=3)
    again = partition(digits, IDS, alpha=alpha, seed=3)
    other = partition(digits, IDS, alpha=alpha, seed=4)
    for a, b in zip(first, again, strict=True):
        assert a.proplet_id == b.proplet_id
        np.testing.assert_array_equal(a.features, b.features)
        np.testing.assert_array_equal(a.labels, b.labels)
    assert any(
        a.size != c.size or not np.array_equal(a.features, c.features)
        for a, c in zip(first, other, strict=True)
    )


def test_iid_parts_have_the_global_label_histogram(digits: Corpus) -> None:
    overall = label_histogram(digits.train.labels, 10)
    parts = partition(digits, IDS, alpha=None, seed=11)
    sizes = [p.size for p in parts]
    assert max(sizes) - min(sizes) <= 1
    for p in parts:
        hist = label_histogram(p.labels, 10)
        # Each class as evenly spread as whole samples allow ...
        assert np.all(np.abs(hist - overall / len(IDS)) < 1), (p.proplet_id, hist)
        # ... so the part's label distribution is the global one, give or take rounding.
        assert total_variation(hist, overall) < 0.05


@pytest.mark.parametrize("seed", range(5))
def test_dirichlet_small_alpha_parts_are_skewed(digits: Corpus, seed: int) -> None:
    overall = label_histogram(digits.train.labels, 10)
    skewed = [
        total_variation(label_histogram(p.labels, 10), overall)
        for p in partition(digits, IDS, alpha=0.1, seed=seed)
    ]
    # Far from the global mix, every one of them (IID parts sit under 0.05).
    assert min(skewed) > 0.3 and float(np.mean(skewed)) > 0.5, skewed
    # A large alpha is close to IID again: alpha is what moves the skew.
    near_iid = [
        total_variation(label_histogram(p.labels, 10), overall)
        for p in partition(digits, IDS, alpha=1000.0, seed=seed)
    ]
    assert max(near_iid) < 0.1, near_iid


def test_parts_are_valid_k_class_datasets(digits: Corpus) -> None:
    for p in partition(digits, IDS[:3], alpha=0.5, seed=0):
        assert (p.schema, p.num_classes, p.num_features) == (CLASSES_SCHEMA, 10, 64)
        validate_dataset(p)


def test_too_many_proplets_for_the_minimum_is_refused(digits: Corpus) -> None:
    ids = [f"p{i}" for i in range(200)]
    with pytest.raises(InvalidArgument, match=r"--proplets: 200 proplets x --min-samples 10"):
        partition(digits, ids, alpha=None, seed=0)
    # With a smaller minimum it fits.
    assert len(partition(digits, ids, alpha=None, seed=0, min_samples=7)) == 200


def test_an_unreachable_minimum_fails_after_bounded_draws(digits: Corpus) -> None:
    with pytest.raises(FailedPrecondition, match=f"--dirichlet: {MAX_DRAWS} draws with alpha"):
        dirichlet_parts(digits.train.labels, 10, 0.01, seed=0, min_samples=140)


@pytest.mark.parametrize(
    ("ids", "alpha", "message"),
    [
        (["a", "b", "a"], None, r"--ids\[2\]: 'a' is given twice"),
        (["a", "digits.test"], None, r"--ids\[1\]: 'digits.test' is reserved"),
        (["a", "b c"], None, r"--ids\[1\]"),
        (["a", "b"], 0.0, r"--dirichlet: alpha must be a number > 0"),
        (["a", "b"], float("nan"), r"--dirichlet: alpha must be a number > 0"),
    ],
)
def test_bad_arguments_are_refused_naming_them(
    digits: Corpus, ids: list[str], alpha: float | None, message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message):
        partition(digits, ids, alpha=alpha, seed=0)


def test_unknown_dataset_is_refused() -> None:
    with pytest.raises(InvalidArgument, match=r"--dataset: 'mnist' is not one of digits"):
        catalog.load("mnist")


# A partition of a few hundred labels is quick, Hypothesis's generation is not: 200 examples
# at most (the profile's number when smaller) cover the sizes without a minute of CI.
@settings(deadline=None, max_examples=min(200, settings().max_examples))
@given(
    labels=st.lists(st.integers(0, 9), min_size=20, max_size=400),
    count=st.integers(1, 8),
    alpha=st.one_of(st.none(), st.floats(0.2, 100.0)),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_partition_puts_every_sample_in_exactly_one_part(
    labels: list[int], count: int, alpha: float | None, seed: int
) -> None:
    y = np.asarray(labels, dtype=np.float64)
    # IID meets any reachable minimum; a Dirichlet draw must be asked for little, or most
    # examples would spend their time redrawing.
    min_samples = max(1, min(3, len(labels) // count)) if alpha is None else 1
    try:
        if alpha is None:
            parts = iid_parts(y, count, seed, min_samples)
        else:
            parts = dirichlet_parts(y, count, alpha, seed, min_samples)
    except FailedPrecondition:
        assert alpha is not None  # only a Dirichlet draw can miss the minimum
        return
    assert len(parts) == count and all(len(p) >= min_samples for p in parts)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))
    assert all(np.all(np.diff(p) > 0) for p in parts)  # each part ascending, no repeats
