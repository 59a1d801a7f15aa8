"""The test suite's deployment CA: one per test process, made on first use in a temporary
directory (removed at exit), so every test runs the secure path unless it says `insecure`.

`tls(kind, name)` is a bundle for any identity (reused once issued); `service_tls("coordinator")`,
`operator_tls()` and `proplet_tls(id)` name the usual ones; `tls_env(...)` is the same as the
environment a child process (`propeller-fl serve ...`) reads. Service identities carry the
names the authorization table grants rights to ("manager", "coordinator", ...).
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

from server.config import INSECURE_ENV, TLS_CRL_ENV, TLS_DIR_ENV, TlsConfig
from server.pki import CertificateAuthority, Identity, Kind

# The operator identity tests call as.
OPERATOR = "tester"

_ca: CertificateAuthority | None = None


def session_ca() -> CertificateAuthority:
    """The suite's CA (created on first use)."""
    global _ca
    if _ca is None:
        directory = Path(tempfile.mkdtemp(prefix="propeller-fl-test-ca-"))
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
        _ca = CertificateAuthority.create(directory / "ca")
    return _ca


def tls(kind: Kind | str, name: str) -> TlsConfig:
    """A bundle of the suite's CA for `kind` `name`, with the CA's revocation list."""
    ca = session_ca()
    bundle = ca.ensure(Identity(Kind(kind), name))
    return TlsConfig.bundle(bundle.dir, crl=ca.crl_path)


def service_tls(name: str) -> TlsConfig:
    return tls(Kind.SERVICE, name)


def operator_tls(name: str = OPERATOR) -> TlsConfig:
    return tls(Kind.OPERATOR, name)


def proplet_tls(proplet_id: str) -> TlsConfig:
    return tls(Kind.PROPLET, proplet_id)


def tls_env(config: TlsConfig | None) -> dict[str, str]:
    """The variables that give a child process `config` (None: PROPELLER_INSECURE=1)."""
    if config is None:
        return {INSECURE_ENV: "1"}
    env = {TLS_DIR_ENV: str(config.cert.parent)}
    if config.crl is not None:
        env[TLS_CRL_ENV] = str(config.crl)
    return env
