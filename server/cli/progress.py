"""Live progress of a federated round on stderr, driven by `Coordinator.WatchRound` events;
and of an experiment (`ExperimentView`: its rounds' table and the round in flight's bar).

On a terminal (stdout and stderr both TTYs, TERM not "dumb") one status line is redrawn in
place as updates arrive; otherwise each event is one plain line, so logs and pipes stay
readable.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import TextIO

from propeller.v1 import coordinator_pb2, manager_pb2
from server.cli.render import render_experiment_rounds

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


_FINISHED = (_ST.ROUND_STATE_COMPLETED, _ST.ROUND_STATE_FAILED)


class ExperimentView:
    """`experiment run --watch` on a terminal: the table of the experiment's rounds so far
    (as `experiment history` shows it) with, under it, a progress bar of the round in flight
    (updates received of its k), redrawn in place with plain ANSI (cursor up, erase down) as
    events arrive. Off a terminal the command prints a line per event instead (`is_live`)."""

    def __init__(self, stream: TextIO, total_rounds: int, width: int = 0) -> None:
        self.stream = stream
        # Lines are cut to the terminal's width: a wrapped line would take two rows, and the
        # redraw moves up by rows.
        self.width = width or shutil.get_terminal_size((100, 24)).columns
        self.total = max(1, total_rounds)
        self.rounds: dict[int, manager_pb2.ExperimentRound] = {}
        # The round in flight: its index and id, its k, the updates received so far.
        self.current: tuple[int, str] | None = None
        self.k_of_n = 0
        self.received = 0
        self.started = time.monotonic()
        self._drawn = 0  # lines the last render wrote

    def on_experiment_event(self, ev: manager_pb2.ExperimentEvent) -> None:
        kind = ev.type
        if kind == manager_pb2.EXPERIMENT_EVENT_TYPE_SNAPSHOT:
            self.total = max(1, ev.experiment.config.rounds or 1)
            for r in ev.experiment.rounds:
                self.rounds[r.index] = r
            # A watch that starts mid-round: that round is in flight.
            last = max(self.rounds, default=0)
            running = ev.experiment.state == manager_pb2.EXPERIMENT_STATE_RUNNING
            if running and last and self.rounds[last].state not in _FINISHED:
                self._start(self.rounds[last])
        elif kind == manager_pb2.EXPERIMENT_EVENT_TYPE_ROUND_STARTED:
            self.rounds[ev.round.index] = ev.round
            self._start(ev.round)
        elif kind in (
            manager_pb2.EXPERIMENT_EVENT_TYPE_ROUND_FINISHED,
            manager_pb2.EXPERIMENT_EVENT_TYPE_ROUND_EVALUATED,
        ):
            self.rounds[ev.round.index] = ev.round
            if self.current is not None and self.current[0] == ev.round.index:
                self.current = None
        elif kind == manager_pb2.EXPERIMENT_EVENT_TYPE_ENDED:
            self.current = None
        self.render()

    def _start(self, rnd: manager_pb2.ExperimentRound) -> None:
        self.current = (rnd.index, rnd.round_id)
        self.k_of_n = len(rnd.sampled)
        self.received = len(rnd.reported)
        self.started = time.monotonic()

    @property
    def round_in_flight(self) -> str:
        """The id of the round in flight ("" when none)."""
        return "" if self.current is None else self.current[1]

    def on_round_event(self, round_id: str, ev: coordinator_pb2.RoundEvent) -> None:
        """A WatchRound event of the round in flight (others are late: ignored)."""
        if self.current is None or self.current[1] != round_id:
            return
        if ev.status.k_of_n:
            self.k_of_n = ev.status.k_of_n
        self.received = len(ev.status.reported)
        self.render()

    def lines(self) -> list[str]:
        rows = [self.rounds[i] for i in sorted(self.rounds)]
        out = render_experiment_rounds(rows).splitlines()
        if self.current is not None:
            index, round_id = self.current
            k = max(1, self.k_of_n)
            done = min(self.received, k)
            width = min(k, 40)
            filled = done * width // k
            bar = "#" * filled + "-" * (width - filled)
            elapsed = time.monotonic() - self.started
            out.append(
                f"round {index}/{self.total} {round_id}  [{bar}] {self.received}/{self.k_of_n} "
                f"updates  {elapsed:.1f}s"
            )
        return out

    def render(self) -> None:
        """Erase what the last render drew, then draw the table and the bar again."""
        text = "\n".join(line[: self.width - 1] for line in self.lines()) + "\n"
        erase = f"\x1b[{self._drawn}F\x1b[J" if self._drawn else ""
        self.stream.write(erase + text)
        self.stream.flush()
        self._drawn = text.count("\n")
