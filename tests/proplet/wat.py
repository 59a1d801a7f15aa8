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
(import "wasi_snapshot_preview1" "clock_time_get"
  (func $clock_time_get (param i32 i64 i32) (result i32)))
(import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
(import "wasi_snapshot_preview1" "fd_prestat_get"
  (func $fd_prestat_get (param i32 i32) (result i32)))
(import "wasi_snapshot_preview1" "path_open"
  (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
(import "wasi_snapshot_preview1" "sock_accept"
  (func $sock_accept (param i32 i32 i32) (result i32)))
"""

DATA_AT = 4096  # where constant data lives; the first page's start is scratch space


def _wat_bytes(data: bytes) -> str:
    return "".join(f"\\{b:02x}" for b in data)


def build(body: str, data: bytes = b"", pages: int = 1, *, extra: str = "") -> bytes:
    """A WASI command whose `_start` runs `body`; `data` is placed at DATA_AT; `extra` adds
    declarations (more memories, tables, locals come first in `body`)."""
    segment = f'(data (i32.const {DATA_AT}) "{_wat_bytes(data)}")' if data else ""
    wat = (
        f'(module {_IMPORTS} (memory (export "memory") {pages}) {extra} {segment}\n'
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


def counting(iterations: int) -> bytes:
    """Counts down from `iterations` in a loop, then returns: work proportional to it."""
    return build(
        f"(local $n i32) (local.set $n (i32.const {iterations}))"
        "(block $done (loop $again"
        "  (br_if $done (i32.eqz (local.get $n)))"
        "  (local.set $n (i32.sub (local.get $n) (i32.const 1)))"
        "  (br $again)))"
    )


def _touch(memory: int, start: str, end: str) -> str:
    """Writes one byte in every 4 KiB page of [start, end) of `memory` (so the pages cost real
    memory); uses the local $at."""
    return (
        f"(local.set $at {start})"
        "(block $touched (loop $page"
        f"  (br_if $touched (i32.ge_u (local.get $at) {end}))"
        f"  (i32.store8 {memory} (local.get $at) (i32.const 1))"
        "  (local.set $at (i32.add (local.get $at) (i32.const 4096)))"
        "  (br $page)))"
    )


def _grow_until_refused() -> str:
    """Grows memory 0 by 1 MiB at a time, using each new MiB, until a grow is refused."""
    return (
        "(block $refused (loop $grow"
        "  (local.set $old (memory.grow (i32.const 16)))"
        "  (br_if $refused (i32.eq (local.get $old) (i32.const -1)))"
        + _touch(
            0, "(i32.shl (local.get $old) (i32.const 16))", "(i32.shl (memory.size) (i32.const 16))"
        )
        + "  (br $grow)))"
    )


def memory_hog() -> bytes:
    """Grows memory 1 MiB at a time, writing to every page, until refused, then aborts, as a
    C or Zig program's failed allocation would."""
    return build("(local $old i32) (local $at i32)" + _grow_until_refused() + "unreachable")


def many_memories(count: int, pages: int) -> bytes:
    """Declares `count` linear memories of `pages` pages each (multi-memory), writes to every
    page of each, then exits 0: `count` x `pages` x 64 KiB of real memory if it may run."""
    extra = "".join(f"(memory {pages})" for _ in range(count - 1))
    end = f"(i32.const {pages * 65536})"
    body = "(local $at i32)" + "".join(_touch(m, "(i32.const 0)", end) for m in range(count))
    return build(body + "(call $proc_exit (i32.const 0))", pages=pages, extra=extra)


def tables(count: int) -> bytes:
    """Declares `count` tables of one element each, then exits 0."""
    return build("(call $proc_exit (i32.const 0))", extra="(table 1 funcref)" * count)


def table_and_memory_hog() -> bytes:
    """Grows its table 1024 elements at a time until refused, then its memory 1 MiB at a time
    (writing to every page) until refused; prints the table's elements and the memory's pages
    (two little-endian u32) and exits 0."""
    body = (
        "(local $old i32) (local $at i32)"
        "(block $full (loop $more"
        "  (br_if $full (i32.eq (table.grow $t (ref.null func) (i32.const 1024)) (i32.const -1)))"
        "  (br $more)))"
    )
    body += _grow_until_refused()
    body += (
        "(i32.store (i32.const 32) (table.size $t))"
        "(i32.store (i32.const 36) (memory.size))"
        "(i32.store (i32.const 0) (i32.const 32))"
        "(i32.store (i32.const 4) (i32.const 8))"
        "(drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))"
        "(call $proc_exit (i32.const 0))"
    )
    return build(body, extra="(table $t 1 funcref)")


def _proposal(declarations: str, body: str) -> bytes:
    """A WASI-less command using a wasm proposal: `declarations`, a memory, `_start` runs
    `body`."""
    wasm: bytes = wasmtime.wat2wasm(
        f'(module {declarations} (memory (export "memory") 1) (func (export "_start") {body}))'
    )
    return wasm


def exception_thrower() -> bytes:
    """Throws a wasm exception and catches it (the exception-handling proposal)."""
    return _proposal("(tag $oops)", "(block $caught (try_table (catch_all $caught) (throw $oops)))")


def gc_arrays() -> bytes:
    """Allocates a GC array (the GC proposal; its heap is not linear memory)."""
    return _proposal(
        "(type $bytes (array (mut i8)))", "(drop (array.new_default $bytes (i32.const 1024)))"
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


def _subscription(
    at: int, userdata: int, tag: int, ident: int, timeout: str = "(i64.const 0)", flags: int = 0
) -> str:
    """A WASI subscription at `at`: userdata u64, tag u8 at +8 (0 clock, 1 fd_read, 2
    fd_write), clock id or fd u32 at +16, timeout u64 at +24 (ns), precision u64 at +32,
    flags u16 at +40 (1 = absolute time)."""
    return (
        f"(i64.store (i32.const {at}) (i64.const {userdata}))"
        f"(i32.store8 (i32.const {at + 8}) (i32.const {tag}))"
        f"(i32.store (i32.const {at + 16}) (i32.const {ident}))"
        f"(i64.store (i32.const {at + 24}) {timeout})"
        f"(i64.store (i32.const {at + 32}) (i64.const 0))"
        f"(i32.store16 (i32.const {at + 40}) (i32.const {flags}))"
    )


MONOTONIC, REALTIME = 1, 0


def _poll(subscriptions: int) -> str:
    """poll_oneoff on the subscriptions at 256.., events to 512.., their count to 768."""
    return (
        "(call $poll_oneoff (i32.const 256) (i32.const 512)"
        f" (i32.const {subscriptions}) (i32.const 768))"
    )


def _sleep(seconds: float) -> str:
    """WASI poll_oneoff on one relative monotonic clock for `seconds` (nothing for 0)."""
    ns = int(seconds * 1e9)
    if not ns:
        return ""
    return _subscription(256, 1, 0, MONOTONIC, f"(i64.const {ns})") + f"(drop {_poll(1)})"


def sleeper(seconds: float) -> bytes:
    """Blocks in the host (WASI poll_oneoff on a relative clock) for `seconds`."""
    return build(_sleep(seconds))


def sleeper_until(unix_ns: int) -> bytes:
    """Blocks in the host until the realtime clock reads `unix_ns` (an absolute clock)."""
    return build(
        _subscription(256, 1, 0, REALTIME, f"(i64.const {unix_ns})", flags=1) + f"(drop {_poll(1)})"
    )


def timed_sleep(seconds: float, *, absolute: bool) -> bytes:
    """Sleeps `seconds` on the monotonic clock (relative, or absolute: now + seconds as read
    by clock_time_get) and checks it: exit 0 if poll_oneoff answered one clock event and the
    clock advanced by at least `seconds`, 1 if it advanced less, 2 if poll_oneoff failed."""
    ns = int(seconds * 1e9)
    timeout = (
        f"(i64.add (i64.load (i32.const 800)) (i64.const {ns}))"
        if absolute
        else f"(i64.const {ns})"
    )
    body = (
        "(drop (call $clock_time_get (i32.const 1) (i64.const 0) (i32.const 800)))"
        + _subscription(256, 7, 0, MONOTONIC, timeout, flags=1 if absolute else 0)
        + f"(if (i32.or (i32.ne {_poll(1)} (i32.const 0))"
        "      (i32.or (i32.ne (i32.load (i32.const 768)) (i32.const 1))"
        "              (i64.ne (i64.load (i32.const 512)) (i64.const 7))))"
        "  (then (call $proc_exit (i32.const 2))))"
        "(drop (call $clock_time_get (i32.const 1) (i64.const 0) (i32.const 808)))"
        "(if (i64.lt_u (i64.sub (i64.load (i32.const 808)) (i64.load (i32.const 800)))"
        f"             (i64.const {ns}))"
        "  (then (call $proc_exit (i32.const 1))))"
        "(call $proc_exit (i32.const 0))"
    )
    return build(body)


# What `host_calls` prints, one byte each, in this order.
HOST_CALLS = (
    "stdin_read_errno",  # fd_read(0): 0
    "stdin_read_bytes",  # ... and how many bytes: 0 (stdin is empty)
    "poll_errno",  # poll_oneoff on stdin readable + a one-hour clock: 0, at once
    "poll_events",  # 1 event ...
    "poll_event_type",  # ... of type fd_read (1)
    "poll_event_userdata",  # ... for the stdin subscription (1)
    "prestat_errno",  # fd_prestat_get(3): EBADF (8), no preopened directory
    "path_open_errno",  # path_open(3, "x"): EBADF
    "sock_accept_errno",  # sock_accept(3): EBADF, no socket
    "fd3_read_errno",  # fd_read(3): EBADF
    "fd3_poll_errno",  # poll_oneoff on fd 3 readable: EBADF
)


def host_calls() -> bytes:
    """Calls each WASI function that could wait for something (stdin, poll_oneoff on a
    descriptor, preopened files, sockets) and prints what each answered (see HOST_CALLS)."""
    iov = "(i32.store (i32.const 0) (i32.const 2048)) (i32.store (i32.const 4) (i32.const 16))"
    results = [
        "(call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 16))",
        "(i32.load (i32.const 16))",
        _subscription(256, 1, 1, 0)
        + _subscription(304, 2, 0, MONOTONIC, f"(i64.const {3600 * 10**9})")
        + _poll(2),
        "(i32.load (i32.const 768))",
        "(i32.load8_u (i32.const 522))",
        "(i32.load8_u (i32.const 512))",
        "(call $fd_prestat_get (i32.const 3) (i32.const 900))",
        "(i32.store8 (i32.const 940) (i32.const 120))"
        "(call $path_open (i32.const 3) (i32.const 0) (i32.const 940) (i32.const 1)"
        " (i32.const 0) (i64.const 0) (i64.const 0) (i32.const 0) (i32.const 944))",
        "(call $sock_accept (i32.const 3) (i32.const 0) (i32.const 948))",
        "(call $fd_read (i32.const 3) (i32.const 0) (i32.const 1) (i32.const 16))",
        _subscription(256, 3, 1, 3) + _poll(1),
    ]
    assert len(results) == len(HOST_CALLS)
    body = iov + "".join(
        f"(i32.store8 (i32.const {1024 + i}) {value})" for i, value in enumerate(results)
    )
    body += (
        "(i32.store (i32.const 0) (i32.const 1024))"
        f"(i32.store (i32.const 4) (i32.const {len(results)}))"
        "(drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))"
    )
    return build(body)


def parse_host_calls(stdout: bytes) -> dict[str, int]:
    return dict(zip(HOST_CALLS, stdout, strict=True))


def json_printer(value: object) -> bytes:
    """Prints `value` as one line of JSON and exits 0 (a module with a fixed answer)."""
    return printing(json.dumps(value).encode() + b"\n", exit_code=0)


def round_update(round_id: str, sleep_s: float) -> bytes:
    """A round module that "trains" for `sleep_s` seconds (a WASI sleep), then prints a valid
    update for `round_id` and the 3-feature model."""
    update = json.dumps(
        {
            "round_id": round_id,
            "num_samples": 10,
            "metrics": {"loss": 0.5},
            "update": {"w": [0.25, -0.5, 1.0], "b": 0.125},
        }
    ).encode()
    return printing(update, sleep_s=sleep_s)


def contract_v2_printer(stdout: bytes) -> bytes:
    """A module declaring trainer contract v2 (it exports `propeller_contract_v2`) that
    prints `stdout` whatever its stdin holds, then exits 0."""
    body = _write(1, 0, len(stdout)) + "(call $proc_exit (i32.const 0))" if stdout else ""
    return build(
        body,
        stdout,
        pages=1 + (DATA_AT + len(stdout)) // 65536,
        extra='(func (export "propeller_contract_v2"))',
    )


def stdin_echo(limit: int = 1 << 20) -> bytes:
    """A contract-v2 module that copies its stdin to stdout (one fd_read per 64 KiB until
    it reads 0, or once it holds at least `limit` - 64 KiB bytes), then exits 0."""
    pages = 2 + limit // 65536
    body = (
        "(local $at i32) (local $n i32)"
        "(local.set $at (i32.const 65536))"
        "(block $eof (loop $more"
        "  (i32.store (i32.const 0) (local.get $at))"
        "  (i32.store (i32.const 4) (i32.const 65536))"
        "  (drop (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 16)))"
        "  (local.set $n (i32.load (i32.const 16)))"
        "  (br_if $eof (i32.eqz (local.get $n)))"
        "  (local.set $at (i32.add (local.get $at) (local.get $n)))"
        f"  (br_if $eof (i32.ge_u (local.get $at) (i32.const {limit})))"
        "  (br $more)))"
        "(i32.store (i32.const 0) (i32.const 65536))"
        "(i32.store (i32.const 4) (i32.sub (local.get $at) (i32.const 65536)))"
        "(drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))"
        "(call $proc_exit (i32.const 0))"
    )
    return build(body, pages=pages, extra='(func (export "propeller_contract_v2"))')
