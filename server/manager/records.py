"""The one shape of the manager's stores (proplets, tasks, experiments): records found by their
`key`, `put` inserting or replacing, `delete` removing, `list` in the order the keys were
first put.

`InMemoryStore` keeps them in a dict; `sqlite_store` extends it to write every put to
manager.sqlite as well. The domain code (`Proplets`, `Tasks`, `Manager`) sees a `RecordStore`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Generic, Protocol, TypeVar

from server.errors import NotFound


class Keyed(Protocol):
    @property
    def key(self) -> str:
        """The record's id, unique within its store."""
        ...


T = TypeVar("T", bound=Keyed)


class RecordStore(Protocol[T]):
    def get(self, key: str) -> T | None: ...

    def put(self, record: T) -> None: ...

    def delete(self, key: str) -> None:
        """Remove the record `key` names (nothing if there is none)."""
        ...

    def list(self) -> list[T]: ...


class InMemoryStore(Generic[T]):
    def __init__(self, records: Iterable[T] = ()) -> None:
        self._records: dict[str, T] = {r.key: r for r in records}

    def get(self, key: str) -> T | None:
        return self._records.get(key)

    def put(self, record: T) -> None:
        self._records[record.key] = record

    def delete(self, key: str) -> None:
        self._records.pop(key, None)

    def list(self) -> list[T]:
        return list(self._records.values())


def require(store: RecordStore[T], key: str, kind: str) -> T:
    """The record `key` names; NotFound saying so otherwise ("task_id: no task 'x'")."""
    record = store.get(key)
    if record is None:
        raise NotFound(f"{kind}_id: no {kind} {key!r}")
    return record
