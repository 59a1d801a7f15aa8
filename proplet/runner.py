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
- epoch interruption: one daemon thread per engine bumps the epoch every `TICK_S` while any run
  is active, and a per-store epoch-deadline callback checks that run's wall-clock deadline,
  its stop request and its output cap at every tick. A per-store check (rather than bumping
  the shared engine's epoch) interrupts one run without touching the others;
- stdout captured in memory up to the output cap (writes beyond it fail inside the module and
  the run is stopped at the next tick), stderr kept as a short tail for error reasons.

Epoch checks only happen while wasm code executes, so no host call may block past the run's
deadline. The one WASI call that can block here is `poll_oneoff` (how `sleep` compiles in C,
Zig, Rust and Go): stdin is empty, there are no preopened directories or sockets, and stdout
and stderr are our own non-blocking callbacks. The runner replaces `poll_oneoff` (and
`clock_time_get`, so that absolute monotonic times share its clock) with versions that sleep
at most until the run's deadline and wake at once when the run is stopped; the run then ends
at the next epoch check, and its thread with it. As a last resort, a run still inside a host
call `HARD_DEADLINE_GRACE_S` after its deadline is abandoned and reported as timed out; while
`MAX_ABANDONED_RUNS` such threads linger in a runtime, new runs fail at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import itertools
import logging
import re
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import wasmtime
from wasmtime import _ffi as wasmtime_ffi  # the epoch-deadline callback has no public wrapper

from proplet.errors import TaskFailed, TaskInterrupted

log = logging.getLogger(__name__)

TICK_S = 0.01
STDERR_TAIL_BYTES = 2048
# How long a run may overstay its deadline (stuck in a host call) before it is abandoned.
HARD_DEADLINE_GRACE_S = 2.0
# How long a stopped run may take to leave wasm before the caller stops waiting for it.
STOP_GRACE_S = 2.0
# How many abandoned runs (threads stuck in a host call past their deadline) a runtime keeps
# before it refuses new runs.
MAX_ABANDONED_RUNS = 4
WASM_PAGE = 65536
# What one table element costs (wasmtime: a pointer).
TABLE_ELEMENT_BYTES = 8


@dataclass(frozen=True)
class Limits:
    """What one run may consume, in all: `memory_bytes` covers its linear memory and its
    tables together (`table_elements` over all its tables, 8 bytes each)."""

    timeout_s: float = 300.0
    memory_bytes: int = 256 << 20
    output_bytes: int = 16 << 20
    table_elements: int = 1 << 16
    tables: int = 1

    def __post_init__(self) -> None:
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
    """One run of a module: what it sees (argv, environment) and what it may consume."""

    argv: Sequence[str]
    env: Mapping[str, str]
    limits: Limits = field(default_factory=Limits)


@dataclass(frozen=True)
class RunOutput:
    """A run that finished with exit status 0 (or returned from `_start`)."""

    stdout: bytes
    stderr_tail: str
    duration_s: float


@dataclass(frozen=True)
class CompiledModule:
    """A module compiled for the runtime's engine and pre-linked against WASI."""

    sha256: str
    size: int
    compile_s: float
    module: Any  # wasmtime.Module
    pre: Any  # wasmtime.InstancePre


class RunControl:
    """Stops one run from any thread: `interrupt(reason)` makes it end as Interrupted."""

    def __init__(self) -> None:
        self._reason: str | None = None
        self._stopped = threading.Event()

    def interrupt(self, reason: str) -> None:
        if self._reason is None:
            self._reason = reason
        self._stopped.set()

    @property
    def interrupted(self) -> str | None:
        return self._reason

    def wait(self, timeout_s: float) -> bool:
        """Sleep up to `timeout_s`; True as soon as the run is interrupted."""
        return self._stopped.wait(timeout_s)


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.3g} MiB"


