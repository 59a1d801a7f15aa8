"""`propeller-fl serve SERVICE`: one service per process, configured only from the environment
(each app's `from_env`), running until SIGINT or SIGTERM and then stopping gracefully. This is
what every container in compose.yaml runs.

`propeller-fl health ADDR`: the containers' healthcheck. It asks the standard
`grpc.health.v1.Health/Check` and exits 0 only for SERVING; with `--proplet ID` it asks the
manager at ADDR whether that proplet is registered and alive instead (a proplet serves no gRPC).

Logs go to stderr. `serve` writes nothing to stdout; `health` writes one status line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from server.cli.client import add_tls_flags, tls_of
from server.cli.runner import add_command
from server.metrics import MetricsConfig, serving_metrics

log = logging.getLogger(__name__)

# The level `serve` logs at when the command line gives no -v: `PROPELLER_LOG_LEVEL`, else INFO.
LOG_LEVEL_ENV = "PROPELLER_LOG_LEVEL"
DEFAULT_LOG_LEVEL = "INFO"


class _Config(Protocol):
    """What serve needs of a service's configuration class."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Any: ...


@dataclass(frozen=True)
class Service:
    """One servable service: the module whose `main()` runs it and its config class."""

    module: str
    config: str

    def load_config(self, env: Mapping[str, str]) -> object:
        """The service's configuration from `env`; raises ValueError naming a bad variable."""
        config_class: type[_Config] = getattr(importlib.import_module(self.module), self.config)
        return config_class.from_env(env)

    def entry_point(self) -> Callable[[], Awaitable[None]]:
        main: Callable[[], Awaitable[None]] = importlib.import_module(self.module).main
        return main


# The app modules are imported only when needed, so `propeller-fl health` starts quickly.
SERVICES: dict[str, Service] = {
    "manager": Service("server.manager.app", "ManagerConfig"),
    "coordinator": Service("server.coordinator.app", "CoordinatorConfig"),
    "aggregator": Service("server.aggregator.app", "AggregatorConfig"),
    "registry": Service("server.registry.app", "RegistryConfig"),
    "datastore": Service("server.datastore.app", "DataStoreConfig"),
    "proplet": Service("proplet.app", "PropletConfig"),
}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = add_command(
        sub,
        "serve",
        serve_command,
        "run one service, configured from the environment (as compose does)",
    )
    serve.add_argument("service", choices=sorted(SERVICES), help="the service to run")
    serve.add_argument(
        "--log-level",
        default=None,
        metavar="LEVEL",
        help=f"DEBUG, INFO, WARNING or ERROR (default: ${LOG_LEVEL_ENV}, else INFO; -v/-vv win)",
    )

    health = add_command(
        sub,
        "health",
        health_command,
        "check a gRPC service's health (exit 0 if SERVING): the containers' healthcheck",
    )
    health.add_argument("addr", metavar="ADDR", help="host:port of the gRPC server")
    health.add_argument(
        "--service",
        default="",
        help="the service name to check, e.g. propeller.v1.Manager (default: the whole server)",
    )
    health.add_argument(
        "--proplet",
        default="",
        metavar="ID",
        help="check that the manager at ADDR sees proplet ID alive instead",
    )
    health.add_argument(
        "--timeout", type=float, default=3.0, help="seconds to wait for the answer (default 3)"
    )
    add_tls_flags(health)


def _log_level(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    name = (args.log_level or env.get(LOG_LEVEL_ENV, "") or DEFAULT_LOG_LEVEL).upper()
    level = logging.getLevelName(name)
    if not isinstance(level, int):
        raise ValueError(f"{LOG_LEVEL_ENV}: {name!r} is not a log level")
    return level


async def serve_command(args: argparse.Namespace) -> int:
    """Run one service in this process until SIGINT or SIGTERM, then stop gracefully. Configuration
    comes only from environment variables; see docs/configuration.md. Logs go to stderr.
    """
    env = os.environ
    if getattr(args, "verbose", 0) == 0:
        logging.getLogger().setLevel(_log_level(args, env))
    service = SERVICES[args.service]
    # Validate the whole configuration before anything starts: a bad variable is one line on
    # stderr and exit status 1, not a half-started service.
    config = service.load_config(env)
    metrics_config = MetricsConfig.from_env(env)
    # Until the service installs its own handlers (once it is up), a signal cancels start-up;
    # after that the service's handlers stop it gracefully.
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    signalled: list[int] = []

    def cancel_start(sig: int) -> None:
        signalled.append(sig)
        task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, cancel_start, sig)
    main = service.entry_point()
    log.info("[serve] %s pid=%d config=%s", args.service, os.getpid(), config)
    started = time.monotonic()
    try:
        with serving_metrics(metrics_config):
            await main()
    except asyncio.CancelledError:
        if not signalled:
            raise
        task.uncancel()
        log.info("[serve] %s stopped by %s during start-up", args.service, _signame(signalled[0]))
        return 0
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    log.info("[serve] %s stopped after %.1f s", args.service, time.monotonic() - started)
    return 0


def _signame(sig: int) -> str:
    with contextlib.suppress(ValueError):
        return signal.Signals(sig).name
    return str(sig)


async def health_command(args: argparse.Namespace) -> int:
    """Ask grpc.health.v1.Health/Check at ADDR and exit 0 only if the answer is SERVING. With
    --proplet ID, ask the manager at ADDR instead whether that proplet is registered and alive.
    """
    # Imported here: gRPC is only needed by this command, and `serve` imports it via the apps.
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from propeller.v1 import manager_pb2, manager_pb2_grpc
    from server.errors import RemoteError, as_remote_error, rpc_errors
    from server.grpc_server import channel

    async with channel(args.addr, tls_of(args)) as chan:
        if args.proplet:
            manager = manager_pb2_grpc.ManagerStub(chan)
            with rpc_errors("Manager.GetProplet", as_remote_error):
                proplet = await manager.GetProplet(
                    manager_pb2.GetPropletRequest(proplet_id=args.proplet), timeout=args.timeout
                )
            if not proplet.alive:
                age = time.time() - proplet.last_seen
                print(
                    f"propeller-fl health: proplet {args.proplet} is not alive "
                    f"(last seen {age:.0f} s ago)",
                    file=sys.stderr,
                )
                return 1
            print(f"proplet {args.proplet}: alive")
            return 0
        stub = health_pb2_grpc.HealthStub(chan)
        try:
            with rpc_errors("Health.Check", as_remote_error):
                resp = await stub.Check(
                    health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
                )
        except RemoteError as exc:
            if exc.code != grpc.StatusCode.NOT_FOUND:
                raise
            print(f"propeller-fl health: {args.addr} serves no {args.service!r}", file=sys.stderr)
            return 1
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
        if resp.status != health_pb2.HealthCheckResponse.SERVING:
            print(f"propeller-fl health: {args.addr} {args.service} {status}", file=sys.stderr)
            return 1
        print(f"status: {status}")
        return 0
