"""The wasmtime runner on its own: each way a module can end, and its limits."""

from __future__ import annotations

import asyncio
import hashlib
import os
import struct
import threading
import time

import pytest
import wasmtime

from proplet import Invocation, Limits, RunControl, TaskFailed, TaskInterrupted, WasmRuntime
from proplet.runner import CompiledModule, RunThreads
from tests.proplet import wat
from tests.support.waits import eventually

LIMITS = Limits(timeout_s=1.0, memory_bytes=16 << 20, output_bytes=64 << 10)


@pytest.fixture(scope="module")
def runtime() -> WasmRuntime:
    return WasmRuntime()


def compiled(runtime: WasmRuntime, wasm: bytes) -> CompiledModule:
    return runtime.compile(wasm, hashlib.sha256(wasm).hexdigest())


async def run(
    runtime: WasmRuntime,
    wasm: bytes,
    limits: Limits = LIMITS,
    control: RunControl | None = None,
    env: dict[str, str] | None = None,
) -> bytes:
    out = await runtime.run(compiled(runtime, wasm), Invocation(["t"], env or {}, limits), control)
    return out.stdout


async def failure(runtime: WasmRuntime, wasm: bytes, limits: Limits = LIMITS) -> str:
    with pytest.raises(TaskFailed) as info:
        await run(runtime, wasm, limits)
    return info.value.reason


async def test_hello_prints_and_exits_zero(runtime: WasmRuntime) -> None:
    assert await run(runtime, wat.hello()) == b"hello from wasm\n"


async def test_returning_from_start_is_success(runtime: WasmRuntime) -> None:
    assert await run(runtime, wat.printing(b"done")) == b"done"


async def test_env_and_argv_reach_the_module(runtime: WasmRuntime) -> None:
    out = await runtime.run(
        compiled(runtime, wat.env_dump()),
        Invocation(["name", "--epochs", "3"], {"A": "1", "JSON": '{"w": [1.5], "b": 0}'}, LIMITS),
    )
    env, args = wat.parse_env_dump(out.stdout)
    assert env == {"A": "1", "JSON": '{"w": [1.5], "b": 0}'}
    assert args == ["name", "--epochs", "3"]


@pytest.mark.parametrize(
    ("module", "reason"),
    [
        (wat.trap(), "trap: wasm `unreachable` instruction executed"),
        (wat.exit_with(3, b"something broke\n"), "exit status 3: something broke"),
        (wat.exit_with(3), "exit status 3"),
        (wat.infinite_loop(), "deadline exceeded after 1s"),
        (wat.flood(4096, 100), "output too large: more than 65536 bytes on stdout"),
    ],
    ids=["trap", "exit-3-stderr", "exit-3", "loop", "flood"],
)
async def test_failures_name_their_reason(runtime: WasmRuntime, module: bytes, reason: str) -> None:
    assert await failure(runtime, module) == reason


async def test_memory_growth_beyond_the_cap_is_a_memory_failure(runtime: WasmRuntime) -> None:
    reason = await failure(runtime, wat.memory_hog())
    assert reason.startswith("memory limit exceeded (")
    assert "of 16 MiB in use" in reason


async def test_initial_memory_beyond_the_cap_is_a_memory_failure(runtime: WasmRuntime) -> None:
    reason = await failure(runtime, wat.build("", pages=512))  # 32 MiB > 16 MiB
    assert reason.startswith("memory limit exceeded")
    assert "512 pages" in reason


async def test_output_exactly_at_the_cap_is_fine(runtime: WasmRuntime) -> None:
    out = await run(runtime, wat.flood(4096, 16))  # 64 KiB exactly
    assert len(out) == 64 << 10


async def test_stderr_tail_is_kept_short(runtime: WasmRuntime) -> None:
    noise = b"n" * 10_000 + b"the end\n"
    reason = await failure(runtime, wat.exit_with(1, noise))
    assert reason.endswith("the end")
    assert len(reason) < 3000


