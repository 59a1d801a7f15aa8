"""Failures end as one line on stderr and exit 1, never a traceback; and the installed entry
point behaves the same as a child process (env fallbacks included)."""

from __future__ import annotations

import contextlib
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.stack import Stack
from tests.cli.helpers import Cli, Result, run_script, tls_flags
from tests.support.ports import free_port

UNREACHABLE = [
    (["models", "list"], "registry", "model registry"),
    (["models", "get", "0"], "registry", "model registry"),
    (["datasets", "list"], "datastore", "data store"),
    (["proplets", "list"], "manager", "manager"),
    (["tasks", "get", "t1"], "manager", "manager"),
    (["experiment", "list"], "manager", "manager"),
    (["round", "status", "r1"], "manager", "manager"),
    (["round", "list"], "coordinator", "coordinator"),
    (["round", "watch", "r1"], "coordinator", "coordinator"),
]


@pytest.mark.parametrize(("argv", "flag", "label"), UNREACHABLE)
async def test_unreachable_service_is_one_line(
    cli: Cli, argv: list[str], flag: str, label: str
) -> None:
    addr = f"127.0.0.1:{free_port()}"
    res = await cli(*argv, f"--{flag}", addr, *tls_flags())
    line = res.failed_with()
    command = " ".join(argv[:2])
    assert line == (
        f"propeller-fl {command}: UNAVAILABLE: cannot reach {label} at {addr} (connection refused)"
    )
    assert res.out == ""


@contextlib.contextmanager
def silent_listener() -> Iterator[str]:
    """A port that accepts TCP connections but never speaks gRPC."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield f"127.0.0.1:{s.getsockname()[1]}"


async def test_a_silent_service_hits_the_timeout(cli: Cli) -> None:
    with silent_listener() as addr:
        res = await cli("models", "list", "--registry", addr, "--timeout", "0.5", *tls_flags())
    res.failed_with(
        f"propeller-fl models list: DEADLINE_EXCEEDED: model registry at {addr} "
        "did not answer within 0.5s"
    )


async def test_bad_flag_values_are_one_line(cli: Cli, tmp_path: Path) -> None:
    (await cli("models", "list", "--timeout", "0", *tls_flags())).failed_with(
        "propeller-fl models list: --timeout: 0.0 must be a positive number of seconds"
    )
    (await cli("models", "get", "v-one", *tls_flags())).failed_with(
        "INVALID_ARGUMENT: VERSION_OR_URI"
    )
    # Neither a bundle nor --insecure: one line saying what to set.
    (await cli("models", "list")).failed_with(
        "propeller-fl models list: --tls-dir / PROPELLER_TLS_DIR: not set",
        "PROPELLER_INSECURE=1",
    )
    (await cli("models", "list", "--tls-dir", str(tmp_path))).failed_with(
        f"propeller-fl models list: TLS ca: {tmp_path / 'ca.crt'} does not exist"
    )


async def test_usage_errors_exit_2_without_traceback(cli: Cli) -> None:
    res = await cli("models", "frobnicate")
    assert res.code == 2 and "Traceback" not in res.err and "invalid choice" in res.err
    res = await cli("tasks", "create", "--name", "x")  # neither --image nor --file
    assert res.code == 2 and "one of the arguments --image --file is required" in res.err


@pytest.mark.process  # the console script / `python -m` as child processes
async def test_entry_point_as_a_process(stack: Stack, tmp_path: Path) -> None:
    """The installed `propeller-fl` script: addresses from the environment, JSON on stdout,
    and an error as one stderr line with exit status 1."""
    ep = stack.endpoints
    env = {
        "MANAGER_ADDR": ep.manager,
        "COORDINATOR_ADDR": ep.coordinator,
        "MODEL_REGISTRY_ADDR": ep.registry,
        "DATA_STORE_ADDR": ep.datastore,
        "PROPELLER_TLS_DIR": tls_flags()[1],
    }
    init = await run_script("models", "init", "--dimension", "2", "--json", env=env)
    assert init.code == 0 and init.err == "", init.err
    assert init.json()["model_uri"] == "fl/models/global_model_v0"
    got = await run_script("models", "get", "0", "--json", env=env)
    assert got.code == 0 and got.json()["model"] == {"w": [0.0, 0.0], "b": 0.0}
    listed = await run_script("datasets", "list", env=env)
    assert listed.code == 0 and listed.out.splitlines()[0].split() == [
        "PROPLET",
        "SCHEMA",
        "SIZE",
        "FEATURES",
    ]

    # Flags win over the environment.
    closed = f"127.0.0.1:{free_port()}"
    bad = await run_script("models", "list", "--registry", closed, env=env)
    assert bad.code == 1 and "Traceback" not in bad.err
    assert bad.err.splitlines() == [
        f"propeller-fl models list: UNAVAILABLE: cannot reach model registry at {closed} "
        "(connection refused)"
    ]
    assert bad.out == ""
    missing = await run_script("models", "get", "7", env=env)
    assert missing.code == 1 and len(missing.err.splitlines()) == 1
    assert missing.err.startswith("propeller-fl models get: NOT_FOUND: ")

    # Defaults are the seed's ports: with nothing set and nothing listening on them, the
    # message names localhost:8084 (skipped if a real deployment happens to be running).
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 8084)) != 0:
            default = await run_script("models", "list", env={**env, "MODEL_REGISTRY_ADDR": ""})
            assert default.err.splitlines() == [
                "propeller-fl models list: UNAVAILABLE: cannot reach model registry at "
                "localhost:8084 (connection refused)"
            ]


@pytest.mark.process  # the console script / `python -m` as child processes
async def test_module_entry_point(stack: Stack) -> None:
    """`python -m server.cli.main` runs the same commands."""
    import asyncio

    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "server.cli.main",
        "datasets",
        "list",
        "--json",
        "--datastore",
        stack.endpoints.datastore,
        *tls_flags(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    res = Result(proc.returncode or 0, out.decode(), err.decode())
    assert res.code == 0, res.err
    assert {d["proplet_id"] for d in res.json()["datasets"]} == {"seed-a", "seed-b"}
