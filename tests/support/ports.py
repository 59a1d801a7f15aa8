"""Loopback ports: a free one to hand to a child process, and waiting until one listens."""

from __future__ import annotations

import contextlib
import random
import socket
import time
from pathlib import Path

# Ports handed out lie between this and the kernel's ephemeral range (ip_local_port_range).
LOWEST = 10_000
# Its own generator: Hypothesis seeds the `random` module in its tests, and two workers (or
# two suites on one machine) drawing the same sequence would pick the same ports.
_draw = random.SystemRandom()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on at `host` (loopback unless a test has addresses of its own),
    below the ephemeral range: a process stopped and started again on it finds it still free.
    (A port of the ephemeral range, the kernel's `bind(0)`, may meanwhile become the source
    port of any outgoing connection on the machine, and the restarted manager failed to bind.)"""
    ephemeral = _ephemeral_low()
    if ephemeral - LOWEST >= 1000:
        for _ in range(200):
            port = _draw.randrange(LOWEST, ephemeral)
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind((host, port))
                except OSError:
                    continue
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        chosen: int = s.getsockname()[1]
        return chosen


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (32768 if it cannot be read)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def wait_port(port: int, timeout: float = 10.0, *, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), 0.2):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")
