"""MQTT topics: one namespace per deployment; what a proplet says on topics ending in its own
id; addressed starts, stops and acknowledgements on per-proplet topics."""

from __future__ import annotations

import pytest

from server.topics import Report, Topics


def test_everything_lives_under_the_namespace() -> None:
    t = Topics(domain="d1", channel="c1")
    for topic in (
        t.proplet_create_for("p1"),
        t.proplet_alive_for("p1"),
        t.proplet_results_for("p1"),
        t.task_start,
        t.task_stop,
        t.round_next,
        t.task_start_for("p1"),
        t.task_stop_for("p1"),
        t.result_ack_for("p1"),
        *t.reports,
        *t.proplet_subscriptions("p1"),
    ):
        assert topic.startswith("m/d1/c/c1/")
    assert t.round_next == "m/d1/c/c1/fl/rounds/next"
    # The seed's topic names, with the proplet's id as a last level.
    assert t.proplet_create_for("p1") == "m/d1/c/c1/control/proplet/create/p1"
    assert t.task_start == "m/d1/c/c1/control/manager/start"


def test_addressed_starts_and_stops_go_to_the_proplets_own_topic() -> None:
    t = Topics()
    assert t.task_start_for("p-1") == t.task_start + "/p-1"
    assert t.task_start_for("p-2") != t.task_start_for("p-1")
    assert t.task_stop_for("p-1") == t.task_stop + "/p-1"
    # Broadcasts use the shared topics.
    assert t.task_start_for("") == t.task_start and t.task_stop_for("") == t.task_stop
    assert t.is_task_start(t.task_start) and t.is_task_start(t.task_start_for("p-1"))
    assert t.is_task_stop(t.task_stop) and t.is_task_stop(t.task_stop_for("p-1"))
    assert not t.is_task_start(t.task_stop) and not t.is_task_stop(t.task_start)
    assert set(t.proplet_subscriptions("p-1")) == {
        t.task_start,
        t.task_start_for("p-1"),
        t.task_stop,
        t.task_stop_for("p-1"),
        t.result_ack_for("p-1"),
    }


@pytest.mark.parametrize("bad", ["a/b", "a+b", "a#", "+", "#", "a b", "svc:x", "x" * 129])
def test_an_id_that_is_not_one_never_becomes_a_topic_level(bad: str) -> None:
    t = Topics()
    for make in (
        t.proplet_create_for,
        t.proplet_alive_for,
        t.proplet_results_for,
        t.task_start_for,
        t.task_stop_for,
        t.result_ack_for,
    ):
        with pytest.raises(ValueError, match="proplet_id"):
            make(bad)
    with pytest.raises(ValueError, match="proplet_id"):
        t.proplet_create_for("")


def test_the_manager_reads_who_reported_from_the_topic() -> None:
    t = Topics("d", "c")
    assert t.reports == [
        "m/d/c/c/control/proplet/create/+",
        "m/d/c/c/control/proplet/alive/+",
        "m/d/c/c/control/proplet/results/+",
    ]
    assert t.parse_report(t.proplet_create_for("p1")) == (Report.CREATE, "p1")
    assert t.parse_report(t.proplet_alive_for("p1")) == (Report.ALIVE, "p1")
    assert t.parse_report(t.proplet_results_for("p1")) == (Report.RESULTS, "p1")
    for other in (
        "m/d/c/c/control/proplet/create",  # the seed's shared topic: no identity
        "m/d/c/c/control/proplet/create/",
        "m/d/c/c/control/proplet/create/a/b",
        "m/d/c/c/control/proplet/create/svc:manager",
        "m/x/c/c/control/proplet/create/p1",  # another namespace
        t.task_start_for("p1"),
    ):
        assert t.parse_report(other) is None, other


@pytest.mark.parametrize("bad", ["", "a/b", "+", "#", "a\x00"])
def test_namespace_parts_are_checked(bad: str) -> None:
    with pytest.raises(ValueError, match="mqtt"):
        Topics(domain=bad)
