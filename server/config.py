"""Configuration read from the environment. Only entry points call `from_env`; tests build
the dataclasses directly."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from server.topics import Topics

N = TypeVar("N", int, float)


def env_str(env: Mapping[str, str], key: str, default: str) -> str:
    value = env.get(key, "")
    return value if value else default


def env_int(env: Mapping[str, str], key: str, default: int) -> int:
    return _env_number(env, key, default, int, "an integer")


def env_float(env: Mapping[str, str], key: str, default: float) -> float:
    return _env_number(env, key, default, float, "a number")


def _env_number(
    env: Mapping[str, str], key: str, default: N, parse: Callable[[str], N], what: str
) -> N:
    raw = env.get(key, "")
    if not raw:
        return default
    try:
        return parse(raw)
    except ValueError:
        raise ValueError(f"{key}: {raw!r} is not {what}") from None


def env_list(env: Mapping[str, str], key: str) -> list[str]:
    return [p.strip() for p in env.get(key, "").split(",") if p.strip()]


T = TypeVar("T")

# How a setting's value is read, by the type its field declares.
_READERS: dict[str, Callable[[Mapping[str, str], str, Any], Any]] = {
    "str": env_str,
    "int": env_int,
    "float": env_float,
}


def setting(var: str, default: T, *, secret: bool = False) -> T:
    """A config field that environment variable `var` sets (`settings_from_env`): its
    default, its variable and its comment stand together in the dataclass. A `secret` one
    (a DSN that may carry a password) is left out of the config's repr, which `serve` logs."""
    return field(default=default, repr=not secret, metadata={"env": var})


def read_by(read: Callable[[Mapping[str, str]], object]) -> dict[str, object]:
    """Field metadata (`field(..., metadata=read_by(fn))`): the environment sets the field as
    `fn(env)` (a nested config, a path, a flag), when `settings_from_env` reads it."""
    return {"read": read}


