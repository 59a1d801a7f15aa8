"""The round rules as plain functions: re-configuration, state machine, which updates count."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from server.coordinator import rounds as R
from server.coordinator.rounds import Round, RoundState, Update
from server.coordinator.store import MemoryRoundStore
from server.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from server.round_spec import RoundSpec, validate, with_defaults
from server.tensors import Spec, Tensors

BASE = "fl/models/global_model_v0"
SPECS = (Spec("w", np.dtype("<f8"), (3,)), Spec("b", np.dtype("<f8"), ()))


def cfg(**kw: Any) -> RoundSpec:
    """A round as the coordinator configures it (checked, defaults applied)."""
    args: dict[str, Any] = {"round_id": "r1", "participants": ("a", "b", "c")}
    args.update(kw)
    return with_defaults(validate(RoundSpec(**args)))


def open_round(k: int = 3, now: float = 100.0, **kw: Any) -> Round:
    rnd = R.new_round(cfg(k_of_n=k, timeout_s=10.0, **kw), BASE, SPECS, now - 1)
    return R.start_round(rnd, now)


def tensors(w: list[float] | None = None, b: float = 0.5) -> Tensors:
    return {"w": np.array(w or [1.0, 2.0, 3.0]), "b": np.array(b)}


def update(proplet: str = "a", **kw: Any) -> Update:
    args: dict[str, Any] = {
        "proplet_id": proplet,
        "base_model_uri": BASE,
        "num_samples": 10,
        "metrics": {"loss": 0.5},
        "tensors": tensors(),
    }
    args.update(kw)
    return Update(**args)


# ---- configuration (the checks themselves: tests/test_round_spec.py) -----------------


def test_same_config_is_fine_a_different_one_already_exists() -> None:
    rnd = R.new_round(cfg(), BASE, SPECS, 1.0)
    R.check_same_config(rnd, cfg())
    with pytest.raises(AlreadyExists, match="k_of_n"):
        R.check_same_config(rnd, cfg(k_of_n=2))
    with pytest.raises(AlreadyExists, match="model_ref"):
        R.check_same_config(rnd, cfg(model_ref=BASE))
    with pytest.raises(AlreadyExists, match="participants"):
        R.check_same_config(rnd, cfg(participants=("a", "b")))


def test_require_round() -> None:
    with pytest.raises(NotFound, match="round_id"):
        R.require_round(None, "nope")


# ---- starting --------------------------------------------------------------------------


def test_new_round_is_pending_with_resolved_model() -> None:
    rnd = R.new_round(cfg(), BASE, SPECS, 5.0)
    assert rnd.state is RoundState.PENDING
    assert rnd.model_ref == BASE
    assert rnd.requested_model_ref == ""
    assert rnd.specs == SPECS
    assert rnd.started_at == 0.0 and rnd.deadline == 0.0


def test_start_sets_deadline_from_start_time() -> None:
    rnd = R.new_round(cfg(timeout_s=10.0), BASE, SPECS, 5.0)
    started = R.start_round(rnd, 100.0)
    assert started.state is RoundState.OPEN
    assert started.started_at == 100.0
    assert started.deadline == 110.0
    assert rnd.state is RoundState.PENDING  # records are immutable


def test_start_is_idempotent_while_running() -> None:
    rnd = open_round()
    assert R.start_round(rnd, 200.0) is rnd
    aggregating = replace(rnd, state=RoundState.AGGREGATING)
    assert R.start_round(aggregating, 200.0) is aggregating


@pytest.mark.parametrize("state", [RoundState.COMPLETED, RoundState.FAILED])
def test_finished_round_cannot_start(state: RoundState) -> None:
    with pytest.raises(FailedPrecondition, match="r1"):
        R.start_round(replace(open_round(), state=state), 200.0)


# ---- updates ---------------------------------------------------------------------------


def test_pending_round_takes_no_update() -> None:
    rnd = R.new_round(cfg(), BASE, SPECS, 5.0)
    with pytest.raises(FailedPrecondition, match="not started"):
        R.admit(rnd, "a")


def test_non_participant_is_refused_by_name() -> None:
    with pytest.raises(FailedPrecondition) as exc:
        R.admit(open_round(), "mallory")
    assert str(exc.value).startswith("proplet_id:")
    assert "mallory" in str(exc.value)


def test_first_update_is_new_second_is_duplicate() -> None:
    rnd = open_round()
    assert R.admit(rnd, "a") is False
    rnd = R.record_update(rnd, "a")
    assert R.admit(rnd, "a") is True


@pytest.mark.parametrize("state", [RoundState.AGGREGATING, RoundState.COMPLETED, RoundState.FAILED])
def test_late_update_is_refused_not_dropped(state: RoundState) -> None:
    rnd = replace(R.record_update(open_round(), "a"), state=state)
    with pytest.raises(FailedPrecondition, match="late update not counted"):
        R.admit(rnd, "b")
    # The participant whose update was counted gets the idempotent answer.
    assert R.admit(rnd, "a") is True


def test_valid_update_comes_back_in_base_order() -> None:
    u = update(tensors={"b": np.array(0.1), "w": np.zeros(3)})
    checked = R.validate_update(open_round(), u)
    assert list(checked.tensors) == ["w", "b"]


@pytest.mark.parametrize(
    ("kw", "error", "field"),
    [
        ({"base_model_uri": "fl/models/global_model_v1"}, FailedPrecondition, "base_model_uri"),
        ({"base_model_uri": ""}, FailedPrecondition, "base_model_uri"),
        ({"num_samples": 0}, InvalidArgument, "num_samples"),
        ({"num_samples": -5}, InvalidArgument, "num_samples"),
        ({"metrics": {"loss": math.nan}}, InvalidArgument, "metrics.loss"),
        ({"tensors": {"w": np.zeros(4), "b": np.array(0.0)}}, InvalidArgument, "tensors.w"),
        ({"tensors": {"w": np.zeros((3, 1)), "b": np.array(0.0)}}, InvalidArgument, "tensors.w"),
        (
            {"tensors": {"w": np.zeros(3, np.float32), "b": np.array(0.0)}},
            InvalidArgument,
            "tensors.w",
        ),
        ({"tensors": {"w": np.zeros(3)}}, InvalidArgument, "tensors.b"),
        (
            {"tensors": {"w": np.zeros(3), "b": np.array(0.0), "z": np.zeros(1)}},
            InvalidArgument,
            "tensors.z",
        ),
        ({"tensors": tensors(w=[1.0, math.nan, 0.0])}, InvalidArgument, "tensors.w"),
        ({"tensors": tensors(b=math.inf)}, InvalidArgument, "tensors.b"),
        ({"tensors": tensors(b=-math.inf)}, InvalidArgument, "tensors.b"),
    ],
)
def test_bad_update_is_rejected_naming_the_field(
    kw: dict[str, Any], error: type[Exception], field: str
) -> None:
    rnd = open_round()
    with pytest.raises(error) as exc:
        R.validate_update(rnd, update(**kw))
    assert str(exc.value).startswith(f"{field}:"), str(exc.value)
    assert rnd == open_round()


def test_k_th_update_closes_the_round() -> None:
    rnd = open_round(k=2)
    one = R.record_update(rnd, "a")
    assert (one.state, one.reported, one.num_updates) == (RoundState.OPEN, ("a",), 1)
    two = R.record_update(one, "c")
    assert two.state is RoundState.AGGREGATING
    assert two.closed_by == "k_of_n"
    assert two.reported == ("a", "c")
    assert one.reported == ("a",)
    with pytest.raises(FailedPrecondition):
        R.admit(two, "b")


# ---- deadline and completion -----------------------------------------------------------


def test_due_only_when_open_and_past_deadline() -> None:
    rnd = open_round(now=100.0)  # deadline 110
    assert not R.is_due(rnd, 109.9)
    assert R.is_due(rnd, 110.0)
    assert not R.is_due(R.new_round(cfg(), BASE, SPECS, 0.0), 1e12)
    assert not R.is_due(replace(rnd, state=RoundState.AGGREGATING), 1e12)


def test_deadline_with_updates_aggregates_them() -> None:
    rnd = R.close_at_deadline(R.record_update(open_round(), "b"), 111.0)
    assert rnd.state is RoundState.AGGREGATING
    assert rnd.closed_by == "deadline"
    assert rnd.failure_reason == ""
    assert rnd.num_updates == 1 < rnd.k_of_n


def test_deadline_without_updates_fails_with_reason() -> None:
    rnd = R.close_at_deadline(open_round(), 111.0)
    assert rnd.state is RoundState.FAILED
    assert rnd.failure_reason == "deadline passed with 0 of 3 updates"
    assert rnd.closed_by == "deadline"
    assert rnd.completed_at == 111.0
    assert rnd.finished


def test_complete_and_fail() -> None:
    rnd = R.record_update(open_round(k=1), "a")
    done = R.complete(rnd, 1, "fl/models/global_model_v1", {"loss": 0.2}, 120.0)
    assert done.state is RoundState.COMPLETED and done.finished
    assert (done.new_model_version, done.new_model_uri) == (1, "fl/models/global_model_v1")
    assert done.metrics == {"loss": 0.2}
    assert done.completed_at == 120.0
    failed = R.fail(rnd, "aggregation failed: x", 121.0)
    assert failed.state is RoundState.FAILED
    assert failed.failure_reason == "aggregation failed: x"


def test_metrics_are_sample_weighted() -> None:
    ups = [
        update("a", num_samples=10, metrics={"loss": 1.0, "accuracy": 0.5}),
        update("b", num_samples=30, metrics={"loss": 0.0}),
    ]
    m = R.weighted_metrics(ups)
    assert m["loss"] == pytest.approx(0.25)
    assert m["accuracy"] == pytest.approx(0.5)  # only the update that reports it
    assert R.weighted_metrics([]) == {}


def test_check_tensors_for_aggregated_model() -> None:
    assert list(R.check_tensors(SPECS, tensors(), "aggregate")) == ["w", "b"]
    with pytest.raises(InvalidArgument, match=r"^aggregate\.w"):
        R.check_tensors(SPECS, tensors(w=[math.nan, 0, 0]), "aggregate")


# ---- store -----------------------------------------------------------------------------


async def test_memory_store_keeps_records_and_updates_in_order() -> None:
    store = MemoryRoundStore()
    r1 = open_round()
    r2 = replace(R.new_round(cfg(round_id="r2", experiment_id="e2"), BASE, SPECS, 1.0))
    await store.put(r1)
    await store.put(r2)
    assert await store.get("r1") == r1
    assert await store.get("zz") is None
    assert [r.round_id for r in await store.list()] == ["r1", "r2"]
    assert [r.round_id for r in await store.list("e2")] == ["r2"]
    await store.add_update("r1", update("b"))
    await store.add_update("r1", update("a"))
    assert [u.proplet_id for u in await store.updates("r1")] == ["b", "a"]
    assert await store.updates("r2") == ()
    r1b = R.record_update(r1, "b")
    await store.put(r1b)
    assert await store.get("r1") == r1b


# ---- participants that cannot report -------------------------------------------------


def test_a_failure_that_leaves_fewer_than_k_of_n_fails_the_round_at_once() -> None:
    rnd = open_round(k=2)
    rnd = R.participant_failed(rnd, "a", "module not found", 105.0)
    assert rnd.state is RoundState.OPEN  # b and c can still make k_of_n 2
    assert (rnd.reachable, rnd.quorum) == (2, 2)
    rnd = R.participant_failed(rnd, "b", "trap: unreachable", 106.0)
    assert rnd.state is RoundState.FAILED
    assert rnd.completed_at == 106.0
    assert rnd.failed == (
        R.ParticipantFailure("a", "module not found"),
        R.ParticipantFailure("b", "trap: unreachable"),
    )
    assert rnd.failure_reason == (
        "k_of_n 2 can no longer be reached: 2 of 3 participants failed, 1 can still report "
        "(a: module not found; b: trap: unreachable)"
    )


def test_every_participant_failing_fails_the_round_and_lists_each() -> None:
    rnd = open_round(k=3)
    for p in ("a", "b", "c"):
        rnd = R.participant_failed(rnd, p, f"{p}: file not found", 101.0 + ord(p))
        assert rnd.state is RoundState.FAILED  # the first failure already leaves 2 < 3
    assert rnd.completed_at == 101.0 + ord("a")  # failed at the first, kept as it was
    assert rnd.failure_reason.endswith("(a: a: file not found)")
    assert [f.proplet_id for f in rnd.failed] == ["a", "b", "c"]  # each one listed


def test_min_k_of_n_lets_the_round_close_with_the_participants_left() -> None:
    rnd = open_round(k=3, min_k_of_n=2)
    rnd = R.record_update(rnd, "a")
    rnd = R.participant_failed(rnd, "c", "proplet went away", 101.0)
    assert rnd.state is RoundState.OPEN and rnd.quorum == 2
    rnd = R.record_update(rnd, "b")
    assert rnd.state is RoundState.AGGREGATING
    assert rnd.closed_by == R.CLOSED_BY_MIN_K_OF_N
    # And when the failure comes last, it is the failure that closes the round.
    rnd = R.record_update(R.record_update(open_round(k=3, min_k_of_n=2), "a"), "b")
    rnd = R.participant_failed(rnd, "c", "stopped", 101.0)
    assert (rnd.state, rnd.closed_by) == (RoundState.AGGREGATING, R.CLOSED_BY_MIN_K_OF_N)


def test_below_min_k_of_n_the_round_fails_and_says_which_floor() -> None:
    rnd = open_round(k=3, min_k_of_n=2)
    rnd = R.participant_failed(rnd, "a", "x", 101.0)
    rnd = R.participant_failed(rnd, "b", "y", 102.0)
    assert rnd.state is RoundState.FAILED
    assert rnd.failure_reason.startswith("min_k_of_n 2 can no longer be reached: 2 of 3")


def test_failures_that_change_nothing_return_the_round_itself() -> None:
    rnd = R.record_update(open_round(k=2), "a")
    assert R.participant_failed(rnd, "a", "late failure", 101.0) is rnd  # it reported
    once = R.participant_failed(rnd, "b", "first", 101.0)
    assert R.participant_failed(once, "b", "again", 102.0) is once  # a repeat keeps the first
    closed = R.record_update(rnd, "b")
    assert R.participant_failed(closed, "c", "after the close", 103.0) is closed
    done = R.complete(closed, 1, "fl/models/global_model_v1", {}, 104.0)
    assert R.participant_failed(done, "c", "after completion", 105.0) is done
    with pytest.raises(FailedPrecondition, match="proplet_id: 'zz' is not a participant"):
        R.participant_failed(rnd, "zz", "?", 101.0)


def test_a_failed_participant_that_reports_after_all_counts() -> None:
    rnd = R.participant_failed(open_round(k=2), "a", "stopped", 101.0)
    rnd = R.record_update(rnd, "a")  # its task was started again and delivered
    assert rnd.failed == () and rnd.reported == ("a",)
    rnd = R.record_update(rnd, "b")
    assert (rnd.state, rnd.closed_by) == (RoundState.AGGREGATING, R.CLOSED_BY_K_OF_N)


def test_a_failure_reason_is_bounded() -> None:
    many = open_round(k=1, participants=tuple(f"p{i}" for i in range(30)))
    for i in range(29):
        many = R.participant_failed(many, f"p{i}", "e" * 5000, 101.0)
    assert many.state is RoundState.OPEN
    assert {len(f.reason) for f in many.failed} == {R.MAX_REASON_CHARS}
    failed = R.participant_failed(many, "p29", "last", 102.0)
    assert failed.state is RoundState.FAILED
    assert failed.failure_reason.endswith("; and 20 more)")
    assert len(failed.failure_reason) < 3000