class _Run:
    """Per-run state shared by the wasm thread's callbacks (epoch ticks, stdout, stderr)."""

    def __init__(self, limits: Limits, control: RunControl) -> None:
        self.limits = limits
        self.control = control
        self.deadline = time.monotonic() + limits.timeout_s
        self.stdout = bytearray()
        self.stderr_tail = bytearray()
        self.output_exceeded = False
        self.stopped_for: str | None = None  # "interrupt" | "deadline" | "output"

    def write_stdout(self, data: bytes) -> int:
        if len(self.stdout) + len(data) > self.limits.output_bytes:
            self.output_exceeded = True
            return -errno.EFBIG
        self.stdout += data
        return len(data)

    def write_stderr(self, data: bytes) -> int:
        self.stderr_tail += data
        if len(self.stderr_tail) > STDERR_TAIL_BYTES:
            del self.stderr_tail[:-STDERR_TAIL_BYTES]
        return len(data)

    def check(self) -> str | None:
        """Called at every epoch tick while wasm runs: why the run must stop now, if it must."""
        if self.control.interrupted is not None:
            self.stopped_for = "interrupt"
        elif self.output_exceeded:
            self.stopped_for = "output"
        elif time.monotonic() >= self.deadline:
            self.stopped_for = "deadline"
        return self.stopped_for

    def stderr_text(self) -> str:
        return self.stderr_tail.decode(errors="replace").strip()

    def sleep_until(self, wake: float) -> bool:
        """Sleep until `wake` (time.monotonic), but never past the deadline nor once the run
        is stopped; True if `wake` was reached with the run still allowed to go on."""
        end = min(wake, self.deadline)
        while (left := end - time.monotonic()) > 0 and not self.control.wait(left):
            pass
        return self.check() is None and time.monotonic() >= wake


# Runs currently inside wasm, by the id handed to the epoch callback as its `data` pointer.
_RUNS: dict[int, _Run] = {}
_RUN_IDS = itertools.count(1)

_DeadlineCallback = ctypes.CFUNCTYPE(
    ctypes.c_size_t,
    ctypes.POINTER(wasmtime_ffi.wasmtime_context_t),
    ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_uint64),
    ctypes.POINTER(wasmtime_ffi.wasmtime_update_deadline_kind_t),
)
_NO_FINALIZER = ctypes.CFUNCTYPE(None, ctypes.c_void_p)()
_UPDATE_DEADLINE_CONTINUE = 0

_WriteCallback = ctypes.CFUNCTYPE(
    ctypes.c_ssize_t, ctypes.c_void_p, ctypes.POINTER(ctypes.c_ubyte), ctypes.c_size_t
)
_STDOUT, _STDERR = 0, 1


def _on_write(data: int | None, buf: Any, size: int) -> int:
    # `data` is run_id * 2 + stream. Never raises (it runs inside wasmtime).
    try:
        key = data or 0
        run = _RUNS.get(key >> 1)
        if run is None:
            return -errno.EBADF
        chunk = ctypes.string_at(buf, size)
        return run.write_stdout(chunk) if key & 1 == _STDOUT else run.write_stderr(chunk)
    except BaseException:
        return -errno.EIO


# Our own output callback with no finalizer, instead of WasiConfig.stdout_custom: that one
# registers a Python finalizer which wasmtime may call from a tokio thread while the
# interpreter is shutting down, aborting the process (observed with wasmtime 50.0.1).
_WRITE_CALLBACK = _WriteCallback(_on_write)


def _error_pointer(message: str) -> int:
    err = wasmtime_ffi.wasmtime_error_new(message.encode())
    value = ctypes.cast(err, ctypes.c_void_p).value
    return int(value or 0)


def _on_epoch_deadline(_ctx: Any, data: int | None, delta: Any, kind: Any) -> int:
    # Runs in the wasm thread with the GIL held. It must not raise: ctypes would swallow the
    # exception and wasmtime would read an unset delta.
    try:
        run = _RUNS.get(data or 0)
        if run is None or run.check() is None:
            delta[0] = 1
            kind[0] = _UPDATE_DEADLINE_CONTINUE
            return 0
        return _error_pointer(f"proplet stopped the module ({run.stopped_for})")
    except BaseException:
        return _error_pointer("proplet stopped the module (epoch check failed)")


_EPOCH_CALLBACK = _DeadlineCallback(_on_epoch_deadline)


# ---------------------------------------------------------------------- bounded WASI calls
#
# The run whose wasm executes in this thread, for the WASI functions below (a host function
# learns nothing else about its store). They never raise: wasmtime-py keeps a host
# function's exception in one process-wide slot, which a concurrent run's trap could pick up.

_CURRENT = threading.local()

