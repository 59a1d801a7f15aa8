"""The signed bytes of an update (`server.provenance`): one fixed encoding, a signature that
verifies with the signer's certificate only, and that breaks when any signed field changes;
and the coordinator's bounds (`server.coordinator.bounds`) as plain functions."""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.coordinator.bounds import (
    MAX_VALUE_BOUND,
    NumSamplesCap,
    UpdateBounds,
    check_magnitude,
    clip_scale,
    distance,
    scaled,
)
from server.errors import InvalidArgument
from server.pki import load_certificate, load_private_key
from server.provenance import (
    SIGNATURE_DOMAIN,
    SIGNATURE_DOMAIN_V2,
    Claim,
    certificate_problem,
    check_module_digest,
    check_signature,
    module_digest,
    sign,
    signature_verifies,
)
from tests.support.security import proplet_tls, session_ca

CLAIM = Claim(
    round_id="r1",
    proplet_id="p1",
    base_model_sha256="a" * 64,
    module_digest="sha256:" + "b" * 64,
    update_sha256="c" * 64,
    num_samples=64,
    metrics={"loss": 0.25, "accuracy": 1.0},
)


def _text(s: str) -> bytes:
    return struct.pack(">I", len(s.encode())) + s.encode()


def test_the_canonical_bytes_are_the_documented_encoding() -> None:
    # Spelled out independently of the implementation: docs/security.md's definition.
    expected = (
        b"propeller-fl/update-signature/v1\n"
        + _text("r1")
        + _text("p1")
        + _text("a" * 64)
        + _text("sha256:" + "b" * 64)
        + _text("c" * 64)
        + struct.pack(">q", 64)
        + struct.pack(">I", 2)
        + _text("accuracy")
        + struct.pack(">d", 1.0)
        + _text("loss")
        + struct.pack(">d", 0.25)
    )
    assert CLAIM.canonical() == expected
    assert CLAIM.canonical().startswith(SIGNATURE_DOMAIN)
    # Metrics in any order encode the same; the golden digest pins the format for good.
    reordered = replace(CLAIM, metrics={"loss": 0.25, "accuracy": 1.0})
    assert reordered.canonical() == expected
    assert hashlib.sha256(expected).hexdigest() == hashlib.sha256(CLAIM.canonical()).hexdigest()


def test_with_a_fuel_receipt_the_canonical_bytes_are_v2_and_cover_it() -> None:
    # v2 (docs/security.md, docs/verifiability.md): the v1 fields after the v2 tag, then the
    # fuel as an unsigned 64-bit big-endian integer.
    fuelled = replace(CLAIM, fuel_consumed=123_456_789)
    v1_fields = CLAIM.canonical().removeprefix(SIGNATURE_DOMAIN)
    assert fuelled.canonical() == (
        b"propeller-fl/update-signature/v2\n" + v1_fields + struct.pack(">Q", 123_456_789)
    )
    assert fuelled.canonical().startswith(SIGNATURE_DOMAIN_V2)
    assert (fuelled.version, CLAIM.version) == (2, 1)
    huge = replace(CLAIM, fuel_consumed=2**64 - 1)
    assert huge.canonical().endswith(b"\xff" * 8)
    with pytest.raises(InvalidArgument, match=r"^fuel_consumed: "):
        replace(CLAIM, fuel_consumed=2**64).canonical()


def test_a_v1_signature_still_verifies_and_a_fuel_figure_cannot_be_changed() -> None:
    tls = proplet_tls("sig-a")
    key, cert = load_private_key(tls.key), load_certificate(tls.cert.read_bytes())
    old = sign(key, CLAIM)  # an update signed before fuel receipts (v1)
    assert signature_verifies(cert, old, CLAIM)
    assert not signature_verifies(cert, old, replace(CLAIM, fuel_consumed=1))
    fuelled = replace(CLAIM, fuel_consumed=5_000_000)
    new = sign(key, fuelled)
    assert signature_verifies(cert, new, fuelled)
    for fuel in (0, 4_999_999, 50_000_000):
        assert not signature_verifies(cert, new, replace(fuelled, fuel_consumed=fuel))


def test_a_signature_verifies_with_the_signers_certificate_only() -> None:
    a, b = proplet_tls("sig-a"), proplet_tls("sig-b")
    signature = sign(load_private_key(a.key), CLAIM)
    cert_a = load_certificate(a.cert.read_bytes())
    cert_b = load_certificate(b.cert.read_bytes())
    assert signature_verifies(cert_a, signature, CLAIM)
    assert not signature_verifies(cert_b, signature, CLAIM)
    check_signature(a.cert.read_bytes(), signature, CLAIM)
    with pytest.raises(InvalidArgument, match=r"^header\.signature: does not verify"):
        check_signature(b.cert.read_bytes(), signature, CLAIM)
    with pytest.raises(InvalidArgument, match=r"^header\.signature: missing"):
        check_signature(a.cert.read_bytes(), b"", CLAIM)
    assert not signature_verifies(cert_a, b"\x30" * 300, CLAIM)


