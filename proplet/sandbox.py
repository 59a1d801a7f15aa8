"""The host side of a wasm run: what wasmtime calls back into while a module executes.

- `RunControl` stops a run from any thread; `Run` is one run's state (deadline, captured
  stdout up to the output cap, a short stderr tail), found by the callbacks below while its
  wasm executes (`Run.executing`).
- Epoch interruption: `EpochTicker` (one daemon thread per engine) bumps the epoch every
  `TICK_S` while any run is active, and a per-store epoch-deadline callback checks that run's
  wall-clock deadline, its stop request and its output cap at every tick. A per-store check
  (rather than bumping the shared engine's epoch) interrupts one run without touching the
  others.
- Output: stdout is captured in memory up to the output cap (writes beyond it fail inside the
  module and the run is stopped at the next tick); stderr is kept as a short tail for error
  reasons.
- Input: stdin is empty, or bytes held in memory (`set_stdin`, trainer contract v2: the model
  and the dataset, which arrive bounded); reads never wait.
- Bounded WASI (`define_bounded_wasi`): epoch checks only happen while wasm code executes, so
  no host call may block past the run's deadline. The one WASI call that can block here is
  `poll_oneoff` (how `sleep` compiles in C, Zig, Rust and Go): stdin is in memory, there are no
  preopened directories or sockets, and stdout and stderr are our own non-blocking callbacks.
  It is replaced (with `clock_time_get`, so that absolute monotonic times share its clock) by
  versions that sleep at most until the run's deadline and wake at once when the run is
  stopped; the run then ends at the next epoch check, and its thread with it.

Every callback here runs inside wasmtime and never raises (see each one for why).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import wasmtime
from wasmtime import _ffi as wasmtime_ffi  # the epoch-deadline callback has no public wrapper

TICK_S = 0.01
STDERR_TAIL_BYTES = 2048


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


class Run:
    """Per-run state shared by the wasm thread's callbacks (epoch ticks, stdout, stderr):
    `attach` routes a store's callbacks to it, `executing` while its wasm runs."""

    def __init__(self, timeout_s: float, output_bytes: int, control: RunControl) -> None:
        self.id = next(_RUN_IDS)
        self.output_bytes = output_bytes
        self.control = control
        self.deadline = time.monotonic() + timeout_s
        self.stdout = bytearray()
        self.stderr_tail = bytearray()
        self.output_exceeded = False
        self.stopped_for: str | None = None  # "interrupt" | "deadline" | "output"

    def write_stdout(self, data: bytes) -> int:
        if len(self.stdout) + len(data) > self.output_bytes:
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

    def attach(self, store: Any, wasi: Any) -> None:
        """Route `store`'s epoch checks and `wasi`'s stdout and stderr to this run (before
        `store.set_wasi(wasi)`)."""
        wasmtime_ffi.wasmtime_store_epoch_deadline_callback(
            store.ptr(), _EPOCH_CALLBACK, ctypes.c_void_p(self.id), _NO_FINALIZER
        )
        store.set_epoch_deadline(1)
        for stream, setter in (
            (_STDOUT, wasmtime_ffi.wasi_config_set_stdout_custom),
            (_STDERR, wasmtime_ffi.wasi_config_set_stderr_custom),
        ):
            key = ctypes.c_void_p(self.id * 2 + stream)
            setter(wasi.ptr(), _WRITE_CALLBACK, key, _NO_FINALIZER)

    @contextlib.contextmanager
    def executing(self, ticker: EpochTicker) -> Iterator[None]:
        """While the run's wasm executes in this thread: the callbacks find it, and `ticker`
        bumps the epoch."""
        _RUNS[self.id] = self
        _CURRENT.run = self
        ticker.acquire()
        try:
            yield
        finally:
            ticker.release()
            _RUNS.pop(self.id, None)
            _CURRENT.run = None


# Runs currently inside wasm, by the id handed to the epoch callback as its `data` pointer.
_RUNS: dict[int, Run] = {}
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
        run: Run | None = getattr(_CURRENT, "run", None)
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


def define_bounded_wasi(linker: Any) -> None:
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


def set_stdin(wasi: Any, data: bytes) -> None:
    """Give a run's WASI config `data` as its stdin, held in memory (wasmtime-py only offers a
    file). wasmtime takes ownership of the byte vector."""
    vec = wasmtime_ffi.wasm_byte_vec_t()
    wasmtime_ffi.wasm_byte_vec_new_uninitialized(ctypes.byref(vec), len(data))
    if data:
        ctypes.memmove(vec.data, data, len(data))
    wasmtime_ffi.wasi_config_set_stdin_bytes(wasi.ptr(), ctypes.byref(vec))


class EpochTicker:
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
