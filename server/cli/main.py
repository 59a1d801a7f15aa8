"""`propeller-fl` entry point. Each command module registers its subcommands on the parser
(`register(sub)`), setting `func`, an async `(args) -> int` (the exit status). Errors end as
one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from server import tracing
from server.cli import certs, commands, demo, serve, up
from server.cli.render import describe_error
from server.console import command as console
from server.errors import PropellerError
from server.log_format import LogConfig, configure_logging

Command = Callable[[argparse.Namespace], Coroutine[Any, Any, int]]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="propeller-fl",
        description="Federated learning on edge devices as WebAssembly tasks (gRPC + MQTT).",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo.register(sub)
    up.register(sub)
    serve.register(sub)
    commands.register(sub)
    certs.register(sub)
    console.register(sub)
    return parser


def service_name(args: argparse.Namespace) -> str:
    """What the process's spans say it is (`OTEL_SERVICE_NAME` wins): the service `serve`
    runs, else the command."""
    return f"propeller-fl-{args.service if args.command == 'serve' else args.command}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    try:
        configure_logging(level, LogConfig.from_env())
    except ValueError as exc:
        print(f"propeller-fl {args.command}: {exc}", file=sys.stderr)
        return 1
    func: Command = args.func
    # Before any server or channel exists: they take the trace interceptors when created.
    tracing.configure(os.environ, service_name(args))
    try:
        return asyncio.run(func(args))
    except KeyboardInterrupt:
        return 130
    except (PropellerError, OSError, ValueError) as exc:
        print(f"propeller-fl {args.command}: {describe_error(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
