"""Where datasets live: a small `DatasetStore` protocol and an in-memory implementation."""

from __future__ import annotations

from typing import Protocol

from server.datastore.datasets import Dataset


class DatasetStore(Protocol):
    def get(self, proplet_id: str) -> Dataset | None: ...

    def put(self, dataset: Dataset) -> None:
        """Store `dataset`, replacing any dataset of the same proplet."""
        ...

    def list(self) -> list[Dataset]:
        """Every dataset, sorted by proplet id."""
        ...


class InMemoryDatasetStore:
    """Datasets in a dict. Arrays are frozen on the way in so nobody mutates stored data."""

    def __init__(self) -> None:
        self._datasets: dict[str, Dataset] = {}

    def get(self, proplet_id: str) -> Dataset | None:
        return self._datasets.get(proplet_id)

    def put(self, dataset: Dataset) -> None:
        dataset.features.setflags(write=False)
        dataset.labels.setflags(write=False)
        self._datasets[dataset.proplet_id] = dataset

    def list(self) -> list[Dataset]:
        return [self._datasets[k] for k in sorted(self._datasets)]
