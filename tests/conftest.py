"""Session fixtures: one real Mosquitto, one real OCI registry and one real PostgreSQL (started
on first use) for the whole run; each test isolates itself with its own MQTT namespace (and
its own database). Also the suite's tiers (markers) and the
Hypothesis profiles.

Tiers (exactly one per test; select with `-m`):
- unit: no network, no child process; fast.
- integration: real Mosquitto / OCI registry / gRPC servers in this process.
- process: real child processes (services, proplets, `up`, `demo`, compose as processes,
  grpcurl, kubectl/nats-server on a rendered deployment) and the long end-to-end scenarios
  (a broker restarted under a fleet, robustness over many experiments, a 50 MB update).
- fuzz: Hypothesis against the services over real gRPC.
A test's tier is its own tier mark if it has one, else the tier of the longest entry of
TIER_BY_PATH its file is under; a "unit" test that uses the real broker or OCI registry is
"integration" (by its fixtures).

Hypothesis profiles: `ci` (the fuzz depth CI runs: 1,000 examples per RPC) and `dev` (50),
chosen by PROPELLER_HYPOTHESIS_PROFILE (default `ci`); neither has a deadline.
"""

from __future__ import annotations

import importlib.util
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import settings

from server.config import MqttConfig
from server.topics import Topics
from tests.cli.helpers import Cli, make_cli
from tests.support.infra import Mosquitto, OciRegistry, mosquitto, oci_registry, push_wasm
from tests.support.postgres import Postgres, postgres
from tests.support.security import session_ca
from tests.support.state import StateBackend

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"

TIERS = ("unit", "integration", "process", "fuzz")
TIER_BY_PATH = {
    ".": "unit",
    "benchmarks": "process",
    "cli": "integration",
    "cli/test_client_render.py": "unit",
    "demo": "process",
    "deploy": "integration",  # kubectl renders as a child process (no network)
    "demo/test_embedded_broker.py": "integration",
    "e2e": "integration",
    "fuzz": "fuzz",
    "fuzz/test_regressions.py": "integration",  # fixed requests, no Hypothesis
    "proplet/test_main.py": "process",
    "readme": "process",
    "reliability": "integration",
    "security": "integration",
    "security/test_pki.py": "unit",
    "security/test_robustness.py": "process",  # 10 proplets, 8 experiments of 3 rounds
    "security/test_authz_table.py": "unit",
    "reliability/test_broker_restart.py": "process",  # a real broker stopped, killed, restarted
    "reliability/test_coordinator_processes.py": "process",
    "reliability/test_datastore_crash.py": "process",
    "reliability/test_manager_crash.py": "process",
    "reliability/test_registry_crash.py": "process",
    "reliability/test_shutdown_graceful.py": "process",
    "reliability/test_shutdown_up.py": "process",
    "reliability/test_upload_limits.py": "process",
    "services": "integration",
    "services/test_fedavg_batching.py": "unit",
}
# Fixtures that bring real infrastructure: a test using one (directly or through another
# fixture) is never "unit".
NETWORK_FIXTURES = frozenset({"broker", "registry", "postgres_server"})

HYPOTHESIS_PROFILE_ENV = "PROPELLER_HYPOTHESIS_PROFILE"
# No deadline: Hypothesis's per-example deadline (200 ms) is a timed assertion, and on a loaded
# machine a unit example took 285 ms once and failed the run ("Unreliable test timings").
settings.register_profile("ci", max_examples=1000, deadline=None)
settings.register_profile("dev", max_examples=50, deadline=None)
settings.load_profile(os.environ.get(HYPOTHESIS_PROFILE_ENV, "ci"))


def path_tier(path: Path) -> str:
    relative = path.relative_to(TESTS)
    for candidate in (relative, *relative.parents):
        tier = TIER_BY_PATH.get(candidate.as_posix())
        if tier is not None:
            return tier
    raise AssertionError(f"{relative}: no tier")  # "." always matches


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        marked = [m.name for m in item.iter_markers() if m.name in TIERS]
        if len(marked) > 1:
            raise pytest.UsageError(f"{item.nodeid}: more than one tier: {marked}")
        tier = marked[0] if marked else path_tier(item.path)
        if tier == "unit" and _uses_network(item):
            if marked:
                raise pytest.UsageError(f"{item.nodeid}: marked unit but uses {NETWORK_FIXTURES}")
            tier = "integration"
        if not marked:
            item.add_marker(tier)


