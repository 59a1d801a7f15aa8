"""Runs WASI modules in wasmtime with limits, off the event loop.

One `WasmRuntime` per process (`WasmRuntime.shared()`): one `Engine`, one WASI `Linker`, and
an in-memory cache of compiled modules keyed by the sha256 of their bytes, so any number of
proplets in the process compile a module once and start it warm afterwards.

Each run gets a fresh `Store` with:
- limits that are totals for the run (`Store.set_limits`): one instance, one linear memory, at
  most `Limits.tables` tables, and `Limits.memory_bytes` for the linear memory and the tables
  together. wasmtime caps each memory and each table on its own, so the totals come from the
  counts: the one memory may grow to `memory_bytes` less the tables' share
  (`table_elements` x 8 bytes), and the tables share `table_elements` between them.
  `memory.grow` returns -1 at the cap; when the module then fails (trap, abort, exit
  non-zero) with its memory close to the cap, the reason says "memory limit exceeded"
  (wasmtime does not report the refused growth itself). The engine refuses the GC and
  exception-handling proposals: their objects live in a heap of their own that the store
  would cap separately, a second budget of the same size;
- epoch interruption (the run's deadline, its stop request and its output cap checked at
  every tick), stdout captured up to the output cap, a stderr tail, and WASI's blocking calls
  bounded by the deadline: the host side, in `proplet.sandbox`;
- fuel metering (`Config.consume_fuel`): the store starts with `Limits.fuel` units, wasmtime
  takes about one per wasm instruction executed (host calls cost none), and the run's
  `fuel_consumed` is the budget less what remains, whatever the outcome. A run that spends its
  whole budget traps and fails with "fuel budget of N exhausted". For the same module and the
  same inputs the count is the same on every run (it counts instructions, not time): the
  update header carries it, signed (docs/verifiability.md). `WasmRuntime(metering=False)` is
  an engine without it (fuel checks are compiled into the code, so the two cannot share
  compiled modules), kept for the benchmark that measures what metering costs.

As a last resort, a run still inside a host call `HARD_DEADLINE_GRACE_S` after its deadline is
abandoned and reported as timed out; while `MAX_ABANDONED_RUNS` such threads linger in a
runtime, new runs fail at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import wasmtime

from proplet.errors import TaskFailed, TaskInterrupted
from proplet.sandbox import EpochTicker, Run, RunControl, define_bounded_wasi, set_stdin
from server import metrics, tracing

# RunControl is part of the runner's interface (`WasmRuntime.run`), kept importable from here.
__all__ = [
    "CONTRACT_V2_EXPORT",
    "DEFAULT_FUEL",
    "HARD_DEADLINE_GRACE_S",
    "MAX_ABANDONED_RUNS",
    "STOP_GRACE_S",
    "CompiledModule",
    "Invocation",
    "Limits",
    "RunControl",
    "RunOutput",
    "WasmRuntime",
]

log = logging.getLogger(__name__)

# How long a run may overstay its deadline (stuck in a host call) before it is abandoned.
HARD_DEADLINE_GRACE_S = 2.0
# How long a stopped run may take to leave wasm before the caller stops waiting for it.
STOP_GRACE_S = 2.0
# How many abandoned runs (threads stuck in a host call past their deadline) a runtime keeps
# before it refuses new runs.
MAX_ABANDONED_RUNS = 4
WASM_PAGE = 65536
# A run's fuel budget when nothing smaller is set (PROPLET_FUEL_LIMIT 0, a round without
# fuel_budget): 10^15 units. The trainers spend 0.8-4.8 x 10^10 units a CPU second here
# (docs/benchmarks.md, wasm-fuel), so that is about six hours of CPU or more: the task's timeout
# ends a run long before this does. Below 2^63 so any count fits a signed
# 64-bit column.
DEFAULT_FUEL = 10**15
MAX_FUEL = 2**63 - 1
# What one table element costs (wasmtime: a pointer).
TABLE_ELEMENT_BYTES = 8


@dataclass(frozen=True)
class Limits:
    """What one run may consume, in all: `memory_bytes` covers its linear memory and its
    tables together (`table_elements` over all its tables, 8 bytes each); `fuel` its
    instructions (a metering runtime's)."""

    timeout_s: float = 300.0
    memory_bytes: int = 256 << 20
    output_bytes: int = 16 << 20
    table_elements: int = 1 << 16
    tables: int = 1
    # Fuel units one run may consume (about one per wasm instruction executed).
    fuel: int = DEFAULT_FUEL

    def __post_init__(self) -> None:
        if not 0 < self.fuel <= MAX_FUEL:
            raise ValueError(f"fuel: {self.fuel} must be between 1 and {MAX_FUEL}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s: {self.timeout_s} must be > 0")
        if self.output_bytes <= 0:
            raise ValueError(f"output_bytes: {self.output_bytes} must be > 0")
        if self.tables < 1:
            raise ValueError(f"tables: {self.tables} must be >= 1")
        if self.table_elements < self.tables:
            raise ValueError(
                f"table_elements: {self.table_elements} must be >= tables ({self.tables})"
            )
        least = WASM_PAGE + self.table_bytes
        if self.memory_bytes < least:
            raise ValueError(
                f"memory_bytes: {self.memory_bytes} must be >= {least} (one wasm page and "
                f"{self.table_elements} table elements)"
            )

    @property
    def table_bytes(self) -> int:
        """The tables' share of `memory_bytes`."""
        return self.table_elements * TABLE_ELEMENT_BYTES

    @property
    def linear_memory_bytes(self) -> int:
        """How far the run's one linear memory may grow."""
        return self.memory_bytes - self.table_bytes

    @property
    def elements_per_table(self) -> int:
        return self.table_elements // self.tables


@dataclass(frozen=True)
class Invocation:
    """One run of a module: what it sees (argv, environment, stdin) and what it may consume.
    `stdin` is held in memory; its size is the caller's to bound (a round task's stdin is its
    model and dataset, both bounded as they arrive)."""

    argv: Sequence[str]
    env: Mapping[str, str]
    limits: Limits = field(default_factory=Limits)
    stdin: bytes = b""


@dataclass(frozen=True)
class RunOutput:
    """A run that finished with exit status 0 (or returned from `_start`)."""

    stdout: bytes
    stderr_tail: str
    duration_s: float
    # Fuel units the run consumed (0 on a runtime without metering).
    fuel_consumed: int = 0


# The export (of any kind) by which a module says it speaks trainer contract v2
# (wasm-client/README.md); a module without it speaks v1.
CONTRACT_V2_EXPORT = "propeller_contract_v2"


@dataclass(frozen=True)
class CompiledModule:
    """A module compiled for the runtime's engine and pre-linked against WASI."""

    sha256: str
    size: int
    compile_s: float
    module: Any  # wasmtime.Module
    pre: Any  # wasmtime.InstancePre
    # The trainer contract the module declares (1 or 2), read once from its exports.
    contract: int = 1


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.3g} MiB"


