"""Round logic on plain Python and numpy values: the round record, its state machine, and
which updates count. What a round may be configured as is `server.round_spec`.

A `Round` is immutable: every transition returns a new record, so a check that raises leaves
the stored round exactly as it was ("rejected updates change nothing").

States: PENDING (configured) -> OPEN (started; its deadline runs) -> AGGREGATING (closed by
k_of_n, or by the deadline with >= 1 update) -> COMPLETED (a new model version is stored) or
FAILED (the deadline passed with no update, or aggregation / the registry write failed).

Participants that cannot report (their task failed: `participant_failed`) lower what the round
can reach: it fails at once when fewer than its floor (min_k_of_n, or k_of_n when that is 0)
can still report, and otherwise closes once every participant that still can has reported
(`quorum`), without waiting for the deadline.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from server.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from server.models import parse_model_uri
from server.provenance import MAX_SIGNATURE_BYTES, Signed, check_module_digest
from server.round_spec import AuditSpec, Hyperparams, RoundSpec
from server.tensors import Array, Spec, Tensors, check_finite

CLOSED_BY_K_OF_N = "k_of_n"
CLOSED_BY_DEADLINE = "deadline"
# Closed with fewer than k_of_n (but at least min_k_of_n) because the others failed.
CLOSED_BY_MIN_K_OF_N = "min_k_of_n"
# How many failed participants a failure reason lists by name (all are in `Round.failed`).
_NAMED_FAILURES = 10
# A participant failure's reason is kept with the round: cut to this many characters.
MAX_REASON_CHARS = 1024


class RoundState(enum.Enum):
    PENDING = "pending"
    OPEN = "open"
    AGGREGATING = "aggregating"
    COMPLETED = "completed"
    FAILED = "failed"


FINISHED = frozenset({RoundState.COMPLETED, RoundState.FAILED})


@dataclass(frozen=True)
class Update:
    """One participant's accepted (or candidate) update: arrays plus what the header said,
    and its provenance (`server.provenance`): the base model and module it claims, its
    signature and the certificate of the call it came on (b"" over plaintext)."""

    proplet_id: str
    base_model_uri: str
    num_samples: int
    metrics: Mapping[str, float]
    tensors: Tensors
    received_at: float = 0.0
    base_model_sha256: str = ""
    module_digest: str = ""
    signature: bytes = b""
    certificate: bytes = b""
    # Set once checked: the sha256 of its bytes (base model order), its L2 distance from the
    # base model (0 when not measured) and the factor clipping scales that difference by.
    sha256: str = ""
    distance: float = 0.0
    clip_scale: float = 1.0
    # A site coordinator's partial (`server.coordinator.site`): the site's participants whose
    # updates it combines (checked when it arrives, not kept with the update).
    contributors: tuple[str, ...] = ()
    # The wasmtime fuel its training consumed, as signed (0: not metered).
    fuel_consumed: int = 0


@dataclass(frozen=True)
class ParticipantFailure:
    """A participant that cannot report in this round, and why (its task's error)."""

    proplet_id: str
    reason: str


# An audit's outcomes (`server.coordinator.audit`): the re-run gave the same update, another
# one, or could not be made (the auditor's own failure: never taken for a match).
AUDIT_MATCH = "match"
AUDIT_MISMATCH = "mismatch"
AUDIT_ERROR = "error"


@dataclass(frozen=True)
class AuditOutcome:
    """One audited update: who sent it, what came of its re-execution, the sha256 of the
    update it sent (`claimed_sha256`) and of the one the auditor's re-run produced
    (`reexecuted_sha256`, "" when the re-run failed), what differed or failed (`detail`),
    and whether the update was left out of the aggregation (`rejected`)."""

    proplet_id: str
    outcome: str
    claimed_sha256: str
    reexecuted_sha256: str = ""
    detail: str = ""
    rejected: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "proplet_id": self.proplet_id,
            "outcome": self.outcome,
            "claimed_sha256": self.claimed_sha256,
            "reexecuted_sha256": self.reexecuted_sha256,
            "detail": self.detail,
            "rejected": self.rejected,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AuditOutcome:
        return cls(
            proplet_id=str(d["proplet_id"]),
            outcome=str(d["outcome"]),
            claimed_sha256=str(d.get("claimed_sha256", "")),
            reexecuted_sha256=str(d.get("reexecuted_sha256", "")),
            detail=str(d.get("detail", "")),
            rejected=bool(d.get("rejected", False)),
        )


@dataclass(frozen=True)
class Round:
    """A round's record. The manager sees it through the round's status
    (`wire.status_from_proto`), which carries everything but the tensor specs."""

    round_id: str
    experiment_id: str
    participants: tuple[str, ...]
    k_of_n: int
    timeout_s: float
    # The resolved base model ("fl/models/global_model_v{N}") and its tensor specs.
    model_ref: str
    specs: tuple[Spec, ...]
    hyperparams: Hyperparams
    task_wasm_image: str
    # model_ref as the configuration asked for it ("" = latest), for idempotent re-configure.
    requested_model_ref: str = ""
    state: RoundState = RoundState.PENDING
    configured_at: float = 0.0
    started_at: float = 0.0
    deadline: float = 0.0
    completed_at: float = 0.0
    # Proplets whose update was accepted, in arrival order.
    reported: tuple[str, ...] = ()
    metrics: Mapping[str, float] = field(default_factory=dict)
    new_model_version: int | None = None
    new_model_uri: str = ""
    failure_reason: str = ""
    closed_by: str = ""
    # 0 -> k_of_n: the fewest participants the round may go on with when others failed.
    min_k_of_n: int = 0
    # Participants that cannot report (never one that has reported), in the order reported.
    failed: tuple[ParticipantFailure, ...] = ()
    # The module every update must come from ("sha256:<hex>"; "" = any), and the base
    # model's sha256 (hex) every update's signature covers.
    module_digest: str = ""
    base_model_sha256: str = ""
    # The aggregation strategy ("" = fedavg) and its canonical parameters ("" = defaults).
    strategy_name: str = ""
    strategy_params_json: str = ""
    # The re-execution audit as configured, the seed its choice uses (the configured one, or
    # the one drawn at creation for 0: never shown outside the coordinator), and its outcomes
    # (recorded when the round closes, before aggregation).
    audit: AuditSpec = field(default_factory=AuditSpec)
    audit_seed: int = 0
    audits: tuple[AuditOutcome, ...] = ()

    @property
    def audit_flagged(self) -> bool:
        """An audited update did not match, or could not be audited."""
        return any(a.outcome != AUDIT_MATCH for a in self.audits)

    # Fuel receipts (`RoundSpec`): each run's fuel budget (0 = the proplets' own) and the
    # fuel plausibility rule's fraction (0 = off; `server.coordinator.fuel`).
    fuel_budget: int = 0
    min_fuel_ratio: float = 0.0

    @property
    def num_updates(self) -> int:
        return len(self.reported)

    @property
    def floor(self) -> int:
        """The fewest participants that must be able to report: min_k_of_n, else k_of_n."""
        return self.min_k_of_n or self.k_of_n

    @property
    def reachable(self) -> int:
        """Participants that have reported or still can (none of them failed)."""
        return len(self.participants) - len(self.failed)

    @property
    def quorum(self) -> int:
        """The updates that close the round: k_of_n, or fewer when failures leave fewer
        participants able to report (never below `floor`: the round fails first)."""
        return min(self.k_of_n, self.reachable)

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    @property
    def base_version(self) -> int:
        return parse_model_uri(self.model_ref)

    def config(self) -> RoundSpec:
        """The configuration this round was created from (with the coordinator's defaults)."""
        return RoundSpec(
            **{name: getattr(self, name) for name in _FROM_SPEC},
            model_ref=self.requested_model_ref,
        )


# A round's fields taken as they are from the RoundSpec it was created from; its model_ref is
# the resolved base model, the spec's the requested one (`requested_model_ref`).
_FROM_SPEC = tuple(f.name for f in fields(RoundSpec) if f.name != "model_ref")


def require_round(rnd: Round | None, round_id: str) -> Round:
    if rnd is None:
        raise NotFound(f"round_id: no round {round_id!r}")
    return rnd


def check_same_config(rnd: Round, cfg: RoundSpec) -> None:
    """A second ConfigureRound for an existing round_id is fine only when it asks for exactly
    the same round (a retry); otherwise ALREADY_EXISTS naming what differs."""
    old = rnd.config()
    diff = [
        name for name in RoundSpec.__dataclass_fields__ if getattr(old, name) != getattr(cfg, name)
    ]
    if diff:
        raise AlreadyExists(
            f"round_id: round {rnd.round_id!r} already exists with a different {', '.join(diff)}"
        )


def new_round(
    cfg: RoundSpec,
    model_ref: str,
    specs: Sequence[Spec],
    now: float,
    base_sha256: str = "",
    audit_seed: int = 0,
) -> Round:
    """A PENDING round for `cfg` whose base model resolved to `model_ref` with `specs` (and
    the sha256 `base_sha256`); its audit chooses with `audit_seed` (the configured seed when
    one is given)."""
    parse_model_uri(model_ref, "model_ref")
    return Round(
        **{name: getattr(cfg, name) for name in _FROM_SPEC},
        model_ref=model_ref,
        specs=tuple(specs),
        requested_model_ref=cfg.model_ref,
        configured_at=now,
        base_model_sha256=base_sha256,
        audit_seed=cfg.audit.seed or audit_seed,
    )


def start_round(rnd: Round, now: float) -> Round:
    """PENDING -> OPEN with its deadline counted from `now`. Starting a round that is already
    open (or closing) returns it unchanged; a finished round cannot start again."""
    if rnd.state is RoundState.PENDING:
        return replace(rnd, state=RoundState.OPEN, started_at=now, deadline=now + rnd.timeout_s)
    if rnd.finished:
        raise FailedPrecondition(
            f"round_id: round {rnd.round_id!r} is {rnd.state.value}; it cannot be started again"
        )
    return rnd


def admit(
    rnd: Round,
    proplet_id: str,
    *,
    participants: Collection[str] | None = None,
    reported: Collection[str] | None = None,
) -> bool:
    """Whether `proplet_id` may submit to `rnd` now; True means its update was already
    accepted (a duplicate: answered accepted, not counted again, the first one kept).

    A proplet that is not a participant gets FAILED_PRECONDITION (not PERMISSION_DENIED:
    there is no authentication, so this is about the round's membership, not the caller's
    rights). A participant that already reported gets the duplicate answer even after the
    round closed, since its update was counted; anyone else after the close is told the
    update is late and not counted.

    `participants` / `reported` may give the round's ones as sets (the same members, faster
    lookups in big rounds)."""
    if rnd.state is RoundState.PENDING:
        raise FailedPrecondition(
            f"round_id: round {rnd.round_id!r} is not started yet; update not counted"
        )
    if proplet_id not in (rnd.participants if participants is None else participants):
        raise FailedPrecondition(
            f"proplet_id: {proplet_id!r} is not a participant of round {rnd.round_id!r}"
        )
    if proplet_id in (rnd.reported if reported is None else reported):
        return True
    if rnd.state is not RoundState.OPEN:
        raise FailedPrecondition(
            f"round_id: round {rnd.round_id!r} is {rnd.state.value}; late update not counted"
        )
    return False


def check_claims(update: Signed) -> None:
    """The form of an update's claims, from its header alone: a module digest is required,
    and a signature is of a signature's size (INVALID_ARGUMENT naming the field)."""
    check_module_digest(update.module_digest, "header.module_digest", required=True)
    if len(update.signature) > MAX_SIGNATURE_BYTES:
        raise InvalidArgument(
            f"header.signature: {len(update.signature)} bytes; a signature is at most "
            f"{MAX_SIGNATURE_BYTES}"
        )


def check_provenance(rnd: Round, update: Signed) -> None:
    """The update's claims about where it comes from, before its bytes are looked at
    (`check_claims`); FAILED_PRECONDITION when the round pins another module, or a base model
    sha256 given is not the round's."""
    check_claims(update)
    if rnd.module_digest and update.module_digest != rnd.module_digest:
        raise FailedPrecondition(
            f"header.module_digest: the update comes from module {update.module_digest}, but "
            f"round {rnd.round_id!r} runs {rnd.module_digest}; update not counted"
        )
    if update.base_model_sha256 and update.base_model_sha256 != rnd.base_model_sha256:
        raise FailedPrecondition(
            f"header.base_model_sha256: {update.base_model_sha256[:80]!r}, but round "
            f"{rnd.round_id!r} trains {rnd.model_ref} with sha256 {rnd.base_model_sha256}"
        )


def validate_update(rnd: Round, update: Update) -> Update:
    """Check an update against the round's base model; returns it with its tensors in the base
    model's order. Reads only fields fixed at configuration, so it may run off the event loop
    (the finite check over big arrays is the expensive part)."""
    if update.base_model_uri != rnd.model_ref:
        raise FailedPrecondition(
            f"base_model_uri: {update.base_model_uri!r}, but round {rnd.round_id!r} trains "
            f"{rnd.model_ref!r}"
        )
    if update.num_samples <= 0:
        raise InvalidArgument(f"num_samples: {update.num_samples} must be > 0")
    for key, value in update.metrics.items():
        if not math.isfinite(value):
            raise InvalidArgument(f"metrics.{key}: {value} is not finite")
    tensors = check_tensors(rnd.specs, update.tensors, "tensors")
    return replace(update, tensors=tensors)


def check_tensors(specs: Sequence[Spec], tensors: Mapping[str, Array], field: str) -> Tensors:
    """`tensors` must be exactly the base model's tensors (names, shapes, dtypes) and finite;
    returns them in the base model's order. INVALID_ARGUMENT naming the tensor otherwise."""
    out: Tensors = {}
    for spec in specs:
        arr = tensors.get(spec.name)
        if arr is None:
            raise InvalidArgument(f"{field}.{spec.name}: missing (the base model has it)")
        if tuple(arr.shape) != spec.shape:
            raise InvalidArgument(
                f"{field}.{spec.name}: shape {list(arr.shape)}, base model has {list(spec.shape)}"
            )
        if arr.dtype != spec.dtype:
            raise InvalidArgument(
                f"{field}.{spec.name}: dtype {arr.dtype}, base model has {spec.dtype}"
            )
        out[spec.name] = arr
    extra = sorted(set(tensors) - set(out))
    if extra:
        raise InvalidArgument(f"{field}.{extra[0]}: not in the base model (it has {list(out)})")
    check_finite(out, field)
    return out


def record_update(rnd: Round, proplet_id: str) -> Round:
    """Count an admitted, validated update; the one that reaches the quorum (k_of_n, or every
    participant that did not fail) closes the round (AGGREGATING). A participant reported as
    failed that reports after all (its task was started again) counts like any other."""
    failed = tuple(f for f in rnd.failed if f.proplet_id != proplet_id)
    rnd = replace(rnd, reported=(*rnd.reported, proplet_id), failed=failed)
    return _close_at_quorum(rnd)


def _close_at_quorum(rnd: Round) -> Round:
    if rnd.state is not RoundState.OPEN or rnd.num_updates < rnd.quorum:
        return rnd
    closed_by = CLOSED_BY_K_OF_N if rnd.num_updates >= rnd.k_of_n else CLOSED_BY_MIN_K_OF_N
    return replace(rnd, state=RoundState.AGGREGATING, closed_by=closed_by)


def participant_failed(rnd: Round, proplet_id: str, reason: str, now: float) -> Round:
    """Record that `proplet_id` cannot report. Returns `rnd` itself when nothing changes (a
    repeat, a participant that already reported, a round closing or completed); FAILED at
    once when fewer than the round's floor can still report; AGGREGATING when every
    participant that still can has reported and that is enough. A round that already failed
    still lists the failure (its status names every participant that failed)."""
    if proplet_id not in rnd.participants:
        raise FailedPrecondition(
            f"proplet_id: {proplet_id!r} is not a participant of round {rnd.round_id!r}"
        )
    if (
        rnd.state not in (RoundState.PENDING, RoundState.OPEN, RoundState.FAILED)
        or proplet_id in rnd.reported
        or any(f.proplet_id == proplet_id for f in rnd.failed)
    ):
        return rnd
    failure = ParticipantFailure(proplet_id, reason[:MAX_REASON_CHARS] or "no reason given")
    rnd = replace(rnd, failed=(*rnd.failed, failure))
    if rnd.state is RoundState.FAILED:
        return rnd
    if rnd.reachable < rnd.floor:
        return fail(rnd, _unreachable_reason(rnd), now)
    return _close_at_quorum(rnd)


def _unreachable_reason(rnd: Round) -> str:
    named = "; ".join(f"{f.proplet_id}: {f.reason[:200]}" for f in rnd.failed[:_NAMED_FAILURES])
    more = len(rnd.failed) - _NAMED_FAILURES
    if more > 0:
        named += f"; and {more} more"
    need = f"min_k_of_n {rnd.min_k_of_n}" if rnd.min_k_of_n else f"k_of_n {rnd.k_of_n}"
    return (
        f"{need} can no longer be reached: {len(rnd.failed)} of {len(rnd.participants)} "
        f"participants failed, {rnd.reachable} can still report ({named})"
    )


def is_due(rnd: Round, now: float) -> bool:
    """An open round whose deadline has passed."""
    return rnd.state is RoundState.OPEN and now >= rnd.deadline


def close_at_deadline(rnd: Round, now: float) -> Round:
    """At the deadline: aggregate what arrived, or fail when nothing did."""
    if rnd.num_updates == 0:
        return replace(
            fail(rnd, f"deadline passed with 0 of {rnd.k_of_n} updates", now),
            closed_by=CLOSED_BY_DEADLINE,
        )
    return replace(rnd, state=RoundState.AGGREGATING, closed_by=CLOSED_BY_DEADLINE)


def complete(rnd: Round, version: int, uri: str, metrics: Mapping[str, float], now: float) -> Round:
    return replace(
        rnd,
        state=RoundState.COMPLETED,
        new_model_version=version,
        new_model_uri=uri,
        metrics=dict(metrics),
        completed_at=now,
    )


def fail(rnd: Round, reason: str, now: float) -> Round:
    return replace(rnd, state=RoundState.FAILED, failure_reason=reason, completed_at=now)


def weighted_metrics(updates: Sequence[Update]) -> dict[str, float]:
    """Per metric, the mean over the updates reporting it, weighted by num_samples."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for u in updates:
        for key, value in u.metrics.items():
            sums[key] = sums.get(key, 0.0) + value * u.num_samples
            weights[key] = weights.get(key, 0.0) + u.num_samples
    return {key: sums[key] / weights[key] for key in sorted(sums) if weights[key] > 0}
