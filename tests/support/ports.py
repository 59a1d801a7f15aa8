"""Loopback ports: a free one to hand to a child process, and waiting until one listens."""

from __future__ import annotations

import contextlib
import socket
import time


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on at `host` (loopback unless a test has addresses of its own)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(port: int, timeout: float = 10.0, *, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), 0.2):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")