def _cause(exc: BaseException) -> str:
    """The useful line of a wasmtime error ("Caused by:" part, without the backtrace)."""
    text = str(exc).strip()
    if "Caused by:" in text:
        text = text.rsplit("Caused by:", 1)[1].strip()
    text = " ".join(line.strip() for line in text.splitlines() if line.strip())
    return text.removeprefix("wasm trap: ")


_COUNT_TOO_HIGH = re.compile(r"resource limit exceeded: (\w+) count too high at (\d+)")


def _instantiation_failure(failure: str, limits: Limits) -> str:
    """The reason for a module that could not be instantiated, naming the limit it broke."""
    total = _mib(limits.memory_bytes)
    count = _COUNT_TOO_HIGH.search(failure)
    if count is not None:
        what, needed = count.group(1), count.group(2)
        allowed = {"memory": 1, "table": limits.tables, "instance": 1}.get(what, 0)
        kinds = {"memory": "linear memories", "table": "tables", "instance": "instances"}
        return (
            f"{what} limit exceeded: the module needs {needed} {kinds.get(what, what)}, a task "
            f"may have {allowed} ({total} of memory and tables in all)"
        )
    if "exceeds memory limits" in failure:
        return f"memory limit exceeded ({total}): {failure}"
    if "exceeds table limits" in failure:
        return f"table limit exceeded ({limits.elements_per_table} elements per table): {failure}"
    return failure