# WASI preview1 errno values, event types and layouts (wasi_snapshot_preview1.witx).
_WASI_EBADF, _WASI_EFAULT, _WASI_EINTR, _WASI_EINVAL = 8, 21, 27, 28
_CLOCK, _FD_READ, _FD_WRITE = 0, 1, 2
_REALTIME, _MONOTONIC, _PROCESS_CPUTIME, _THREAD_CPUTIME = 0, 1, 2, 3
_ABSTIME = 1
_SUBSCRIPTION = struct.Struct("<QB7xIxxxxQQH6x")  # userdata, tag, clock id | fd, timeout, ...
_EVENT = struct.Struct("<QHB5xQH6x")  # userdata, error, type, nbytes, flags
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_STDIO = (0, 1, 2)  # the only descriptors a run has: no preopens, no sockets
# More subscriptions in one call than any program polls; refused so a call stays cheap.
_MAX_SUBSCRIPTIONS = 4096
_I32 = wasmtime.ValType.i32()
_I64 = wasmtime.ValType.i64()


def _now_ns(clock: int) -> int:
    return time.time_ns() if clock == _REALTIME else time.monotonic_ns()


def _memory(caller: Any, ptr: int, size: int) -> Any:
    """The caller's exported memory if [ptr, ptr + size) lies inside it, else None."""
    memory = caller.get("memory")
    if not isinstance(memory, wasmtime.Memory) or ptr + size > memory.data_len(caller):
        return None
    return memory


def _clock_time_get(caller: Any, clock: int, _precision: int, out: int) -> int:
    try:
        if clock in (_PROCESS_CPUTIME, _THREAD_CPUTIME):
            return _WASI_EBADF  # as wasmtime's own: no CPU-time clocks
        if clock not in (_REALTIME, _MONOTONIC):
            return _WASI_EINVAL
        out &= 0xFFFFFFFF
        memory = _memory(caller, out, _U64.size)
        if memory is None:
            return _WASI_EFAULT
        memory.write(caller, _U64.pack(_now_ns(clock)), out)
        return 0
    except BaseException:
        return _WASI_EFAULT


def _poll_oneoff(caller: Any, subs: int, events: int, count: int, written: int) -> int:
    """WASI poll_oneoff: fd subscriptions (only stdin, stdout and stderr exist, and none of
    them ever waits) are ready at once; otherwise sleep until the first clock is due, but
    never past the run's deadline nor once it is stopped: then answer EINTR and the run ends
    at its next epoch check."""
    try:
        subs, events, written = subs & 0xFFFFFFFF, events & 0xFFFFFFFF, written & 0xFFFFFFFF
        run: _Run | None = getattr(_CURRENT, "run", None)
        if run is None or not 0 < count <= _MAX_SUBSCRIPTIONS:
            return _WASI_EINVAL
        memory = _memory(caller, subs, count * _SUBSCRIPTION.size)
        if memory is None:
            return _WASI_EFAULT
        raw = memory.read(caller, subs, subs + count * _SUBSCRIPTION.size)
        ready: list[tuple[int, int]] = []  # (userdata, event type)
        clocks: list[tuple[int, float]] = []  # (userdata, time.monotonic() when due)
        now = time.monotonic()
        for userdata, tag, ident, timeout, _precision, flags in _SUBSCRIPTION.iter_unpack(raw):
            if tag == _CLOCK:
                if ident not in (_REALTIME, _MONOTONIC):
                    return _WASI_EINVAL
                due_ns = timeout - _now_ns(ident) if flags & _ABSTIME else timeout
                clocks.append((userdata, now + max(0, due_ns) / 1e9))
            elif tag in (_FD_READ, _FD_WRITE):
                if ident not in _STDIO:
                    return _WASI_EBADF
                ready.append((userdata, tag))
            else:
                return _WASI_EINVAL
        if not ready and not run.sleep_until(min(wake for _, wake in clocks)):
            return _WASI_EINTR
        now = time.monotonic()
        out = [_EVENT.pack(userdata, 0, tag, 1, 0) for userdata, tag in ready]
        out += [_EVENT.pack(userdata, 0, _CLOCK, 0, 0) for userdata, due in clocks if due <= now]
        data = b"".join(out)
        if _memory(caller, events, len(data)) is None or _memory(caller, written, 4) is None:
            return _WASI_EFAULT
        memory.write(caller, data, events)
        memory.write(caller, _U32.pack(len(out)), written)
        return 0
    except BaseException:
        return _WASI_EFAULT


def _define_bounded_wasi(linker: Any) -> None:
    """Put the bounded `poll_oneoff` and its `clock_time_get` in place of wasmtime's."""
    linker.allow_shadowing = True
    try:
        for name, params, func in (
            ("poll_oneoff", [_I32, _I32, _I32, _I32], _poll_oneoff),
            ("clock_time_get", [_I32, _I64, _I32], _clock_time_get),
        ):
            kind = wasmtime.FuncType(params, [_I32])
            linker.define_func("wasi_snapshot_preview1", name, kind, func, access_caller=True)
    finally:
        linker.allow_shadowing = False


