"""The deployment's public-key infrastructure: one CA, a certificate per identity, revocation.

Every process of a deployment holds a key and a certificate issued by the deployment's CA;
the certificate says who it is:
- the URI SAN `spiffe://propeller/{kind}/{name}` is the identity (`Identity`), what gRPC
  servers authorize (`server.authz`);
- the subject CN is the identity's MQTT user name (`Identity.username`): the proplet id itself
  for a proplet, `service:NAME` / `operator:NAME` otherwise (mosquitto's
  `use_identity_as_username` takes the CN; ids never contain ':', so the two cannot collide);
- a service's certificate also carries DNS / IP SANs for the hosts it is reached at.

Keys are ECDSA P-256: every TLS stack here takes them (grpc's BoringSSL, mosquitto's OpenSSL,
Python's ssl). Revocation is a CRL signed by the CA (`crl.pem` beside it): a standard file
that mosquitto reads as `crlfile`, that only the CA key can produce (an attacker who can write
the file still cannot un-revoke a certificate), and that the gRPC servers re-read when it
changes (`RevocationList`: one stat per call), so a revoked certificate is refused on its next
call without a restart.

On disk, a CA directory (`CertificateAuthority`):
    ca.crt  ca.key (0600)  crl.pem  issued.jsonl (one line per certificate issued)
    <kind>-<name>/         a bundle: ca.crt, tls.crt, tls.key (0600), by default here
A bundle (`Bundle`) is what one process needs: the CA certificate it trusts, its certificate
and its key. Issuing one writes only that bundle (and a line of the index).
"""

from __future__ import annotations

import datetime
import enum
import ipaddress
import json
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from server.ids import MAX_ID_LENGTH, id_problem

TRUST_DOMAIN = "propeller"
CA_CERT = "ca.crt"
CA_KEY = "ca.key"
CRL_FILE = "crl.pem"
INDEX_FILE = "issued.jsonl"
BUNDLE_CA = "ca.crt"
BUNDLE_CERT = "tls.crt"
BUNDLE_KEY = "tls.key"
CA_DAYS = 3650
LEAF_DAYS = 365
# Certificates start a little in the past: a peer whose clock is slightly behind still takes
# a certificate issued a moment ago.
CLOCK_SKEW = datetime.timedelta(minutes=5)
# Every service certificate names these, so a process reaches a service on its own machine
# (healthchecks, `up`, tests) whatever other hosts it is issued for.
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


class PkiError(Exception):
    """A CA, bundle, certificate or CRL that cannot be used; the message says which file."""


class Kind(enum.StrEnum):
    SERVICE = "service"
    OPERATOR = "operator"
    PROPLET = "proplet"


_KINDS = tuple(k.value for k in Kind)

# A site coordinator (hierarchical aggregation, `server.coordinator.site`) is the service
# `site-{site_id}`: the authorization table grants every such service the site's rights, the
# root reads the site from it, and `models verify` takes it as the signer of the site's
# partial.
SITE_SERVICE_PREFIX = "site-"


def site_service(site_id: str) -> str:
    """The service name a site coordinator's certificate carries."""
    return f"{SITE_SERVICE_PREFIX}{site_id}"


