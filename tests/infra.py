"""Real infrastructure for tests: Mosquitto and the CNCF OCI registry as child processes on
free loopback ports, started and stopped by the tests themselves."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def stop_process(proc: subprocess.Popen[bytes] | None, grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds."""
    if proc is None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def eventually(
    probe: Callable[[], Awaitable[T]], done: Callable[[T], bool], timeout: float = 60.0
) -> T:
    """Poll `probe` until `done(value)`, bounded by `timeout`; fail showing the last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached within {timeout}s; last value: {value}")
        await asyncio.sleep(0.05)


def _binary(name: str, *candidates: str) -> str:
    for c in (name, *candidates):
        found = shutil.which(c)
        if found:
            return found
        if Path(c).exists():
            return c
    raise FileNotFoundError(f"{name} not installed (apt-get install it; .ci/run does)")


@dataclass
class Mosquitto:
    port: int
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        conf = self.workdir / "mosquitto.conf"
        (self.workdir / "data").mkdir(exist_ok=True)
        conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            # As root, mosquitto would drop to the `mosquitto` user, which cannot write into
            # pytest's private temp dirs: persistence would then fail silently.
            + ("user root\n" if os.geteuid() == 0 else "")
            + "persistence true\n"
            f"persistence_location {self.workdir / 'data'}/\n"
            "max_queued_messages 100000\n"
            "set_tcp_nodelay true\n"
            "log_dest stderr\n"
        )
        # The child keeps its own copy of the log descriptor; ours closes at once.
        with open(self.workdir / "mosquitto.log", "ab") as log:
            self.proc = subprocess.Popen(
                [_binary("mosquitto", "/usr/sbin/mosquitto"), "-c", str(conf)],
                stdout=log,
                stderr=log,
            )
        wait_port(self.port)

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None


@contextlib.contextmanager
def mosquitto(workdir: Path) -> Iterator[Mosquitto]:
    broker = Mosquitto(free_port(), workdir)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@dataclass
class OciRegistry:
    port: int
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        conf = self.workdir / "registry.yml"
        conf.write_text(
            "version: 0.1\n"
            "log:\n  level: warn\n"
            "storage:\n"
            f"  filesystem:\n    rootdirectory: {self.workdir / 'data'}\n"
            "  delete:\n    enabled: true\n"
            "http:\n"
            f"  addr: 127.0.0.1:{self.port}\n"
        )
        with open(self.workdir / "registry.log", "ab") as log:
            self.proc = subprocess.Popen(
                [_binary("docker-registry", "/usr/bin/docker-registry"), "serve", str(conf)],
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + 15
        while True:
            try:
                with urllib.request.urlopen(f"http://{self.host}/v2/", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("docker-registry did not answer /v2/")
            time.sleep(0.05)

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None


@contextlib.contextmanager
def oci_registry(workdir: Path) -> Iterator[OciRegistry]:
    reg = OciRegistry(free_port(), workdir)
    reg.start()
    try:
        yield reg
    finally:
        reg.stop()


def push_wasm(
    registry: OciRegistry, wasm: Path, repo: str = "fl-client-wasm", tag: str = "latest"
) -> str:
    """Push a module with oras, as the seed does; returns the image reference."""
    import oras.client

    target = f"{registry.host}/{repo}:{tag}"
    client = oras.client.OrasClient(hostname=registry.host, insecure=True)
    resp = client.push(
        target=target,
        files=[f"{wasm}:application/wasm"],
        disable_path_validation=True,
    )
    if resp.status_code not in (200, 201):
        raise RuntimeError(f"oras push {target}: HTTP {resp.status_code}")
    return target