def settings_from_env(config: type[Any], env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """What the environment (`os.environ` when None) sets of the dataclass `config`, by
    field name: each `setting` field's variable read as the field's type (str, int or float;
    a malformed number is a ValueError naming the variable) or its default, and each
    `read_by` field as its reader says. A config's `from_env` is `cls(**settings_from_env(cls,
    env))` and whatever depends on more than one variable."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for f in fields(config):
        if "env" in f.metadata:
            kind = f.type if isinstance(f.type, str) else f.type.__name__
            values[f.name] = _READERS[kind](env, f.metadata["env"], f.default)
        elif "read" in f.metadata:
            values[f.name] = f.metadata["read"](env)
    return values


# A comma list of the broker nodes a client may use (host:port each), tried in order: the
# first is the one a client connects to, the others take over when it is lost.
MQTT_BROKERS_ENV = "PROPELLER_MQTT_BROKERS"


def parse_broker(entry: str, var: str = MQTT_BROKERS_ENV) -> tuple[str, int]:
    """`host:port` (an IPv6 host in brackets) as (host, port); ValueError naming `var`."""
    host, sep, port = entry.strip().rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{var}: {entry.strip()!r} is not host:port (port 1..65535)")
    return host, int(port)


@dataclass(frozen=True)
class MqttConfig:
    """Where the broker is, which deployment namespace to use and who this client is.

    `host`:`port` is the broker (or the first node of a clustered one); `failover` the other
    nodes of a cluster, tried in turn when a connection is lost or refused (`brokers` is
    all of them, in order). `tls`: the process's bundle (the same as its gRPC one,
    `TlsConfig`): the client verifies the broker's certificate against the CA and presents
    its own, whose CN is its MQTT user name and client id (docs/security.md, "MQTT"). None:
    plaintext, anonymous (PROPELLER_INSECURE=1)."""

    host: str = "127.0.0.1"
    port: int = 1883
    topics: Topics = field(default_factory=Topics)
    keepalive: int = 30
    tls: TlsConfig | None = None
    failover: tuple[tuple[str, int], ...] = ()

    @property
    def brokers(self) -> list[tuple[str, int]]:
        """Every node this client may connect to, the preferred one first."""
        return [(self.host, self.port), *self.failover]

    @classmethod
    def on_brokers(cls, brokers: Sequence[tuple[str, int]], **settings: Any) -> MqttConfig:
        """A config for the nodes `brokers` (the first preferred); ValueError if empty."""
        if not brokers:
            raise ValueError(f"{MQTT_BROKERS_ENV}: no broker given")
        (host, port), *rest = brokers
        return cls(host=host, port=port, failover=tuple(rest), **settings)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> MqttConfig:
        """PROPELLER_MQTT_HOST / _PORT, or PROPELLER_MQTT_BROKERS (host:port,host:port,...:
        the nodes of a clustered broker; not together with _HOST / _PORT),
        PROPELLER_DOMAIN_ID / _CHANNEL_ID, and the process's TLS settings
        (`TlsConfig.from_env`)."""
        env = os.environ if env is None else env
        nodes = [parse_broker(n) for n in env_list(env, MQTT_BROKERS_ENV)]
        if nodes:
            single = [v for v in ("PROPELLER_MQTT_HOST", "PROPELLER_MQTT_PORT") if env.get(v)]
            if single:
                raise ValueError(
                    f"{MQTT_BROKERS_ENV} and {single[0]} are both set: name the broker once"
                )
        else:
            nodes = [
                (
                    env_str(env, "PROPELLER_MQTT_HOST", "127.0.0.1"),
                    env_int(env, "PROPELLER_MQTT_PORT", 1883),
                )
            ]
        topics = Topics(
            domain=env_str(env, "PROPELLER_DOMAIN_ID", "propeller"),
            channel=env_str(env, "PROPELLER_CHANNEL_ID", "fl"),
        )
        return cls.on_brokers(nodes, topics=topics, tls=TlsConfig.from_env(env))

    def as_identity(self, tls: TlsConfig | None) -> MqttConfig:
        """The same broker and namespace, as the holder of `tls` (None: plaintext)."""
        return replace(self, tls=tls)


# The transport's variables (docs/configuration.md, docs/security.md).
TLS_DIR_ENV = "PROPELLER_TLS_DIR"
TLS_CA_ENV = "PROPELLER_TLS_CA"
TLS_CERT_ENV = "PROPELLER_TLS_CERT"
TLS_KEY_ENV = "PROPELLER_TLS_KEY"
TLS_CRL_ENV = "PROPELLER_TLS_CRL"
INSECURE_ENV = "PROPELLER_INSECURE"
_TRUE = ("1", "true", "yes", "on")


@dataclass(frozen=True)
class TlsConfig:
    """A process's credentials for mutual TLS: the deployment CA's certificate it trusts, its
    own certificate and key (`server.pki` issues them as a bundle directory) and, for a
    server, the CA's revocation list (re-read whenever it changes). Where a config takes
    `tls: TlsConfig | None`, None means plaintext: no encryption, no authentication, no
    authorization (`PROPELLER_INSECURE=1`; logged as a warning)."""

    ca: Path
    cert: Path
    key: Path
    crl: Path | None = None

    @classmethod
    def bundle(cls, directory: Path, crl: Path | None = None) -> TlsConfig:
        """The bundle directory `directory` (ca.crt, tls.crt, tls.key)."""
        return cls(directory / "ca.crt", directory / "tls.crt", directory / "tls.key", crl)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> TlsConfig | None:
        """PROPELLER_TLS_DIR (a bundle directory) or PROPELLER_TLS_CA + _CERT + _KEY (the
        three files; any of them overrides the bundle's), PROPELLER_TLS_CRL; None with
        PROPELLER_INSECURE=1. ValueError saying what to set when there is neither, or both."""
        env = os.environ if env is None else env
        insecure = env.get(INSECURE_ENV, "").strip().lower() in _TRUE
        directory = env_str(env, TLS_DIR_ENV, "")
        files = {v: env_str(env, v, "") for v in (TLS_CA_ENV, TLS_CERT_ENV, TLS_KEY_ENV)}
        crl = env_str(env, TLS_CRL_ENV, "")
        named = [v for v in (TLS_DIR_ENV, *files) if env_str(env, v, "")]
        if insecure:
            if named:
                raise ValueError(
                    f"{INSECURE_ENV}=1 and {named[0]} are both set: choose TLS or plaintext"
                )
            return None
        if not named:
            raise ValueError(
                f"{TLS_DIR_ENV}: not set: give this process a certificate bundle "
                f"(`propeller-fl certs issue ...`, docs/security.md), or set {INSECURE_ENV}=1 "
                "to run without TLS"
            )
        base = cls.bundle(Path(directory)) if directory else None
        paths: dict[str, Path] = {}
        for var, name in ((TLS_CA_ENV, "ca"), (TLS_CERT_ENV, "cert"), (TLS_KEY_ENV, "key")):
            if files[var]:
                paths[name] = Path(files[var])
            elif base is not None:
                paths[name] = getattr(base, name)
            else:
                raise ValueError(f"{var}: not set (or set {TLS_DIR_ENV} to a bundle directory)")
        config = cls(crl=Path(crl) if crl else None, **paths)
        config.check_readable()
        return config

    def check_readable(self) -> None:
        """ValueError naming the first of the files that cannot be read."""
        for name, path in (("ca", self.ca), ("cert", self.cert), ("key", self.key)):
            if not os.access(path, os.R_OK):
                why = "does not exist" if not path.exists() else "is not readable"
                raise ValueError(f"TLS {name}: {path} {why}")


# Each service's environment variable (as the seed names them), default port and what
# messages call it. One table, so the services, the proplet and the CLI agree.
ENDPOINTS: dict[str, tuple[str, int, str]] = {
    "manager": ("MANAGER_ADDR", 7070, "manager"),
    "coordinator": ("COORDINATOR_ADDR", 8086, "coordinator"),
    "aggregator": ("AGGREGATOR_ADDR", 8085, "aggregator"),
    "registry": ("MODEL_REGISTRY_ADDR", 8084, "model registry"),
    "datastore": ("DATA_STORE_ADDR", 8083, "data store"),
}


@dataclass(frozen=True)
class Endpoints:
    """gRPC addresses of the services, as host:port."""

    manager: str = "127.0.0.1:7070"
    coordinator: str = "127.0.0.1:8086"
    aggregator: str = "127.0.0.1:8085"
    registry: str = "127.0.0.1:8084"
    datastore: str = "127.0.0.1:8083"

    @classmethod
    def on(cls, host: str) -> Endpoints:
        """Every service on `host` at its default port."""
        return cls(**{name: f"{host}:{port}" for name, (_, port, _) in ENDPOINTS.items()})

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, defaults: Endpoints | None = None
    ) -> Endpoints:
        """The addresses the environment names; the others from `defaults` (127.0.0.1)."""
        env = os.environ if env is None else env
        d = defaults or cls()
        return cls(
            **{name: env_str(env, var, getattr(d, name)) for name, (var, _, _) in ENDPOINTS.items()}
        )

    def label(self, service: str) -> str:
        """What messages call `service`, with its address: "model registry at host:port"."""
        return f"{ENDPOINTS[service][2]} at {getattr(self, service)}"


def bind_problem(host: str, port: int) -> str | None:
    """Why `host:port` cannot be listened on right now (the OS's reason), or None if it can.
    Checked before a fixed port is used, so a taken port is one clear line instead of a
    traceback (amqtt) or a silently shared port (gRPC servers bind with SO_REUSEPORT)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            return str(exc.strerror or exc)
    return None
