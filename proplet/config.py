"""Proplet configuration: a frozen dataclass; only `main()` reads the environment."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from proplet.federated import Backoff
from proplet.runner import DEFAULT_FUEL, MAX_FUEL, Limits
from server.config import (
    Endpoints,
    MqttConfig,
    TlsConfig,
    env_int,
    env_list,
    env_str,
    read_by,
    setting,
    settings_from_env,
)
from server.oci import is_loopback
from server.pki import Kind, PkiError, read_identity

DEFAULT_WORK_DIR = Path(tempfile.gettempdir()) / "propeller-fl" / "proplet"


def parse_mirrors(raw: str, key: str = "PROPLET_REGISTRY_MIRRORS") -> dict[str, str]:
    """`"local-registry:5000=127.0.0.1:5000,ghcr.io=mirror:5000"` -> {image host: address}."""
    mirrors: dict[str, str] = {}
    for item in (p.strip() for p in raw.split(",")):
        if not item:
            continue
        host, sep, target = item.partition("=")
        if not sep or not host.strip() or not target.strip():
            raise ValueError(f"{key}: {item!r} is not HOST=ADDRESS")
        mirrors[host.strip()] = target.strip()
    return mirrors


def _work_dir(env: Mapping[str, str]) -> Path:
    return Path(env_str(env, "PROPLET_WORK_DIR", str(DEFAULT_WORK_DIR)))


def _mirrors(env: Mapping[str, str]) -> dict[str, str]:
    return parse_mirrors(env.get("PROPLET_REGISTRY_MIRRORS", ""))


def _insecure_registries(env: Mapping[str, str]) -> frozenset[str] | None:
    insecure = env_list(env, "PROPLET_INSECURE_REGISTRIES")
    return frozenset(insecure) if insecure else None


def _mebibytes(var: str, default_mib: int) -> Callable[[Mapping[str, str]], int]:
    """A limit the environment gives in MiB, kept in bytes."""
    return lambda env: env_int(env, var, default_mib) << 20


@dataclass(frozen=True)
class PropletConfig:
    """Everything a proplet needs; tests build it directly."""

    proplet_id: str
    name: str = setting("PROPLET_NAME", "")
    mqtt: MqttConfig = field(default_factory=MqttConfig, metadata=read_by(MqttConfig.from_env))
    # Model registry, data store and coordinator used when a task's env does not name them.
    endpoints: Endpoints = field(default_factory=Endpoints, metadata=read_by(Endpoints.from_env))
    heartbeat_s: float = setting("PROPLET_HEARTBEAT_S", 10.0)
    # Content-addressed module cache (shared safely by proplets on one machine).
    work_dir: Path = field(default=DEFAULT_WORK_DIR, metadata=read_by(_work_dir))
    # Image host as written in image_url -> address actually used, e.g.
    # {"local-registry:5000": "127.0.0.1:5000"}.
    registry_mirrors: Mapping[str, str] = field(default_factory=dict, metadata=read_by(_mirrors))
    # Registry addresses spoken to over plain HTTP. None: loopback addresses and mirror targets.
    insecure_registries: frozenset[str] | None = field(
        default=None, metadata=read_by(_insecure_registries)
    )
    task_timeout_s: float = setting("PROPLET_TASK_TIMEOUT_S", 300.0)
    # One run's linear memory and tables together (the tables' share: 8 bytes an element).
    memory_limit_bytes: int = field(
        default=256 << 20, metadata=read_by(_mebibytes("PROPLET_MEMORY_LIMIT_MB", 256))
    )
    output_limit_bytes: int = field(
        default=16 << 20, metadata=read_by(_mebibytes("PROPLET_OUTPUT_LIMIT_MB", 16))
    )
    # Table elements of one run over all its tables, and how many tables it may have.
    table_elements_limit: int = setting("PROPLET_TABLE_ELEMENTS_LIMIT", 1 << 16)
    tables_limit: int = setting("PROPLET_TABLES_LIMIT", 1)
    # Fuel units one run may consume (about one per wasm instruction); 0: DEFAULT_FUEL (10^15,
    # no practical limit: the timeout ends a run first). A round's fuel_budget (env
    # FUEL_BUDGET) can only lower it for that round's tasks.
    fuel_limit: int = setting("PROPLET_FUEL_LIMIT", 0)
    rpc_timeout_s: float = setting("PROPLET_RPC_TIMEOUT_S", 30.0)
    # Round services (registry, data store, coordinator) that fail with UNAVAILABLE or
    # DEADLINE_EXCEEDED are retried after delays growing from retry_backoff_s to at most
    # retry_max_backoff_s (with jitter), until the round's deadline.
    retry_backoff_s: float = setting("PROPLET_RETRY_BACKOFF_S", 0.2)
    retry_max_backoff_s: float = setting("PROPLET_RETRY_MAX_BACKOFF_S", 5.0)
    # A task result the manager has not acknowledged is sent again this often (and after every
    # reconnection to the broker).
    result_resend_s: float = setting("PROPLET_RESULT_RESEND_S", 5.0)
    # Mutual TLS on the round services' channels, with this proplet's own certificate (its id
    # in the SAN; None: plaintext).
    tls: TlsConfig | None = field(kw_only=True)

    def __post_init__(self) -> None:
        if not self.proplet_id or any(c in self.proplet_id for c in "/+#"):
            raise ValueError(f"proplet_id: {self.proplet_id!r} must be non-empty without / + #")
        if not self.heartbeat_s > 0:
            raise ValueError(f"heartbeat_s: {self.heartbeat_s} must be > 0")
        if not self.rpc_timeout_s > 0:
            raise ValueError(f"rpc_timeout_s: {self.rpc_timeout_s} must be > 0")
        if not self.result_resend_s > 0:
            raise ValueError(f"result_resend_s: {self.result_resend_s} must be > 0")
        if not 0 <= self.fuel_limit <= MAX_FUEL:
            raise ValueError(
                f"fuel_limit: {self.fuel_limit} must be between 0 (the default, "
                f"{DEFAULT_FUEL}) and {MAX_FUEL}"
            )
        self.limits  # noqa: B018 - validates the limits now rather than at the first task
        self.backoff  # noqa: B018 - and the retry backoff

    @property
    def limits(self) -> Limits:
        return Limits(
            timeout_s=self.task_timeout_s,
            memory_bytes=self.memory_limit_bytes,
            output_bytes=self.output_limit_bytes,
            table_elements=self.table_elements_limit,
            tables=self.tables_limit,
            fuel=self.fuel_limit or DEFAULT_FUEL,
        )

    @property
    def backoff(self) -> Backoff:
        return Backoff(initial_s=self.retry_backoff_s, max_s=self.retry_max_backoff_s)

    def registry_address(self, host: str) -> str:
        """Where to reach the registry an image names (after mirrors)."""
        return self.registry_mirrors.get(host, host)

    def is_insecure(self, address: str) -> bool:
        """Whether to use plain HTTP for a registry address (after mirrors)."""
        if self.insecure_registries is not None:
            return address in self.insecure_registries
        return is_loopback(address) or address in self.registry_mirrors.values()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> PropletConfig:
        env = os.environ if env is None else env
        # The certificate says who the proplet is (`_proplet_id`): read once, used twice.
        tls = TlsConfig.from_env(env)
        proplet_id = _proplet_id(env.get("PROPLET_ID", "").strip(), tls)
        return cls(**settings_from_env(cls, env), proplet_id=proplet_id, tls=tls)


def _proplet_id(given: str, tls: TlsConfig | None) -> str:
    """PROPLET_ID, or the id the proplet's certificate names: a proplet is who its certificate
    says (given both, they must agree)."""
    if tls is None:
        if not given:
            raise ValueError("PROPLET_ID: required")
        return given
    try:
        identity = read_identity(tls.cert)
    except PkiError as exc:
        raise ValueError(f"TLS cert: {exc}") from None
    if identity.kind is not Kind.PROPLET:
        raise ValueError(f"TLS cert: {tls.cert} is a {identity}'s, not a proplet's")
    if given and given != identity.name:
        raise ValueError(
            f"PROPLET_ID: {given!r}, but the certificate {tls.cert} is proplet {identity.name!r}'s"
        )
    return identity.name