# A service that runs as replicas (two or more processes on one PostgreSQL database: the
# manager, `server.manager.replicas`; the coordinator, `server.coordinator.replicas`) gives
# each replica a certificate of its own, the service `{service}-{replica_id}`: its MQTT user
# name, and so its client id on the mutual-TLS broker, is its own (two replicas sharing one
# would take each other's session over). The authorization table and the MQTT ACL grant every
# such service the service's rights, and the replica's id is read from its certificate (the
# service's REPLICA_ID variable, if given, must agree). A replica's server certificate names
# the hosts its clients dial (`--host coordinator`), as the service's does: clients check the
# host name, not the identity.
@dataclass(frozen=True)
class ReplicatedService:
    """A service whose replicas are each the service `{name}-{replica_id}`."""

    name: str

    @property
    def prefix(self) -> str:
        return f"{self.name}-"

    def replica_service(self, replica_id: str) -> str:
        """The service name a replica's certificate carries."""
        return f"{self.prefix}{replica_id}"

    def replica_id(self, identity: Identity) -> str | None:
        """The replica id of one of its replicas' identities (`service {name}-{id}`); None
        for any other identity, the single service's (`service {name}`) included."""
        if identity.kind is not Kind.SERVICE or not identity.name.startswith(self.prefix):
            return None
        return identity.name[len(self.prefix) :] or None

    def includes(self, identity: Identity) -> bool:
        """Whether `identity` has the service's rights: the service or one of its replicas."""
        single = identity.kind is Kind.SERVICE and identity.name == self.name
        return single or self.replica_id(identity) is not None

    def replica_id_from(self, given: str, cert: Path | None, variable: str) -> str:
        """The replica id a process runs as: `given` (the setting `variable`), or the id its
        certificate `cert` names (None: plaintext) when that is a replica's: a replica is who
        its certificate says, and given both, they must agree (ValueError naming both). The
        single service's certificate leaves the setting as it is."""
        if cert is None:
            return given
        try:
            identity = read_identity(cert)
        except PkiError as exc:
            raise ValueError(f"TLS cert: {exc}") from None
        from_cert = self.replica_id(identity)
        if from_cert is None:
            return given
        if given and given != from_cert:
            raise ValueError(
                f"{variable}: {given!r}, but the certificate {cert} is {identity}'s "
                f"(replica {from_cert!r})"
            )
        return from_cert


MANAGER_SERVICE = "manager"
COORDINATOR_SERVICE = "coordinator"
MANAGER_REPLICAS = ReplicatedService(MANAGER_SERVICE)
COORDINATOR_REPLICAS = ReplicatedService(COORDINATOR_SERVICE)
# Every replicated service, by its name.
REPLICATED: dict[str, ReplicatedService] = {
    s.name: s for s in (MANAGER_REPLICAS, COORDINATOR_REPLICAS)
}
manager_replica_service = MANAGER_REPLICAS.replica_service
coordinator_replica_service = COORDINATOR_REPLICAS.replica_service


def acts_as(identity: Identity, service: str) -> bool:
    """Whether `identity` has the rights of the service `service`: it is that service, or one
    of its replicas if it is a replicated one."""
    replicated = REPLICATED.get(service)
    if replicated is not None:
        return replicated.includes(identity)
    return identity.kind is Kind.SERVICE and identity.name == service


@dataclass(frozen=True)
class Identity:
    """Who a certificate says its holder is."""

    kind: Kind
    name: str

    def __post_init__(self) -> None:
        if not isinstance(self.kind, Kind):
            object.__setattr__(self, "kind", Kind(self.kind))
        # The one id rule (server/ids.py): no ':' (the MQTT user names `service:NAME` stay
        # apart from proplet ids), no '/' (the URI), no MQTT wildcards, no whitespace.
        problem = id_problem(self.name)
        if problem is not None:
            raise ValueError(f"{self.kind.value} name: {problem}")
        # The CN holds the MQTT user name, and X.509 caps a CN at 64 characters.
        if len(self.username) > MAX_ID_LENGTH:
            raise ValueError(
                f"{self.kind.value} name: {self.name!r} is too long for a certificate: "
                f"{self.username!r} is over {MAX_ID_LENGTH} characters"
            )

    @property
    def uri(self) -> str:
        return f"spiffe://{TRUST_DOMAIN}/{self.kind.value}/{self.name}"

    @property
    def username(self) -> str:
        """The certificate's CN, which mosquitto uses as the MQTT user name."""
        return self.name if self.kind is Kind.PROPLET else f"{self.kind.value}:{self.name}"

    @property
    def label(self) -> str:
        """`<kind>-<name>`: the bundle directory's name."""
        return f"{self.kind.value}-{self.name}"

    @classmethod
    def from_uri(cls, uri: str) -> Identity:
        prefix = f"spiffe://{TRUST_DOMAIN}/"
        if not uri.startswith(prefix):
            raise ValueError(f"{uri!r} is not a {prefix}KIND/NAME identity")
        kind, sep, name = uri[len(prefix) :].partition("/")
        if not sep or kind not in _KINDS:
            raise ValueError(f"{uri!r}: the kind must be one of {', '.join(Kind)}")
        return cls(Kind(kind), name)

    @classmethod
    def parse(cls, kind: str, name: str) -> Identity:
        """`Identity(kind, name)` from text; ValueError naming the bad part."""
        if kind not in _KINDS:
            raise ValueError(f"kind: {kind!r} is not one of {', '.join(_KINDS)}")
        return cls(Kind(kind), name)

    def __str__(self) -> str:
        return f"{self.kind.value} {self.name!r}"