def _memory_in_use(instance: Any, store: Any) -> int:
    if instance is None:
        return 0
    total = 0
    for ext in instance.exports(store).values():
        if isinstance(ext, wasmtime.Memory):
            total += int(ext.data_len(store))
    return total


class WasmRuntime:
    """One wasmtime engine, its WASI linker, its epoch ticker and its compiled modules."""

    _shared: ClassVar[WasmRuntime | None] = None
    _shared_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(
        self,
        max_modules: int = 32,
        max_abandoned: int = MAX_ABANDONED_RUNS,
        *,
        metering: bool = True,
    ) -> None:
        config = wasmtime.Config()
        config.epoch_interruption = True
        config.consume_fuel = metering
        self.metering = metering
        # GC objects and exceptions live in a heap the store caps apart from linear memory.
        config.wasm_gc = False
        config.wasm_exceptions = False
        # The same module on the same inputs gives the same bytes on any host: the coordinator's
        # re-execution audit (docs/verifiability.md) compares a proplet's update with its own
        # re-run byte for byte. Relaxed SIMD may differ between CPUs unless made deterministic
        # (no cost to modules that do not use it).
        config.wasm_relaxed_simd_deterministic = True
        self.engine: Any = wasmtime.Engine(config)
        # WASI, with the calls that could block bounded by the run's deadline. Public so a
        # caller can define more host functions before compiling modules that import them.
        self.linker: Any = wasmtime.Linker(self.engine)
        self.linker.define_wasi()
        define_bounded_wasi(self.linker)
        self._ticker = EpochTicker(self.engine)
        self._max_modules = max_modules
        self._modules: OrderedDict[str, CompiledModule] = OrderedDict()
        self._compiling: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self.max_abandoned = max_abandoned
        self._abandoned = 0
        self._workers = RunThreads()
        self.compiles = 0

    @classmethod
    def shared(cls) -> WasmRuntime:
        """The process-wide runtime (created on first use)."""
        with cls._shared_lock:
            if cls._shared is None:
                cls._shared = cls()
            return cls._shared

    # ------------------------------------------------------------------ modules

    def cached(self, sha256: str) -> CompiledModule | None:
        with self._lock:
            hit = self._modules.get(sha256)
            if hit is not None:
                self._modules.move_to_end(sha256)
            return hit

    def compile(self, wasm: bytes, sha256: str) -> CompiledModule:
        """Compile and pre-link `wasm` (blocking), or return the cached result for `sha256`.
        Concurrent callers for the same module wait for one compilation."""
        hit = self.cached(sha256)
        if hit is not None:
            return hit
        with self._lock:
            gate = self._compiling.setdefault(sha256, threading.Lock())
        try:
            with gate:
                hit = self.cached(sha256)
                if hit is not None:
                    return hit
                started = time.perf_counter()
                try:
                    module = wasmtime.Module(self.engine, wasm)
                except wasmtime.WasmtimeError as exc:
                    raise TaskFailed(f"invalid wasm module: {_cause(exc)}") from None
                try:
                    pre = self.linker.instantiate_pre(module)
                except wasmtime.WasmtimeError as exc:
                    raise TaskFailed(f"cannot link module: {_cause(exc)}") from None
                contract = 2 if any(e.name == CONTRACT_V2_EXPORT for e in module.exports) else 1
                compiled = CompiledModule(
                    sha256, len(wasm), time.perf_counter() - started, module, pre, contract
                )
                with self._lock:
                    self._modules[sha256] = compiled
                    while len(self._modules) > self._max_modules:
                        self._modules.popitem(last=False)
                    self.compiles += 1
                log.info(
                    "[proplet.runner] compiled sha256=%s size=%d in %.1f ms",
                    sha256[:12],
                    len(wasm),
                    compiled.compile_s * 1000,
                )
                return compiled
        finally:
            with self._lock:
                self._compiling.pop(sha256, None)

    @property
    def abandoned_runs(self) -> int:
        """Runs given up on while inside a host call whose threads have not ended yet."""
        with self._lock:
            return self._abandoned

    # ------------------------------------------------------------------ running

    def run_sync(
        self, compiled: CompiledModule, invocation: Invocation, control: RunControl | None = None
    ) -> RunOutput:
        """Run the module's `_start` in the calling thread. Raises TaskFailed with the reason
        (trap, exit status, deadline, memory or output limit) or TaskInterrupted."""
        limits = invocation.limits
        run = Run(limits.timeout_s, limits.output_bytes, control or RunControl())
        store: Any = wasmtime.Store(self.engine)
        store.set_limits(
            memory_size=limits.linear_memory_bytes,
            table_elements=limits.elements_per_table,
            instances=1,
            tables=limits.tables,
            memories=1,
        )
        wasi: Any = wasmtime.WasiConfig()
        wasi.argv = list(invocation.argv)
        wasi.env = list(invocation.env.items())
        if invocation.stdin:
            set_stdin(wasi, invocation.stdin)
        run.attach(store, wasi)
        store.set_wasi(wasi)
        if self.metering:
            store.set_fuel(limits.fuel)

        started = time.perf_counter()
        instance: Any = None
        failure: str | None = None
        out_of_fuel = False
        exit_code = 0
        with run.executing(self._ticker):
            try:
                instance = compiled.pre.instantiate(store)
                start = instance.exports(store).get("_start")
                if not isinstance(start, wasmtime.Func):
                    raise TaskFailed("module exports no _start function (not a WASI command)")
                start(store)
            except wasmtime.ExitTrap as exc:  # WASI proc_exit, raised even for status 0
                exit_code = int(exc.code)
            except wasmtime.Trap as exc:
                out_of_fuel = exc.trap_code is wasmtime.TrapCode.OUT_OF_FUEL
                failure = f"trap: {_cause(exc)}"
            except wasmtime.WasmtimeError as exc:
                failure = _cause(exc)
        duration = time.perf_counter() - started
        fuel = limits.fuel - int(store.get_fuel()) if self.metering else 0
        metrics.wasm_ran(duration, fuel)

        if run.stopped_for == "interrupt":
            raise TaskInterrupted(f"interrupted: {run.control.interrupted}")
        if run.stopped_for == "deadline":
            raise TaskFailed(f"deadline exceeded after {limits.timeout_s:g}s")
        if run.output_exceeded:
            raise TaskFailed(f"output too large: more than {limits.output_bytes} bytes on stdout")
        if out_of_fuel:
            raise TaskFailed(f"fuel budget of {limits.fuel} exhausted (the module ran out)")
        if failure is None and exit_code != 0:
            tail = run.stderr_text()
            failure = f"exit status {exit_code}" + (f": {tail}" if tail else "")
        if failure is not None:
            if instance is None:
                raise TaskFailed(_instantiation_failure(failure, limits))
            in_use = _memory_in_use(instance, store)
            # wasmtime does not say that a memory.grow was refused; a module that failed with
            # its memory within 1/8 of the cap almost certainly failed for want of more.
            cap = limits.linear_memory_bytes
            if in_use + max(WASM_PAGE, cap // 8) > cap:
                raise TaskFailed(
                    f"memory limit exceeded ({_mib(in_use)} of {_mib(limits.memory_bytes)} "
                    f"in use): {failure}"
                )
            raise TaskFailed(failure)
        return RunOutput(bytes(run.stdout), run.stderr_text(), duration, fuel)

    @tracing.traced("wasm run")
    async def run(
        self, compiled: CompiledModule, invocation: Invocation, control: RunControl | None = None
    ) -> RunOutput:
        """`run_sync` in a daemon thread. Cancelling the caller interrupts the module. Fails at
        once while `max_abandoned` earlier runs are still stuck in host calls."""
        stuck = self.abandoned_runs
        if stuck >= self.max_abandoned:
            raise TaskFailed(
                f"runner saturated: {stuck} earlier runs are still blocked in host calls past "
                f"their deadline (at most {self.max_abandoned}); retry later"
            )
        control = control or RunControl()
        loop = asyncio.get_running_loop()
        done: asyncio.Future[RunOutput] = loop.create_future()
        # Retrieve the outcome even when nobody awaits it any more (abandoned or stopped runs).
        done.add_done_callback(lambda f: f.cancelled() or f.exception())
        thread = _RunThread()

        def settle(result: RunOutput | None, exc: BaseException | None) -> None:
            if done.done():
                return
            if exc is not None:
                done.set_exception(exc)
            else:
                done.set_result(result)  # type: ignore[arg-type]

        def target() -> Callable[[], None]:
            result: RunOutput | None = None
            error: BaseException | None = None
            try:
                result = self.run_sync(compiled, invocation, control)
            except BaseException as exc:  # handed to the awaiting coroutine
                error = exc
            finally:
                with self._lock:
                    thread.finished = True
                    if thread.abandoned:
                        self._abandoned -= 1

            def deliver() -> None:
                with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting
                    loop.call_soon_threadsafe(settle, result, error)

            return deliver

        self._workers.submit(target)
        timeout_s = invocation.limits.timeout_s
        hard_deadline = timeout_s + HARD_DEADLINE_GRACE_S
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation.
            async with asyncio.timeout(hard_deadline):
                return await asyncio.shield(done)
        except TimeoutError:
            control.interrupt("deadline")
            with self._lock:
                if not thread.finished:
                    thread.abandoned = True
                    self._abandoned += 1
            log.warning(
                "[proplet.runner] sha256=%s still running %.1fs after start (blocked in a host "
                "call); abandoning its thread",
                compiled.sha256[:12],
                hard_deadline,
            )
            raise TaskFailed(
                f"deadline exceeded after {timeout_s:g}s (module blocked in a host call)"
            ) from None
        except asyncio.CancelledError:
            control.interrupt("task stopped")
            await asyncio.wait({done}, timeout=STOP_GRACE_S)
            raise


class RunThreads:
    """The threads runs execute in, kept for the next run once theirs ends: starting a thread
    per run cost the event loop that starts it more than a short run itself (the loop waits
    until the new thread holds the GIL; docs/benchmarks.md, "Fleet"). A run never waits for a
    thread: one is started whenever no idle thread is free to take it, so runs stuck in a host
    call (abandoned) never hold up others. A thread idle for `idle_s` ends. A thread is named
    RUN_THREAD while it runs a job and IDLE_THREAD while it waits for one.

    A job returns what delivers its outcome (`deliver`), called once its thread counts as idle
    again: a caller that starts its next run as soon as it has the outcome finds that thread
    free rather than starting another."""

    RUN_THREAD = "wasm-run"
    IDLE_THREAD = "wasm-idle"

    def __init__(self, idle_s: float = 30.0) -> None:
        self.idle_s = idle_s
        self._ready = threading.Condition(threading.Lock())
        self._jobs: deque[Job] = deque()
        self._idle = 0

    def submit(self, job: Job) -> None:
        """Run `job` in a thread: an idle one, else a new one."""
        with self._ready:
            # Every idle thread takes one queued job; a job beyond them gets a new thread.
            if self._idle > len(self._jobs):
                self._jobs.append(job)
                self._ready.notify()
                return
        threading.Thread(target=self._serve, args=(job,), name=self.RUN_THREAD, daemon=True).start()

    def _serve(self, first: Job) -> None:
        me = threading.current_thread()
        job: Job | None = first
        while job is not None:
            me.name = self.RUN_THREAD
            deliver = job()
            me.name = self.IDLE_THREAD
            with self._ready:
                self._idle += 1
            try:
                deliver()
            except BaseException:
                with self._ready:
                    self._idle -= 1
                raise
            job = self._next()

    def _next(self) -> Job | None:
        """The next queued job for this idle thread, waiting up to `idle_s` for one; None: the
        thread ends. The thread no longer counts as idle either way."""
        with self._ready:
            try:
                until = time.monotonic() + self.idle_s
                while not self._jobs:
                    left = until - time.monotonic()
                    if left <= 0:
                        return None
                    self._ready.wait(left)
                return self._jobs.popleft()
            finally:
                self._idle -= 1


# A run in a `RunThreads` thread: it returns what hands its outcome over.
Job = Callable[[], Callable[[], None]]


@dataclass
class _RunThread:
    """Whether a run's thread has ended, and whether its caller gave up on it first (guarded
    by the runtime's lock)."""

    finished: bool = False
    abandoned: bool = False
