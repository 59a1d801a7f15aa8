"""The wasmtime runner on its own: each way a module can end, and its limits."""

from __future__ import annotations

import asyncio
import hashlib

import pytest
import wasmtime

from proplet import Invocation, Limits, RunControl, TaskFailed, TaskInterrupted, WasmRuntime
from proplet.runner import CompiledModule
from tests.proplet import wat

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


async def test_module_blocked_in_a_host_call_is_abandoned_after_the_deadline(
    runtime: WasmRuntime,
) -> None:
    limits = Limits(timeout_s=0.2, memory_bytes=16 << 20, output_bytes=1024)
    reason = await failure(runtime, wat.sleeper(5.0), limits)
    assert reason.startswith("deadline exceeded after 0.2s")


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