# --------------------------------------------------------------------------- certificates


def load_certificate(data: bytes, what: str = "certificate") -> x509.Certificate:
    """A certificate from PEM or DER bytes."""
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise PkiError(f"{what}: not a certificate ({exc})") from None


def identity_of(cert: x509.Certificate) -> Identity:
    """The identity a certificate's URI SAN names; PkiError if it names none (or several)."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise PkiError("certificate has no subject alternative name") from None
    uris = [u for u in sans.get_values_for_type(x509.UniformResourceIdentifier)]
    ours = [u for u in uris if u.startswith(f"spiffe://{TRUST_DOMAIN}/")]
    if len(ours) != 1:
        raise PkiError(f"certificate names {len(ours)} propeller identities, not one: {uris}")
    try:
        return Identity.from_uri(ours[0])
    except ValueError as exc:
        raise PkiError(str(exc)) from None


def load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The ECDSA private key in `path` (PEM, unencrypted): a CA's or a bundle's `tls.key`."""
    try:
        key = serialization.load_pem_private_key(_read(path), password=None)
    except ValueError as exc:
        raise PkiError(f"{path}: not a private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{path}: not an ECDSA key")
    return key


def read_identity(path: Path) -> Identity:
    """The identity of the certificate in `path` (PEM or DER)."""
    return identity_of(load_certificate(_read(path), str(path)))


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise PkiError(f"{path}: {exc.strerror or exc}") from None


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` atomically (a reader sees the old file or the new one), with
    `mode` from the start (a key is never readable by others, not even for a moment)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """A CA signs certificates and CRLs; every other key signs its TLS handshakes."""
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _san_entries(identity: Identity, hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity.uri)]
    for host in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


# --------------------------------------------------------------------------- bundles


class _HasDir(Protocol):
    @property
    def dir(self) -> Path: ...


class InDir:
    """A read-only attribute naming one file of its owner's directory: `owner.dir / name`."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, owner: _HasDir, owner_type: type | None = None) -> Path:
        return owner.dir / self.name


@dataclass(frozen=True)
class Bundle:
    """One process's credentials: a directory with ca.crt, tls.crt and tls.key."""

    dir: Path
    ca = InDir(BUNDLE_CA)
    cert = InDir(BUNDLE_CERT)
    key = InDir(BUNDLE_KEY)

    def identity(self) -> Identity:
        return read_identity(self.cert)

    def certificate(self) -> x509.Certificate:
        return load_certificate(_read(self.cert), str(self.cert))

    def grpcurl_flags(self) -> str:
        return f"-cacert {self.ca} -cert {self.cert} -key {self.key}"


@dataclass(frozen=True)
class Issued:
    """One certificate the CA issued (a line of issued.jsonl)."""

    serial: int
    identity: Identity
    not_after: datetime.datetime
    bundle: str

    def to_json(self) -> str:
        return json.dumps(
            {
                "serial": f"{self.serial:x}",
                "kind": self.identity.kind.value,
                "name": self.identity.name,
                "not_after": self.not_after.isoformat(),
                "bundle": self.bundle,
            }
        )

    @classmethod
    def from_json(cls, line: str) -> Issued:
        d = json.loads(line)
        return cls(
            serial=int(d["serial"], 16),
            identity=Identity.parse(d["kind"], d["name"]),
            not_after=datetime.datetime.fromisoformat(d["not_after"]),
            bundle=d["bundle"],
        )


class CertificateAuthority:
    """A deployment CA in `directory` (see the module docstring). Nothing is read or written
    before a method is called; the methods are blocking (call them in a thread from async
    code)."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)

    cert_path = InDir(CA_CERT)
    key_path = InDir(CA_KEY)
    crl_path = InDir(CRL_FILE)
    index_path = InDir(INDEX_FILE)

    def exists(self) -> bool:
        return self.cert_path.exists() or self.key_path.exists()

    @classmethod
    def create(
        cls, directory: Path, *, name: str = "propeller-fl deployment CA", days: int = CA_DAYS
    ) -> CertificateAuthority:
        """A new CA in `directory` (created if needed); PkiError if one is there already."""
        ca = cls(directory)
        if ca.exists():
            raise PkiError(f"{ca.dir}: a CA exists here already ({CA_CERT} / {CA_KEY})")
        ca.dir.mkdir(parents=True, exist_ok=True)
        key = _new_key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(ca=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        _write(ca.key_path, _key_pem(key), 0o600)
        _write(ca.cert_path, _pem(cert))
        ca._write_crl(key, cert, [])
        return ca

    @classmethod
    def open_or_create(cls, directory: Path) -> CertificateAuthority:
        ca = cls(directory)
        if not ca.exists():
            return cls.create(directory)
        ca.certificate()  # readable
        return ca

    def certificate(self) -> x509.Certificate:
        return load_certificate(_read(self.cert_path), str(self.cert_path))

    def _key(self) -> ec.EllipticCurvePrivateKey:
        return load_private_key(self.key_path)

    # ---- issuing

    def bundle_for(self, identity: Identity) -> Bundle:
        """Where `issue` puts `identity`'s bundle by default: DIR/<kind>-<name>."""
        return Bundle(self.dir / identity.label)

    def issue(
        self,
        identity: Identity,
        *,
        hosts: Sequence[str] = (),
        out: Path | None = None,
        days: int = LEAF_DAYS,
        replace: bool = False,
    ) -> Bundle:
        """A new key and certificate for `identity`, written as a bundle to `out` (default
        `bundle_for(identity)`); nothing else is touched. A service's certificate names
        `hosts` and LOCAL_HOSTS. PkiError if the bundle exists, unless `replace`."""
        bundle = Bundle(out) if out is not None else self.bundle_for(identity)
        if not replace and (bundle.cert.exists() or bundle.key.exists()):
            raise PkiError(f"{bundle.dir}: a bundle exists here already")
        if hosts and identity.kind is not Kind.SERVICE:
            raise PkiError(f"hosts: only a service's certificate names hosts, not a {identity}")
        ca_cert, ca_key = self.certificate(), self._key()
        key = _new_key()
        now = _now()
        eku = [ExtendedKeyUsageOID.CLIENT_AUTH]
        san_hosts: list[str] = []
        if identity.kind is Kind.SERVICE:
            # Services serve and call: the same certificate on both ends.
            eku.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
            san_hosts = [*hosts, *LOCAL_HOSTS]
        not_after = min(now + datetime.timedelta(days=days), ca_cert.not_valid_after_utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.username)]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(eku), critical=False)
            .add_extension(x509.SubjectAlternativeName(_san_entries(identity, san_hosts)), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
            )
            .sign(ca_key, hashes.SHA256())
        )
        bundle.dir.mkdir(parents=True, exist_ok=True)
        _write(bundle.key, _key_pem(key), 0o600)
        _write(bundle.cert, _pem(cert))
        _write(bundle.ca, _pem(ca_cert))
        issued = Issued(cert.serial_number, identity, not_after, str(bundle.dir))
        with open(self.index_path, "a", encoding="utf-8") as index:
            index.write(issued.to_json() + "\n")
        return bundle

    def ensure(
        self,
        identity: Identity,
        *,
        hosts: Sequence[str] = (),
        out: Path | None = None,
        min_days_left: int = 7,
    ) -> Bundle:
        """The bundle of `identity` where `issue` would write it, reused when it is this CA's,
        for this identity, not revoked, valid for `min_days_left` more days and naming
        `hosts`; issued anew otherwise."""
        bundle = Bundle(out) if out is not None else self.bundle_for(identity)
        if bundle.cert.exists() and bundle.key.exists():
            try:
                if self._usable(bundle, identity, hosts, min_days_left):
                    return bundle
            except PkiError:
                pass
        return self.issue(identity, hosts=hosts, out=out, replace=True)

    def _usable(
        self, bundle: Bundle, identity: Identity, hosts: Sequence[str], min_days_left: int
    ) -> bool:
        cert = bundle.certificate()
        if identity_of(cert) != identity or cert.issuer != self.certificate().subject:
            return False
        if _read(bundle.ca) != _pem(self.certificate()):
            return False
        left = cert.not_valid_after_utc - _now()
        if left < datetime.timedelta(days=min_days_left):
            return False
        if cert.serial_number in self.revoked():
            return False
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        named = {str(v) for v in sans.get_values_for_type(x509.IPAddress)} | set(
            sans.get_values_for_type(x509.DNSName)
        )
        return set(hosts) <= named

    def issued(self) -> list[Issued]:
        """Every certificate issued, oldest first."""
        try:
            text = self.index_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        return [Issued.from_json(line) for line in text.splitlines() if line.strip()]

    # ---- revocation

    def revoked(self) -> set[int]:
        """The serial numbers the CRL lists."""
        crl = _load_crl(self.crl_path)
        return {r.serial_number for r in crl}

    def revoke(self, serials: Iterable[int]) -> set[int]:
        """Add `serials` to the CRL (re-signed, replaced atomically); the serials newly
        revoked. Every service refuses them from its next call on."""
        wanted = set(serials)
        known = {i.serial for i in self.issued()}
        unknown = wanted - known
        if unknown:
            raise PkiError(
                f"serial: {', '.join(f'{s:x}' for s in sorted(unknown))} not issued by this CA"
            )
        already = self.revoked()
        new = wanted - already
        if new:
            self._write_crl(self._key(), self.certificate(), sorted(already | new))
        return new

    def revoke_identity(self, identity: Identity) -> set[int]:
        """Revoke every certificate issued to `identity`; the serials newly revoked."""
        serials = {i.serial for i in self.issued() if i.identity == identity}
        if not serials:
            raise PkiError(f"{identity}: no certificate issued by this CA")
        return self.revoke(serials)

    def _write_crl(
        self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate, serials: Sequence[int]
    ) -> None:
        now = _now()
        number = 1
        if self.crl_path.exists():
            number = _crl_number(_load_crl(self.crl_path)) + 1
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(cert.subject)
            .last_update(now - CLOCK_SKEW)
            # OpenSSL (mosquitto) refuses every client once a CRL's next update has passed:
            # ours lasts as long as the CA, and a revocation writes a new one.
            .next_update(cert.not_valid_after_utc)
            .add_extension(x509.CRLNumber(number), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), False
            )
        )
        for serial in serials:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
            )
        crl = builder.sign(key, hashes.SHA256())
        _write(self.crl_path, crl.public_bytes(serialization.Encoding.PEM))


def _load_crl(path: Path) -> x509.CertificateRevocationList:
    data = _read(path)
    try:
        return x509.load_pem_x509_crl(data)
    except ValueError as exc:
        raise PkiError(f"{path}: not a certificate revocation list ({exc})") from None


def _crl_number(crl: x509.CertificateRevocationList) -> int:
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return 0


class RevocationList:
    """The serials a CA's CRL revokes, as a server sees them: the file is re-read whenever
    its modification time or size changes (one stat per check), and only a CRL signed by
    `ca` counts. A CRL that cannot be read or is not signed by the CA revokes everything
    (PkiError on every check) until it is fixed: failing closed, loudly."""

    def __init__(self, path: Path, ca: x509.Certificate) -> None:
        self.path = path
        self._ca = ca
        self._stamp: tuple[int, int] | None = None
        self._serials: frozenset[int] = frozenset()
        self._error = ""

    def _reload(self) -> None:
        try:
            st = os.stat(self.path)
        except OSError as exc:
            self._stamp, self._error = None, f"{self.path}: {exc.strerror or exc}"
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            crl = _load_crl(self.path)
            public_key = self._ca.public_key()
            if not isinstance(public_key, ec.EllipticCurvePublicKey):
                raise PkiError("the deployment CA's key is not an ECDSA key")
            if crl.issuer != self._ca.subject or not crl.is_signature_valid(public_key):
                raise PkiError(f"{self.path}: not signed by the deployment CA")
        except (PkiError, InvalidSignature) as exc:
            self._error = str(exc)
            return
        self._serials = frozenset(r.serial_number for r in crl)
        self._error = ""

    def is_revoked(self, serial: int) -> bool:
        self._reload()
        if self._error:
            raise PkiError(f"certificate revocation list unusable: {self._error}")
        return serial in self._serials
