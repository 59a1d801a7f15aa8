"""The one bounded poll: tests wait for what a user would notice, never for a fixed time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")

POLL_S = 0.02


def _truthy(value: Any) -> bool:
    return bool(value)


async def eventually(
    probe: Callable[[], Awaitable[T]],
    done: Callable[[T], bool] = _truthy,
    *,
    timeout: float = 60.0,
    what: str = "condition",
) -> T:
    """Await `probe()` until `done(value)` holds (by default: the value is true), at most
    `timeout` seconds; returns that value. Fails naming `what` and showing the last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s; last value: {value!r}")
        await asyncio.sleep(POLL_S)