async def test_module_without_start_is_rejected(runtime: WasmRuntime) -> None:
    module = bytes(wasmtime.wat2wasm('(module (func (export "main")))'))
    assert "no _start" in await failure(runtime, module)


def test_invalid_module_and_unknown_imports_fail_to_load(runtime: WasmRuntime) -> None:
    with pytest.raises(TaskFailed, match="invalid wasm module"):
        runtime.compile(b"not wasm", "0" * 64)
    linked = bytes(wasmtime.wat2wasm('(module (import "env" "nope" (func)))'))
    with pytest.raises(TaskFailed, match="cannot link module"):
        runtime.compile(linked, hashlib.sha256(linked).hexdigest())


async def test_interrupt_stops_a_running_module(runtime: WasmRuntime) -> None:
    control = RunControl()
    limits = Limits(timeout_s=60.0, memory_bytes=16 << 20, output_bytes=1024)
    job = asyncio.create_task(run(runtime, wat.infinite_loop(), limits, control))
    await asyncio.sleep(0.05)  # let it enter the loop; the stop must work mid-run
    control.interrupt("stopped by test")
    with pytest.raises(TaskInterrupted, match="stopped by test"):
        await asyncio.wait_for(job, 10)


async def test_cancelling_the_caller_interrupts_the_module(runtime: WasmRuntime) -> None:
    control = RunControl()
    limits = Limits(timeout_s=60.0, memory_bytes=16 << 20, output_bytes=1024)
    job = asyncio.create_task(run(runtime, wat.infinite_loop(), limits, control))
    await asyncio.sleep(0.05)
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job
    assert control.interrupted == "task stopped"


async def test_one_run_stopping_leaves_concurrent_runs_alone(runtime: WasmRuntime) -> None:
    slow = Limits(timeout_s=60.0, memory_bytes=16 << 20, output_bytes=1024)
    victim, bystander = RunControl(), RunControl()
    a = asyncio.create_task(run(runtime, wat.infinite_loop(), slow, victim))
    b = asyncio.create_task(run(runtime, wat.infinite_loop(), slow, bystander))
    await asyncio.sleep(0.05)
    victim.interrupt("only this one")
    with pytest.raises(TaskInterrupted):
        await asyncio.wait_for(a, 10)
    assert not b.done()
    bystander.interrupt("cleanup")
    with pytest.raises(TaskInterrupted):
        await asyncio.wait_for(b, 10)


# ---------------------------------------------------------------- limits are totals per run


async def test_memory_and_tables_share_one_budget(runtime: WasmRuntime) -> None:
    # The module grows its table, then its memory, each until refused.
    out = await run(runtime, wat.table_and_memory_hog())
    elements, pages = struct.unpack("<II", out)
    assert elements * 8 + pages * 65536 <= LIMITS.memory_bytes
    assert elements > 60_000  # most of the tables' share (65,536 elements by default)
    assert pages * 65536 > LIMITS.memory_bytes - LIMITS.table_bytes - (1 << 20)


@pytest.mark.parametrize("count", [2, 8])
async def test_more_than_one_memory_fails_naming_the_limit(
    runtime: WasmRuntime, count: int
) -> None:
    # Each memory (200 pages, 12.5 MiB) is under the cap on its own: only the count stops it.
    reason = await failure(runtime, wat.many_memories(count, 200))
    assert reason == (
        f"memory limit exceeded: the module needs {count} linear memories, a task may have 1 "
        "(16 MiB of memory and tables in all)"
    )
    assert await run(runtime, wat.many_memories(1, 200)) == b""


async def test_tables_beyond_the_limit_fail_naming_it(runtime: WasmRuntime) -> None:
    reason = await failure(runtime, wat.tables(2))
    assert reason == (
        "table limit exceeded: the module needs 2 tables, a task may have 1 "
        "(16 MiB of memory and tables in all)"
    )
    two = Limits(timeout_s=1.0, memory_bytes=16 << 20, output_bytes=1024, tables=2)
    assert await run(runtime, wat.tables(2), two) == b""


