"""Loopback ports: a free one to hand to a child process, and waiting until one listens."""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

# Ports handed out lie between this and the kernel's ephemeral range (ip_local_port_range).
LOWEST = 10_000


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on at `host` (loopback unless a test has addresses of its own).

    Many tests hand a port to a process that binds it later, or stop a process and start it
    again on the same port, so a port handed out must stay unclaimed by anyone else for a
    while, not just be free now. Hence: below the kernel's ephemeral range (`bind(0)` picks
    there, and any outgoing connection on the machine may take such a port as its source
    port: a manager restarted on one once failed to bind it), a slice of that span per
    pytest-xdist worker (two workers never hand out the same port: a nats node of one and a
    coordinator of the other once did), and within the slice one port after the other from
    a random start (not again before the whole slice was handed out; two suites on one
    machine start at different places)."""
    with _lock:
        for _ in range(_SLICE_TRIES):
            port = next(_ports)
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind((host, port))
                except OSError:
                    continue  # in use now
                return port
    raise RuntimeError(f"no free port in {_SLICE_TRIES} tries")


_SLICE_TRIES = 1000
_lock = threading.Lock()


def _slice() -> range:
    """This process's share of [LOWEST, the ephemeral range): all of it, or its
    pytest-xdist worker's (`gwN` of PYTEST_XDIST_WORKER_COUNT)."""
    try:
        high = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        high = 32768
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    index = int(worker.removeprefix("gw")) if worker.startswith("gw") else 0
    size = (high - LOWEST) // max(1, count)
    return range(LOWEST + index * size, LOWEST + (index + 1) * size)


def _cycle(ports: range) -> Iterator[int]:
    """The slice's ports in order from a random one, round and round. (Its own generator:
    Hypothesis seeds the `random` module in its tests.)"""
    start = random.SystemRandom().randrange(len(ports))
    return itertools.cycle([*ports[start:], *ports[:start]])


_ports = _cycle(_slice())


def wait_port(port: int, timeout: float = 10.0, *, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), 0.2):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")
