"""Running `propeller-fl` as a user would: in-process through `server.cli.main.main` (in a
worker thread, since main() runs its own event loop) or as the installed console script."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import wasmtime

from server.cli.main import main
from server.config import Endpoints
from tests.support.security import operator_tls

T = TypeVar("T")


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)

    def json_lines(self) -> list[Any]:
        return [json.loads(line) for line in self.out.splitlines() if line.strip()]

    @property
    def err_lines(self) -> list[str]:
        return self.err.splitlines()

    def ok(self) -> Result:
        assert self.code == 0, f"exit {self.code}\nstdout:\n{self.out}\nstderr:\n{self.err}"
        assert self.err == "", self.err
        return self

    def failed_with(self, *needles: str) -> str:
        """Exit 1 with exactly one stderr line, no traceback; returns that line."""
        assert self.code == 1, f"exit {self.code}\nstdout:\n{self.out}\nstderr:\n{self.err}"
        assert "Traceback" not in self.err and "Traceback" not in self.out
        assert len(self.err_lines) == 1, self.err
        line = self.err_lines[0]
        for needle in needles:
            assert needle in line, line
        return line


Cli = Callable[..., Awaitable[Result]]


def make_cli(capsys: pytest.CaptureFixture[str]) -> Cli:
    async def run(*argv: str) -> Result:
        capsys.readouterr()
        try:
            code = await asyncio.to_thread(main, list(argv))
        except SystemExit as exc:  # argparse usage errors
            code = int(exc.code or 0)
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


def console_script() -> str:
    """The `propeller-fl` entry point installed into the venv."""
    found = Path(sys.executable).with_name("propeller-fl")
    if found.exists():
        return str(found)
    which = shutil.which("propeller-fl")
    assert which, "propeller-fl console script not installed (pip install -e .)"
    return which


async def run_script(*argv: str, env: dict[str, str] | None = None) -> Result:
    """The console script as a child process; the event loop keeps serving meanwhile."""
    proc = await asyncio.create_subprocess_exec(
        console_script(),
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


def tls_flags() -> list[str]:
    """The suite's operator bundle, as a client command takes it."""
    return ["--tls-dir", str(operator_tls().cert.parent)]


def flags(endpoints: Endpoints) -> list[str]:
    """Where the services are, and the suite's operator bundle to call them with."""
    return [
        *tls_flags(),
        "--manager",
        endpoints.manager,
        "--coordinator",
        endpoints.coordinator,
        "--registry",
        endpoints.registry,
        "--datastore",
        endpoints.datastore,
        "--timeout",
        "20",
    ]


def table_rows(text: str) -> tuple[list[str], list[list[str]]]:
    """Split an aligned table (columns separated by 2+ spaces) into header and rows."""
    lines = [line for line in text.splitlines() if line.strip()]
    split = [re.split(r"\s{2,}", line.strip()) for line in lines]
    return split[0], split[1:]


def hello_wasm(path: Path, text: bytes = b"hello from wasm\n") -> Path:
    """A WASI command that writes `text` to stdout and returns."""
    data = "".join(f"\\{b:02x}" for b in text)
    wat = f"""
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 1024) "{data}")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 1024))
    (i32.store (i32.const 4) (i32.const {len(text)}))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
"""
    path.write_bytes(wasmtime.wat2wasm(wat))
    return path


def spin_wasm(path: Path) -> Path:
    """A WASI command that loops until it is stopped."""
    wat = '(module (memory (export "memory") 1) (func (export "_start") (loop $l (br $l))))'
    path.write_bytes(wasmtime.wat2wasm(wat))
    return path


def terminal_screen(raw: str) -> list[str]:
    """What a terminal shows after `raw` written by `server.cli.progress.ExperimentView`: each
    redraw (cursor up N lines, erase down) replaces the lines the previous one drew."""
    lines: list[str] = []
    for part in re.split(r"(\x1b\[\d+F\x1b\[J)", raw.replace("\r\n", "\n")):
        moved = re.fullmatch(r"\x1b\[(\d+)F\x1b\[J", part)
        if moved:
            del lines[len(lines) - int(moved.group(1)) :]
        else:
            lines += part.splitlines()
    return lines
