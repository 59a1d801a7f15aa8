"""server/pki.py: the CA, bundles, identities in certificates, revocation (issue 9, item 2)."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from server.ids import MAX_ID_LENGTH
from server.pki import (
    CertificateAuthority,
    Identity,
    Kind,
    PkiError,
    RevocationList,
    identity_of,
    load_certificate,
    read_identity,
)


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.create(tmp_path / "ca")


def test_a_proplet_certificate_names_its_id_and_its_mqtt_user(ca: CertificateAuthority) -> None:
    bundle = ca.issue(Identity(Kind.PROPLET, "p-1"))
    assert bundle.dir == ca.dir / "proplet-p-1"
    cert = bundle.certificate()
    assert identity_of(cert) == Identity(Kind.PROPLET, "p-1")
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == "p-1"  # the MQTT user name is the proplet id itself
    assert bundle.ca.read_bytes() == ca.cert_path.read_bytes()
    assert stat.S_IMODE(bundle.key.stat().st_mode) == 0o600
    assert stat.S_IMODE(ca.key_path.stat().st_mode) == 0o600
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]  # a client, never a server


def test_a_service_certificate_names_its_hosts(ca: CertificateAuthority) -> None:
    bundle = ca.issue(Identity(Kind.SERVICE, "coordinator"), hosts=["coordinator", "10.0.0.7"])
    cert = bundle.certificate()
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"coordinator", "localhost"}
    assert set(sans.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("10.0.0.7"),
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == "service:coordinator"
    assert read_identity(bundle.cert) == Identity(Kind.SERVICE, "coordinator")


def test_identity_from_pem_and_der(ca: CertificateAuthority) -> None:
    bundle = ca.issue(Identity(Kind.OPERATOR, "alice"))
    pem = bundle.cert.read_bytes()
    der = load_certificate(pem).public_bytes(serialization.Encoding.DER)
    assert identity_of(load_certificate(der)) == Identity(Kind.OPERATOR, "alice")
    with pytest.raises(PkiError, match="not a certificate"):
        load_certificate(b"garbage")


def test_issuing_touches_only_the_new_bundle(ca: CertificateAuthority) -> None:
    first = ca.issue(Identity(Kind.PROPLET, "a"))
    before = {p: p.read_bytes() for p in first.dir.iterdir()}
    crl = ca.crl_path.read_bytes()
    ca.issue(Identity(Kind.PROPLET, "b"))
    assert {p: p.read_bytes() for p in first.dir.iterdir()} == before
    assert ca.crl_path.read_bytes() == crl
    with pytest.raises(PkiError, match="exists here already"):
        ca.issue(Identity(Kind.PROPLET, "a"))
    assert [i.identity.name for i in ca.issued()] == ["a", "b"]


def test_ensure_reuses_a_good_bundle_and_replaces_a_revoked_one(ca: CertificateAuthority) -> None:
    who = Identity(Kind.SERVICE, "registry")
    first = ca.ensure(who, hosts=["model-registry"])
    serial = first.certificate().serial_number
    assert ca.ensure(who, hosts=["model-registry"]).certificate().serial_number == serial
    # A host it does not name yet: a new certificate.
    second = ca.ensure(who, hosts=["registry.example"])
    assert second.certificate().serial_number != serial
    ca.revoke({second.certificate().serial_number})
    assert ca.ensure(who).certificate().serial_number not in ca.revoked()


def test_names_that_would_break_uris_topics_or_user_names_are_refused() -> None:
    for bad in ("", "a/b", "a:b", "a+b", "#", "a b", "é", "x" * (MAX_ID_LENGTH + 1), "-a"):
        with pytest.raises(ValueError, match="name"):
            Identity(Kind.PROPLET, bad)
    with pytest.raises(ValueError, match="kind"):
        Identity.parse("admin", "x")
    with pytest.raises(ValueError):
        Identity.from_uri("spiffe://other/proplet/a")
    assert Identity.from_uri("spiffe://propeller/proplet/a") == Identity(Kind.PROPLET, "a")


def test_every_valid_proplet_id_fits_a_certificate(ca: CertificateAuthority) -> None:
    # The longest proplet id is its certificate's CN (the MQTT user name), which X.509 caps at
    # 64 characters; a longer operator or service user name is refused before issuing.
    longest = Identity(Kind.PROPLET, "p" * MAX_ID_LENGTH)
    bundle = ca.issue(longest)
    cn = bundle.certificate().subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == longest.username == "p" * MAX_ID_LENGTH
    with pytest.raises(ValueError, match="too long for a certificate"):
        Identity(Kind.OPERATOR, "o" * (MAX_ID_LENGTH - len("operator:") + 1))


def test_only_services_name_hosts(ca: CertificateAuthority) -> None:
    with pytest.raises(PkiError, match="only a service"):
        ca.issue(Identity(Kind.PROPLET, "a"), hosts=["somewhere"])


def test_a_second_ca_in_the_same_directory_is_refused(ca: CertificateAuthority) -> None:
    with pytest.raises(PkiError, match="a CA exists"):
        CertificateAuthority.create(ca.dir)
    assert CertificateAuthority.open_or_create(ca.dir).certificate() == ca.certificate()


def test_revocation_is_seen_by_a_reader_without_a_restart(ca: CertificateAuthority) -> None:
    a = ca.issue(Identity(Kind.PROPLET, "a")).certificate().serial_number
    b = ca.issue(Identity(Kind.PROPLET, "b")).certificate().serial_number
    crl = RevocationList(ca.crl_path, ca.certificate())
    assert not crl.is_revoked(a) and not crl.is_revoked(b)
    assert ca.revoke_identity(Identity(Kind.PROPLET, "a")) == {a}
    assert crl.is_revoked(a) and not crl.is_revoked(b)
    assert ca.revoke({a}) == set()  # already revoked
    with pytest.raises(PkiError, match="not issued by this CA"):
        ca.revoke({12345})
    with pytest.raises(PkiError, match="no certificate issued"):
        ca.revoke_identity(Identity(Kind.PROPLET, "nobody"))


def test_a_crl_not_signed_by_the_ca_fails_closed(ca: CertificateAuthority, tmp_path: Path) -> None:
    other = CertificateAuthority.create(tmp_path / "other")
    serial = ca.issue(Identity(Kind.PROPLET, "a")).certificate().serial_number
    crl = RevocationList(ca.crl_path, ca.certificate())
    assert not crl.is_revoked(serial)
    ca.crl_path.write_bytes(other.crl_path.read_bytes())  # an empty CRL of another CA
    with pytest.raises(PkiError, match="not signed by the deployment CA"):
        crl.is_revoked(serial)
    ca.crl_path.write_bytes(b"not a crl")
    with pytest.raises(PkiError, match="not a certificate revocation list"):
        crl.is_revoked(serial)
    ca.crl_path.unlink()
    with pytest.raises(PkiError, match="unusable"):
        crl.is_revoked(serial)
