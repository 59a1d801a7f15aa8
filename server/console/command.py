"""`propeller-fl console`: the command that serves the console until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import signal

from server.cli.client import tls_of
from server.cli.runner import add_command, add_connection_flags, endpoints_of
from server.console.app import DEFAULT_LISTEN, Console, ConsoleConfig
from server.console.feeds import DEFAULT_POLL_S


async def cmd_console(args: argparse.Namespace) -> int:
    """Serve a live, read-only web page of the fleet: proplets and their liveness, experiments
    and their rounds as they run (timings, who closed them), and the convergence plot. The
    page's server reads the manager and the coordinator over gRPC as the operator whose
    bundle --tls-dir names (or PROPELLER_TLS_DIR); it listens on loopback unless --listen
    says else. Prints the page's address, then serves until Ctrl-C or SIGTERM.
    """
    config = ConsoleConfig(
        endpoints=endpoints_of(args),
        tls=tls_of(args),
        listen=args.listen,
        poll_s=args.poll,
        timeout_s=args.timeout,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        async with Console(config) as console:
            print(f"console {console.url}", flush=True)
            await stop.wait()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = add_command(sub, "console", cmd_console, "serve a live web page of the fleet")
    parser.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        metavar="HOST:PORT",
        help=f"where the page is served (default {DEFAULT_LISTEN}: this machine only)",
    )
    parser.add_argument(
        "--poll",
        type=float,
        default=DEFAULT_POLL_S,
        metavar="SECONDS",
        help=f"how often proplets and experiments are listed (default {DEFAULT_POLL_S:g})",
    )
    add_connection_flags(parser)
