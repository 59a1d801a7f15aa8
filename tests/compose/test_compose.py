"""compose.yaml, checked twice: its structure (one image, `serve <name>` commands, gRPC
healthchecks, depends_on conditions, named volumes, the seed's ports, the proplet ids), and then
run as it is, as a process cluster, with the seed walkthrough against it.

No Docker engine runs here, so the cluster is compose.yaml played by hand:
- each service of ours runs as a local process: the image's ENTRYPOINT (`propeller-fl` of this
  virtualenv) followed by exactly the service's `command`, with exactly its `environment`;
- the broker and the OCI registry are real Mosquitto and docker-registry (tests/support/infra.py);
  the broker starts once the certs job has made its bundle, with the TLS listener and the ACL
  compose.yaml configures (the same generators, `server.mqtt_acl`);
- services start in `depends_on` order, each waiting for its dependencies' conditions
  (`service_healthy`: the dependency's own healthcheck command exits 0;
  `service_completed_successfully`: the job exited 0), and every healthcheck is run until it
  passes, so each one is shown to work.

The address rule. A compose address is `HOST:PORT` where HOST is a service name (its DNS name
on the compose network) or, inside a service, `0.0.0.0`, `127.0.0.1` or `localhost`, which name
that service itself. Each (service, container port) gets one free loopback port: ours a fresh
one, mosquitto and local-registry the ports their processes bound. Every `HOST:PORT` in an
environment value or a command argument (healthchecks included) becomes `127.0.0.1:<that
port>`; an `X_HOST` variable naming a service has its `X_PORT` sibling remapped the same way. A
published port `"H:C"` of service S is reached on the port of (S, C). What a user types against
compose gets the same rewriting (the image reference `local-registry:5000/...` included). Paths
under a service's volume mount become a directory per named volume under the test's tmp dir;
`/app` (the image's WORKDIR, where the Dockerfile builds the trainer) is the repository root.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import json
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import yaml

from propeller.v1 import (
    coordinator_pb2,
    manager_pb2,
)
from server import tracing
from server.cli.serve import LOG_LEVEL_ENV, SERVICES
from server.config import MqttConfig, TlsConfig
from server.log_format import LogConfig
from server.messages import MAX_PACKET_BYTES
from server.metrics import METRICS_ADDR_ENV, MetricsConfig
from server.mqtt_acl import MosquittoTls, mosquitto_acl
from server.pki import CertificateAuthority
from server.topics import Topics
from tests.operations.scrape import scrape
from tests.support.clients import V0, Clients, clients
from tests.support.cluster import round_notes
from tests.support.infra import Mosquitto, OciRegistry, oci_registry
from tests.support.ports import free_port
from tests.support.processes import (
    DEPLOYED_SERVICES,
    GRPC_SERVICES,
    LISTEN_VARS,
    ChildProcess,
    service_environment,
    started,
)
from tests.support.security import service_tls, tls, tls_env
from tests.support.waits import eventually

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "compose.yaml"
TRACING_FILE = ROOT / "compose.tracing.yaml"
COLLECTOR_CONFIG = ROOT / "deploy" / "otel-collector.yaml"
CONFIG_DOC = ROOT / "docs" / "configuration.md"
DOCKERFILE = ROOT / "Dockerfile"
IMAGE_WORKDIR = "/app"

# Compose service -> the `propeller-fl serve` service it runs.
OURS = DEPLOYED_SERVICES
PROPLETS = ("proplet", "proplet-2", "proplet-3")
JOB = "push-wasm"
# The one-shot job that makes the CA and every bundle on the certs volume (docs/security.md).
CERTS = "certs"
CERTS_DIR = "/certs"
JOBS = (JOB, CERTS)
# The bundle each service of ours runs with (a proplet: its own id's).
BUNDLES = {
    "mosquitto": "service-mqtt",
    "manager": "service-manager",
    "coordinator": "service-coordinator",
    "aggregator": "service-aggregator",
    "model-registry": "service-registry",
    "local-data-store": "service-datastore",
}
INFRA = ("mosquitto", "local-registry")
# Started only with their profile (`docker compose --profile NAME up`): name -> profile.
PROFILED = {"prometheus": "metrics", "otel-collector": "tracing"}
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus.yml"
# The seed's familiar host ports.
PUBLISHED = {
    "manager": 7070,
    "coordinator": 8086,
    "aggregator": 8085,
    "model-registry": 8084,
    "local-data-store": 8083,
    "local-registry": 5000,
    "mosquitto": 1883,
    "prometheus": 9090,
}
# Compose service -> the gRPC service it serves (its healthcheck names it).
GRPC_SERVICE = {
    name: GRPC_SERVICES[serve] for name, serve in OURS.items() if serve in GRPC_SERVICES
}
SELF_HOSTS = ("0.0.0.0", "127.0.0.1", "localhost")
SEED_IMAGE = "local-registry:5000/fl-client-wasm:latest"

# Bounds: compose's own start_period for a healthcheck, and how long a stop may take.
STOP_BOUND_S = 20.0
JOB_BOUND_S = 60.0


# --------------------------------------------------------------------------- reading compose


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    return data


def services(compose: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The services `docker compose up` starts: those of no profile."""
    every: dict[str, dict[str, Any]] = compose["services"]
    return {name: svc for name, svc in every.items() if not svc.get("profiles")}