async def test_a_table_bigger_than_its_share_fails_naming_the_limit(runtime: WasmRuntime) -> None:
    shared = Limits(timeout_s=1.0, memory_bytes=16 << 20, output_bytes=1024, tables=2)
    out = await run(runtime, wat.table_and_memory_hog(), shared)
    elements, _ = struct.unpack("<II", out)
    assert elements <= shared.table_elements // 2


@pytest.mark.parametrize(
    ("wasm", "proposal"),
    [(wat.gc_arrays(), "gc"), (wat.exception_thrower(), "exceptions")],
    ids=["gc", "exceptions"],
)
def test_gc_and_exception_proposals_are_refused(
    runtime: WasmRuntime, wasm: bytes, proposal: str
) -> None:
    # Their objects would live in a heap of their own, beside the memory budget.
    with pytest.raises(TaskFailed, match=rf"invalid wasm module: .*{proposal}"):
        runtime.compile(wasm, hashlib.sha256(wasm).hexdigest())


# ---------------------------------------------------------- host calls end with the run


def wasm_run_threads() -> int:
    return sum(t.name == "wasm-run" for t in threading.enumerate())


async def threads() -> tuple[int, int]:
    """(the runner's threads, all threads of this process as the kernel counts them)"""
    return wasm_run_threads(), len(os.listdir("/proc/self/task"))


@pytest.mark.parametrize("absolute", [False, True], ids=["relative", "absolute"])
async def test_a_sleep_within_the_deadline_sleeps(runtime: WasmRuntime, absolute: bool) -> None:
    # The module checks itself that its clock advanced by the time asked for.
    assert await run(runtime, wat.timed_sleep(0.05, absolute=absolute)) == b""


async def test_a_module_sleeping_past_its_deadline_leaves_no_thread_behind(
    runtime: WasmRuntime,
) -> None:
    short = Limits(timeout_s=0.1, memory_bytes=16 << 20, output_bytes=1024)
    assert await run(runtime, wat.hello()) == b"hello from wasm\n"  # the epoch ticker runs
    _, baseline = await eventually(threads, lambda n: n[0] == 0, timeout=10)
    for _ in range(10):
        assert await failure(runtime, wat.sleeper(3600), short) == "deadline exceeded after 0.1s"
        await eventually(
            threads,
            lambda n: n[0] == 0 and n[1] <= baseline,
            timeout=10,
            what="no thread left behind by the failed run",
        )
    assert await run(runtime, wat.hello()) == b"hello from wasm\n"


async def test_a_sleep_until_a_far_wall_clock_time_ends_at_the_deadline(
    runtime: WasmRuntime,
) -> None:
    short = Limits(timeout_s=0.1, memory_bytes=16 << 20, output_bytes=1024)
    in_an_hour = time.time_ns() + 3600 * 10**9
    reason = await failure(runtime, wat.sleeper_until(in_an_hour), short)
    assert reason == "deadline exceeded after 0.1s"
    await eventually(threads, lambda n: n[0] == 0, timeout=10)


async def test_interrupt_wakes_a_sleeping_module(runtime: WasmRuntime) -> None:
    control = RunControl()
    limits = Limits(timeout_s=3600.0, memory_bytes=16 << 20, output_bytes=1024)
    job = asyncio.create_task(run(runtime, wat.sleeper(3600), limits, control))
    await eventually(threads, lambda n: n[0] == 1, timeout=10)
    control.interrupt("stopped by test")
    with pytest.raises(TaskInterrupted, match="stopped by test"):
        await asyncio.wait_for(job, 10)
    await eventually(threads, lambda n: n[0] == 0, timeout=10)


