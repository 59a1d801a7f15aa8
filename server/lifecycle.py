"""The one lifecycle of every long-lived thing: the service apps, the proplet, the stack runner,
the MQTT session and the embedded broker; and the service process around an app.

`async with thing:` runs `thing._open(stack)`, which opens what the thing owns in order and
registers the release of each piece on `stack` as it goes (`stack.enter_async_context(cm)`,
`stack.push_async_callback(close)`, `start_task(stack, coro, name)` for a background task).
Exit releases everything in reverse order; so does an exception half-way through `_open`,
which releases exactly what was opened so far and then propagates. What must happen first on
exit is registered last.

Background tasks go on the same stack rather than in an `asyncio.TaskGroup`: a task group waits
for its tasks at exit instead of cancelling them, and it cancels the task that entered it when
a child fails, which is not the task that exits it when a test fixture's set-up and tear-down
run in different tasks. On the stack a task's cancellation also takes its place in the order:
the coordinator's deadline task stops before its round store closes.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import Coroutine, Mapping
from contextlib import AsyncExitStack
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, Self, TypeVar

from server.config import TlsConfig, env_str
from server.grpc_server import ServiceBinding, serve_until_signal

if TYPE_CHECKING:
    from dataclasses import Field

log = logging.getLogger(__name__)

T = TypeVar("T")

# How long one cancellation of a background task is given before it is cancelled again: longer
# than the proplet's SHUTDOWN_GRACE_S (2 s), which its worker waits, once cancelled, for the
# running task to notice the stop and be reported Interrupted.
RECANCEL_S = 3.0

# Where `propeller-fl serve` keeps a service's state when PROPELLER_STATE_DIR is unset
# (relative to the working directory; see docs/configuration.md). Tests and the one-process
# modes build configs directly: a state_dir of None keeps the state in memory.
STATE_DIR_ENV = "PROPELLER_STATE_DIR"
DEFAULT_STATE_DIR = Path("propeller-fl-state")


class Lifecycle:
    """Async context manager base: subclasses implement `_open(stack)` (see the module
    docstring); `aclose()` (also what exit does) releases everything once."""

    _stack: AsyncExitStack | None = None
    _closing = False

    async def _open(self, stack: AsyncExitStack) -> None:
        """Open what the thing owns, registering each release on `stack` (default: nothing,
        as for the stateless aggregator)."""

    async def __aenter__(self) -> Self:
        self._closing = False
        async with AsyncExitStack() as stack:
            await self._open(stack)
            self._stack = stack.pop_all()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Release what `_open` opened, in reverse order. Idempotent."""
        self._closing = True
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()

    def _entered(self, value: T | None) -> T:
        """`value`, which `_open` sets; a RuntimeError before that and from the first step of
        the exit on (nothing reaches what is being released)."""
        if value is None or self._closing:
            raise RuntimeError(f"{type(self).__name__}: use it inside `async with`")
        return value


def start_task(
    stack: AsyncExitStack, coro: Coroutine[Any, Any, None], name: str
) -> asyncio.Task[None]:
    """Run `coro` in the background until `stack` closes; then it is cancelled and awaited."""
    task = asyncio.create_task(coro, name=name)
    stack.push_async_callback(cancel_and_wait, task)
    return task


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel `task` and wait for it to end; a failure it ended with is logged (everything else
    is still released). Cancels again while it keeps running: on Python 3.11
    `asyncio.wait_for` (used inside aiomqtt) can swallow a cancellation that arrives just as
    the awaited operation completes. A cancellation of the caller is not swallowed."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=RECANCEL_S)
    if not task.cancelled() and task.exception() is not None:
        log.error(
            "[lifecycle] background task %s failed", task.get_name(), exc_info=task.exception()
        )


class ServiceApp(Lifecycle, ABC):
    """A service's app: owns its state, background tasks and MQTT sessions between entry and
    exit, and its `bindings` (valid inside the block) go on any gRPC server."""

    @property
    @abstractmethod
    def bindings(self) -> list[ServiceBinding]: ...


def state_dir_from_env(env: Mapping[str, str]) -> Path | None:
    """PROPELLER_STATE_DIR as a config's `state_dir` (None when unset or empty)."""
    raw = env_str(env, STATE_DIR_ENV, "")
    return Path(raw) if raw else None


class _StateConfig(Protocol):
    """A frozen dataclass config with a `state_dir`."""

    __dataclass_fields__: ClassVar[dict[str, Field[Any]]]

    @property
    def state_dir(self) -> Path | None: ...


C = TypeVar("C", bound=_StateConfig)


def for_serve(config: C, service: str) -> C:
    """`config` as `propeller-fl serve` runs it: without a state directory, the default one
    (logged, resolved, under the service's name)."""
    if config.state_dir is None:
        config = replace(config, state_dir=DEFAULT_STATE_DIR)
    assert config.state_dir is not None
    log.info("[%s] state_dir=%s", service, config.state_dir.resolve())
    return config


async def run_service(app: ServiceApp, addr: str, tls: TlsConfig | None) -> None:
    """A service process's `main()`: enter `app`, serve its bindings on `addr` (mutual TLS
    with `tls`; None: plaintext) until SIGINT or SIGTERM, stop the server gracefully, then
    exit `app`."""
    async with app:
        await serve_until_signal(addr, app.bindings, tls)
