"""`propeller-fl` entry point. Each module registers its subcommands on the parser; a command
is a function `(args) -> int` (exit status). Errors end as one line on stderr and a non-zero
exit, never a traceback."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import grpc

from server.errors import PropellerError

Command = Callable[[argparse.Namespace], Coroutine[Any, Any, int]]


def build_parser() -> argparse.ArgumentParser:
    import server.cli.client as client
    import server.cli.demo as demo
    import server.cli.serve as serve

    parser = argparse.ArgumentParser(
        prog="propeller-fl",
        description="Federated learning on edge devices as WebAssembly tasks (gRPC + MQTT).",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo.register(sub)
    serve.register(sub)
    client.register(sub)
    return parser


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    if isinstance(exc, PropellerError):
        return f"{exc.code.name}: {exc}"
    return str(exc) or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    func: Command = args.func
    try:
        return asyncio.run(func(args))
    except KeyboardInterrupt:
        return 130
    except (PropellerError, grpc.aio.AioRpcError, OSError, ValueError) as exc:
        print(f"propeller-fl {args.command}: {describe_error(exc)}", file=sys.stderr)
        return 1


def set_command(parser: argparse.ArgumentParser, func: Command) -> None:
    parser.set_defaults(func=func)


if __name__ == "__main__":
    raise SystemExit(main())
