"""A PostgreSQL server of the tests' own: `initdb` into a temporary directory and `postgres`
on a free loopback port (never the machine's own server), stopped and removed at the end.
Each test that needs a database gets a fresh one (`create_database`), so tests never see each
other's rows.

PostgreSQL refuses to run as root: when the tests run as root, the cluster's directory is
owned by the `postgres` user (which Debian's package creates) and `initdb` and `postgres` run
as that user (`setpriv`, which execs in place, so a signal reaches the server itself). The
directory is made with `tempfile` rather than pytest's temp dirs, which are private to root.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg

from tests.support.infra import _binary
from tests.support.ports import free_port, wait_port
from tests.support.processes import ChildProcess, started

# Debian's package keeps the server's programs out of PATH, under its major version.
SUPERUSER = "propeller"


def pg_binary(name: str) -> str:
    """`name` from PATH, /usr/local/bin, or the newest /usr/lib/postgresql/N/bin."""
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    return _binary(name, f"/usr/local/bin/{name}", *(str(d / name) for d in versions))


def _as_server_user() -> list[str]:
    """The prefix that runs a command as the `postgres` user when we are root."""
    if os.geteuid() != 0:
        return []
    return ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--"]


class Postgres(ChildProcess):
    """`postgres` over a cluster `initdb` made in `datadir`, on `port` of 127.0.0.1, trusting
    local connections (a test database with no secrets). `url(dbname)` is a DSN for it."""

    def __init__(self, port: int, datadir: Path, logs: Path, *, durable: bool = False) -> None:
        self.port = port
        self.datadir = datadir
        argv = [
            *_as_server_user(),
            pg_binary("postgres"),
            "-D", str(datadir),
            "-p", str(port),
            "-h", "127.0.0.1",
            "-k", str(datadir),  # its Unix socket stays in its own directory
            # A throw-away cluster: tests kill our processes, not the server. `durable` (the
            # benchmarks') keeps fsync on, so a commit costs what it costs in production.
            "-c", f"fsync={'on' if durable else 'off'}",
            "-c", "max_connections=200",
        ]  # fmt: skip
        super().__init__("postgres", argv, logs, stdout="log", cwd=datadir)

    def initdb(self) -> None:
        if os.geteuid() == 0:
            entry = pwd.getpwnam("postgres")
            os.chown(self.datadir, entry.pw_uid, entry.pw_gid)
        self.datadir.chmod(0o700)
        initdb = [*_as_server_user(), pg_binary("initdb"), "-D", str(self.datadir)]
        subprocess.run(
            [*initdb, "-U", SUPERUSER, "--auth=trust", "--encoding=UTF8", "--no-sync"],
            check=True,
            capture_output=True,
            cwd=self.datadir,
        )

    def start(self) -> None:
        super().start()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()  # `started` only stops what started
            raise

    def _wait_ready(self) -> None:
        wait_port(self.port, timeout=30.0)
        # The port opens before the server accepts sessions (recovery, start-up).
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline and self.running:
            try:
                psycopg.connect(self.url("postgres"), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                time.sleep(0.05)
        raise RuntimeError(f"postgres did not accept connections\n{self.tail()}")

    def stop(self, grace: float = 5.0) -> None:
        # SIGINT is PostgreSQL's fast shutdown; its SIGTERM would wait for every session.
        if self.running:
            self.send(signal.SIGINT)
        super().stop(grace)

    def url(self, dbname: str) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self) -> str:
        """A new, empty database; its DSN."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        return self.url(name)

    def drop_database(self, url: str) -> None:
        name = url.rsplit("/", 1)[1]
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def postgres(logs: Path, *, durable: bool = False) -> Iterator[Postgres]:
    """A PostgreSQL on a free loopback port, its cluster in a temporary directory (fsync off
    unless `durable`)."""
    datadir = Path(tempfile.mkdtemp(prefix="propeller-pg-"))
    try:
        server = Postgres(free_port(), datadir, logs, durable=durable)
        server.initdb()
        with started(server, grace=10.0) as running:
            yield running
    finally:
        shutil.rmtree(datadir, ignore_errors=True)
