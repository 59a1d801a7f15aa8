"""`attempt` in TaskStart and TaskResult on the wire: round-trips, 0 when an older peer
leaves it out, and a malformed one makes the payload malformed."""

from __future__ import annotations

import json

import pytest

from server.messages import COMPLETED, TaskResult, TaskStart


def test_attempt_round_trips() -> None:
    start = TaskStart(id="t", name="n", file=b"\0asm", attempt=3)
    assert TaskStart.from_json(start.to_json()) == start
    result = TaskResult("t", "p1", COMPLETED, results="r", timestamp=5.0, attempt=3)
    assert TaskResult.from_json(result.to_json()) == result


def test_absent_attempt_is_zero() -> None:
    assert TaskStart.from_json(b'{"id": "t"}').attempt == 0
    assert TaskResult.from_json(b'{"task_id": "t", "state": "Running"}').attempt == 0


@pytest.mark.parametrize("bad", [-1, 1.5, "2", True, None])
def test_malformed_attempt_is_rejected(bad: object) -> None:
    with pytest.raises(ValueError, match=r"^attempt:"):
        TaskStart.from_json(json.dumps({"id": "t", "attempt": bad}))
    with pytest.raises(ValueError, match=r"^attempt:"):
        TaskResult.from_json(json.dumps({"task_id": "t", "state": "Running", "attempt": bad}))
    with pytest.raises(ValueError, match=r"^attempt:"):
        TaskResult("t", "p1", COMPLETED, attempt=bad)  # type: ignore[arg-type]
