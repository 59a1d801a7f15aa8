"""What a watcher of a round is told (`Coordinator.watch`): the round as it is, then each
change, as in-process `Event`s; `Watchers` holds each round's watchers' queues. Only the
servicer's proto mapping gives these a form outside the process."""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass

from server.coordinator.rounds import Round


class EventType(enum.Enum):
    SNAPSHOT = enum.auto()
    STARTED = enum.auto()
    UPDATE_ACCEPTED = enum.auto()
    AGGREGATING = enum.auto()
    COMPLETED = enum.auto()
    FAILED = enum.auto()


@dataclass(frozen=True)
class Event:
    type: EventType
    round: Round
    timestamp: float
    proplet_id: str = ""


class Watchers:
    """Per round, the queues of those watching it. Unbounded: a watcher is told every change
    of one round, and a round has a bounded number of them (one per participant and a few
    state changes)."""

    def __init__(self) -> None:
        self._queues: dict[str, set[asyncio.Queue[Event]]] = {}

    def add(self, round_id: str) -> asyncio.Queue[Event]:
        queue: asyncio.Queue[Event] = asyncio.Queue()
        self._queues.setdefault(round_id, set()).add(queue)
        return queue

    def discard(self, round_id: str, queue: asyncio.Queue[Event]) -> None:
        queues = self._queues.get(round_id)
        if queues is not None:
            queues.discard(queue)
            if not queues:
                del self._queues[round_id]

    def tell(self, event: Event) -> None:
        for queue in self._queues.get(event.round.round_id, ()):
            queue.put_nowait(event)