def environment(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    assert isinstance(env, dict), "environment: use the mapping form"
    for key, value in env.items():
        assert isinstance(value, str), f"environment {key}: quote {value!r} as a string"
    return dict(env)


def depends_on(service: Mapping[str, Any]) -> dict[str, str]:
    deps = service.get("depends_on", {})
    assert isinstance(deps, dict), "depends_on: use the long form with a condition"
    return {name: spec["condition"] for name, spec in deps.items()}


def healthcheck_test(service: Mapping[str, Any]) -> list[str]:
    test: list[str] = service["healthcheck"]["test"]
    return test


def duration_s(text: str) -> float:
    """A compose duration like "1m30s", "60s" or "500ms" in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def volume_mounts(service: Mapping[str, Any]) -> dict[str, str]:
    """Mount path -> named volume."""
    mounts: dict[str, str] = {}
    for entry in service.get("volumes", []):
        name, _, target = str(entry).partition(":")
        mounts[target.split(":")[0]] = name
    return mounts


def transitive_deps(compose: Mapping[str, Any], name: str) -> set[str]:
    seen: set[str] = set()
    todo = [name]
    while todo:
        for dep in depends_on(services(compose)[todo.pop()]):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def start_order(compose: Mapping[str, Any]) -> list[str]:
    """The services in an order compatible with depends_on; fails on a cycle."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        assert name not in visiting, f"depends_on cycle through {name}"
        visiting.add(name)
        for dep in depends_on(services(compose)[name]):
            visit(dep)
        visiting.discard(name)
        order.append(name)

    for name in services(compose):
        visit(name)
    return order


class RecordingEnv(dict[str, str]):
    """An environment that remembers which variables were asked for."""

    def __init__(self, values: Mapping[str, str]) -> None:
        super().__init__(values)
        self.read: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> str:
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):
            self.read.add(key)
        return super().__contains__(key)


