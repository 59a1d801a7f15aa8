"""The proplet: an edge agent that takes WASM tasks over MQTT and runs them in wasmtime.

Lifecycle (`async with Proplet(config) as p:`): connect to the broker, announce on
`control/proplet/create/{id}`, heartbeat on `control/proplet/alive/{id}`, and run the tasks
published on `control/manager/start/{id}` (addressed to this proplet) and on
`control/manager/start` (to any proplet), one at a time in arrival order. Each task reports
Running, then Completed (its results) or Failed (the reason) or Interrupted on
`control/proplet/results/{id}`, every report carrying the `attempt` of the start it answers. A
start is known by (task id, attempt): a repeated one is ignored (also once that attempt has
finished), a newer attempt of a queued task replaces it,
one of the running task waits in the queue until it ends. A task with ROUND_ID in its env is
a round task (see `proplet.federated`). Nothing a task or a message does can take the proplet
down. With TLS, the proplet is who its certificate says (`MqttConfig.tls`): the broker lets it
publish only on its own topics.

Results survive a broker that dies (kill -9 included): each result is kept until the manager
acknowledges it (`ResultAck` on `control/manager/ack/{id}`, once the result is on the
manager's disk) and sent again every `result_resend_s` and after every reconnection until
then; the manager applies a repeat as a no-op. Results go out in order through one reporter
task, so neither a task's start nor the next task waits for the broker. The MQTT session is
persistent (clean_session=False): task starts published while the proplet was down are
delivered when it reconnects, and the announcement is repeated after every reconnection.
Unacknowledged results are kept in memory only: a proplet that restarts loses them (the
manager then interrupts the task at its deadline).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import math
import platform
import signal
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Iterable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from proplet.artifacts import ArtifactStore
from proplet.config import PropletConfig
from proplet.errors import TaskError, TaskFailed, TaskInterrupted
from proplet.federated import (
    FederatedClient,
    FlInputs,
    FlTask,
    is_federated,
    summary,
)
from proplet.runner import CompiledModule, Invocation, RunControl, WasmRuntime
from proplet.task_output import parse_evaluation, parse_update
from server import metrics, tracing
from server.lifecycle import Lifecycle, start_task
from server.messages import (
    COMPLETED,
    FAILED,
    INTERRUPTED,
    RUNNING,
    PropletAnnounce,
    ResultAck,
    TaskResult,
    TaskStart,
    TaskStop,
)
from server.mqtt import MqttSession
from server.tensors import offload_if_big

log = logging.getLogger(__name__)

A = TypeVar("A")
B = TypeVar("B")
M = TypeVar("M")

# How long shutdown waits for a running task to notice it was stopped, and for the last
# results to be acknowledged.
SHUTDOWN_GRACE_S = 2.0
# How many results wait for their acknowledgement at most (the oldest is given up on beyond),
# and how many finished attempts are remembered (a start sent again for one is not run again).
MAX_UNACKED = 1024
MAX_REMEMBERED = 4096

ResultKey = tuple[str, int, str]  # (task id, attempt, state)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@dataclass
class _Running:
    start: TaskStart
    control: RunControl = field(default_factory=RunControl)
    job: asyncio.Task[str] | None = None
    stop_reason: str | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        self.control.interrupt(reason)
        if self.job is not None:
            self.job.cancel()


class Proplet(Lifecycle):
    """Async context manager; `stop()` (also called on exit) takes the device offline:
    heartbeats end at once, queued and running tasks are reported Interrupted."""

    def __init__(self, config: PropletConfig, *, runtime: WasmRuntime | None = None) -> None:
        self.config = config
        self.runtime = runtime or WasmRuntime.shared()
        self.artifacts = ArtifactStore(config)
        self.federated = FederatedClient(
            config.proplet_id, config.rpc_timeout_s, backoff=config.backoff, tls=config.tls
        )
        self.topics = config.mqtt.topics
        self._session: MqttSession | None = None
        self._pending: OrderedDict[str, TaskStart] = OrderedDict()
        self._wakeup = asyncio.Event()
        self._current: _Running | None = None
        # Results not acknowledged yet, oldest first; those due to be published, in order;
        # when each was last published.
        self._unacked: OrderedDict[ResultKey, TaskResult] = OrderedDict()
        self._due: OrderedDict[ResultKey, None] = OrderedDict()
        self._sent_at: dict[ResultKey, float] = {}
        self._has_due = asyncio.Event()
        self._all_acked = asyncio.Event()
        self._all_acked.set()
        # The last finished attempt per task id.
        self._finished: OrderedDict[str, int] = OrderedDict()

    @property
    def proplet_id(self) -> str:
        return self.config.proplet_id

    @property
    def running_task(self) -> str | None:
        """Id of the task running now, if any."""
        return self._current.start.id if self._current is not None else None

    @property
    def queued_tasks(self) -> list[str]:
        return list(self._pending)

    @property
    def unacknowledged(self) -> list[TaskResult]:
        """The results the manager has not acknowledged yet, oldest first."""
        return list(self._unacked.values())

    def metadata(self) -> dict[str, str]:
        return {
            "os": platform.system().lower(),
            "arch": platform.machine(),
            "python": platform.python_version(),
            "runtime": "wasmtime",
            "wasmtime": _version("wasmtime"),
            "version": _version("propeller-fl"),
            "memory_limit_bytes": str(self.config.memory_limit_bytes),
            "task_timeout_s": f"{self.config.task_timeout_s:g}",
        }

    # ------------------------------------------------------------------ lifecycle

    async def _open(self, stack: AsyncExitStack) -> None:
        """Registered in the reverse of the order `stop()` releases them: heartbeats end,
        queued tasks are reported Interrupted, the running one is interrupted, the last
        results go out and are acknowledged (for up to SHUTDOWN_GRACE_S), then the gRPC
        channels, the artifact store and the MQTT session close."""
        stack.callback(log.info, "[Proplet] id=%s stopped", self.proplet_id)
        session = self._session = await stack.enter_async_context(
            MqttSession(
                self.config.mqtt,
                client_id=f"proplet-{self.proplet_id}",
                # Its own start, stop and ack topics; the shared ones for broadcasts.
                subscriptions=self.topics.proplet_subscriptions(self.proplet_id),
                handler=self._on_message,
            )
        )
        stack.callback(self._forget_session)
        stack.callback(self.artifacts.close)
        stack.push_async_callback(self.federated.close)
        await self._announce()
        start_task(stack, self._reporter(session), f"results-{self.proplet_id}")
        start_task(stack, self._resender(session), f"resend-{self.proplet_id}")
        stack.push_async_callback(self._flush_results)
        start_task(stack, self._work(), f"proplet-{self.proplet_id}")
        stack.callback(self._drop_queue)
        start_task(stack, self._heartbeat(session), f"heartbeat-{self.proplet_id}")
        log.info(
            "[Proplet] id=%s up: broker=%s:%d namespace=%s",
            self.proplet_id,
            self.config.mqtt.host,
            self.config.mqtt.port,
            self.topics.base,
        )

    async def stop(self) -> None:
        """Go offline: stop heartbeats, interrupt the running task, drop the queue (each
        reported Interrupted), close the MQTT session and the gRPC channels. Idempotent."""
        await self.aclose()

    def _drop_queue(self) -> None:
        dropped = list(self._pending.values())
        self._pending.clear()
        for start in dropped:
            self._report(start, INTERRUPTED, error="interrupted: proplet shutting down")

    async def _flush_results(self) -> None:
        """The last results (Interrupted ones included) go out, and are acknowledged, if the
        broker and the manager are there."""
        try:
            async with asyncio.timeout(SHUTDOWN_GRACE_S):
                await self._all_acked.wait()
        except TimeoutError:
            log.warning(
                "[Proplet] id=%s %d task results not acknowledged before shutdown",
                self.proplet_id,
                len(self._unacked),
            )

    def _forget_session(self) -> None:
        self._session = None

    # ------------------------------------------------------------------ MQTT

    async def _announce(self) -> None:
        assert self._session is not None
        announce = PropletAnnounce(self.proplet_id, self.config.name, self.metadata())
        await self._session.publish(
            self.topics.proplet_create_for(self.proplet_id), announce.to_json()
        )

    async def _heartbeat(self, session: MqttSession) -> None:
        loop = asyncio.get_running_loop()
        interval = self.config.heartbeat_s
        next_beat = loop.time()
        seen_connects = session.connects
        while not self._closing:
            try:
                if session.connects != seen_connects:
                    # Reconnected: the manager may have restarted too, so introduce ourselves
                    # again rather than rely on it remembering us.
                    seen_connects = session.connects
                    await self._announce()
                status = {
                    "state": "running" if self._current is not None else "idle",
                    "task_id": self.running_task or "",
                    "queued": str(len(self._pending)),
                }
                beat = PropletAnnounce(self.proplet_id, self.config.name, status)
                await session.publish(
                    self.topics.proplet_alive_for(self.proplet_id), beat.to_json(), timeout=interval
                )
            except Exception as exc:  # a missed heartbeat is logged; the next one may work
                log.warning("[Proplet.heartbeat] id=%s failed: %s", self.proplet_id, exc)
            next_beat += interval
            await asyncio.sleep(max(0.0, next_beat - loop.time()))

    async def _on_message(self, topic: str, payload: bytes) -> None:
        t = self.topics
        if t.is_task_start(topic):
            if (start := self._parsed("task start", TaskStart.from_json, payload)) is not None:
                self._accept(start)
        elif t.is_task_stop(topic):
            if (stop := self._parsed("task stop", TaskStop.from_json, payload)) is not None:
                self._stop_task(stop)
        elif (
            topic == t.result_ack_for(self.proplet_id)
            and (ack := self._parsed("result ack", ResultAck.from_json, payload)) is not None
        ):
            self._acknowledged(ack)

    def _parsed(self, what: str, parse: Callable[[bytes], M], payload: bytes) -> M | None:
        """`parse(payload)`, or None (logged) for a malformed one."""
        try:
            return parse(payload)
        except ValueError as exc:
            log.warning("[Proplet] id=%s dropped malformed %s: %s", self.proplet_id, what, exc)
            return None

    def _accept(self, start: TaskStart) -> None:
        if start.proplet_id and start.proplet_id != self.proplet_id:
            return  # addressed to another proplet
        if self._closing:
            return
        if self._finished.get(start.id, 0) >= start.attempt > 0:
            # Sent again (the manager has no result yet: a broker outage): not run twice; its
            # result is being sent again until acknowledged.
            log.info(
                "[Proplet] id=%s task=%s attempt=%d already ran; ignored",
                self.proplet_id,
                start.id,
                start.attempt,
            )
            return
        held = [s for s in (self._pending.get(start.id), self._running_start()) if s is not None]
        if any(s.id == start.id and s.attempt >= start.attempt for s in held):
            # A redelivered start, or one overtaken by a newer attempt we already hold.
            log.info(
                "[Proplet] id=%s task=%s attempt=%d already queued or running",
                self.proplet_id,
                start.id,
                start.attempt,
            )
            return
        superseded = self._pending.get(start.id)
        # A newer attempt of a queued task takes its place in the queue; one of the running
        # task queues behind it.
        self._pending[start.id] = start
        if superseded is not None:
            self._report(
                superseded,
                INTERRUPTED,
                error=f"interrupted: superseded by attempt {start.attempt}",
            )
        self._wakeup.set()
        log.info(
            "[Proplet] id=%s task=%s attempt=%d queued (%d waiting)",
            self.proplet_id,
            start.id,
            start.attempt,
            len(self._pending),
        )

    def _running_start(self) -> TaskStart | None:
        return self._current.start if self._current is not None else None

    def _stop_task(self, stop: TaskStop) -> None:
        if stop.proplet_id and stop.proplet_id != self.proplet_id:
            return
        queued = self._pending.pop(stop.id, None)
        if queued is not None:
            log.info("[Proplet] id=%s task=%s dropped from the queue", self.proplet_id, stop.id)
            self._report(queued, INTERRUPTED, error="interrupted: stopped before it started")
        if self._current is not None and self._current.start.id == stop.id:
            log.info("[Proplet] id=%s task=%s stopping", self.proplet_id, stop.id)
            self._current.stop("stopped by request")

    def _report(self, start: TaskStart, state: str, results: str = "", error: str = "") -> None:
        """Queue a result of the run `start` asked for (published in the order queued, and
        again until the manager acknowledges it)."""
        if self._session is None:
            return
        key = (start.id, start.attempt, state)
        result = TaskResult(
            start.id, self.proplet_id, state, results=results, error=error, attempt=start.attempt
        )
        self._unacked[key] = result
        self._all_acked.clear()
        while len(self._unacked) > MAX_UNACKED:
            key, dropped = self._unacked.popitem(last=False)
            self._forget(key)
            log.warning(
                "[Proplet] id=%s task=%s attempt=%d: result %s never acknowledged; given up",
                self.proplet_id,
                dropped.task_id,
                dropped.attempt,
                dropped.state,
            )
        if state != RUNNING:
            self._finished[start.id] = max(start.attempt, self._finished.pop(start.id, 0))
            while len(self._finished) > MAX_REMEMBERED:
                self._finished.popitem(last=False)
        self._make_due(key)

    def _make_due(self, key: ResultKey) -> None:
        self._due[key] = None
        self._has_due.set()

    def _forget(self, key: ResultKey) -> None:
        self._due.pop(key, None)
        self._sent_at.pop(key, None)
        if not self._unacked:
            self._all_acked.set()

    def _acknowledged(self, ack: ResultAck) -> None:
        key = (ack.task_id, ack.attempt, ack.state)
        if self._unacked.pop(key, None) is not None:
            self._forget(key)

    def _send_again(self, keys: Iterable[ResultKey]) -> None:
        """Publish these unacknowledged results again, now."""
        for key in list(keys):
            self._make_due(key)

    async def _reporter(self, session: MqttSession) -> None:
        """Publishes the due results in order; one that cannot be published now is due again
        at the next `_resender` pass."""
        timeout = self.config.result_resend_s
        while True:
            await self._has_due.wait()
            if not self._due:
                self._has_due.clear()
                continue
            key, _ = self._due.popitem(last=False)
            result = self._unacked.get(key)
            if result is None:  # acknowledged meanwhile
                continue
            try:
                await session.publish(
                    self.topics.proplet_results_for(self.proplet_id),
                    result.to_json(),
                    timeout=timeout,
                )
                self._sent_at[key] = time.monotonic()
            except Exception as exc:
                log.warning(
                    "[Proplet] id=%s task=%s could not report %s (sent again later): %s",
                    self.proplet_id,
                    result.task_id,
                    result.state,
                    exc,
                )

    async def _resender(self, session: MqttSession) -> None:
        """Every `result_resend_s`, makes due again each result published that long ago and
        not acknowledged yet; after a reconnection, every one at once (the broker may have
        lost them, and the manager's acknowledgements)."""
        interval = self.config.result_resend_s
        connects = session.connects
        while True:
            await asyncio.sleep(interval)
            if session.connects != connects:
                connects = session.connects
                self._send_again(self._unacked)
            else:
                cutoff = time.monotonic() - interval
                self._send_again(
                    k for k in self._unacked if self._sent_at.get(k, -math.inf) <= cutoff
                )

    # ------------------------------------------------------------------ tasks

    async def _work(self) -> None:
        while not self._closing:
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            _, start = self._pending.popitem(last=False)
            await self._run_task(start)

    async def _run_task(self, start: TaskStart) -> None:
        running = _Running(start)
        self._current = running
        started = time.perf_counter()
        job: asyncio.Task[str] | None = None
        try:
            self._report(start, RUNNING)
            attributes = self._span_attributes(start)
            traced = tracing.task_run(start.traceparent, attributes, self._execute(running))
            job = asyncio.create_task(traced, name=f"task-{start.id}")
            running.job = job
            if running.stop_reason is not None:  # stopped while its Running report was in flight
                job.cancel()
            await asyncio.wait({job})
        except asyncio.CancelledError:  # the proplet is shutting down
            running.stop("proplet shutting down")
            if job is not None:
                await asyncio.wait({job}, timeout=SHUTDOWN_GRACE_S)
            self._current = None
            self._report(start, INTERRUPTED, error="interrupted: proplet shutting down")
            raise
        self._current = None
        state, results, error = self._outcome(running, job)
        t = running.timings
        log.info(
            "[Proplet] id=%s task=%s %s in %.1f ms (fetch %.1f, compile %.1f, run %.1f)%s",
            self.proplet_id,
            start.id,
            state,
            (time.perf_counter() - started) * 1000,
            t.get("fetch_ms", 0.0),
            t.get("compile_ms", 0.0),
            t.get("run_ms", 0.0),
            f": {error}" if error else "",
        )
        self._report(start, state, results=results, error=error)

    def _span_attributes(self, start: TaskStart) -> dict[str, str]:
        return {
            "propeller.task_id": start.id,
            "propeller.proplet_id": self.proplet_id,
            "propeller.round_id": start.env.get("ROUND_ID", ""),
        }

    def _outcome(self, running: _Running, job: asyncio.Task[str]) -> tuple[str, str, str]:
        if job.cancelled():
            return INTERRUPTED, "", f"interrupted: {running.stop_reason or 'cancelled'}"
        exc = job.exception()
        if exc is None:
            return COMPLETED, job.result(), ""
        if isinstance(exc, TaskInterrupted):
            return INTERRUPTED, "", exc.reason
        if isinstance(exc, TaskFailed):
            return FAILED, "", exc.reason
        log.error(
            "[Proplet] id=%s task=%s crashed",
            self.proplet_id,
            running.start.id,
            exc_info=exc,
        )
        return FAILED, "", f"internal error: {type(exc).__name__}: {exc}"

    async def _execute(self, running: _Running) -> str:
        start = running.start
        fl: FlTask | None = None
        deadline = 0.0
        if is_federated(start.env):
            fl = FlTask.from_env(start.env, self.config.endpoints)
            # Until when the round's services are retried: the round's deadline, else the
            # task timeout from now.
            deadline = fl.retry_deadline(self.config.task_timeout_s)
        t0 = time.perf_counter()
        inputs: FlInputs | None = None
        if fl is None:
            compiled = await self._load(running)
        else:
            compiled, inputs = await _both(
                self._load(running), self.federated.fetch_inputs(fl, deadline)
            )
        prepare_ms = (time.perf_counter() - t0) * 1000
        running.timings["fetch_ms"] = prepare_ms - running.timings.get("compile_ms", 0.0)
        # A round task runs its round's module and no other (MODULE_DIGEST).
        module = fl.check_module(compiled.sha256) if fl is not None else ""
        env, stdin = dict(start.env), b""
        if fl is not None and inputs is not None:
            env, stdin = await inputs.invocation_inputs(
                compiled.contract, fl.module_env(start.env), self.proplet_id
            )
        limits = self.config.limits
        if fl is not None and fl.fuel_budget:
            # The round's budget, never above the proplet's own.
            limits = replace(limits, fuel=min(limits.fuel, fl.fuel_budget))
        invocation = Invocation([start.name or start.id, *start.cli_args], env, limits, stdin)
        t1 = time.perf_counter()
        try:
            out = await self.runtime.run(compiled, invocation, running.control)
        finally:
            running.timings["run_ms"] = (time.perf_counter() - t1) * 1000
        if fl is None or inputs is None:
            return out.stdout.decode(errors="replace")
        if fl.evaluates:
            # Federated evaluation: the metrics are the result; the coordinator gets nothing.
            return parse_evaluation(out.stdout, inputs.dataset_size, compiled.contract)
        update = await offload_if_big(
            len(out.stdout),
            parse_update,
            out.stdout,
            fl,
            self.proplet_id,
            inputs.model,
            inputs.dataset_size,
            base_sha256=inputs.model_sha256,
            module_digest=module,
            contract=compiled.contract,
            fuel_consumed=out.fuel_consumed,
        )
        metrics.phase_took("training", t0)
        upload_began = time.perf_counter()
        response = await self.federated.submit(fl, update, deadline)
        metrics.phase_took("upload", upload_began)
        return summary(update, response)

    async def _load(self, running: _Running) -> CompiledModule:
        """The task's module compiled: from memory when this process already compiled it."""
        start = running.start

        def have(sha256: str) -> bool:
            return self.runtime.cached(sha256) is not None

        artifact = await self.artifacts.fetch(start, have)
        compiled = self.runtime.cached(artifact.sha256)
        if compiled is not None:
            return compiled
        data = artifact.data
        if data is None:  # evicted since `have` said yes: fetch the bytes after all
            data = (await self.artifacts.fetch(start)).data
            assert data is not None
        t0 = time.perf_counter()
        compiled = await asyncio.to_thread(self.runtime.compile, data, artifact.sha256)
        running.timings["compile_ms"] = (time.perf_counter() - t0) * 1000
        return compiled


async def _both(first: Coroutine[Any, Any, A], second: Coroutine[Any, Any, B]) -> tuple[A, B]:
    """Run two steps concurrently; the first to fail cancels the other and its error is raised
    as is (not wrapped in an ExceptionGroup) so it becomes the task's reason."""
    try:
        async with asyncio.TaskGroup() as tg:
            a = tg.create_task(first)
            b = tg.create_task(second)
    except* TaskError as group:
        raise group.exceptions[0] from None
    return a.result(), b.result()


async def main() -> None:
    """Run one proplet from the environment until SIGINT or SIGTERM."""
    config = PropletConfig.from_env()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with Proplet(config):
        await stop.wait()
