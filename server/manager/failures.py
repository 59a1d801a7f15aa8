"""Participants that cannot report: a task of a round (ROUND_ID in its env) that failed or was
interrupted means its participant will not report, so the coordinator is told (retried while
it is unreachable, until the round's deadline): the round fails at once if it can no longer
reach its quorum, instead of at its deadline.

`failure_of` says whether a task is such a failure; `report_failure` tells the coordinator
(the `Manager` runs it in the background).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from server.errors import DeadlineExceeded, PropellerError, Unavailable
from server.manager.coordinator import RoundService
from server.manager.experiments import EVALUATE, FL_TASK
from server.manager.tasks import Task, TaskState

log = logging.getLogger(__name__)

# Coordinator answers that another attempt may change: the experiment stays recorded and its
# fan-out is tried again. Any other refusal removes it (the request was not accepted).
TRANSIENT: tuple[type[PropellerError], ...] = (Unavailable, DeadlineExceeded)
# How long the manager keeps telling the coordinator about a failed participant when the
# task carries no ROUND_DEADLINE.
REPORT_WINDOW_S = 60.0


@dataclass(frozen=True)
class ParticipantFailure:
    """`proplet_id` will not report in `round_id`, because of `reason`; worth telling the
    coordinator until `until` (unix seconds)."""

    round_id: str
    proplet_id: str
    reason: str
    until: float


def failure_of(task: Task, clock: Callable[[], float]) -> ParticipantFailure | None:
    """The failure to report for `task`, None when there is none (not a round's training
    task, or not failed or interrupted)."""
    if task.state not in (TaskState.FAILED, TaskState.INTERRUPTED):
        return None
    if task.env.get(FL_TASK) == EVALUATE:
        return None  # an evaluation: its round is over, the coordinator has nothing to learn
    round_id = task.env.get("ROUND_ID", "")
    proplet_id = task.proplet_id or task.reported_by
    if not round_id or not proplet_id:
        return None
    reason = task.error or f"task {task.id} {task.state.value.lower()}"
    try:
        until = float(task.env.get("ROUND_DEADLINE", "")) or 0.0
    except ValueError:
        until = 0.0
    until = until or clock() + REPORT_WINDOW_S
    return ParticipantFailure(round_id, proplet_id, reason, until)


async def report_failure(
    rounds: RoundService,
    failure: ParticipantFailure,
    clock: Callable[[], float],
    *,
    retry_initial_s: float,
    retry_max_s: float,
) -> None:
    round_id, proplet_id, reason, until = (
        failure.round_id,
        failure.proplet_id,
        failure.reason,
        failure.until,
    )
    delay = retry_initial_s
    while True:
        try:
            state = await rounds.report_failure(round_id, proplet_id, reason)
        except TRANSIENT as exc:
            if clock() + delay > until:
                log.warning(
                    "[Manager.failures] round_id=%s proplet_id=%s: coordinator not told "
                    "before the round's deadline (%s); the deadline closes the round",
                    round_id,
                    proplet_id,
                    exc,
                )
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, retry_max_s)
            continue
        except PropellerError as exc:  # e.g. a manual task for a round nobody configured
            log.info(
                "[Manager.failures] round_id=%s proplet_id=%s: not recorded by the coordinator: %s",
                round_id,
                proplet_id,
                exc,
            )
            return
        log.info(
            "[Manager.failures] round_id=%s proplet_id=%s reported failed; round %s",
            round_id,
            proplet_id,
            state.value,
        )
        return
