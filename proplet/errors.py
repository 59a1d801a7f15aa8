"""Why a task did not complete. Every step of running a task raises one of these with a
reason a user can act on; the proplet turns it into the task's Failed/Interrupted result."""

from __future__ import annotations


class TaskError(Exception):
    """Root of the proplet's task errors; `reason` is what the task result reports."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TaskFailed(TaskError):
    """The task could not run to completion (bad artifact, trap, limit, rejected update...)."""


class TaskInterrupted(TaskError):
    """The task was stopped on purpose (TaskStop, or the proplet shutting down)."""
