"""Hierarchical aggregation: a coordinator's tier, and what a site coordinator sends upward.

- "flat" (the default): proplets submit to it, and it stores each round's model.
- "site": a coordinator acting for one site of a root coordinator (its `upstream`). A site
  round has the root round's round_id and base model, and the site's proplets as its
  participants (k-of-n per site); its deadline ends before the root's. When it closes it
  aggregates its updates by FedAvg into the site's partial — the sample-weighted mean and the
  sample total — signs it with the site's own service key and submits it to the root as the
  site's one update. The site round completes once the root has accepted it: no model
  version and no round-complete notice of its own (the root's round makes both).
- "root": its rounds' participants are sites (k-of-n over sites). Only site coordinators
  submit (service identity `site-{site_id}`, as their own site), each partial naming its
  contributors, whose caps bound its num_samples (`checks.UpdateChecks`).

Why the partial composes: for the FedAvg family the root's weighted mean of the sites'
weighted means, weighted by their sample totals, is sum_s n_s (sum_i n_i x_i / n_s) / sum_s
n_s = sum_i n_i x_i / sum_i n_i, the flat weighted mean. FedProx is FedAvg at the server, and
the server-optimiser strategies (fedavgm, fedadam, fedyogi, fedadagrad) take exactly that mean
as their pseudo-gradient's input, so the root applies them unchanged. Order statistics
(median, trimmed mean, Krum, Bulyan) do not compose — the median of the sites' medians is not
the median of the updates, and Krum's scores need every update — so hierarchical rounds
refuse them (FAILED_PRECONDITION).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import grpc
from cryptography.hazmat.primitives.asymmetric import ec

from propeller.v1 import coordinator_pb2, coordinator_pb2_grpc
from server.aggregator.strategies import STRATEGIES, strategy_class
from server.config import TlsConfig
from server.coordinator import rounds as R
from server.coordinator.backend import RetryPolicy, with_retry
from server.coordinator.clients import meta_of
from server.coordinator.rounds import Round, Update
from server.coordinator.wire import status_from_proto
from server.errors import FailedPrecondition, NotFound, PropellerError, rpc_errors
from server.ids import id_problem
from server.pki import (
    SITE_SERVICE_PREFIX,
    Identity,
    Kind,
    load_private_key,
    read_identity,
    site_service,
)
from server.provenance import Claim, sign
from server.round_spec import RoundSpec
from server.streams import update_stream
from server.tensors import Tensors, sha256_of

log = logging.getLogger(__name__)

FLAT = "flat"
ROOT = "root"
SITE = "site"
TIERS = (FLAT, ROOT, SITE)


def site_of(identity: Identity) -> str | None:
    """The site a caller's identity speaks for (None: not a site coordinator)."""
    if identity.kind is Kind.SERVICE and identity.name.startswith(SITE_SERVICE_PREFIX):
        return identity.name[len(SITE_SERVICE_PREFIX) :] or None
    return None


@dataclass(frozen=True)
class Hierarchy:
    """A coordinator's place in the hierarchy: its tier and, for a site, its id."""

    tier: str = FLAT
    site_id: str = ""

    def __post_init__(self) -> None:
        if self.tier not in TIERS:
            raise ValueError(f"tier: {self.tier!r} must be one of {', '.join(TIERS)}")
        if self.tier == SITE:
            problem = id_problem(self.site_id)
            if problem is not None:
                raise ValueError(f"site_id: {problem} (a site coordinator names its site)")
        elif self.site_id:
            raise ValueError(f"site_id: {self.site_id!r} is only for tier {SITE!r}")

    @property
    def hierarchical(self) -> bool:
        return self.tier != FLAT

    def signing_key(self, tls: TlsConfig | None) -> ec.EllipticCurvePrivateKey | None:
        """A site's key for signing its partials (None over plaintext). The root holds a site
        to its own identity: a certificate for another identity would only be refused there,
        so it is refused here, at start (ValueError)."""
        if tls is None:
            return None
        expected = Identity(Kind.SERVICE, site_service(self.site_id))
        actual = read_identity(tls.cert)
        if actual != expected:
            raise ValueError(
                f"site_id: {self.site_id!r} needs the certificate of {expected}, "
                f"but {tls.cert} is {actual}'s"
            )
        return load_private_key(tls.key)


_COMPOSING = ", ".join(name for name, cls in STRATEGIES.items() if cls.incremental)


def check_composes(strategy_name: str) -> None:
    """A hierarchical round's strategy must compose over sites (see the module docstring)."""
    cls = strategy_class(strategy_name)
    if cls.name == "wasm":
        raise FailedPrecondition(
            "strategy_name: wasm runs its module on every update of the round at once, which "
            "does not compose over sites (a site's partial is a weighted mean); a hierarchical "
            f"round takes one of {_COMPOSING}"
        )
    if not cls.incremental:
        raise FailedPrecondition(
            f"strategy_name: {cls.name} is an order statistic, which does not compose over "
            "sites (a site's partial is a weighted mean; the median of the sites' results is "
            f"not the median of all updates); a hierarchical round takes one of {_COMPOSING}"
        )


