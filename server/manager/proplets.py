"""Proplets as the manager knows them: registered by their MQTT announcements, alive while
their heartbeats keep arriving.

Liveness is judged on the manager's own receive time, never on the proplet's clock, and the
window is several heartbeat intervals wide so a live proplet never flaps to dead between two
heartbeats (the original used window == interval).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

from server.manager.records import InMemoryStore, RecordStore, require
from server.messages import PropletAnnounce

Clock = Callable[[], float]


@dataclass(frozen=True)
class Proplet:
    id: str
    name: str
    metadata: dict[str, str] = field(default_factory=dict)
    last_seen: float = 0.0
    registered_at: float = 0.0

    @property
    def key(self) -> str:
        return self.id


# Where proplet records live: in memory, or manager.sqlite (`sqlite_store`).
PropletStore = RecordStore[Proplet]
InMemoryPropletStore = InMemoryStore[Proplet]


@dataclass(frozen=True)
class Skipped:
    """A requested participant that will not get a task, and why."""

    proplet_id: str
    reason: str


class Proplets:
    """Registration and liveness over a `PropletStore`."""

    def __init__(self, store: PropletStore, alive_window_s: float, clock: Clock = time.time):
        if not alive_window_s > 0:
            raise ValueError(f"alive_window_s: {alive_window_s} must be > 0")
        self.store = store
        self.alive_window_s = alive_window_s
        self.clock = clock

    def announce(self, msg: PropletAnnounce) -> Proplet:
        """Register a new proplet or refresh a known one (create and alive alike)."""
        now = self.clock()
        known = self.store.get(msg.proplet_id)
        if known is None:
            proplet = Proplet(
                id=msg.proplet_id,
                name=msg.name,
                metadata=dict(msg.metadata),
                last_seen=now,
                registered_at=now,
            )
        else:
            # Heartbeats often carry no name or metadata: keep what the create message said.
            proplet = replace(
                known,
                name=msg.name or known.name,
                metadata=dict(msg.metadata) if msg.metadata else known.metadata,
                last_seen=max(now, known.last_seen),
            )
        self.store.put(proplet)
        return proplet

    def get(self, proplet_id: str) -> Proplet:
        return require(self.store, proplet_id, "proplet")

    def all(self) -> list[Proplet]:
        """Every known proplet, in registration order (the store's order, kept across
        restarts; new proplets only ever come at the end, which ListProplets' pages count
        on)."""
        return self.store.list()

    def age(self, proplet: Proplet) -> float:
        """Seconds since the manager last heard from `proplet`."""
        return max(0.0, self.clock() - proplet.last_seen)

    def is_alive(self, proplet: Proplet) -> bool:
        return self.age(proplet) <= self.alive_window_s

    def alive_count(self) -> int:
        """How many proplets are alive now. Called from the metrics endpoint's thread: a
        registration landing during the count makes it count again."""
        for _ in range(10):
            try:
                return sum(1 for p in self.all() if self.is_alive(p))
            except RuntimeError:  # the store changed size while it was being listed
                continue
        return 0

    def split(self, participants: Iterable[str]) -> tuple[list[str], list[Skipped]]:
        """Participants that can take part now (known and alive), in request order, and the
        others with the reason each one is left out."""
        scheduled: list[str] = []
        skipped: list[Skipped] = []
        for pid in participants:
            proplet = self.store.get(pid)
            if proplet is None:
                skipped.append(Skipped(pid, "unknown proplet"))
            elif not self.is_alive(proplet):
                skipped.append(Skipped(pid, f"not alive (last seen {self.age(proplet):.1f} s ago)"))
            else:
                scheduled.append(pid)
        return scheduled, skipped
