"""Where rounds and their accepted updates live.

The coordinator keeps nothing about a round outside a `RoundStore`: the round record (the
immutable `Round`, replaced on every transition) and every accepted update, as arrays, in
arrival order. A durable implementation slots in behind the same interface; the methods are
async so one may do its I/O off the event loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from server.coordinator.rounds import Round, Update


class RoundStore(Protocol):
    async def get(self, round_id: str) -> Round | None:
        """The round's current record, or None."""
        ...

    async def put(self, rnd: Round) -> None:
        """Insert or replace the round's record."""
        ...

    async def list(self, experiment_id: str = "") -> list[Round]:
        """All rounds (of one experiment when given), in configuration order."""
        ...

    async def add_update(self, round_id: str, update: Update) -> None:
        """Keep an accepted update (the caller has checked it is the proplet's first)."""
        ...

    async def updates(self, round_id: str) -> Sequence[Update]:
        """The round's accepted updates in arrival order."""
        ...


class MemoryRoundStore:
    """A `RoundStore` in process memory: lost on restart."""

    def __init__(self) -> None:
        self._rounds: dict[str, Round] = {}
        self._updates: dict[str, list[Update]] = {}

    async def get(self, round_id: str) -> Round | None:
        return self._rounds.get(round_id)

    async def put(self, rnd: Round) -> None:
        self._rounds[rnd.round_id] = rnd

    async def list(self, experiment_id: str = "") -> list[Round]:
        return [
            r
            for r in self._rounds.values()
            if not experiment_id or r.experiment_id == experiment_id
        ]

    async def add_update(self, round_id: str, update: Update) -> None:
        self._updates.setdefault(round_id, []).append(update)

    async def updates(self, round_id: str) -> Sequence[Update]:
        return tuple(self._updates.get(round_id, ()))
