"""What `propeller-fl demo` and `propeller-fl up` share besides the stack runner
(`server.stack.Stack`): the trainer module they hand the proplets, the error that ends either
in one line, and their argument types."""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib.util
import math
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parents[2]
WASM_BUILD_SCRIPT = _REPO_ROOT / "wasm-client" / "build.py"
DEFAULT_PROPLETS = 3
DEFAULT_SAMPLES = 64
DEFAULT_FEATURES = 3


class CommandFailed(Exception):
    """The run cannot go on; the message is the one line the user sees."""


def one_line_failure(
    name: str,
) -> Callable[
    [Callable[[argparse.Namespace], Awaitable[int]]],
    Callable[[argparse.Namespace], Awaitable[int]],
]:
    """The command `name` ends a CommandFailed as `propeller-fl NAME: <message>` on stderr
    (after whatever it printed on stdout) and exit status 1."""

    def wrap(
        command: Callable[[argparse.Namespace], Awaitable[int]],
    ) -> Callable[[argparse.Namespace], Awaitable[int]]:
        @functools.wraps(command)
        async def run(args: argparse.Namespace) -> int:
            try:
                return await command(args)
            except CommandFailed as exc:
                sys.stdout.flush()
                print(f"propeller-fl {name}: {exc}", file=sys.stderr)
                return 1

        return run

    return wrap


# ---------------------------------------------------------------------------- trainer


def _build_trainer(mlp: bool) -> Path:
    if not WASM_BUILD_SCRIPT.is_file():
        raise CommandFailed(
            f"trainer: {WASM_BUILD_SCRIPT} not found (installed without the source tree?); "
            "pass --wasm FILE"
        )
    spec = importlib.util.spec_from_file_location("wasm_client_build", WASM_BUILD_SCRIPT)
    if spec is None or spec.loader is None:
        raise CommandFailed(f"trainer: cannot load {WASM_BUILD_SCRIPT}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        path = Path(module.build_mlp() if mlp else module.build())
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CommandFailed(f"trainer: build failed: {first}") from None
    return path


def _trainer(explicit: Path | None, mlp: bool) -> Path:
    if explicit is not None:
        if not explicit.is_file():
            raise CommandFailed(f"--wasm: {explicit} is not a file")
        return explicit.resolve()
    return _build_trainer(mlp).resolve()


async def locate_trainer(explicit: Path | None, *, mlp: bool = False) -> Path:
    """The trainer module: `--wasm FILE`, or wasm-client built (cached) from source: the
    linear trainer, or with `mlp` the MLP trainer (fl-mlp.wasm)."""
    return await asyncio.to_thread(_trainer, explicit, mlp)


def add_stack_flags(parser: argparse.ArgumentParser, *, insecure_help: str) -> None:
    """What `demo` and `up` both take about the stack they start: how many proplets, whether
    its gRPC is plaintext, and the trainer module."""
    parser.add_argument(
        "--proplets", type=_positive_int, default=DEFAULT_PROPLETS, metavar="N", help="proplets (3)"
    )
    parser.add_argument("--insecure", action="store_true", help=insecure_help)
    parser.add_argument(
        "--wasm",
        type=Path,
        default=None,
        metavar="FILE",
        help="trainer module to use instead of building wasm-client/src/main.zig",
    )


# ---------------------------------------------------------------------------- argument types
# (argparse names the function in its message for a value that is not a number at all:
# "invalid _positive_int value: 'x'", as it always has.)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be in 0..65535 (0 = any free port), got {value}")
    return value