CHANGES = st.sampled_from(
    [
        {"round_id": "r2"},
        {"proplet_id": "p2"},
        {"base_model_sha256": "d" * 64},
        {"module_digest": "sha256:" + "e" * 64},
        {"update_sha256": "f" * 64},
        {"num_samples": 65},
        {"num_samples": 6400},
        {"metrics": {"loss": 0.25}},
        {"metrics": {"loss": 0.2500000001, "accuracy": 1.0}},
        {"metrics": {"loss": 0.25, "accuracy": 1.0, "x": 0.0}},
    ]
)


@given(change=CHANGES)
def test_any_signed_field_changed_breaks_the_signature(change: dict[str, object]) -> None:
    tls = proplet_tls("sig-a")
    signature = sign(load_private_key(tls.key), CLAIM)
    cert = load_certificate(tls.cert.read_bytes())
    assert not signature_verifies(cert, signature, replace(CLAIM, **change))  # type: ignore[arg-type]


def test_module_digests() -> None:
    assert module_digest(b"x") == "sha256:" + hashlib.sha256(b"x").hexdigest()
    assert check_module_digest("", "f") == ""
    with pytest.raises(InvalidArgument, match=r"^f: 'empty' is not a module digest"):
        check_module_digest("", "f", required=True)
    for bad in ("sha256:" + "A" * 64, "md5:00", "sha256:" + "0" * 63):
        with pytest.raises(InvalidArgument, match=r"^f: "):
            check_module_digest(bad, "f")


def test_a_certificate_must_come_from_the_ca_and_name_the_proplet() -> None:
    ca = session_ca().certificate()
    pem = proplet_tls("cert-a").cert.read_bytes()
    cert, problem = certificate_problem(pem, ca, "cert-a")
    assert cert is not None and problem == ""
    assert certificate_problem(pem, ca, "cert-b")[1] == (
        "the certificate is proplet 'cert-a''s, the update names proplet 'cert-b'"
    )
    assert certificate_problem(b"", ca, "cert-a")[1].startswith("no certificate")
    other = load_certificate(proplet_tls("cert-b").cert.read_bytes())
    assert "was not issued by the deployment CA" in certificate_problem(pem, other, "cert-a")[1]


# ---- bounds ---------------------------------------------------------------------------------

BASE = {"w": np.array([1.0, 2.0, 2.0]), "b": np.array(0.0)}


def test_distance_is_the_l2_norm_of_the_difference_over_all_tensors() -> None:
    update = {"w": np.array([1.0, 2.0, 5.0]), "b": np.array(4.0)}
    assert distance(update, BASE) == 5.0
    f32 = {"w": np.array([1.0, 2.0, 5.0], np.float32), "b": np.array(4.0, np.float32)}
    assert distance(f32, BASE) == 5.0


def test_clipping_scales_the_difference_to_the_bound() -> None:
    update = {"w": np.array([1.0, 2.0, 5.0]), "b": np.array(4.0)}
    assert clip_scale(5.0, 10.0) == 1.0 and clip_scale(5.0, 0.0) == 1.0
    scale = clip_scale(5.0, 1.0)
    assert scale == 0.2
    clipped = scaled(update, BASE, scale)
    assert math.isclose(distance(clipped, BASE), 1.0)
    np.testing.assert_array_equal(clipped["w"], [1.0, 2.0, 2.6])
    assert clipped["b"].dtype == np.float64 and float(clipped["b"]) == pytest.approx(0.8)


def test_values_beyond_the_bound_are_refused_naming_the_tensor() -> None:
    check_magnitude({"w": np.array([1e30, -1e30]), "b": np.array(0.0)}, 1e30, "tensors")
    with pytest.raises(InvalidArgument) as exc:
        check_magnitude({"w": np.array([1.0]), "b": np.array(-1e308)}, 1e30, "tensors")
    assert str(exc.value).startswith(
        "tensors.b: holds a value of magnitude 1e+308, beyond the coordinator's bound 1e+30"
    )


def test_bound_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="max_update_value"):
        UpdateBounds(max_abs_value=MAX_VALUE_BOUND * 10)
    with pytest.raises(ValueError, match="max_update_distance"):
        UpdateBounds(max_distance=-1.0)
    with pytest.raises(ValueError, match="clip needs"):
        UpdateBounds(max_distance=0.0, clip=True)
    assert NumSamplesCap.parse("dataset") == NumSamplesCap("dataset")
    assert NumSamplesCap.parse(" None ") == NumSamplesCap("none")
    assert NumSamplesCap.parse("500") == NumSamplesCap("fixed", 500)
    for bad in ("0", "-3", "lots"):
        with pytest.raises(ValueError, match="num_samples_cap"):
            NumSamplesCap.parse(bad)
