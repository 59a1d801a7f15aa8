"""Who may call what: the one authorization table, and the check every gRPC server runs.

`RULES` maps each RPC's full method name to a `Rule`: which identity kinds may call it
(operators; services, by name; proplets) and, for proplets, whether only "as themselves" (a
request field must be their own id). docs/security.md holds the same table;
tests/security/test_authz_table.py checks that the two agree and that every RPC of every
service we serve has a row. A method without a row is refused.

`Gate` runs in front of every handler (`server.grpc_server` wraps them all): it reads the
peer's certificate from the call's auth context (the TLS handshake has already verified it
against the deployment CA), takes its identity (`server.pki.identity_of`), refuses a revoked
one (the CA's CRL, re-read when it changes) with UNAUTHENTICATED, checks the method's rule
(PERMISSION_DENIED naming what is missing) and, for a unary request, the "as itself" field.
The caller then reaches the servicer through a context variable (`caller()`); a servicer whose
request is a stream compares the id in it with `require_self(...)`.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from server.config import TlsConfig
from server.errors import PermissionDenied, Unauthenticated
from server.pki import (
    SITE_SERVICE_PREFIX,
    Identity,
    Kind,
    PkiError,
    RevocationList,
    acts_as,
    identity_of,
    load_certificate,
)

log = logging.getLogger(__name__)

ANY_SERVICE = "*"
# Every site coordinator (service `site-{site_id}`, `server.coordinator.site`): a site acts
# for its proplets towards the root, the aggregator and the data store.
SITES = f"{SITE_SERVICE_PREFIX}*"


@dataclass(frozen=True)
class Rule:
    """Who may call one RPC. `services`: service names (ANY_SERVICE: any service; SITES:
    any site coordinator; "manager" / "coordinator": the service and every replica of it,
    service `manager-{replica_id}` / `coordinator-{replica_id}`, `server.pki.REPLICATED`).
    `as_itself`: a proplet may call it only with this request field (dotted for a stream's
    header) equal to its own id; `verb` words the refusal ("submit" -> "may only submit as
    itself")."""

    operator: bool = False
    services: frozenset[str] = frozenset()
    proplet: bool = False
    as_itself: str = ""
    verb: str = "call it"

    def allows(self, identity: Identity) -> bool:
        if identity.kind is Kind.OPERATOR:
            return self.operator
        if identity.kind is Kind.SERVICE:
            site = SITES in self.services and identity.name.startswith(SITE_SERVICE_PREFIX)
            named = any(acts_as(identity, service) for service in self.services)
            return site or named or ANY_SERVICE in self.services
        return self.proplet

    def who(self) -> str:
        """The callers it allows, as a refusal names them."""
        parts = []
        if self.operator:
            parts.append("operators")
        if ANY_SERVICE in self.services:
            parts.append("services")
        elif self.services:
            parts.append("service " + ", ".join(sorted(self.services)))
        if self.proplet:
            parts.append("proplets (as themselves)" if self.as_itself else "proplets")
        return "; ".join(parts) or "nobody"


def _rule(
    *, operator: bool = False, services: tuple[str, ...] = (), proplet: bool = False, **kw: Any
) -> Rule:
    return Rule(operator=operator, services=frozenset(services), proplet=proplet, **kw)


OPERATOR = _rule(operator=True)
ANYONE = _rule(operator=True, services=(ANY_SERVICE,), proplet=True)
# A proplet's dataset (and its size): the operators, the coordinator and the sites' (the
# audit's re-runs, the num_samples cap), and the proplet itself.
_DATASET_READ = _rule(
    operator=True,
    services=("coordinator", SITES),
    proplet=True,
    as_itself="proplet_id",
    verb="read a dataset",
)

_M = "/propeller.v1.Manager/"
_C = "/propeller.v1.Coordinator/"
_A = "/propeller.v1.Aggregator/"
_R = "/propeller.v1.ModelRegistry/"
_D = "/propeller.v1.DataStore/"

RULES: Mapping[str, Rule] = {
    # The manager: the operators' entry point. Proplets reach it only over MQTT, except to
    # ask about themselves (a proplet container's healthcheck).
    f"{_M}StartExperiment": OPERATOR,
    f"{_M}GetExperiment": OPERATOR,
    f"{_M}ListExperiments": OPERATOR,
    f"{_M}StopExperiment": OPERATOR,
    f"{_M}WatchExperiment": _rule(operator=True, services=(ANY_SERVICE,)),
    f"{_M}ListExperimentRounds": _rule(operator=True, services=(ANY_SERVICE,)),
    f"{_M}GetRoundStatus": OPERATOR,
    f"{_M}ListProplets": OPERATOR,
    f"{_M}GetProplet": _rule(operator=True, proplet=True, as_itself="proplet_id", verb="ask"),
    f"{_M}CreateTask": OPERATOR,
    f"{_M}StartTask": OPERATOR,
    f"{_M}StopTask": OPERATOR,
    f"{_M}GetTask": OPERATOR,
    f"{_M}ListTasks": OPERATOR,
    # The coordinator: rounds configured by operators and by the manager (StartExperiment);
    # updates only from the proplets themselves, and a site's partial from its site
    # coordinator (the servicer holds it to its own site, and only a root takes it).
    f"{_C}ConfigureRound": _rule(operator=True, services=("manager",)),
    f"{_C}StartRound": _rule(operator=True, services=("manager",)),
    # Task failures of a round's participants: only the manager hears task results; a site
    # coordinator tells its root that its site's round failed (the servicer holds it to its
    # own site).
    f"{_C}ReportParticipantFailure": _rule(services=("manager", SITES)),
    f"{_C}SubmitUpdate": _rule(
        services=(SITES,), proplet=True, as_itself="header.proplet_id", verb="submit"
    ),
    # A site coordinator reads its root's round (membership, base model, deadline).
    f"{_C}GetRoundStatus": _rule(operator=True, services=("manager", SITES)),
    f"{_C}ListRounds": OPERATOR,
    # The manager drives experiments from the round's events (server/manager/driver.py).
    f"{_C}WatchRound": _rule(operator=True, services=("manager",)),
    # The aggregator: only the coordinator, and site coordinators (their partials).
    f"{_A}Aggregate": _rule(services=("coordinator", SITES)),
    # The model registry: new versions from operators and the coordinator; read by anyone.
    f"{_R}InitModel": OPERATOR,
    f"{_R}PutModel": _rule(operator=True, services=("coordinator",)),
    f"{_R}GetModel": ANYONE,
    f"{_R}GetModelInfo": ANYONE,
    f"{_R}ListModels": _rule(operator=True, services=(ANY_SERVICE,)),
    # A version's lineage: written by the coordinator only, with the version it made; read
    # by operators (`models verify`) and services.
    f"{_R}PutLineage": _rule(services=("coordinator",)),
    f"{_R}GetLineage": _rule(operator=True, services=(ANY_SERVICE,)),
    # The data store: a proplet reads its own dataset only; the coordinator (and a site's)
    # reads a participant's to re-run its update (the re-execution audit).
    f"{_D}GetDataset": _DATASET_READ,
    f"{_D}PutDataset": OPERATOR,
    f"{_D}ListDatasets": OPERATOR,
    # A dataset's size: the coordinator (and a site's) caps num_samples by it.
    f"{_D}GetDatasetInfo": _DATASET_READ,
    # Many at once: the coordinator (and a site's) for the updates that arrived together.
    f"{_D}GetDatasetInfos": _rule(operator=True, services=("coordinator", SITES)),
    # Beside every service: health and reflection, for any authenticated identity.
    "/grpc.health.v1.Health/Check": ANYONE,
    "/grpc.health.v1.Health/List": ANYONE,
    "/grpc.health.v1.Health/Watch": ANYONE,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": ANYONE,
}


def method_name(method: str) -> str:
    """ "/propeller.v1.Coordinator/SubmitUpdate" -> "SubmitUpdate"."""
    return method.rpartition("/")[2]


@dataclass(frozen=True)
class Caller:
    """Who is calling and what: `identity` None on a plaintext server (nobody is
    authenticated there, so nothing is authorized either)."""

    identity: Identity | None
    method: str
    rule: Rule | None
    # The peer's certificate (PEM) as the TLS handshake verified it; b"" on plaintext.
    certificate: bytes = b""


_CALLER: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("caller", default=None)


def set_caller(caller: Caller) -> None:
    """Called by the server wrapper at the start of each call (each call runs in a task of its
    own, so the value is the call's alone)."""
    _CALLER.set(caller)


def caller() -> Identity | None:
    """The identity of the current call's peer (None on a plaintext server or outside a
    call)."""
    current = _CALLER.get()
    return None if current is None else current.identity


def caller_certificate() -> bytes:
    """The current call's peer certificate (PEM; b"" on a plaintext server): what the
    coordinator checks an update's signature with."""
    current = _CALLER.get()
    return b"" if current is None else current.certificate


def require_self(claimed: str) -> None:
    """For a rule with `as_itself`: a proplet caller must claim its own id. Operators and
    services pass; so does every caller of a plaintext server."""
    current = _CALLER.get()
    if current is None or current.identity is None or current.rule is None:
        return
    identity, rule = current.identity, current.rule
    if identity.kind is Kind.PROPLET and rule.as_itself and claimed != identity.name:
        raise PermissionDenied(
            f"{method_name(current.method)}: proplet {identity.name!r} may only {rule.verb} as "
            f"itself, not as {claimed!r} ({rule.as_itself})"
        )


def authorize(identity: Identity, method: str) -> Rule:
    """The method's rule if it allows `identity`; PermissionDenied naming who may call it."""
    rule = RULES.get(method)
    name = method_name(method)
    if rule is None:
        raise PermissionDenied(f"{name}: no authorization rule for {method}; nobody may call it")
    if not rule.allows(identity):
        raise PermissionDenied(f"{name}: {identity} may not call it; allowed: {rule.who()}")
    return rule


def _field(request: Any, dotted: str) -> Any:
    value = request
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


# Peer certificates parsed so far (PEM -> identity, serial): a connection's every call
# carries the same certificate, so it is parsed once. Bounded: cleared when full.
_CACHE_SIZE = 4096


class Gate:
    """Authentication and authorization in front of a TLS server's handlers (see the module
    docstring). Holds the CA certificate and the revocation list of `tls`."""

    def __init__(self, tls: TlsConfig) -> None:
        ca = load_certificate(tls.ca.read_bytes(), str(tls.ca))
        self._crl = None if tls.crl is None else RevocationList(tls.crl, ca)
        self._peers: dict[bytes, tuple[Identity, int]] = {}
        if self._crl is None:
            log.warning(
                "[authz] no certificate revocation list (PROPELLER_TLS_CRL): revoked "
                "certificates are not refused"
            )

    def _peer(self, auth_context: Mapping[str, Iterable[bytes]]) -> tuple[Identity, bytes]:
        pem = next(iter(auth_context.get("x509_pem_cert", ())), None)
        if pem is None:
            raise Unauthenticated("no client certificate")
        known = self._peers.get(pem)
        if known is None:
            try:
                cert = load_certificate(pem)
                known = (identity_of(cert), cert.serial_number)
            except PkiError as exc:
                raise Unauthenticated(f"client certificate: {exc}") from None
            if len(self._peers) >= _CACHE_SIZE:
                self._peers.clear()
            self._peers[pem] = known
        identity, serial = known
        if self._crl is not None:
            try:
                revoked = self._crl.is_revoked(serial)
            except PkiError as exc:
                log.error("[authz] %s", exc)
                raise Unauthenticated(str(exc)) from None
            if revoked:
                raise Unauthenticated(f"{identity}: certificate {serial:x} is revoked")
        return identity, pem

    def admit(self, auth_context: Mapping[str, Iterable[bytes]], method: str) -> Caller:
        """The caller of `method`: authenticated and allowed by its rule, or Unauthenticated /
        PermissionDenied."""
        identity, pem = self._peer(auth_context)
        return Caller(identity, method, authorize(identity, method), pem)

    @staticmethod
    def check_request(caller: Caller, request: Any) -> None:
        """A unary request's "as itself" field, before the servicer sees it (a request stream's
        is the servicer's to check, with `require_self`)."""
        rule = caller.rule
        if rule is not None and rule.as_itself:
            _CALLER.set(caller)
            require_self(str(_field(request, rule.as_itself)))
