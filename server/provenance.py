"""Where an update comes from, and the proof of it: module digests, the canonical bytes a
proplet signs, signing them with its key and checking a signature against its certificate.

The proplet signs, the coordinator checks every update it takes (against the certificate of
the mutual-TLS call it came on) and `propeller-fl models verify` checks them again from the
registry's lineage. All three build the signed bytes here, so there is one definition:

    canonical = b"propeller-fl/update-signature/v1\\n"
                + str(round_id) + str(proplet_id) + str(base_model_sha256)
                + str(module_digest) + str(update_sha256)
                + i64(num_samples)
                + u32(len(metrics)) + for each metric, by key (UTF-8 bytes, ascending):
                      str(key) + f64(value)

An update that carries the fuel its training consumed (`fuel_consumed` > 0, docs/
verifiability.md "Fuel receipts") is signed in the v2 form, which covers it too:

    canonical_v2 = b"propeller-fl/update-signature/v2\\n"
                   + (the v1 fields above, in the same order and encoding)
                   + u64(fuel_consumed)

An update without one (fuel_consumed 0: a proplet from before fuel receipts, a runtime without
metering, a site's partial) is signed in the v1 form, so every signature in an older lineage
still verifies. The form follows from the header itself: a fuel figure changed after signing
(to another count, or to 0) breaks the signature either way.

where str(s) = u32(len(utf8(s))) + utf8(s), integers are big-endian, f64 is the IEEE 754
binary64 value big-endian (the exact double the header carries). `base_model_sha256` and
`update_sha256` are lowercase hex; `update_sha256` is the sha256 of the update's tensor bytes
concatenated in the base model's tensor order; `module_digest` is "sha256:" + the hex sha256
of the wasm module's bytes. The signature is ECDSA P-256 with SHA-256, DER-encoded, made with
the key of the proplet's TLS certificate (`tls.key` of its bundle). docs/security.md
("Provenance") says the same.
"""

from __future__ import annotations

import hashlib
import math
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from server.errors import InvalidArgument
from server.pki import Kind, PkiError, identity_of, load_certificate, site_service

SIGNATURE_DOMAIN = b"propeller-fl/update-signature/v1\n"
SIGNATURE_DOMAIN_V2 = b"propeller-fl/update-signature/v2\n"
MODULE_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# A DER ECDSA P-256 signature is at most 72 bytes; anything much longer is not one.
MAX_SIGNATURE_BYTES = 256
_ALGORITHM = ec.ECDSA(hashes.SHA256())


def module_digest(data: bytes) -> str:
    """A module's digest: "sha256:" + the hex sha256 of its bytes."""
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def check_module_digest(value: str, field: str, *, required: bool = False) -> str:
    """`value` if it is a module digest ("" too unless `required`); INVALID_ARGUMENT naming
    `field` otherwise."""
    if not value and not required:
        return value
    if not MODULE_DIGEST.fullmatch(value):
        shown = value[:80] if value else "empty"
        raise InvalidArgument(
            f"{field}: {shown!r} is not a module digest ('sha256:' + 64 lowercase hex digits)"
        )
    return value


def _text(value: str) -> bytes:
    data = value.encode("utf-8")
    return struct.pack(">I", len(data)) + data


class Signed(Protocol):
    """An update's header fields about its origin, whatever carries them (the proplet's
    `UpdateMeta`, the coordinator's `Update`, a lineage's `UpdateHeader`): those its
    signature covers, the base model it claims to be trained from, and the signature."""

    @property
    def proplet_id(self) -> str: ...

    @property
    def module_digest(self) -> str: ...

    @property
    def num_samples(self) -> int: ...

    @property
    def metrics(self) -> Mapping[str, float]: ...

    @property
    def base_model_sha256(self) -> str: ...

    @property
    def fuel_consumed(self) -> int: ...

    @property
    def signature(self) -> bytes: ...