def loadable(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with its bundle directory (a path on the certs volume) replaced by the suite's
    bundle of the same identity, so a config loads here (no TLS: plaintext)."""
    out = dict(env)
    bundle = out.get("PROPELLER_TLS_DIR", "")
    if not bundle:
        out.setdefault("PROPELLER_INSECURE", "1")
        return out
    kind, _, name = Path(bundle).name.partition("-")
    out["PROPELLER_TLS_DIR"] = str(tls(kind, name).cert.parent)
    out.pop("PROPELLER_TLS_CRL", None)
    return out


def variables_read(serve_name: str, env: Mapping[str, str] | None = None) -> set[str]:
    """Every variable `propeller-fl serve NAME` reads: its config's from_env, and the log level."""
    base = loadable(env or {})
    if serve_name == "proplet":
        base.setdefault("PROPLET_ID", "a-proplet")
    recorder = RecordingEnv(base)
    SERVICES[serve_name].load_config(recorder)
    tracing.wanted(recorder)  # what `propeller-fl` reads to decide on traces
    # What the CLI reads for every command: the log format, and /metrics for serve.
    LogConfig.from_env(recorder)
    MetricsConfig.from_env(recorder)
    return recorder.read | {LOG_LEVEL_ENV}


def documented_variables() -> dict[str, str]:
    """Variable -> its row, from the table in docs/configuration.md."""
    rows: dict[str, str] = {}
    for line in CONFIG_DOC.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^\|\s*`([A-Z][A-Z0-9_]*)`\s*\|", line)
        if m:
            assert m[1] not in rows, f"{m[1]} has two rows in docs/configuration.md"
            rows[m[1]] = line
    return rows


# --------------------------------------------------------------------------- structure


def test_every_service_of_ours_runs_the_one_image_with_serve(compose: dict[str, Any]) -> None:
    every = compose["services"]
    assert set(every) == {*OURS, *JOBS, *INFRA, *PROFILED}
    for name, svc in every.items():
        assert svc.get("profiles", []) == ([PROFILED[name]] if name in PROFILED else []), name
    svcs = services(compose)
    image = svcs["manager"]["image"]
    build = svcs["manager"]["build"]
    assert build["context"] == "." and build.get("dockerfile", "Dockerfile") == "Dockerfile"
    for name, serve_name in OURS.items():
        svc = svcs[name]
        assert (svc["image"], svc["build"]) == (image, build), name
        assert svc["command"] == ["serve", serve_name], name
        assert svc.get("restart") == "unless-stopped", name
    assert (svcs[JOB]["image"], svcs[JOB]["build"]) == (image, build)
    assert svcs[JOB]["command"] == [
        "wasm",
        "push",
        f"{IMAGE_WORKDIR}/wasm-client/build/fl-client.wasm",
        "--image",
        SEED_IMAGE,
        "--plain-http",
    ]
    assert svcs[JOB].get("restart") == "no"  # a one-shot job
    assert (svcs[CERTS]["image"], svcs[CERTS]["build"]) == (image, build)
    assert svcs[CERTS].get("restart") == "no"
    assert svcs[CERTS]["command"][:3] == ["certs", "init", CERTS_DIR]
    assert svcs["mosquitto"]["image"] == "eclipse-mosquitto:2"
    assert svcs["local-registry"]["image"] == "registry:2"


def test_the_dockerfile_builds_that_image() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert froms and all(f == "python:3.11-slim" or f in ("install", "wasm") for f in froms)
    assert froms[-1] == "python:3.11-slim"
    assert re.search(r"^RUN .*pip install \.$", text, re.M)
    assert "RUN python wasm-client/build.py" in text
    # The push-wasm job's path is where the trainer lands in the final image.
    assert f"{IMAGE_WORKDIR}/wasm-client/build/fl-client.wasm" in text.split("\nFROM")[-1]
    assert re.search(r"^WORKDIR /app$", text.split("\nFROM")[-1], re.M)
    entrypoints = re.findall(r"^ENTRYPOINT\s+(.+)$", text, re.M)
    assert [json.loads(e) for e in entrypoints] == [["propeller-fl"]]
    ignored = (ROOT / ".dockerignore").read_text(encoding="utf-8").split()
    assert {".git", ".venv", "tests"} <= set(ignored)


def test_healthchecks_ask_the_grpc_health_service(compose: dict[str, Any]) -> None:
    svcs = services(compose)
    for name, grpc_name in GRPC_SERVICE.items():
        port = PUBLISHED[name]
        assert healthcheck_test(svcs[name]) == [
            "CMD",
            "propeller-fl",
            "health",
            f"127.0.0.1:{port}",
            "--service",
            grpc_name,
        ], name
    # A proplet serves no gRPC: healthy means the manager sees it alive.
    for name in PROPLETS:
        pid = environment(svcs[name])["PROPLET_ID"]
        assert healthcheck_test(svcs[name]) == [
            "CMD",
            "propeller-fl",
            "health",
            f"manager:{PUBLISHED['manager']}",
            "--proplet",
            pid,
        ], name
    for name in (*OURS, *INFRA):
        check = svcs[name]["healthcheck"]
        assert check["test"][0] == "CMD", name
        for key in ("interval", "timeout", "start_period"):
            assert duration_s(check[key]) > 0, (name, key)
        assert check["retries"] >= 1, name
    assert all("healthcheck" not in svcs[job] for job in JOBS)


def test_depends_on_waits_for_what_each_service_talks_to(compose: dict[str, Any]) -> None:
    svcs = services(compose)
    order = start_order(compose)  # no cycle
    assert order.index(JOB) < order.index("manager")
    for name, svc in svcs.items():
        for dep, condition in depends_on(svc).items():
            assert dep in svcs, f"{name} depends on unknown {dep}"
            if dep in JOBS:
                assert condition == "service_completed_successfully", name
            else:
                assert condition == "service_healthy", (name, dep)
                assert "healthcheck" in svcs[dep], dep
    assert depends_on(svcs[JOB]) == {"local-registry": "service_healthy"}
    for name in ("manager", *PROPLETS):
        assert JOB in transitive_deps(compose, name), name
    for name in PROPLETS:
        assert "manager" in depends_on(svcs[name]), name
    # Every service another one's environment names is started (and healthy) before it.
    hosts = set(svcs)
    for name in (*OURS, *JOBS):
        env = environment(svcs[name])
        named = {
            h for value in env.values() for h in re.findall(r"([a-z][a-z0-9-]*):\d+", value)
        } & hosts
        assert named - {name} <= transitive_deps(compose, name), (name, named)


# What an operator must reach from elsewhere (mutual TLS guards it) is published on every
# interface; the rest on the loopback interface only (docs/security.md).
OPERATOR_FACING = {"manager", "coordinator", "model-registry", "local-data-store"}


def test_ports_are_the_seeds(compose: dict[str, Any]) -> None:
    svcs = services(compose)
    for name, svc in svcs.items():
        published = [str(p) for p in svc.get("ports", [])]
        if name in PUBLISHED:
            port = PUBLISHED[name]
            where = "" if name in OPERATOR_FACING else "127.0.0.1:"
            assert published == [f"{where}{port}:{port}"], name
        else:
            assert published == [], name
    for name in GRPC_SERVICE:
        listen = LISTEN_VARS[OURS[name]]
        assert environment(svcs[name])[listen] == f"0.0.0.0:{PUBLISHED[name]}", name
    assert "listener 1883" in compose["configs"]["mosquitto-conf"]["content"]


# The broker's files in its container: its bundle and the CA's revocation list from the certs
# volume, its own copy of its key (see compose.yaml), the ACL from `configs`.
BROKER_FILES = MosquittoTls(
    ca=f"{CERTS_DIR}/service-mqtt/ca.crt",
    cert=f"{CERTS_DIR}/service-mqtt/tls.crt",
    key="/mosquitto/tls.key",
    crl=f"{CERTS_DIR}/crl.pem",
    acl="/mosquitto/config/acl",
)


def test_mosquitto_requires_certificates_and_applies_the_acl(compose: dict[str, Any]) -> None:
    """The listener block the tests' own brokers run (`MosquittoTls.listener`, the one
    generator), with the container's paths; the ACL file is `server.mqtt_acl`'s, verbatim."""
    mosq = services(compose)["mosquitto"]
    assert mosq["configs"] == [
        {"source": "mosquitto-conf", "target": "/mosquitto/config/mosquitto.conf"},
        {"source": "mosquitto-acl", "target": BROKER_FILES.acl},
    ]
    conf = compose["configs"]["mosquitto-conf"]["content"]
    lines = conf.splitlines()
    assert lines[0] == "per_listener_settings true"
    assert BROKER_FILES.listener(PUBLISHED["mosquitto"]) in conf
    assert "allow_anonymous true" not in lines
    assert sum(line.startswith("listener ") for line in lines) == 1  # no plaintext listener
    assert {"persistence true", "persistence_location /mosquitto/data/"} <= set(lines)
    assert f"max_packet_size {MAX_PACKET_BYTES}" in lines
    assert compose["configs"]["mosquitto-acl"]["content"] == mosquitto_acl()
    assert volume_mounts(mosq) == {"/mosquitto/data": "mosquitto-data", CERTS_DIR: "certs"}
    assert f"certs:{CERTS_DIR}:ro" in mosq["volumes"]
    assert depends_on(mosq) == {CERTS: "service_completed_successfully"}
    # The key mosquitto reads is its own copy of the certs job's, made before it starts.
    shell = mosq["command"]
    assert shell[:2] == ["sh", "-c"]
    copy = f"install -m 0400 -o mosquitto -g mosquitto {CERTS_DIR}/service-mqtt/tls.key"
    assert shell[2].startswith(f"{copy} {BROKER_FILES.key} && exec /usr/sbin/mosquitto -c ")
    # Its healthcheck connects as the broker's own identity over TLS.
    check = healthcheck_test(mosq)
    assert check[:2] == ["CMD", "mosquitto_sub"]
    for flag, value in (
        ("--cafile", BROKER_FILES.ca),
        ("--cert", BROKER_FILES.cert),
        ("--key", BROKER_FILES.key),
    ):
        assert check[check.index(flag) + 1] == value


def test_state_lives_on_named_volumes(compose: dict[str, Any]) -> None:
    svcs: dict[str, dict[str, Any]] = compose["services"]  # the profiled ones' volumes too
    declared = set(compose["volumes"])
    used: list[str] = []
    for name, svc in svcs.items():
        for target, volume in volume_mounts(svc).items():
            assert volume in declared, f"{name}: volume {volume} is not declared"
            assert target.startswith("/"), name
            used.append(volume)
    # Each named volume is used by exactly one service, except the certificates, which the
    # certs job writes and every service of ours (and the broker) reads.
    shared = [v for v in used if v == "certs"]
    assert sorted(v for v in used if v != "certs") == sorted(declared - {"certs"})
    assert len(shared) == 2 + len(OURS)
    for name in OURS:
        assert f"certs:{CERTS_DIR}:ro" in svcs[name]["volumes"], name
        bundle = environment(svcs[name])["PROPELLER_TLS_DIR"]
        expected = BUNDLES.get(name) or f"proplet-{environment(svcs[name])['PROPLET_ID']}"
        assert bundle == f"{CERTS_DIR}/{expected}", name
        assert environment(svcs[name]).get("PROPELLER_TLS_CRL", "") in ("", "/certs/crl.pem")
        assert name in PROPLETS or environment(svcs[name])["PROPELLER_TLS_CRL"]
    assert volume_mounts(svcs["local-registry"]) == {"/var/lib/registry": "oci-registry-data"}
    registry_state = environment(svcs["model-registry"])["PROPELLER_STATE_DIR"]
    assert volume_mounts(svcs["model-registry"]) == {
        registry_state: "model-registry-data",
        CERTS_DIR: "certs",
    }
    for name in PROPLETS:
        work = environment(svcs[name])["PROPLET_WORK_DIR"]
        assert list(volume_mounts(svcs[name])) == [work, CERTS_DIR], name
    assert len({tuple(volume_mounts(svcs[n]).values()) for n in PROPLETS}) == 3


def test_the_proplet_ids_are_fixed_and_seeded(compose: dict[str, Any]) -> None:
    svcs = services(compose)
    ids = [environment(svcs[n])["PROPLET_ID"] for n in PROPLETS]
    assert len(set(ids)) == 3
    for pid in ids:
        assert str(uuid.UUID(pid)) == pid  # a UUID, as the seed's participants are
    assert list(compose["x-proplet-ids"].values()) == ids
    seeded = environment(svcs["local-data-store"])["PROPELLER_DATASTORE_SEED_IDS"].split(",")
    assert seeded == ids
    # The certs job issues each of them its bundle (and every service of ours its own).
    command = svcs[CERTS]["command"]
    issued = [command[i + 1] for i, a in enumerate(command) if a == "--proplet"]
    assert issued == ids
    services_issued = [command[i + 1] for i, a in enumerate(command) if a == "--service"]
    assert sorted(s.partition("=")[0] for s in services_issued) == sorted(
        b.removeprefix("service-") for b in BUNDLES.values()
    )
    for spec in services_issued:  # each named for the host the others dial
        service, _, hosts = spec.partition("=")
        (name,) = [n for n, b in BUNDLES.items() if b == f"service-{service}"]
        assert hosts.split(",") == [name], spec
    names = [environment(svcs[n])["PROPLET_NAME"] for n in PROPLETS]
    assert names == ["proplet-1", "proplet-2", "proplet-3"]
    for name in PROPLETS:
        env = environment(svcs[name])
        assert env["PROPLET_INSECURE_REGISTRIES"] == "local-registry:5000", name


def test_every_variable_compose_sets_is_read_and_valid(compose: dict[str, Any]) -> None:
    svcs = services(compose)
    for name, serve_name in OURS.items():
        env = environment(svcs[name])
        unread = set(env) - variables_read(serve_name, env)
        assert not unread, f"{name} sets variables nothing reads: {sorted(unread)}"
    proplet = SERVICES["proplet"].load_config(loadable(environment(svcs["proplet"])))
    assert proplet.is_insecure("local-registry:5000")  # type: ignore[attr-defined]
    datastore = SERVICES["datastore"].load_config(loadable(environment(svcs["local-data-store"])))
    assert len(datastore.seed_proplet_ids) == 3  # type: ignore[attr-defined]


def test_the_metrics_profile_scrapes_every_service_on_its_metrics_port(
    compose: dict[str, Any],
) -> None:
    svcs: dict[str, dict[str, Any]] = compose["services"]
    prometheus = svcs["prometheus"]
    assert prometheus["image"].startswith("prom/prometheus:")
    assert prometheus["ports"] == ["127.0.0.1:9090:9090"]  # the UI on the host's loopback
    (mounted,) = prometheus["configs"]
    assert mounted["target"] == "/etc/prometheus/prometheus.yml"
    source = compose["configs"][mounted["source"]]["file"]
    assert (ROOT / source).resolve() == PROMETHEUS_CONFIG
    # Every service and proplet of ours serves /metrics on a port the network reaches, not
    # published on the host; the config scrapes exactly those.
    wanted: set[str] = set()
    for name in OURS:
        listen = MetricsConfig.from_env(environment(svcs[name]))
        host, port = listen.listen_on()
        assert host == "0.0.0.0", name  # reachable from the prometheus container
        assert str(port) in [str(p) for p in svcs[name].get("expose", [])], name
        assert all(not str(p).endswith(f":{port}") for p in svcs[name].get("ports", [])), name
        wanted.add(f"{name}:{port}")
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text(encoding="utf-8"))
    targets = [
        t
        for job in config["scrape_configs"]
        for static in job["static_configs"]
        for t in static["targets"]
    ]
    assert sorted(targets) == sorted(wanted)
    assert all(
        job.get("metrics_path", "/metrics") == "/metrics" for job in config["scrape_configs"]
    )
    assert METRICS_ADDR_ENV in documented_variables()