def _uses_network(item: pytest.Item) -> bool:
    """Whether the test uses real infrastructure: a network fixture, or the PostgreSQL case
    of `state_backend`."""
    if NETWORK_FIXTURES & set(getattr(item, "fixturenames", ())):
        return True
    callspec = getattr(item, "callspec", None)
    return callspec is not None and callspec.params.get("state_backend") == "postgres"


def load_wasm_build() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "wasm_client_build", ROOT / "wasm-client" / "build.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """The deployment's broker as compose runs it: TLS with the suite's CA, certificates
    required, the ACL (`server.mqtt_acl`); and a plaintext listener (`plain_port`) for the
    tests that say `insecure`."""
    with mosquitto(tmp_path_factory.mktemp("mosquitto"), ca=session_ca(), plain=True) as b:
        yield b


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OciRegistry]:
    with oci_registry(tmp_path_factory.mktemp("oci")) as r:
        yield r


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postgres]:
    """A PostgreSQL of the suite's own on a free loopback port (`tests.support.postgres`)."""
    with postgres(tmp_path_factory.mktemp("postgres")) as server:
        yield server


@pytest.fixture
def database_url(postgres_server: Postgres) -> Iterator[str]:
    """A fresh, empty database on the suite's PostgreSQL: its DSN (PROPELLER_DATABASE_URL)."""
    url = postgres_server.create_database()
    yield url
    postgres_server.drop_database(url)


@pytest.fixture(params=["sqlite", "postgres"])
def state_backend(request: pytest.FixtureRequest, tmp_path: Path) -> StateBackend:
    """Each durable backend in turn (`tests.support.state`): the store contract tests run the
    same assertions against SQLite files and a fresh PostgreSQL database."""
    url = request.getfixturevalue("database_url") if request.param == "postgres" else ""
    return StateBackend(request.param, tmp_path / "state", url)


@pytest.fixture(scope="session")
def trainer_wasm() -> Path:
    path: Path = load_wasm_build().build()
    return path


@pytest.fixture(scope="session")
def mlp_wasm() -> Path:
    """The MLP trainer (wasm-client/src/mlp.zig, trainer contract v2)."""
    path: Path = load_wasm_build().build_mlp()
    return path


@pytest.fixture(scope="session")
def seed_image_registry(registry: OciRegistry, trainer_wasm: Path) -> str:
    """The address of the test OCI registry once the trainer is pushed there as the seed's
    `fl-client-wasm:latest`: a manager given it as its registry (`oci_registry`) pins the
    seed's image `local-registry:5000/fl-client-wasm:latest` to that module."""
    push_wasm(registry, trainer_wasm, repo="fl-client-wasm", tag="latest")
    return registry.host


@pytest.fixture(scope="session")
def trainer_image(registry: OciRegistry, trainer_wasm: Path) -> str:
    """The trainer pushed once to the test OCI registry as `fl-client-wasm` under a tag of
    this run: its image reference, for a cluster's round tasks (`cluster(..., image=)`)."""
    return push_wasm(registry, trainer_wasm, repo="fl-client-wasm", tag=uuid.uuid4().hex[:8])


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Cli:
    """The CLI run in this process (`tests.cli.helpers.make_cli`), its output captured."""
    return make_cli(capsys)


@pytest.fixture
def topics() -> Topics:
    """A namespace of its own per test, so tests never see each other's messages."""
    return Topics(domain=f"t{uuid.uuid4().hex[:8]}", channel="fl")


@pytest.fixture
def mqtt(broker: Mosquitto, topics: Topics) -> MqttConfig:
    """The test broker's TLS listener, in the test's own namespace, as nobody yet: whoever
    connects says who with `as_identity(...)` (the cluster gives each service and proplet
    its own)."""
    return MqttConfig(port=broker.port, topics=topics)


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A Mosquitto of this test's own, configured as `broker` (TLS, certificates, the ACL)
    with persistence, to stop, kill, start again on the same port and data, or reload."""
    with mosquitto(tmp_path / "mosquitto", ca=session_ca()) as b:
        yield b


@pytest.fixture
def own_mqtt(own_broker: Mosquitto, topics: Topics) -> MqttConfig:
    """`own_broker` in the test's namespace, as nobody yet (see `mqtt`)."""
    return MqttConfig(port=own_broker.port, topics=topics)


@pytest.fixture
def plain_mqtt(broker: Mosquitto, topics: Topics) -> MqttConfig:
    """The test broker's plaintext listener (no TLS, no ACL), for `insecure` tests."""
    assert broker.plain_port is not None
    return MqttConfig(port=broker.plain_port, topics=topics)
