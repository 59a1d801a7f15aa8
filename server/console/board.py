"""The console's picture of the fleet, as the page draws it: proplets, experiments and rounds,
each a JSON-ready dict keyed by its id; and the pages watching it.

What a feed learns is merged in (`proplets`, `experiment`, `round`): a field the source does
not know (None) keeps what another source said, and a round's state only moves forward, so a
late snapshot from one stream cannot undo what another already told. Each change that alters
an entry goes to every open page as one `Change` (its kind and the entry as it is now); a
page too slow to keep up is dropped (its queue full), and its browser reconnects and starts
again from `snapshot()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

Entry = dict[str, Any]

# A round's states in the order a round passes through them; FAILED and COMPLETED both end it.
ROUND_STATE_RANK = {
    "UNSPECIFIED": 0,
    "PENDING": 1,
    "OPEN": 2,
    "AGGREGATING": 3,
    "COMPLETED": 4,
    "FAILED": 4,
}
# The changes one page may have waiting: a round of hundreds of proplets is a few hundred
# changes; more than this and the page is behind for good, so it starts again.
PAGE_QUEUE = 2000


@dataclass(frozen=True)
class Change:
    """One event for the page: `kind` is "proplets" (the whole list), "experiment", "round"
    or "problem" (what the console cannot reach, "" once it can again)."""

    kind: str
    data: Any


def _rank(state: object) -> int:
    return ROUND_STATE_RANK.get(state, 0) if isinstance(state, str) else 0


def _merged(old: Entry | None, new: Mapping[str, Any]) -> Entry:
    merged = dict(old or {})
    for key, value in new.items():
        if value is None:
            continue
        if key == "state" and _rank((old or {}).get("state")) > _rank(value):
            continue
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            value = {**merged[key], **value}
        merged[key] = value
    return merged


class Board:
    """The proplets, experiments and rounds the console knows, and the pages to tell."""

    def __init__(self) -> None:
        self._proplets: list[Entry] = []
        self._experiments: dict[str, Entry] = {}
        self._rounds: dict[str, Entry] = {}
        self._problem = ""
        self._pages: set[asyncio.Queue[Change | None]] = set()

    def snapshot(self) -> dict[str, Any]:
        """Everything, as a page starts from it."""
        return {
            "proplets": list(self._proplets),
            "experiments": list(self._experiments.values()),
            "rounds": list(self._rounds.values()),
            "problem": self._problem,
        }

    def round_of(self, round_id: str) -> Entry | None:
        return self._rounds.get(round_id)

    def proplets(self, entries: Sequence[Entry]) -> None:
        """The manager's whole list, as ListProplets answered it."""
        listed = list(entries)
        if listed != self._proplets:
            self._proplets = listed
            self._tell(Change("proplets", listed))

    def experiment(self, experiment_id: str, fields: Mapping[str, Any]) -> None:
        self._merge(self._experiments, "experiment", {"experiment_id": experiment_id, **fields})

    def round(self, round_id: str, fields: Mapping[str, Any]) -> None:
        # A state never goes back; a round's state is the one field ranked (experiments only
        # go from RUNNING to an end, which their source never reverses).
        self._merge(self._rounds, "round", {"round_id": round_id, **fields})

    def problem(self, text: str) -> bool:
        """What the console cannot do now ("" once it can); True if that is news."""
        if text == self._problem:
            return False
        self._problem = text
        self._tell(Change("problem", text))
        return True

    def _merge(self, table: dict[str, Entry], kind: str, fields: Mapping[str, Any]) -> None:
        key = fields[f"{kind}_id"]
        old = table.get(key)
        new = _merged(old, fields)
        if new != old:
            table[key] = new
            self._tell(Change(kind, new))

    def _tell(self, change: Change) -> None:
        for queue in list(self._pages):
            try:
                queue.put_nowait(change)
            except asyncio.QueueFull:
                # Behind for good: end its stream (None) so the browser reconnects afresh.
                self._pages.discard(queue)
                queue.get_nowait()
                queue.put_nowait(None)
                log.warning("[console] a page fell %d changes behind; it starts again", PAGE_QUEUE)

    @contextlib.asynccontextmanager
    async def page(self) -> AsyncIterator[tuple[dict[str, Any], asyncio.Queue[Change | None]]]:
        """A page's start (the snapshot) and its queue of changes after it (None: start
        again), registered together so no change falls between the two."""
        queue: asyncio.Queue[Change | None] = asyncio.Queue(PAGE_QUEUE)
        self._pages.add(queue)
        try:
            yield self.snapshot(), queue
        finally:
            self._pages.discard(queue)

    @property
    def pages(self) -> int:
        return len(self._pages)