def test_configuration_doc_has_one_row_per_variable() -> None:
    read: set[str] = set()
    for serve_name in sorted(set(OURS.values())):
        read |= variables_read(serve_name)
    # Also every variable named in a `from_env(env=None)` (one that reads the process
    # environment; a round task's FlTask.from_env reads the task's env), whatever the branch.
    for path in [*ROOT.glob("server/**/*.py"), *ROOT.glob("proplet/*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.FunctionDef)
                and node.name == "from_env"
                and node.args.defaults
                and isinstance(node.args.defaults[-1], ast.Constant)
                and node.args.defaults[-1].value is None
            ):
                for const in ast.walk(node):
                    if (
                        isinstance(const, ast.Constant)
                        and isinstance(const.value, str)
                        and re.fullmatch(r"[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+", const.value)
                    ):
                        read.add(const.value)
    rows = documented_variables()
    assert not read - set(rows), f"undocumented: {sorted(read - set(rows))}"
    assert not set(rows) - read, f"documented but read by nothing: {sorted(set(rows) - read)}"


def test_the_tracing_profile_collects_every_service_s_spans(compose: dict[str, Any]) -> None:
    """`--profile tracing` adds an OpenTelemetry collector (and nothing else); the override
    file points exactly our services at its OTLP receiver, with OpenTelemetry's own variable
    (read by every `propeller-fl serve`); the collector's config (in the repository, mounted
    where its command reads it) receives OTLP/gRPC on that port and sends traces through a
    pipeline whose every part is defined."""
    every = compose["services"]
    profiled = {n: s["profiles"] for n, s in every.items() if s.get("profiles")}
    assert {n for n, p in profiled.items() if "tracing" in p} == {"otel-collector"}
    assert profiled["otel-collector"] == ["tracing"]
    collector = every["otel-collector"]
    assert collector["image"].startswith("otel/opentelemetry-collector:")
    assert not collector["image"].endswith(":latest")
    (mount,) = collector["configs"]
    assert compose["configs"][mount["source"]] == {"file": "./deploy/otel-collector.yaml"}
    assert collector["command"] == [f"--config={mount['target']}"]

    config = yaml.safe_load(COLLECTOR_CONFIG.read_text(encoding="utf-8"))
    endpoint = config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    host, _, port = endpoint.rpartition(":")
    assert host == "0.0.0.0"
    assert collector["ports"] == [f"127.0.0.1:{port}:{port}"]
    (traces,) = config["service"]["pipelines"].values()
    assert list(config["service"]["pipelines"]) == ["traces"]
    for part in ("receivers", "processors", "exporters"):
        assert traces[part], part
        assert set(traces[part]) <= set(config[part]), part

    override = yaml.safe_load(TRACING_FILE.read_text(encoding="utf-8"))
    assert set(override["services"]) == set(OURS)
    for name, serve_name in OURS.items():
        svc = override["services"][name]
        env = environment(svc)
        assert env == {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://otel-collector:{port}"}, name
        assert tracing.wanted(env)
        assert set(env) <= variables_read(serve_name, env), name
        assert depends_on(svc) == {"otel-collector": "service_started"}, name


# --------------------------------------------------------------------------- serve and health


def all_variables() -> set[str]:
    return set().union(*(variables_read(s) for s in set(OURS.values())))


@pytest.mark.process
def test_serve_refuses_a_bad_variable_in_one_line() -> None:
    env = {**service_environment(all_variables()), "PROPELLER_MQTT_PORT": "not-a-port"}
    result = subprocess.run(
        [*propeller_fl(), "serve", "coordinator"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        "propeller-fl serve: PROPELLER_MQTT_PORT: 'not-a-port' is not an integer\n"
    )


@pytest.mark.process
async def test_a_signal_during_start_up_stops_serve_cleanly(tmp_path: Path) -> None:
    """`docker compose stop` while the broker is still unreachable: exit 0, not a kill."""
    env = {
        **service_environment(all_variables()),
        **tls_env(service_tls("manager")),
        "PROPELLER_MQTT_PORT": str(free_port()),  # nothing listens: start-up keeps retrying
        "PROPELLER_MANAGER_LISTEN": "127.0.0.1:0",
    }
    argv = [*propeller_fl(), "serve", "manager"]
    with started(ChildProcess("manager", argv, tmp_path, env=env, stdout="file")) as serve:
        await serve.wait_log("[serve] manager pid=")
        assert await serve.terminate_async(STOP_BOUND_S) == 0, serve.tail()
        assert serve.out_path.read_bytes() == b""
        assert "stopped by SIGTERM during start-up" in serve.log_text()


# --------------------------------------------------------------------------- the process cluster


@dataclass
class AddressMap:
    """The address rule of the module docstring."""

    hosts: frozenset[str]
    ports: dict[tuple[str, int], int]
    volume_dirs: dict[str, Path]
    pattern: re.Pattern[str] = field(init=False)

    def __post_init__(self) -> None:
        names = sorted({*self.hosts, *SELF_HOSTS}, key=len, reverse=True)
        alternatives = "|".join(re.escape(n) for n in names)
        self.pattern = re.compile(rf"(?<![\w.-])({alternatives}):(\d+)(?!\d)")

    def port(self, service: str, host: str, port: int) -> int:
        key = (service if host in SELF_HOSTS else host, port)
        assert key in self.ports, f"{service}: {host}:{port} is no port compose declares"
        return self.ports[key]

    def address(self, service: str, value: str) -> str:
        return self.pattern.sub(lambda m: f"127.0.0.1:{self.port(service, m[1], int(m[2]))}", value)

    def path(self, mounts: Mapping[str, str], value: str) -> str:
        if value == IMAGE_WORKDIR or value.startswith(IMAGE_WORKDIR + "/"):
            return str(ROOT) + value[len(IMAGE_WORKDIR) :]
        for target, volume in mounts.items():
            if value == target or value.startswith(target.rstrip("/") + "/"):
                return str(self.volume_dirs[volume]) + value[len(target.rstrip("/")) :]
        return value

    def argv(self, service: str, mounts: Mapping[str, str], args: list[str]) -> list[str]:
        return [self.path(mounts, self.address(service, a)) for a in args]

    def env(
        self, service: str, mounts: Mapping[str, str], env: Mapping[str, str]
    ) -> dict[str, str]:
        out = {k: self.path(mounts, self.address(service, v)) for k, v in env.items()}
        for key, host in env.items():
            if key.endswith("_HOST") and host in self.hosts:
                port_key = key.removesuffix("_HOST") + "_PORT"
                assert port_key in env, f"{service}: {key} names {host} without {port_key}"
                out[key] = "127.0.0.1"
                out[port_key] = str(self.port(service, host, int(env[port_key])))
        unmapped = {
            k: v
            for k, v in out.items()
            if k.endswith(("_ADDR", "_LISTEN")) and not v.startswith("127.0.0.1:")
        }
        assert not unmapped, f"{service}: addresses the rule cannot map: {unmapped}"
        return out

    def published(self, compose: Mapping[str, Any], host_port: int) -> str:
        """Where `localhost:<host_port>` of the compose host is."""
        for name, svc in services(compose).items():
            for spec in svc.get("ports", []):
                published, target = str(spec).split(":")[-2:]  # [IP:]HOST:CONTAINER
                if int(published) == host_port:
                    return f"127.0.0.1:{self.ports[(name, int(target))]}"
        raise AssertionError(f"nothing publishes port {host_port}")


def propeller_fl() -> list[str]:
    """The image's ENTRYPOINT, from this virtualenv."""
    exe = Path(sys.executable).parent / "propeller-fl"
    assert exe.exists(), "propeller-fl is not installed in this environment (pip install -e .)"
    return [str(exe)]


class Cluster:
    """compose.yaml's services of ours (and its job) as local processes."""

    def __init__(
        self,
        compose: dict[str, Any],
        amap: AddressMap,
        logs: Path,
        base_env: dict[str, str],
    ) -> None:
        self.compose = compose
        self.amap = amap
        self.logs = logs
        self.base_env = base_env
        self.processes: dict[str, ChildProcess] = {}
        self.healthy: set[str] = set()
        self._up: dict[str, asyncio.Task[None]] = {}

    def spec(self, name: str) -> dict[str, Any]:
        return services(self.compose)[name]

    def command(self, name: str) -> tuple[list[str], dict[str, str]]:
        svc = self.spec(name)
        mounts = volume_mounts(svc)
        for volume in mounts.values():
            self.amap.volume_dirs[volume].mkdir(parents=True, exist_ok=True)
        argv = [*propeller_fl(), *self.amap.argv(name, mounts, list(svc["command"]))]
        declared = environment(svc)
        metrics = declared.pop(METRICS_ADDR_ENV, None)
        env = {**self.base_env, **self.amap.env(name, mounts, declared)}
        if metrics is not None:
            # /metrics on a port the process picks (it logs the address): a port chosen here
            # in advance may be taken by then, and nothing else depends on it.
            env[METRICS_ADDR_ENV] = "127.0.0.1:0"
        return argv, env

    def metrics_url(self, name: str) -> str:
        """Where the service's process serves /metrics, from its log."""
        found = re.findall(
            r"\[metrics\] serving (http://\S+/metrics)", self.processes[name].log_text()
        )
        assert found, f"{name}: no metrics endpoint logged"
        return str(found[-1])

    def start(self, name: str) -> ChildProcess:
        """The service's process: stderr in LOGS/NAME.log, stdout in LOGS/NAME.out."""
        argv, env = self.command(name)
        process = ChildProcess(name, argv, self.logs, env=env, stdout="file")
        process.start()
        self.processes[name] = process
        return process

    def healthcheck_argv(self, name: str) -> list[str]:
        test = healthcheck_test(self.spec(name))
        assert test[0] == "CMD" and test[1] == "propeller-fl", test
        mounts = volume_mounts(self.spec(name))
        return [*propeller_fl(), *self.amap.argv(name, mounts, test[2:])]

    async def wait_healthy(self, name: str) -> None:
        """Run the service's healthcheck (as compose would, more often) until it passes."""
        check = self.spec(name)["healthcheck"]
        argv = self.healthcheck_argv(name)
        env = self.command(name)[1]  # a healthcheck runs inside the container, with its env
        timeout = duration_s(check["timeout"])
        bound = duration_s(check["start_period"]) + check["retries"] * duration_s(check["interval"])
        deadline = time.monotonic() + bound
        last = ""
        while True:
            process = self.processes[name]
            assert process.running, f"{name} exited before it was healthy\n{process.tail()}"
            try:
                result = await asyncio.to_thread(
                    subprocess.run,
                    argv,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=timeout + 10,  # the check's own --timeout bounds its RPC
                )
            except subprocess.TimeoutExpired:
                # As compose counts it: a check that outlives its timeout failed; try again
                # (on a loaded machine the CLI's start alone can take seconds).
                last = f"the check took more than {timeout + 10:.0f} s"
            else:
                if result.returncode == 0:
                    self.healthy.add(name)
                    return
                last = result.stderr.strip()
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{name} not healthy within {bound:.0f} s: {last}\n" + process.tail()
                )
            await asyncio.sleep(0.25)

    async def run_job(self, name: str) -> None:
        process = self.start(name)
        code = await process.wait_exit(JOB_BOUND_S)
        assert code == 0, f"{name} exited {code}\n{process.tail()}"

    async def _bring_up(self, name: str) -> None:
        for dep, condition in depends_on(self.spec(name)).items():
            if dep in INFRA:
                continue  # started by the test before the cluster, and ready
            await self._up[dep]  # healthy, or completed successfully for the job
            assert condition in ("service_healthy", "service_completed_successfully")
        if name in JOBS:
            await self.run_job(name)
        else:
            self.start(name)
            await self.wait_healthy(name)

    async def up(self, names: list[str]) -> None:
        async with asyncio.TaskGroup() as tg:
            for name in names:
                self._up[name] = tg.create_task(self._bring_up(name), name=f"up-{name}")

    def stop_all(self) -> dict[str, int | None]:
        """SIGTERM every process still running; each one's exit status (None: did not stop)."""
        running = {n: p for n, p in self.processes.items() if p.running}
        for p in running.values():
            p.send(signal.SIGTERM)
        deadline = time.monotonic() + STOP_BOUND_S
        codes: dict[str, int | None] = {}
        for name, p in running.items():
            try:
                codes[name] = p.wait(max(0.1, deadline - time.monotonic()))
            except AssertionError:  # still running at the deadline
                codes[name] = None
        return codes

    def kill_leftovers(self) -> None:
        for p in self.processes.values():
            p.stop(grace=0)

    def logs_tail(self) -> str:
        return "\n".join(p.tail() for p in self.processes.values())


@contextlib.contextmanager
def infrastructure(tmp_path: Path) -> Iterator[OciRegistry]:
    """An OCI registry of the cluster's own. (Its broker starts after the certs job: see
    `compose_broker`.)"""
    with oci_registry(tmp_path / "oci") as registry:
        yield registry


def compose_broker(amap: AddressMap, port: int, workdir: Path) -> Mosquitto:
    """The compose broker, as a real mosquitto on `port`: the listener and ACL compose.yaml
    configures (the same generators, checked above), with the bundle the certs job made for
    it on the certs volume."""
    ca = CertificateAuthority(amap.volume_dirs["certs"])
    assert (amap.volume_dirs["certs"] / BUNDLES["mosquitto"] / "tls.key").exists()
    return Mosquitto(port, workdir, ca=ca)


async def run_round(
    c: Clients, round_id: str, model_ref: str, ids: list[str], image: str
) -> coordinator_pb2.RoundStatus:
    """One experiment round, as the seed's step 6, to completion; returns its final status."""
    resp = await c.start_experiment(
        round_id, ids, image, experiment_id=f"exp-{round_id}", model_ref=model_ref, k_of_n=3
    )
    assert sorted(s.proplet_id for s in resp.scheduled) == sorted(ids)
    assert not resp.skipped
    status = await c.wait_state(round_id, timeout=90, via="manager")
    assert status.state == coordinator_pb2.ROUND_STATE_COMPLETED, status.failure_reason
    assert status.completed and status.num_updates == 3
    assert sorted(status.reported) == sorted(ids)
    # Exactly one task per participant, named as the seed names them, each Completed.
    tasks = await eventually(
        lambda: c.round_tasks(round_id),
        lambda ts: all(t.state == manager_pb2.TASK_STATE_COMPLETED for t in ts),
    )
    assert sorted((t.name, t.proplet_id) for t in tasks) == sorted(
        (f"fl-round-{round_id}-{pid}", pid) for pid in ids
    )
    return status


@pytest.mark.process
async def test_compose_as_a_process_cluster(
    compose: dict[str, Any], trainer_wasm: Path, tmp_path: Path
) -> None:
    svcs = services(compose)
    # The trainer the push-wasm job pushes is the one the Dockerfile builds, at /app/...
    assert trainer_wasm == ROOT / "wasm-client" / "build" / "fl-client.wasm"
    reserved = all_variables()
    with infrastructure(tmp_path) as registry, contextlib.ExitStack() as broker_stack:
        mqtt_port = free_port()
        ports: dict[tuple[str, int], int] = {
            ("mosquitto", PUBLISHED["mosquitto"]): mqtt_port,
            ("local-registry", PUBLISHED["local-registry"]): registry.port,
        }
        for name in OURS:
            for spec in svcs[name].get("ports", []):
                ports[(name, int(str(spec).split(":")[-1]))] = free_port()
        amap = AddressMap(
            hosts=frozenset(svcs),
            ports=ports,
            volume_dirs={v: tmp_path / "volumes" / v for v in compose["volumes"]},
        )
        logs = tmp_path / "logs"
        logs.mkdir()
        cluster = Cluster(compose, amap, logs, service_environment(reserved))
        order = [n for n in start_order(compose) if n not in INFRA and n not in PROFILED]
        assert set(order) == {*OURS, *JOBS}
        ok = False
        try:
            async with asyncio.timeout(180):
                # The certs job first, then the broker with its bundle (its depends_on).
                await cluster.up([CERTS])
                broker = compose_broker(amap, mqtt_port, tmp_path / "mosquitto")
                broker_stack.enter_context(started(broker, grace=5.0))
                await cluster.up([n for n in order if n != CERTS])
            assert cluster.healthy == set(OURS)  # every healthcheck ran and passed
            await walkthrough(compose, amap, broker)
            await metrics_after_the_walkthrough(cluster)
            # The model registry's versions are on its volume.
            assert any((tmp_path / "volumes" / "model-registry-data").iterdir())
            # Graceful stop: SIGTERM, each service exits 0 within the bound.
            codes = cluster.stop_all()
            assert codes == dict.fromkeys(OURS, 0), cluster.logs_tail()
            for name in OURS:  # serve logs to stderr and prints nothing on stdout
                assert cluster.processes[name].out_path.read_bytes() == b"", name
            # A restarted registry still has every version (the named volume's point).
            cluster.start("model-registry")
            await cluster.wait_healthy("model-registry")
            async with clients(
                {"registry": amap.published(compose, PUBLISHED["model-registry"])},
                tls=compose_operator(amap),
            ) as c:
                assert await c.versions() == [0, 1, 2]
            assert cluster.stop_all() == {"model-registry": 0}
            ok = True
        finally:
            if not ok:
                print(cluster.logs_tail())
            cluster.kill_leftovers()


async def metrics_after_the_walkthrough(cluster: Cluster) -> None:
    """Every process's /metrics (what the `metrics` profile's Prometheus scrapes, checked
    statically above) after the walkthrough's two rounds of three proplets."""
    scraped = {name: await scrape(cluster.metrics_url(name)) for name in OURS}
    coordinator, manager = scraped["coordinator"], scraped["manager"]
    accepted = {"outcome": "accepted", "code": "OK", "field": ""}
    assert coordinator.value("propeller_updates_total", **accepted) == 2 * len(PROPLETS)
    assert coordinator.value("propeller_rounds_total", state="completed") == 2
    for phase in ("aggregation", "store"):
        assert coordinator.value("propeller_round_phase_seconds_count", phase=phase) == 2
    assert manager.value("propeller_proplets_alive") == len(PROPLETS)
    assert manager.value("propeller_round_phase_seconds_count", phase="fan_out") == 2
    for name in PROPLETS:
        assert scraped[name].value("propeller_wasm_run_seconds_count") == 2, name
        for phase in ("training", "upload"):
            count = scraped[name].value("propeller_round_phase_seconds_count", phase=phase)
            assert count == 2, (name, phase)
    # The registry read the two new versions as model streams.
    stored = {"stream": "model", "direction": "in"}
    assert scraped["model-registry"].value("propeller_stream_bytes_total", **stored) > 0


def compose_operator(amap: AddressMap) -> TlsConfig:
    """The operator bundle the certs job made (`docker compose cp certs:/certs/operator-admin`)."""
    return TlsConfig.bundle(amap.volume_dirs["certs"] / "operator-admin")


async def walkthrough(compose: dict[str, Any], amap: AddressMap, broker: Mosquitto) -> None:
    """The seed's steps 4 to 9 over gRPC against the published ports."""
    svcs = services(compose)
    ids = [environment(svcs[n])["PROPLET_ID"] for n in PROPLETS]
    # The image reference as the seed writes it, seen from the proplets' network.
    image = amap.address("proplet", SEED_IMAGE)
    manager_env = environment(svcs["manager"])
    mqtt = MqttConfig(
        port=broker.port,
        topics=Topics(manager_env["PROPELLER_DOMAIN_ID"], manager_env["PROPELLER_CHANNEL_ID"]),
    )
    published = {
        "manager": amap.published(compose, PUBLISHED["manager"]),
        "registry": amap.published(compose, PUBLISHED["model-registry"]),
    }
    async with (
        clients(published, tls=compose_operator(amap)) as c,
        round_notes(mqtt, identity=compose_operator(amap)) as notes,
    ):
        # 4. The three compose proplets are registered and alive under their fixed ids.
        await c.wait_alive(ids)
        assert {p.name for p in await c.proplets()} == {"proplet-1", "proplet-2", "proplet-3"}

        # 5. v0: zeros of dimension 3.
        v0 = await c.init_model(3)
        assert v0.version == 0 and v0.model_uri == V0
        model0 = await c.model(0)
        assert model0["w"].tolist() == [0.0, 0.0, 0.0] and float(model0["b"]) == 0.0

        # 6-8. Round 1 from v0 with k_of_n=3 -> v1, which differs from v0.
        r1 = f"r-{uuid.uuid4().hex[:8]}"
        status = await run_round(c, r1, V0, ids, image)
        assert status.new_model_version == 1
        note = await asyncio.wait_for(notes.get(), 10)
        assert note["round_id"] == r1 and note["model_uri"] == "fl/models/global_model_v1"
        model1 = await c.model(1)
        assert not np.allclose(model1["w"], model0["w"])

        # 9. Round 2 from v1 -> v2.
        r2 = f"r-{uuid.uuid4().hex[:8]}"
        status2 = await run_round(c, r2, "fl/models/global_model_v1", ids, image)
        assert status2.new_model_version == 2
        note2 = await asyncio.wait_for(notes.get(), 10)
        assert note2["round_id"] == r2 and note2["new_model_version"] == 2
        model2 = await c.model(2)
        assert not np.allclose(model2["w"], model1["w"])
        assert await c.versions() == [0, 1, 2]
