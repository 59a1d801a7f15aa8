"""The one lifecycle (`server/lifecycle.py`): what opens is released in reverse order, on exit
and on a failure half-way through opening; background tasks end before what they use closes."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from server import lifecycle
from server.lifecycle import (
    Lifecycle,
    cancel_and_wait,
    for_serve,
    start_task,
    state_dir_from_env,
)


class Thing(Lifecycle):
    """Opens `parts` in order, logging each open and release; fails at `fail_at`."""

    def __init__(self, parts: list[str], fail_at: str = "") -> None:
        self.parts = parts
        self.fail_at = fail_at
        self.log: list[str] = []
        self.value: str | None = None

    @property
    def entered(self) -> str:
        return self._entered(self.value)

    async def _open(self, stack: AsyncExitStack) -> None:
        for part in self.parts:
            if part == self.fail_at:
                raise OSError(f"{part}: cannot open")
            self.log.append(f"open {part}")
            stack.callback(self.log.append, f"close {part}")
        self.value = "open"


async def test_exit_releases_in_reverse_order_once() -> None:
    thing = Thing(["store", "session", "channel"])
    with pytest.raises(RuntimeError, match=r"Thing: use it inside `async with`"):
        _ = thing.entered
    async with thing:
        assert thing.entered == "open"
    assert thing.log == [
        "open store",
        "open session",
        "open channel",
        "close channel",
        "close session",
        "close store",
    ]
    with pytest.raises(RuntimeError, match="inside `async with`"):
        _ = thing.entered
    await thing.aclose()  # idempotent
    assert len(thing.log) == 6


async def test_a_failure_while_opening_releases_what_was_opened() -> None:
    thing = Thing(["store", "session", "channel"], fail_at="channel")
    with pytest.raises(OSError, match="channel: cannot open"):
        async with thing:
            pytest.fail("the block must not run")
    assert thing.log == ["open store", "open session", "close session", "close store"]


async def test_background_tasks_end_before_what_was_opened_earlier_closes() -> None:
    events: list[str] = []

    async def tick() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            events.append("task ended")

    class WithTask(Lifecycle):
        async def _open(self, stack: AsyncExitStack) -> None:
            stack.callback(events.append, "store closed")
            start_task(stack, tick(), "tick")

    async with WithTask():
        await asyncio.sleep(0)
    assert events == ["task ended", "store closed"]


async def test_a_swallowed_cancellation_is_repeated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lifecycle, "RECANCEL_S", 0.05)
    cancels = 0

    async def stubborn() -> None:
        nonlocal cancels
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                cancels += 1
                if cancels >= 2:
                    raise

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    await cancel_and_wait(task)
    assert task.cancelled() and cancels == 2


async def test_a_failed_background_task_is_logged_and_the_rest_released(
    caplog: pytest.LogCaptureFixture,
) -> None:
    closed: list[str] = []

    async def crash() -> None:
        raise ValueError("boom")

    class Crashing(Lifecycle):
        async def _open(self, stack: AsyncExitStack) -> None:
            stack.callback(closed.append, "store")
            start_task(stack, crash(), "crasher")

    async with Crashing():
        await asyncio.sleep(0)
    assert closed == ["store"]
    assert "background task crasher failed" in caplog.text


@dataclass(frozen=True)
class Config:
    state_dir: Path | None = None


def test_state_dir_from_the_environment_and_for_serve(tmp_path: Path) -> None:
    assert state_dir_from_env({}) is None
    assert state_dir_from_env({"PROPELLER_STATE_DIR": ""}) is None
    assert state_dir_from_env({"PROPELLER_STATE_DIR": str(tmp_path)}) == tmp_path
    assert for_serve(Config(), "Svc") == Config(Path("propeller-fl-state"))
    assert for_serve(Config(tmp_path), "Svc") == Config(tmp_path)
