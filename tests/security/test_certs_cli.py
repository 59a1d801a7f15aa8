"""`propeller-fl certs ...` and the TLS settings every process reads (issue 9, items 1 and 2):
onboarding touches one bundle, revocation lands in the CRL, nothing starts without TLS or an
explicit plaintext setting, and a proplet is who its certificate says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from proplet.config import PropletConfig
from server.cli.main import main
from server.config import TlsConfig
from server.pki import CertificateAuthority, Identity, Kind, RevocationList
from server.registry.app import RegistryConfig

pytestmark = pytest.mark.unit

IDS = ("d69775d9-235f-41ee-8336-0a16e65e3451", "56623ab9-6ca2-455f-8dae-2deb8858205c")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_init_issues_what_is_missing_and_keeps_the_rest(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    d = tmp_path / "pki"
    args = ["certs", "init", str(d), "--service", "coordinator=coordinator,10.0.0.5"]
    args += ["--operator", "admin", *(f for pid in IDS for f in ("--proplet", pid))]
    code, out, err = run(capsys, *args)
    assert (code, err) == (0, "")
    assert {p.name for p in d.iterdir() if p.is_dir()} == {
        "service-coordinator",
        "operator-admin",
        *(f"proplet-{pid}" for pid in IDS),
    }
    before = {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}
    code, out, _ = run(capsys, *args)  # compose's job, started again
    assert code == 0 and out.count("(kept)") == 5
    assert {p: p.read_bytes() for p in d.rglob("*") if p.is_file()} == before


def test_issue_one_proplet_touches_nothing_else(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    d = tmp_path / "pki"
    assert run(capsys, "certs", "init", str(d), "--proplet", IDS[0])[0] == 0
    before = {p: p.read_bytes() for p in d.rglob("*") if p.is_file() and p.name != "issued.jsonl"}
    code, _, err = run(capsys, "certs", "issue", str(d), "proplet", IDS[1])
    assert (code, err) == (0, "")
    after = {p: p.read_bytes() for p in d.rglob("*") if p.is_file() and p.name != "issued.jsonl"}
    new = set(after) - set(before)
    assert {p.relative_to(d).parent.name for p in new} == {f"proplet-{IDS[1]}"}
    assert {p: after[p] for p in before} == before
    # Twice is refused, in one line.
    code, _, err = run(capsys, "certs", "issue", str(d), "proplet", IDS[1])
    assert code == 1 and err.count("\n") == 1 and "exists here already" in err


def test_revoke_and_list(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    d = tmp_path / "pki"
    run(capsys, "certs", "init", str(d), "--proplet", IDS[0], "--proplet", IDS[1])
    ca = CertificateAuthority(d)
    crl = RevocationList(ca.crl_path, ca.certificate())
    serial = ca.bundle_for(Identity(Kind.PROPLET, IDS[0])).certificate().serial_number
    assert not crl.is_revoked(serial)
    code, out, err = run(capsys, "certs", "revoke", str(d), "proplet", IDS[0])
    assert (code, err) == (0, "") and f"{serial:x}" in out
    assert crl.is_revoked(serial)
    code, out, _ = run(capsys, "certs", "list", str(d), "--json")
    states = {row["name"]: row["state"] for row in json.loads(out)}
    assert states == {IDS[0]: "revoked", IDS[1]: "valid"}
    code, _, err = run(capsys, "certs", "revoke", str(d), "--serial", "zz")
    assert code == 1 and "--serial" in err
    code, _, err = run(capsys, "certs", "issue", str(tmp_path / "nothing"), "operator", "x")
    assert code == 1 and "no CA here" in err


def test_names_that_cannot_be_identities_are_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    d = tmp_path / "pki"
    run(capsys, "certs", "init", str(d))
    for bad in ("a/b", "service:x", "+", "a b"):
        code, _, err = run(capsys, "certs", "issue", str(d), "proplet", bad)
        assert code == 1 and "name" in err and err.count("\n") == 1, err


def test_a_service_will_not_start_without_tls_or_an_explicit_plaintext() -> None:
    with pytest.raises(ValueError, match=r"PROPELLER_TLS_DIR: not set.*PROPELLER_INSECURE=1"):
        RegistryConfig.from_env({})
    assert RegistryConfig.from_env({"PROPELLER_INSECURE": "1"}).tls is None
    with pytest.raises(ValueError, match="choose TLS or plaintext"):
        RegistryConfig.from_env({"PROPELLER_INSECURE": "1", "PROPELLER_TLS_DIR": "/x"})
    with pytest.raises(ValueError, match="does not exist"):
        RegistryConfig.from_env({"PROPELLER_TLS_DIR": "/nonexistent"})


def test_a_proplet_is_who_its_certificate_says(tmp_path: Path) -> None:
    ca = CertificateAuthority.create(tmp_path / "pki")
    bundle = ca.issue(Identity(Kind.PROPLET, IDS[0]))
    env = {"PROPELLER_TLS_DIR": str(bundle.dir)}
    config = PropletConfig.from_env(env)
    assert config.proplet_id == IDS[0] and config.tls == TlsConfig.bundle(bundle.dir)
    with pytest.raises(ValueError, match=r"PROPLET_ID.*proplet 'd69775d9"):
        PropletConfig.from_env({**env, "PROPLET_ID": IDS[1]})
    operator = ca.issue(Identity(Kind.OPERATOR, "admin"))
    with pytest.raises(ValueError, match="not a proplet's"):
        PropletConfig.from_env({"PROPELLER_TLS_DIR": str(operator.dir)})


def test_a_manager_replica_is_issued_and_named_in_the_mqtt_acl(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """`certs issue DIR service manager-1` makes a manager replica's bundle (the identity its
    replica id is read from); `certs mqtt-acl --manager-replica 1` names it with the
    manager's rights; a replica id that cannot name a certificate is refused in one line."""
    d = tmp_path / "pki"
    assert run(capsys, "certs", "init", str(d))[0] == 0
    code, out, err = run(capsys, "certs", "issue", str(d), "service", "manager-1", "--host", "m")
    assert (code, err) == (0, "")
    bundle = CertificateAuthority(d).bundle_for(Identity(Kind.SERVICE, "manager-1"))
    assert bundle.identity().username == "service:manager-1"
    code, out, err = run(capsys, "certs", "mqtt-acl", "--manager-replica", "1")
    assert (code, err) == (0, "")
    block = out.split("user service:manager-1\n", 1)[1]
    manager = out.split("user service:manager\n", 1)[1].split("\n\n", 1)[0]
    assert block.strip() == manager.strip()
    code, out, err = run(capsys, "certs", "mqtt-acl", "--manager-replica", "a/b")
    assert code != 0 and out == ""
    assert err.count("\n") == 1 and "--manager-replica" in err


def test_a_coordinator_replica_is_named_in_the_mqtt_acl(capsys: pytest.CaptureFixture[str]) -> None:
    """`certs mqtt-acl --coordinator-replica a` names the replica (user
    `service:coordinator-a`) with the coordinator's rights, beside a manager replica's; an id
    that cannot name a certificate is refused in one line naming the option."""
    code, out, err = run(
        capsys, "certs", "mqtt-acl", "--coordinator-replica", "a", "--manager-replica", "1"
    )
    assert (code, err) == (0, "")
    block = out.split("user service:coordinator-a\n", 1)[1].split("\n\n", 1)[0]
    coordinator = out.split("user service:coordinator\n", 1)[1].split("\n\n", 1)[0]
    assert block.strip() == coordinator.strip() and "user service:manager-1\n" in out
    code, out, err = run(capsys, "certs", "mqtt-acl", "--coordinator-replica", "a/b")
    assert code != 0 and out == ""
    assert err.count("\n") == 1 and "--coordinator-replica" in err