async def test_no_host_call_can_wait(runtime: WasmRuntime) -> None:
    # Everything a module could wait on: stdin, poll_oneoff on a descriptor (with a one-hour
    # clock beside it), preopened files, sockets. A call that waited would fail the run at
    # its deadline instead of answering.
    limits = Limits(timeout_s=30.0, memory_bytes=16 << 20, output_bytes=1024)
    answers = wat.parse_host_calls(await run(runtime, wat.host_calls(), limits))
    ebadf = 8
    assert answers == {
        "stdin_read_errno": 0,
        "stdin_read_bytes": 0,
        "poll_errno": 0,
        "poll_events": 1,
        "poll_event_type": 1,
        "poll_event_userdata": 1,
        "prestat_errno": ebadf,
        "path_open_errno": ebadf,
        "sock_accept_errno": ebadf,
        "fd3_read_errno": ebadf,
        "fd3_poll_errno": ebadf,
    }


async def test_runs_stuck_in_an_unknown_host_call_are_bounded_in_number() -> None:
    """The last resort, for a host call that could block and is not bounded (the test defines
    one): such runs are abandoned after the deadline plus a grace period, and while
    `max_abandoned` of them linger new runs fail at once."""
    runtime = WasmRuntime(max_abandoned=2)
    gate = threading.Event()
    runtime.linker.define_func("test", "block", wasmtime.FuncType([], []), lambda: gate.wait(60))
    blocking = bytes(
        wasmtime.wat2wasm(
            '(module (import "test" "block" (func $block)) (memory (export "memory") 1)'
            '(func (export "_start") (call $block)))'
        )
    )
    short = Limits(timeout_s=0.1, memory_bytes=16 << 20, output_bytes=1024)
    try:
        stuck = await asyncio.gather(
            *(failure(runtime, blocking, short) for _ in range(2)), return_exceptions=True
        )
        assert stuck == ["deadline exceeded after 0.1s (module blocked in a host call)"] * 2
        assert runtime.abandoned_runs == 2
        assert await failure(runtime, wat.hello()) == (
            "runner saturated: 2 earlier runs are still blocked in host calls past their "
            "deadline (at most 2); retry later"
        )
    finally:
        gate.set()

    async def abandoned() -> int:
        return runtime.abandoned_runs

    await eventually(abandoned, lambda n: n == 0, what="the stuck threads ended")
    assert await run(runtime, wat.hello()) == b"hello from wasm\n"


def blocking_runtime(
    gate: threading.Event, inside: list[threading.Thread]
) -> tuple[WasmRuntime, bytes]:
    """A runtime with a host call that notes the thread of each run inside it and waits for
    `gate`, and a module that makes that call."""
    runtime = WasmRuntime()

    def block() -> None:
        inside.append(threading.current_thread())
        gate.wait(60)

    runtime.linker.define_func("test", "block", wasmtime.FuncType([], []), block)
    module = bytes(
        wasmtime.wat2wasm(
            '(module (import "test" "block" (func $block)) (memory (export "memory") 1)'
            '(func (export "_start") (call $block)))'
        )
    )
    return runtime, module


async def test_run_threads_are_used_again_yet_no_run_waits_for_one() -> None:
    gate, inside = threading.Event(), list[threading.Thread]()
    runtime, blocking = blocking_runtime(gate, inside)
    limits = Limits(timeout_s=30.0, memory_bytes=16 << 20, output_bytes=1024)
    gate.set()
    for _ in range(5):  # one run after the other: all in one thread
        assert await run(runtime, blocking, limits) == b""
    assert all(t is inside[0] for t in inside), "a thread per run"
    gate.clear()
    inside.clear()
    try:
        runs = [asyncio.create_task(run(runtime, blocking, limits)) for _ in range(4)]

        async def count() -> int:
            return len(inside)

        # Four runs inside the call at once: none waited for another's thread.
        await eventually(count, lambda n: n == 4, timeout=10, what="all four runs at once")
    finally:
        gate.set()
    assert await asyncio.gather(*runs) == [b""] * 4
    assert len(set(inside)) == 4
    await eventually(threads, lambda n: n[0] == 0, timeout=10, what="no thread left running")


