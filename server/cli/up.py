"""`propeller-fl up`: the whole system in one process (`server.stack.Stack` with an embedded
MQTT broker and N proplets) on the familiar ports, until Ctrl-C / SIGTERM.

Secure by default: a throwaway deployment CA (in `--certs DIR`, else STATE_DIR/certs, else a
temporary directory) gives every service and proplet its certificate, and an operator bundle
whose paths `up` prints, with the grpcurl flags that use it. `--insecure`: plaintext."""

from __future__ import annotations

import argparse
import asyncio
import signal
import tempfile
import uuid
from pathlib import Path
from typing import Any

from server.cli.one_process import (
    DEFAULT_FEATURES,
    DEFAULT_SAMPLES,
    CommandFailed,
    _port,
    _positive_int,
    add_stack_flags,
    locate_trainer,
    one_line_failure,
)
from server.cli.runner import add_command
from server.config import ENDPOINTS, bind_problem
from server.metrics import MetricsConfig, MetricsEndpoint, serving_metrics
from server.stack import Stack, StackConfig

# The seed's ports, as `propeller-fl up` uses them.
UP_PORTS = {name: port for name, (_, port, _) in ENDPOINTS.items()} | {"mqtt": 1883}
# A task of `up` may run for as long as a proplet allows by default.
TASK_TIMEOUT_S = 300.0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    up = add_command(
        sub, "up", cmd_up, "run all services, an embedded MQTT broker and N proplets until Ctrl-C"
    )
    up.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    for name, port in UP_PORTS.items():
        up.add_argument(
            f"--{name}-port",
            type=_port,
            default=port,
            metavar="PORT",
            help=f"({port}; 0 = any free port)",
        )
    up.add_argument(
        "--samples", type=_positive_int, default=DEFAULT_SAMPLES, help="samples per proplet (64)"
    )
    up.add_argument(
        "--features",
        type=_positive_int,
        default=DEFAULT_FEATURES,
        help="synthetic feature count (3)",
    )
    up.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help=(
            "keep every service's state (models, datasets, rounds, proplets, tasks, "
            "experiments) in SQLite files in DIR, so a restart with the same DIR carries on "
            "(default: in memory)"
        ),
    )
    up.add_argument(
        "--certs",
        type=Path,
        default=None,
        metavar="DIR",
        help=(
            "the deployment CA and every bundle, made there if it holds none (default: "
            "STATE_DIR/certs with --state-dir, else a temporary directory removed on exit)"
        ),
    )
    add_stack_flags(up, insecure_help="plaintext gRPC: no TLS, no authentication, no authorization")


def check_ports_free(host: str, ports: dict[str, int]) -> None:
    """Fail at once, naming the flag, when a fixed port is taken. (gRPC servers bind with
    SO_REUSEPORT, so a second `up` would otherwise share the ports of the first one.)"""
    for name, port in ports.items():
        problem = bind_problem(host, port) if port else None
        if problem is not None:
            raise CommandFailed(f"--{name}-port: cannot listen on {host}:{port}: {problem}")


@one_line_failure("up")
async def cmd_up(args: argparse.Namespace) -> int:
    """Start an embedded MQTT broker, the five services and N proplets (with seeded synthetic
    datasets) in this process on the usual ports, print each address, each proplet id and the
    trainer image, then 'ready'; stop cleanly on Ctrl-C or SIGTERM.
    """
    ports: dict[str, int] = {name: getattr(args, f"{name}_port") for name in UP_PORTS}
    check_ports_free(args.host, ports)
    service_ports: dict[str, Any] = {f"{name}_port": ports[name] for name in ENDPOINTS}
    trainer = await locate_trainer(args.wasm)
    proplet_ids = tuple(str(uuid.uuid4()) for _ in range(args.proplets))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    if args.insecure and args.certs is not None:
        raise CommandFailed("--insecure and --certs: choose one")
    try:
        with tempfile.TemporaryDirectory(prefix="propeller-fl-up-") as work:
            certs: Path | None = None
            if not args.insecure:
                certs = args.certs or (args.state_dir or Path(work)) / "certs"
            config = StackConfig(
                broker_port=ports["mqtt"],
                host=args.host,
                **service_ports,
                seed_proplet_ids=proplet_ids,
                num_samples=args.samples,
                num_features=args.features,
                state_dir=args.state_dir,
                proplet_ids=proplet_ids,
                proplet_work_dir=Path(work),
                proplet_task_timeout_s=TASK_TIMEOUT_S,
                ca_dir=certs,
            )
            with serving_metrics(MetricsConfig.from_env()) as metrics_endpoint:
                await _serve_stack(config, trainer, proplet_ids, metrics_endpoint, stop)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
    return 0


async def _serve_stack(
    config: StackConfig,
    trainer: Path,
    proplet_ids: tuple[str, ...],
    metrics_endpoint: MetricsEndpoint | None,
    stop: asyncio.Event,
) -> None:
    """Run the stack, print what a user needs of it, and stop when `stop` is set."""
    async with Stack(config) as stack:
        assert stack.broker is not None
        ep = stack.endpoints
        lines = [
            ("mqtt", stack.broker.address),
            ("manager", ep.manager),
            ("coordinator", ep.coordinator),
            ("aggregator", ep.aggregator),
            ("registry", ep.registry),
            ("datastore", ep.datastore),
            ("trainer", f"file://{trainer}"),
            *(("proplet", pid) for pid in proplet_ids),
            *_credentials(stack),
            *([("metrics", metrics_endpoint.url)] if metrics_endpoint else []),
        ]
        for name, value in lines:
            print(f"{name:<12} {value}", flush=True)
        print("ready", flush=True)
        await stop.wait()


def _credentials(stack: Stack) -> list[tuple[str, str]]:
    """Where the CA and the operator bundle are, and grpcurl's flags for it."""
    tls = stack.operator_tls
    if tls is None or stack.ca is None:
        return [("tls", "off (--insecure): grpcurl -plaintext")]
    return [
        ("certs", str(stack.ca.dir)),
        ("operator", str(tls.cert.parent)),
        ("grpcurl", f"-cacert {tls.ca} -cert {tls.cert} -key {tls.key}"),
    ]
