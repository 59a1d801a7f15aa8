"""MQTT topics: one namespace per deployment; addressed task starts on per-proplet topics."""

from __future__ import annotations

import pytest

from server.topics import Topics


def test_everything_lives_under_the_namespace() -> None:
    t = Topics(domain="d1", channel="c1")
    for topic in (
        t.proplet_create,
        t.proplet_alive,
        t.proplet_results,
        t.task_start,
        t.task_stop,
        t.round_next,
        t.task_start_for("p1"),
    ):
        assert topic.startswith("m/d1/c/c1/")
    assert t.round_next == "m/d1/c/c1/fl/rounds/next"


def test_addressed_starts_go_to_the_proplets_own_topic() -> None:
    t = Topics()
    assert t.task_start_for("p-1") == t.task_start + "/p-1"
    assert t.task_start_for("p-2") != t.task_start_for("p-1")
    # Broadcasts, and ids that cannot be one topic level, use the shared topic.
    for pid in ("", "a/b", "a+b", "a#"):
        assert t.task_start_for(pid) == t.task_start
    assert t.is_task_start(t.task_start) and t.is_task_start(t.task_start_for("p-1"))
    assert not t.is_task_start(t.task_stop)


@pytest.mark.parametrize("bad", ["", "a/b", "+", "#"])
def test_namespace_parts_are_checked(bad: str) -> None:
    with pytest.raises(ValueError, match="mqtt"):
        Topics(domain=bad)
