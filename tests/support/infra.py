"""Real infrastructure for tests: Mosquitto and the CNCF OCI registry as child processes on
free loopback ports, started and stopped by the tests themselves."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

from server.messages import MAX_PACKET_BYTES
from server.mqtt_acl import MosquittoTls, mosquitto_acl
from server.pki import CertificateAuthority, Identity, Kind
from tests.support.ports import free_port, wait_port
from tests.support.processes import ChildProcess, started

# The broker's own identity (its server certificate names 127.0.0.1 and localhost).
BROKER = Identity(Kind.SERVICE, "mqtt")


def _binary(name: str, *candidates: str) -> str:
    for c in (name, *candidates):
        found = shutil.which(c)
        if found:
            return found
        if Path(c).exists():
            return c
    raise FileNotFoundError(f"{name} not installed (apt-get install it; .ci/run does)")


class _Server(ChildProcess):
    """A third-party server run from `binary` with its configuration file `conf` (written
    into `workdir` from `config`) on `port`; its output goes to the log in `workdir`."""

    def __init__(
        self, binary: str, args: list[str], conf: str, config: str, port: int, workdir: Path
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / conf).write_text(config)
        argv = [binary, *(str(workdir / conf) if a == conf else a for a in args)]
        super().__init__(Path(binary).name, argv, workdir, stdout="log")
        self.port = port
        self.workdir = workdir


class Mosquitto(_Server):
    """A broker with persistence (its sessions survive a stop and start over `workdir`).

    With a CA (`ca`): the deployment's broker, as compose runs it (`server.mqtt_acl`): `port`
    is TLS only, every client with a certificate of the CA that the CA's revocation list does
    not list (read at start and on `reload()`), its CN as user name and client id, the ACL
    file written from `server.mqtt_acl.RULES`. `plain_port` (if given) is a second listener,
    plaintext and anonymous with no ACL, for the tests that say `insecure`. Without a CA:
    one anonymous plaintext listener on `port`. Every listener is on `host` (loopback unless
    a test reaches the broker from hosts of its own: `tests.support.netns`), which the
    broker's certificate then names too."""

    def __init__(
        self,
        port: int,
        workdir: Path,
        *,
        ca: CertificateAuthority | None = None,
        plain_port: int | None = None,
        host: str = "127.0.0.1",
        manager_replicas: Sequence[str] = (),
        coordinator_replicas: Sequence[str] = (),
    ) -> None:
        (workdir / "data").mkdir(parents=True, exist_ok=True)
        self.ca = ca
        self.plain_port = plain_port
        self.host = host
        common = (
            # As root, mosquitto would drop to the `mosquitto` user, which cannot write into
            # pytest's private temp dirs: persistence would then fail silently.
            ("user root\n" if os.geteuid() == 0 else "") + "persistence true\n"
            f"persistence_location {workdir / 'data'}/\n"
            "max_queued_messages 100000\n"
            f"max_packet_size {MAX_PACKET_BYTES}\n"
            "set_tcp_nodelay true\n"
            "log_dest stderr\n"
        )
        if ca is None:
            config = f"listener {port} {host}\nallow_anonymous true\n" + common
        else:
            bundle = ca.ensure(BROKER, hosts=[] if host == "127.0.0.1" else [host])
            (workdir / "acl").write_text(
                mosquitto_acl(
                    manager_replicas=manager_replicas, coordinator_replicas=coordinator_replicas
                )
            )
            files = MosquittoTls(
                ca=str(bundle.ca),
                cert=str(bundle.cert),
                key=str(bundle.key),
                crl=str(ca.crl_path),
                acl=str(workdir / "acl"),
            )
            config = "per_listener_settings true\n" + common + files.listener(port, host)
            if plain_port is not None:
                config += f"\nlistener {plain_port} {host}\nallow_anonymous true\n"
        binary = _binary("mosquitto", "/usr/sbin/mosquitto")
        super().__init__(binary, ["-c", "mosquitto.conf"], "mosquitto.conf", config, port, workdir)

    def start(self) -> None:
        super().start()
        wait_port(self.port, host=self.host)
        if self.plain_port is not None:
            wait_port(self.plain_port, host=self.host)

    def reload(self) -> None:
        """SIGHUP: mosquitto reads its configuration, the revocation list included, again."""
        self.send(signal.SIGHUP)


class OciRegistry(_Server):
    """The CNCF distribution registry (`docker-registry`), deletes enabled, on `bind`'s
    address (loopback unless a test's own hosts pull from it)."""

    def __init__(self, port: int, workdir: Path, *, bind: str = "127.0.0.1") -> None:
        self.bind = bind
        config = (
            "version: 0.1\n"
            "log:\n  level: warn\n"
            "storage:\n"
            f"  filesystem:\n    rootdirectory: {workdir / 'data'}\n"
            "  delete:\n    enabled: true\n"
            "http:\n"
            f"  addr: {bind}:{port}\n"
        )
        binary = _binary("docker-registry", "/usr/bin/docker-registry")
        super().__init__(binary, ["serve", "registry.yml"], "registry.yml", config, port, workdir)

    @property
    def host(self) -> str:
        return f"{self.bind}:{self.port}"

    def start(self) -> None:
        super().start()
        deadline = time.monotonic() + 15
        while True:
            url = f"http://{self.host}/v2/"
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"docker-registry did not answer /v2/\n{self.tail()}")
            time.sleep(0.05)


@contextlib.contextmanager
def mosquitto(
    workdir: Path,
    *,
    ca: CertificateAuthority | None = None,
    plain: bool = False,
    host: str = "127.0.0.1",
    manager_replicas: Sequence[str] = (),
    coordinator_replicas: Sequence[str] = (),
) -> Iterator[Mosquitto]:
    """A Mosquitto on free ports of `host` (see `Mosquitto`; `plain`: with a plaintext
    listener too; `manager_replicas`, `coordinator_replicas`: the replica ids its ACL names,
    `mosquitto_acl`)."""
    plain_port = free_port(host) if plain and ca is not None else None
    broker = Mosquitto(
        free_port(host),
        workdir,
        ca=ca,
        plain_port=plain_port,
        host=host,
        manager_replicas=manager_replicas,
        coordinator_replicas=coordinator_replicas,
    )
    with started(broker, grace=5.0) as running:
        yield running


@contextlib.contextmanager
def oci_registry(workdir: Path, *, bind: str = "127.0.0.1") -> Iterator[OciRegistry]:
    with started(OciRegistry(free_port(bind), workdir, bind=bind), grace=5.0) as registry:
        yield registry


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
