"""What every client command shares, written once: a command is a row of the table in
`server.cli.commands` (`Command`: group, name, help, arguments, and an async function that
calls the `Client` and returns a `Reply`), and `run` does the rest: the services' addresses
(flags, then the environment, then the seed's ports on localhost), the client and its
timeout, the output as tables or JSON, and exit status 1 with one line on stderr for a failed
command. Errors raised inside (ours, or a `FileProblem`) become that one line in
`server.cli.main`.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import Message

from server.cli.client import CLI_ENDPOINTS, DEFAULT_TIMEOUT_S, Client, add_tls_flags, tls_of
from server.cli.render import Output, message_dict
from server.config import ENDPOINTS, Endpoints

# The services the client commands talk to (each has a --SERVICE flag).
SERVICES = ("manager", "coordinator", "registry", "datastore")


@dataclass(frozen=True)
class Reply:
    """What a command answers. `doc` is printed (indented) with --json, `text` otherwise or
    when there is no `doc`; `printed`: the command already wrote its output as it happened.
    A `failure` is one line on stderr after the output, and exit status 1."""

    doc: object = None
    text: str = ""
    printed: bool = False
    failure: str = ""


def shown(msg: Message, text: str) -> Reply:
    """A reply that is one message: as JSON, or as `text`."""
    return Reply(message_dict(msg), text)


Arg = tuple[tuple[str, ...], dict[str, Any]]


def arg(*flags: str, **options: Any) -> Arg:
    """One `parser.add_argument(*flags, **options)`."""
    return flags, options


@dataclass(frozen=True)
class OneOf:
    """Arguments of which exactly one must be given."""

    args: tuple[Arg, ...]


@dataclass(frozen=True)
class Command:
    """`propeller-fl GROUP NAME ARGS...`: `run(client, args)` is all it does of its own."""

    group: str
    name: str
    help: str
    run: Callable[[Client, argparse.Namespace], Awaitable[Reply]]
    args: tuple[Arg | OneOf, ...] = ()
    # False for a command that calls none of our services (`wasm push`): no TLS flags.
    grpc: bool = True


def one_call(
    call: Callable[[Client, argparse.Namespace], Awaitable[Message]],
    render: Callable[[Any], str],
) -> Callable[[Client, argparse.Namespace], Awaitable[Reply]]:
    """A command that is one call whose answer is shown as it is."""

    async def run(c: Client, a: argparse.Namespace) -> Reply:
        msg = await call(c, a)
        return shown(msg, render(msg))

    return run


def endpoints_of(args: argparse.Namespace) -> Endpoints:
    """Flags win over the environment, which wins over the seed's ports on localhost."""
    given = {name: getattr(args, name) for name in SERVICES if getattr(args, name)}
    return dataclasses.replace(Endpoints.from_env(defaults=CLI_ENDPOINTS), **given)


async def run(command: Command, args: argparse.Namespace) -> int:
    """The part every command shares: connect, call, print, exit status."""
    tls = tls_of(args) if command.grpc else None
    async with Client(endpoints_of(args), tls=tls, timeout=args.timeout) as client:
        reply = await command.run(client, args)
    out = Output()
    if not reply.printed:
        if args.json and reply.doc is not None:
            out.json(reply.doc)
        else:
            out.text(reply.text)
    if reply.failure:
        sys.stderr.write(f"propeller-fl {args.command}: {reply.failure}\n")
        sys.stderr.flush()
        return 1
    return 0


def _common_parser(tls: bool) -> argparse.ArgumentParser:
    """Flags every client command takes: where the services are, the RPC timeout, --json;
    with `tls`, --tls-dir and --insecure."""
    p = argparse.ArgumentParser(add_help=False)
    add_connection_flags(p, tls)
    p.add_argument(
        "--json", action="store_true", help="machine-readable JSON on stdout instead of tables"
    )
    return p


def add_connection_flags(parser: argparse.ArgumentParser, tls: bool = True) -> None:
    """The services' addresses (`endpoints_of` reads them), --timeout and, with `tls`,
    --tls-dir / --insecure: what every client of the services takes."""
    g = parser.add_argument_group("connection")
    for service in SERVICES:
        env, _, label = ENDPOINTS[service]
        g.add_argument(
            f"--{service}",
            metavar="HOST:PORT",
            default=None,
            help=f"{label} address (env {env}; default {getattr(CLI_ENDPOINTS, service)})",
        )
    g.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help=f"per-RPC timeout (default {DEFAULT_TIMEOUT_S:g})",
    )
    if tls:
        add_tls_flags(g)


def add_command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    run: Callable[[argparse.Namespace], Awaitable[int]],
    summary: str,
    **defaults: Any,
) -> argparse.ArgumentParser:
    """A command that is not a row of the client table (`demo`, `up`, `serve`, `certs init`,
    ...): `summary` is its line in the list of commands, `run`'s docstring its description,
    and `run` what `server.cli.main` calls (`func`); `defaults` go on its namespace too."""
    parser = sub.add_parser(name, help=summary, description=inspect.getdoc(run))
    parser.set_defaults(func=run, **defaults)
    return parser


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    groups_help: dict[str, str],
    commands: Sequence[Command],
) -> None:
    """Add the command groups and their commands to the `propeller-fl` parser."""
    common = {tls: _common_parser(tls) for tls in (True, False)}
    groups: dict[str, argparse._SubParsersAction[argparse.ArgumentParser]] = {}
    for name, help_ in groups_help.items():
        gp = sub.add_parser(name, help=help_, description=help_)
        groups[name] = gp.add_subparsers(dest="action", metavar="ACTION", required=True)
    for command in commands:
        p = groups[command.group].add_parser(
            command.name,
            help=command.help,
            description=command.help,
            parents=[common[command.grpc]],
        )
        for spec in command.args:
            if isinstance(spec, OneOf):
                one = p.add_mutually_exclusive_group(required=True)
                for flags, options in spec.args:
                    one.add_argument(*flags, **options)
            else:
                p.add_argument(*spec[0], **spec[1])

        async def func(args: argparse.Namespace, command: Command = command) -> int:
            return await run(command, args)

        # Error lines name the full command: "propeller-fl models list: ...".
        p.set_defaults(func=func, command=f"{command.group} {command.name}")
