"""Proplet registration and liveness, on an injected clock."""

from __future__ import annotations

import pytest

from server.errors import NotFound
from server.manager.proplets import InMemoryPropletStore, Proplets, Skipped
from server.messages import PropletAnnounce
from tests.manager.fakes import FakeClock


def make(window: float = 30.0) -> tuple[Proplets, FakeClock]:
    clock = FakeClock()
    return Proplets(InMemoryPropletStore(), window, clock), clock


def test_first_announce_registers_with_manager_receive_time() -> None:
    proplets, clock = make()
    # The proplet's clock is far off; the manager's receive time is what counts.
    p = proplets.announce(PropletAnnounce("p1", "edge-1", {"os": "linux"}, timestamp=5.0))
    assert (p.id, p.name, p.metadata) == ("p1", "edge-1", {"os": "linux"})
    assert p.registered_at == p.last_seen == clock.now
    assert proplets.is_alive(p)


def test_heartbeat_refreshes_last_seen_and_keeps_name_and_metadata() -> None:
    proplets, clock = make()
    proplets.announce(PropletAnnounce("p1", "edge-1", {"os": "linux"}))
    registered = clock.now
    clock.advance(10)
    p = proplets.announce(PropletAnnounce("p1"))
    assert p.last_seen == clock.now
    assert p.registered_at == registered
    assert (p.name, p.metadata) == ("edge-1", {"os": "linux"})


def test_alive_within_window_inclusive_and_dead_after() -> None:
    proplets, clock = make(window=30.0)
    proplets.announce(PropletAnnounce("p1"))
    clock.advance(30.0)
    assert proplets.is_alive(proplets.get("p1"))
    clock.advance(0.001)
    assert not proplets.is_alive(proplets.get("p1"))
    # One heartbeat brings it back.
    proplets.announce(PropletAnnounce("p1"))
    assert proplets.is_alive(proplets.get("p1"))


def test_heartbeats_at_default_interval_never_flap() -> None:
    proplets, clock = make(window=30.0)
    proplets.announce(PropletAnnounce("p1"))
    for _ in range(100):
        # A heartbeat every 10 s, each one a little late: still alive at every moment.
        for _ in range(12):
            clock.advance(1.0)
            assert proplets.is_alive(proplets.get("p1"))
        proplets.announce(PropletAnnounce("p1"))


def test_window_must_be_positive() -> None:
    with pytest.raises(ValueError, match="alive_window_s"):
        Proplets(InMemoryPropletStore(), 0.0)


def test_get_unknown_names_proplet_id() -> None:
    proplets, _ = make()
    with pytest.raises(NotFound, match="proplet_id"):
        proplets.get("nope")


def test_all_in_registration_order() -> None:
    proplets, clock = make()
    for pid in ("b", "a", "c"):
        proplets.announce(PropletAnnounce(pid))
        clock.advance(1)
    proplets.announce(PropletAnnounce("a"))
    assert [p.id for p in proplets.all()] == ["b", "a", "c"]


def test_split_participants_keeps_order_and_says_why() -> None:
    proplets, clock = make(window=30.0)
    proplets.announce(PropletAnnounce("old"))
    clock.advance(42.0)
    proplets.announce(PropletAnnounce("p2"))
    proplets.announce(PropletAnnounce("p1"))
    scheduled, skipped = proplets.split(["p1", "ghost", "old", "p2"])
    assert scheduled == ["p1", "p2"]
    assert skipped == [
        Skipped("ghost", "unknown proplet"),
        Skipped("old", "not alive (last seen 42.0 s ago)"),
    ]
