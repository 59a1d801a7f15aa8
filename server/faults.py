"""Crash points, for the crash tests only: a service kills itself with SIGKILL at a named
point of its code, so a test can show what a restart recovers from that exact moment.

`PROPELLER_TEST_KILL_AT=POINT` (or `POINT:N`, the N-th time the point is passed; 1 by
default) in a service's environment arms one point; nothing else reads the variable, and
without it `crash_point` does nothing (the default, in every deployment). It is read from the
process environment the first time a point is passed, not through a service's configuration:
it is no setting a user has, and `docs/configuration.md` does not list it.

The points (each where a crash used to lose something; `docs/reliability.md` has the test of
each):

- `manager.before_record`: StartExperiment checked the request and chose the participants;
  nothing is recorded yet.
- `manager.round_configured`: StartExperiment recorded the experiment and configured its round
  on the coordinator, and has not started the round.
- `manager.round_started`: the round is open; no task of the experiment exists yet.
- `manager.task_start_published`: a task start was published (count them with `:N`).
- `manager.round_outcome_recorded`: an experiment's round finished and its outcome is
  recorded; the next round is not planned yet (`server/manager/driver.py`).
- `manager.next_round_recorded`: an experiment's next round (participants, task ids) is
  recorded; nothing of it has left the manager.
- `coordinator.deadline_claimed`: a coordinator replica (on PostgreSQL) leased due rounds to
  itself (their deadline, or an aggregation whose replica's lease expired) and has done
  nothing with them yet.
- `coordinator.aggregation_claimed`: a coordinator replica holds the lease of a round's
  aggregation and has not begun it.
- `coordinator.model_stored`: the round's new version and its lineage are in the registry;
  the round's completion (and its experiment's new strategy state) is not committed yet.
- `coordinator.round_completed`: the round's COMPLETED record and its notification are
  committed; the notification is not published yet.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from dataclasses import dataclass

log = logging.getLogger(__name__)

KILL_AT_ENV = "PROPELLER_TEST_KILL_AT"


@dataclass
class _Armed:
    point: str
    at: int
    passed: int = 0


_armed: _Armed | None = None
_read = False


def _parse(text: str) -> _Armed | None:
    point, _, count = text.strip().partition(":")
    if not point:
        return None
    return _Armed(point, int(count) if count else 1)


def crash_point(point: str) -> None:
    """Kill this process with SIGKILL if `point` is the armed one and this is its N-th pass;
    otherwise nothing."""
    global _armed, _read
    if not _read:
        _armed, _read = _parse(os.environ.get(KILL_AT_ENV, "")), True
    armed = _armed
    if armed is None or armed.point != point:
        return
    armed.passed += 1
    if armed.passed < armed.at:
        return
    log.critical("[faults] point=%s pass=%d: killing this process (SIGKILL)", point, armed.passed)
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