class _EpochTicker:
    """Bumps an engine's epoch every TICK_S while at least one run is active."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self._lock = threading.Lock()
        self._active = 0
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        with self._lock:
            self._active += 1
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="wasmtime-epoch", daemon=True
                )
                self._thread.start()
            self._wake.set()

    def release(self) -> None:
        with self._lock:
            self._active -= 1
            if self._active == 0:
                self._wake.clear()

    def _loop(self) -> None:
        while True:
            self._wake.wait()
            time.sleep(TICK_S)
            self._engine.increment_epoch()


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

    def __init__(self, max_modules: int = 32, max_abandoned: int = MAX_ABANDONED_RUNS) -> None:
        config = wasmtime.Config()
        config.epoch_interruption = True
        # GC objects and exceptions live in a heap the store caps apart from linear memory.
        config.wasm_gc = False
        config.wasm_exceptions = False
        self.engine: Any = wasmtime.Engine(config)
        # WASI, with the calls that could block bounded by the run's deadline. Public so a
        # caller can define more host functions before compiling modules that import them.
        self.linker: Any = wasmtime.Linker(self.engine)
        self.linker.define_wasi()
        _define_bounded_wasi(self.linker)
        self._ticker = _EpochTicker(self.engine)
        self._max_modules = max_modules
        self._modules: OrderedDict[str, CompiledModule] = OrderedDict()
        self._compiling: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self.max_abandoned = max_abandoned
        self._abandoned = 0
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
                compiled = CompiledModule(
                    sha256, len(wasm), time.perf_counter() - started, module, pre
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
        run = _Run(limits, control or RunControl())
        run_id = next(_RUN_IDS)
        store: Any = wasmtime.Store(self.engine)
        store.set_limits(
            memory_size=limits.linear_memory_bytes,
            table_elements=limits.elements_per_table,
            instances=1,
            tables=limits.tables,
            memories=1,
        )
        wasmtime_ffi.wasmtime_store_epoch_deadline_callback(
            store.ptr(), _EPOCH_CALLBACK, ctypes.c_void_p(run_id), _NO_FINALIZER
        )
        store.set_epoch_deadline(1)
        wasi: Any = wasmtime.WasiConfig()
        wasi.argv = list(invocation.argv)
        wasi.env = list(invocation.env.items())
        for stream, setter in (
            (_STDOUT, wasmtime_ffi.wasi_config_set_stdout_custom),
            (_STDERR, wasmtime_ffi.wasi_config_set_stderr_custom),
        ):
            key = ctypes.c_void_p(run_id * 2 + stream)
            setter(wasi.ptr(), _WRITE_CALLBACK, key, _NO_FINALIZER)
        store.set_wasi(wasi)

        started = time.perf_counter()
        instance: Any = None
        failure: str | None = None
        exit_code = 0
        _RUNS[run_id] = run
        _CURRENT.run = run
        self._ticker.acquire()
        try:
            instance = compiled.pre.instantiate(store)
            start = instance.exports(store).get("_start")
            if not isinstance(start, wasmtime.Func):
                raise TaskFailed("module exports no _start function (not a WASI command)")
            start(store)
        except wasmtime.ExitTrap as exc:  # WASI proc_exit, raised even for status 0
            exit_code = int(exc.code)
        except wasmtime.Trap as exc:
            failure = f"trap: {_cause(exc)}"
        except wasmtime.WasmtimeError as exc:
            failure = _cause(exc)
        finally:
            self._ticker.release()
            _RUNS.pop(run_id, None)
            _CURRENT.run = None
        duration = time.perf_counter() - started

        if run.stopped_for == "interrupt":
            raise TaskInterrupted(f"interrupted: {run.control.interrupted}")
        if run.stopped_for == "deadline":
            raise TaskFailed(f"deadline exceeded after {limits.timeout_s:g}s")
        if run.output_exceeded:
            raise TaskFailed(f"output too large: more than {limits.output_bytes} bytes on stdout")
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
        return RunOutput(bytes(run.stdout), run.stderr_text(), duration)

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

        def target() -> None:
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
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting
                loop.call_soon_threadsafe(settle, result, error)

        threading.Thread(target=target, name="wasm-run", daemon=True).start()
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


@dataclass
class _RunThread:
    """Whether a run's thread has ended, and whether its caller gave up on it first (guarded
    by the runtime's lock)."""

    finished: bool = False
    abandoned: bool = False