@dataclass(frozen=True)
class Claim:
    """What an update's signature covers (see the module docstring for its bytes)."""

    round_id: str
    proplet_id: str
    base_model_sha256: str
    module_digest: str
    update_sha256: str
    num_samples: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    # 0: signed in the v1 form (no fuel receipt); otherwise v2, which covers it.
    fuel_consumed: int = 0

    @classmethod
    def of(
        cls, header: Signed, *, round_id: str, base_model_sha256: str, update_sha256: str
    ) -> Claim:
        """The claim of an update with `header`'s fields, for `round_id`, trained from the
        base model `base_model_sha256`, whose bytes hash to `update_sha256`."""
        return cls(
            round_id=round_id,
            proplet_id=header.proplet_id,
            base_model_sha256=base_model_sha256,
            module_digest=header.module_digest,
            update_sha256=update_sha256,
            num_samples=int(header.num_samples),
            metrics=dict(header.metrics),
            fuel_consumed=int(header.fuel_consumed),
        )

    @property
    def version(self) -> int:
        """The canonical form the claim is signed in: 2 with a fuel receipt, else 1."""
        return 2 if self.fuel_consumed else 1

    def canonical(self) -> bytes:
        if not -(2**63) <= self.num_samples < 2**63:
            raise InvalidArgument(f"num_samples: {self.num_samples} does not fit in 64 bits")
        if not 0 <= self.fuel_consumed < 2**64:
            raise InvalidArgument(f"fuel_consumed: {self.fuel_consumed} does not fit in 64 bits")
        parts = [
            SIGNATURE_DOMAIN_V2 if self.version == 2 else SIGNATURE_DOMAIN,
            _text(self.round_id),
            _text(self.proplet_id),
            _text(self.base_model_sha256),
            _text(self.module_digest),
            _text(self.update_sha256),
            struct.pack(">q", self.num_samples),
            struct.pack(">I", len(self.metrics)),
        ]
        for key in sorted(self.metrics, key=lambda k: k.encode("utf-8")):
            value = float(self.metrics[key])
            if not math.isfinite(value):
                raise InvalidArgument(f"metrics.{key}: {value} is not finite")
            parts.append(_text(key) + struct.pack(">d", value))
        if self.version == 2:
            parts.append(struct.pack(">Q", self.fuel_consumed))
        return b"".join(parts)


def sign(key: ec.EllipticCurvePrivateKey, claim: Claim) -> bytes:
    """The signature (DER) of `claim`'s canonical bytes with `key`."""
    return key.sign(claim.canonical(), _ALGORITHM)


def signature_verifies(cert: x509.Certificate, signature: bytes, claim: Claim) -> bool:
    """Whether `signature` is the signature of `claim` by the key of `cert`."""
    public = cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) or len(signature) > MAX_SIGNATURE_BYTES:
        return False
    try:
        public.verify(signature, claim.canonical(), _ALGORITHM)
    except (InvalidSignature, ValueError):
        return False
    return True


# Peer certificates parsed so far (PEM -> certificate): a proplet sends every update with the
# same one. Bounded: cleared when full.
_PEERS: dict[bytes, x509.Certificate] = {}
_PEERS_KEPT = 4096


def check_signature(certificate: bytes, signature: bytes, claim: Claim) -> None:
    """The coordinator's check of an update taken over mutual TLS: `signature` (the header's)
    must be `claim`'s, by the key of `certificate` (the call's peer, PEM). INVALID_ARGUMENT
    naming header.signature otherwise."""
    if not signature:
        raise InvalidArgument(
            "header.signature: missing; every update must be signed with its proplet's key "
            "(docs/security.md, Provenance)"
        )
    cert = _PEERS.get(certificate)
    if cert is None:
        cert = load_certificate(certificate, "peer certificate")
        if len(_PEERS) >= _PEERS_KEPT:
            _PEERS.clear()
        _PEERS[certificate] = cert
    if not signature_verifies(cert, signature, claim):
        raise InvalidArgument(
            f"header.signature: does not verify with proplet {claim.proplet_id!r}'s certificate "
            "over (round_id, proplet_id, base_model_sha256, module_digest, the update's sha256, "
            "num_samples, metrics, fuel_consumed): the update or its header changed after "
            "signing, or another key signed it"
        )


def certificate_problem(
    certificate: bytes, ca: x509.Certificate, proplet_id: str
) -> tuple[x509.Certificate | None, str]:
    """`certificate` (PEM, from a lineage) parsed, and "" when it was issued by `ca` to
    proplet `proplet_id`, or to the site coordinator of site `proplet_id` (a root's update is
    a site's partial, signed by its site: docs/architecture.md, "Hierarchical aggregation");
    otherwise None or the certificate, and what is wrong with it."""
    if not certificate:
        return None, "no certificate (the update was taken over plaintext: unsigned)"
    try:
        cert = load_certificate(certificate, "certificate")
        who = identity_of(cert)
    except PkiError as exc:
        return None, str(exc)
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return cert, f"the certificate of {who} was not issued by the deployment CA"
    signer = (who.kind, who.name)
    if signer not in ((Kind.PROPLET, proplet_id), (Kind.SERVICE, site_service(proplet_id))):
        return cert, f"the certificate is {who}'s, the update names proplet {proplet_id!r}"
    return cert, ""