async def test_an_idle_run_thread_ends() -> None:
    workers = RunThreads(idle_s=0.05)
    ran = threading.Event()

    async def count() -> int:
        return len(os.listdir("/proc/self/task"))

    before = await count()
    workers.submit(lambda: ran.set)
    await eventually(
        count, lambda n: n <= before and ran.is_set(), timeout=10, what="the idle thread ended"
    )


def test_compiled_modules_are_cached_by_content(runtime: WasmRuntime) -> None:
    fresh = WasmRuntime()
    wasm = wat.printing(b"cache me")
    sha = hashlib.sha256(wasm).hexdigest()
    first = fresh.compile(wasm, sha)
    assert fresh.cached(sha) is first
    assert fresh.compile(wasm, sha) is first
    assert fresh.compiles == 1


def test_shared_runtime_is_one_per_process() -> None:
    assert WasmRuntime.shared() is WasmRuntime.shared()


# ---- fuel ---------------------------------------------------------------------------------


async def fuel_of(runtime: WasmRuntime, wasm: bytes, limits: Limits = LIMITS) -> int:
    out = await runtime.run(compiled(runtime, wasm), Invocation(["t"], {}, limits))
    return out.fuel_consumed


async def test_fuel_is_counted_and_the_same_for_the_same_run(runtime: WasmRuntime) -> None:
    small = [await fuel_of(runtime, wat.counting(10_000)) for _ in range(3)]
    big = await fuel_of(runtime, wat.counting(100_000))
    assert small[0] > 10_000
    assert small == [small[0]] * 3
    # Ten times the loop, about ten times the fuel (the fixed part is a few units).
    assert 9.5 < big / small[0] < 10.5
    # A fresh runtime (another engine, another compilation) counts the same.
    assert await fuel_of(WasmRuntime(), wat.counting(10_000)) == small[0]


async def test_a_run_that_spends_its_fuel_budget_fails_naming_it(runtime: WasmRuntime) -> None:
    needed = await fuel_of(runtime, wat.counting(10_000))
    # wasmtime checks the budget at loop heads and calls, so a budget a few units short of
    # what the run needs may still see it end: half of it does not.
    tight = Limits(timeout_s=60.0, memory_bytes=16 << 20, output_bytes=1024, fuel=needed // 2)
    assert await failure(runtime, wat.counting(10_000), tight) == (
        f"fuel budget of {needed // 2} exhausted (the module ran out)"
    )
    exact = Limits(timeout_s=60.0, memory_bytes=16 << 20, output_bytes=1024, fuel=needed)
    assert await fuel_of(runtime, wat.counting(10_000), exact) == needed
    # A module that never ends stops at its budget long before its timeout.
    started = time.monotonic()
    loop = Limits(timeout_s=60.0, memory_bytes=16 << 20, output_bytes=1024, fuel=10**7)
    assert await failure(runtime, wat.infinite_loop(), loop) == (
        "fuel budget of 10000000 exhausted (the module ran out)"
    )
    assert time.monotonic() - started < 30
    # The runtime goes on running modules.
    assert await run(runtime, wat.hello()) == b"hello from wasm\n"


async def test_a_runtime_without_metering_counts_nothing() -> None:
    plain = WasmRuntime(metering=False)
    tight = Limits(timeout_s=60.0, memory_bytes=16 << 20, output_bytes=1024, fuel=1)
    assert await fuel_of(plain, wat.counting(10_000), tight) == 0


def test_fuel_budget_must_be_positive_and_fit_64_bits() -> None:
    for bad in (0, -1, 2**63):
        with pytest.raises(ValueError, match=r"^fuel: "):
            Limits(fuel=bad)
