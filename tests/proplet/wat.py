"""Small WASI test modules written in WAT, each showing one behaviour a task can have."""

from __future__ import annotations

import json

import wasmtime

_IMPORTS = """
(import "wasi_snapshot_preview1" "fd_write"
  (func $fd_write (param i32 i32 i32 i32) (result i32)))
(import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
(import "wasi_snapshot_preview1" "environ_sizes_get"
  (func $environ_sizes_get (param i32 i32) (result i32)))
(import "wasi_snapshot_preview1" "environ_get" (func $environ_get (param i32 i32) (result i32)))
(import "wasi_snapshot_preview1" "args_sizes_get"
  (func $args_sizes_get (param i32 i32) (result i32)))
(import "wasi_snapshot_preview1" "args_get" (func $args_get (param i32 i32) (result i32)))
(import "wasi_snapshot_preview1" "poll_oneoff"
  (func $poll_oneoff (param i32 i32 i32 i32) (result i32)))
"""

DATA_AT = 4096  # where constant data lives; the first page's start is scratch space


def _wat_bytes(data: bytes) -> str:
    return "".join(f"\\{b:02x}" for b in data)


def build(body: str, data: bytes = b"", pages: int = 1) -> bytes:
    """A WASI command whose `_start` runs `body`; `data` is placed at DATA_AT."""
    segment = f'(data (i32.const {DATA_AT}) "{_wat_bytes(data)}")' if data else ""
    wat = (
        f'(module {_IMPORTS} (memory (export "memory") {pages}) {segment}\n'
        f'(func (export "_start") {body}))'
    )
    wasm: bytes = wasmtime.wat2wasm(wat)
    return wasm


def _write(fd: int, offset: int, length: int) -> str:
    """fd_write of one iovec {DATA_AT+offset, length}, built at address 0."""
    return (
        f"(i32.store (i32.const 0) (i32.const {DATA_AT + offset}))"
        f"(i32.store (i32.const 4) (i32.const {length}))"
        f"(drop (call $fd_write (i32.const {fd}) (i32.const 0) (i32.const 1) (i32.const 8)))"
    )


def printing(
    stdout: bytes = b"", *, stderr: bytes = b"", exit_code: int | None = None, sleep_s: float = 0
) -> bytes:
    """Blocks in the host for `sleep_s` seconds, writes `stdout` and `stderr`, then returns
    from _start or exits with `exit_code`."""
    body = _sleep(sleep_s)
    if stdout:
        body += _write(1, 0, len(stdout))
    if stderr:
        body += _write(2, len(stdout), len(stderr))
    if exit_code is not None:
        body += f"(call $proc_exit (i32.const {exit_code}))"
    pages = 1 + (DATA_AT + len(stdout) + len(stderr)) // 65536
    return build(body, stdout + stderr, pages=pages)


def hello() -> bytes:
    return printing(b"hello from wasm\n", exit_code=0)


def trap() -> bytes:
    return build("unreachable")


def infinite_loop() -> bytes:
    return build("(loop $forever (br $forever))")


def memory_hog() -> bytes:
    """Grows memory 1 MiB at a time until refused, then aborts, as a C or Zig program's failed
    allocation would."""
    return build(
        "(block $refused (loop $grow"
        "  (br_if $refused (i32.eq (memory.grow (i32.const 16)) (i32.const -1)))"
        "  (br $grow)))"
        "unreachable"
    )


def exit_with(code: int, stderr: bytes = b"") -> bytes:
    return printing(stderr=stderr, exit_code=code)


def flood(chunk: int = 4096, times: int = 1000) -> bytes:
    """Writes `times` chunks of `chunk` bytes to stdout (ignoring write errors), exits 0."""
    body = (
        f"(i32.store (i32.const 0) (i32.const {DATA_AT}))"
        f"(i32.store (i32.const 4) (i32.const {chunk}))"
        f"(i32.store (i32.const 16) (i32.const {times}))"
        "(block $done (loop $again"
        "  (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))"
        "  (i32.store (i32.const 16) (i32.sub (i32.load (i32.const 16)) (i32.const 1)))"
        "  (br_if $again (i32.gt_s (i32.load (i32.const 16)) (i32.const 0)))))"
        "(call $proc_exit (i32.const 0))"
    )
    return build(body, b"x" * chunk, pages=1 + (DATA_AT + chunk) // 65536)


def env_dump() -> bytes:
    """Prints its environment as NUL-terminated KEY=VALUE strings (the WASI environ buffer),
    then a 0x1E (record separator), then its argv the same way."""
    # Scratch: sizes at 0..8, iovec at 16..24, nwritten at 24; pointer arrays at 64 KiB;
    # string buffers from 128 KiB; 64 pages = 4 MiB of room.
    body = (
        "(drop (call $environ_sizes_get (i32.const 0) (i32.const 4)))"
        "(drop (call $environ_get (i32.const 65536) (i32.const 131072)))"
        "(i32.store (i32.const 16) (i32.const 131072))"
        "(i32.store (i32.const 20) (i32.load (i32.const 4)))"
        "(drop (call $fd_write (i32.const 1) (i32.const 16) (i32.const 1) (i32.const 24)))"
        + _write(1, 0, 1)
        + "(drop (call $args_sizes_get (i32.const 0) (i32.const 4)))"
        "(drop (call $args_get (i32.const 65536) (i32.const 131072)))"
        "(i32.store (i32.const 16) (i32.const 131072))"
        "(i32.store (i32.const 20) (i32.load (i32.const 4)))"
        "(drop (call $fd_write (i32.const 1) (i32.const 16) (i32.const 1) (i32.const 24)))"
    )
    return build(body, b"\x1e", pages=64)


def parse_env_dump(stdout: bytes) -> tuple[dict[str, str], list[str]]:
    env_part, _, args_part = stdout.partition(b"\x1e")
    env: dict[str, str] = {}
    for item in env_part.split(b"\0"):
        if item:
            key, _, value = item.decode().partition("=")
            env[key] = value
    args = [a.decode() for a in args_part.split(b"\0") if a]
    return env, args


def _sleep(seconds: float) -> str:
    """WASI poll_oneoff on one relative clock for `seconds` (nothing for 0)."""
    ns = int(seconds * 1e9)
    if not ns:
        return ""
    return (
        # subscription at 0: userdata u64, tag u8 at 8 (0 = clock), clock id u32 at 16
        # (1 = monotonic), timeout u64 at 24, precision u64 at 32, flags u16 at 40 (0 = relative)
        "(i32.store8 (i32.const 8) (i32.const 0))"
        "(i32.store (i32.const 16) (i32.const 1))"
        f"(i64.store (i32.const 24) (i64.const {ns}))"
        "(drop (call $poll_oneoff (i32.const 0) (i32.const 256) (i32.const 1) (i32.const 512)))"
    )


def sleeper(seconds: float) -> bytes:
    """Blocks in the host (WASI poll_oneoff on a relative clock) for `seconds`."""
    return build(_sleep(seconds))


def json_printer(value: object) -> bytes:
    """Prints `value` as one line of JSON and exits 0 (a module with a fixed answer)."""
    return printing(json.dumps(value).encode() + b"\n", exit_code=0)
