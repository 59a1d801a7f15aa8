"""Live progress of a federated round on stderr, driven by `Coordinator.WatchRound` events.

On a terminal (stdout and stderr both TTYs, TERM not "dumb") one status line is redrawn in
place as updates arrive; otherwise each event is one plain line, so logs and pipes stay
readable.
"""

from __future__ import annotations

import os
import time
from typing import TextIO

from propeller.v1 import coordinator_pb2

_EV = coordinator_pb2.RoundEventType
_ST = coordinator_pb2.RoundState


def is_live(stdout: TextIO, stderr: TextIO) -> bool:
    """Whether to redraw a status line in place rather than print plain lines."""
    if os.environ.get("TERM", "") == "dumb":
        return False
    return _isatty(stdout) and _isatty(stderr)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or not a real file
        return False


class StatusLine:
    """One line of status: redrawn in place when live, appended as plain lines otherwise."""

    def __init__(self, stream: TextIO, live: bool) -> None:
        self.stream = stream
        self.live = live
        self._shown = False

    def show(self, text: str) -> None:
        if self.live:
            self.stream.write("\r" + text + "\x1b[K")
            self._shown = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def clear(self) -> None:
        """Remove the live line (before printing something permanent)."""
        if self.live and self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = False


class RoundProgress:
    """What one round looks like so far; `on_event` renders each WatchRound event."""

    def __init__(
        self, line: StatusLine, index: int, total: int, round_id: str, participants: int
    ) -> None:
        self.line = line
        self.label = f"round {index}/{total} {round_id}"
        self.participants = participants
        self.k_of_n = participants
        self.reported: list[str] = []
        self.phase = "starting"
        self.started = time.monotonic()

    def on_event(self, event: coordinator_pb2.RoundEvent) -> None:
        status = event.status
        if status.k_of_n:
            self.k_of_n = status.k_of_n
        if status.participants:
            self.participants = len(status.participants)
        self.reported = list(status.reported)
        self.phase = _phase(status)
        if self.line.live:
            self.render()
            return
        kind = event.type
        if kind == _EV.ROUND_EVENT_TYPE_UPDATE_ACCEPTED:
            self.line.show(
                f"{self.label}: update from {event.proplet_id} ({len(self.reported)}/{self.k_of_n})"
            )
        elif kind == _EV.ROUND_EVENT_TYPE_COMPLETED:
            self.line.show(
                f"{self.label}: completed -> v{status.new_model_version} "
                f"({len(self.reported)}/{self.k_of_n} reported, closed by {status.closed_by})"
            )
        elif kind == _EV.ROUND_EVENT_TYPE_FAILED:
            self.line.show(f"{self.label}: failed: {status.failure_reason}")
        else:
            self.line.show(
                f"{self.label}: {self.phase}, {len(self.reported)}/{self.k_of_n} updates "
                f"of {self.participants} participants"
            )

    def render(self) -> None:
        """Redraw the live line (also called on a timer so the clock moves)."""
        if not self.line.live:
            return
        k = max(self.k_of_n, 1)
        done = min(len(self.reported), k)
        bar = "#" * done + "-" * (k - done)
        elapsed = time.monotonic() - self.started
        self.line.show(
            f"{self.label}  [{bar}] {len(self.reported)}/{self.k_of_n} updates  "
            f"{self.phase}  {elapsed:.1f}s"
        )


def _phase(status: coordinator_pb2.RoundStatus) -> str:
    return {
        _ST.ROUND_STATE_PENDING: "pending",
        _ST.ROUND_STATE_OPEN: "training",
        _ST.ROUND_STATE_AGGREGATING: "aggregating",
        _ST.ROUND_STATE_COMPLETED: "completed",
        _ST.ROUND_STATE_FAILED: "failed",
    }.get(status.state, "unknown")