def check_against_root(spec: RoundSpec, model_ref: str, root: Round, site_id: str) -> None:
    """A site round must be part of the root's round of the same id: the site among its
    participants, the same base model and strategy, the root not finished."""
    where = f"the root coordinator's round {root.round_id!r}"
    if site_id not in root.participants:
        raise FailedPrecondition(
            f"round_id: {where} does not list site {site_id!r} among its participants"
        )
    if root.finished:
        raise FailedPrecondition(f"round_id: {where} is {root.state.value}")
    if model_ref != root.model_ref:
        raise FailedPrecondition(f"model_ref: {model_ref!r}, but {where} trains {root.model_ref!r}")
    if strategy_class(spec.strategy_name).name != strategy_class(root.strategy_name).name:
        raise FailedPrecondition(
            f"strategy_name: {spec.strategy_name or 'fedavg'!r}, but {where} aggregates by "
            f"{root.strategy_name or 'fedavg'!r}"
        )


def check_deadline(deadline: float, timeout_s: float, root: Round) -> None:
    """A site round must close before its root's: its partial has to arrive in time. An open
    root's deadline is known; a pending one's starts later, so a shorter timeout suffices."""
    if root.state is R.RoundState.OPEN and deadline >= root.deadline:
        raise FailedPrecondition(
            f"timeout_s: the site's round would close at {deadline:.3f}, not before the root's "
            f"deadline {root.deadline:.3f}; its partial would arrive too late"
        )
    if root.state is R.RoundState.PENDING and timeout_s >= root.timeout_s:
        raise FailedPrecondition(
            f"timeout_s: {timeout_s:g} s, not shorter than the root round's {root.timeout_s:g} s"
        )


def partial_of(rnd: Round, headers: Sequence[Update], mean: Tensors, site_id: str) -> Update:
    """The site's one update to the root: the weighted mean `mean` of the updates `headers`
    describe, weighted by their sample total, with their weighted metrics, naming them."""
    digests = {u.module_digest for u in headers}
    module = rnd.module_digest or (next(iter(digests)) if len(digests) == 1 else "")
    if not module:
        raise FailedPrecondition(
            f"module_digest: the site's updates come from {len(digests)} modules and round "
            f"{rnd.round_id!r} pins none; its partial cannot name one"
        )
    return Update(
        proplet_id=site_id,
        base_model_uri=rnd.model_ref,
        num_samples=sum(u.num_samples for u in headers),
        metrics=R.weighted_metrics(headers),
        tensors=mean,
        base_model_sha256=rnd.base_model_sha256,
        module_digest=module,
        contributors=tuple(u.proplet_id for u in headers),
    )


class Upstream(Protocol):
    """What a site coordinator needs from its root coordinator."""

    async def round(self, round_id: str) -> Round:
        """The root's round `round_id` (its status); NotFound when it has none."""
        ...

    async def submit(self, round_id: str, partial: Update) -> None:
        """Submit the site's partial (idempotent at the root: a repeat is a duplicate)."""
        ...

    async def report_failure(self, round_id: str, site_id: str, reason: str) -> None:
        """Tell the root that site `site_id` cannot report in `round_id` (idempotent)."""
        ...


class GrpcUpstream:
    """`Upstream` over a channel to the root (owned by the caller), signing each partial with
    the site's key (None over plaintext)."""

    def __init__(
        self, channel: grpc.aio.Channel, key: ec.EllipticCurvePrivateKey | None, *, timeout_s: float
    ) -> None:
        self._stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        self._key = key
        self._timeout_s = timeout_s

    async def round(self, round_id: str) -> Round:
        with rpc_errors("root coordinator: GetRoundStatus"):
            status = await self._stub.GetRoundStatus(
                coordinator_pb2.GetRoundStatusRequest(round_id=round_id), timeout=self._timeout_s
            )
        return status_from_proto(status)

    async def submit(self, round_id: str, partial: Update) -> None:
        # The partial is signed here, by the site: it carries no signature yet.
        meta = replace(meta_of(round_id, partial), contributors=partial.contributors)
        if self._key is not None:
            claim = Claim.of(
                meta,
                round_id=round_id,
                base_model_sha256=partial.base_model_sha256,
                update_sha256=sha256_of(partial.tensors),
            )
            meta = replace(meta, signature=sign(self._key, claim))
        with rpc_errors("root coordinator: SubmitUpdate"):
            await self._stub.SubmitUpdate(
                update_stream(meta, partial.tensors), timeout=self._timeout_s
            )

    async def report_failure(self, round_id: str, site_id: str, reason: str) -> None:
        request = coordinator_pb2.ReportParticipantFailureRequest(
            round_id=round_id, proplet_id=site_id, reason=f"site round failed: {reason}"
        )
        with rpc_errors("root coordinator: ReportParticipantFailure"):
            await self._stub.ReportParticipantFailure(request, timeout=self._timeout_s)


async def root_round(upstream: Upstream, round_id: str) -> Round:
    """The root's round, or FAILED_PRECONDITION when the root has none to be part of."""
    try:
        return await upstream.round(round_id)
    except NotFound:
        raise FailedPrecondition(
            f"round_id: the root coordinator has no round {round_id!r}; configure it there "
            "first, with this site among its participants"
        ) from None


async def report_failed_round(
    upstream: Upstream, retry: RetryPolicy, rnd: Round, site_id: str
) -> None:
    """A site round failed: the root hears it as its participant's failure, so it closes
    at the quorum the other sites can still reach (or fails) without waiting for its
    deadline. Best effort: should it not arrive, the root's deadline still closes its
    round."""
    try:
        await with_retry(
            retry,
            "report the site's failure to the root",
            rnd.round_id,
            lambda _n: upstream.report_failure(rnd.round_id, site_id, rnd.failure_reason),
        )
    except PropellerError as exc:
        log.warning(
            "[Coordinator.site] round_id=%s the root did not take the site's failure: %s",
            rnd.round_id,
            exc,
        )
