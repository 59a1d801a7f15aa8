"""The Coordinator contract on the wire: round specs, hyperparameters and round statuses
between `propeller.v1` messages and the domain types (`server.round_spec`, `rounds.Round`).

Both ends translate here, the coordinator's servicer and its clients (the manager's
`CoordinatorClient` and servicer), so they read the contract the same way. The manager's
StartExperimentRequest carries the same round fields as ConfigureRoundRequest (manager.proto
builds on coordinator.proto), so one reader serves both.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from propeller.v1 import coordinator_pb2, manager_pb2, tensor_pb2
from server.coordinator.rounds import AuditOutcome, ParticipantFailure, Round, RoundState
from server.errors import grpc_errors
from server.grpc_server import Context
from server.ids import check_id
from server.round_spec import AuditSpec, Hyperparams, RoundSpec
from server.wire import message_from, value_from

STATES: dict[RoundState, coordinator_pb2.RoundState] = {
    RoundState.PENDING: coordinator_pb2.ROUND_STATE_PENDING,
    RoundState.OPEN: coordinator_pb2.ROUND_STATE_OPEN,
    RoundState.AGGREGATING: coordinator_pb2.ROUND_STATE_AGGREGATING,
    RoundState.COMPLETED: coordinator_pb2.ROUND_STATE_COMPLETED,
    RoundState.FAILED: coordinator_pb2.ROUND_STATE_FAILED,
}
STATE_OF: dict[int, RoundState] = {int(v): k for k, v in STATES.items()}

SpecMessage = coordinator_pb2.ConfigureRoundRequest | manager_pb2.StartExperimentRequest

# The round fields a request built from a spec carries as they are (`spec_fields`): not the
# strategy, which its callers set themselves. Otherwise a field keeps its name and value
# between the messages and the domain types (`server.wire`); the functions below write out
# the ones that change form (repeated fields, hyperparameters, state...).
_SPEC_SCALARS = (
    "round_id",
    "experiment_id",
    "k_of_n",
    "timeout_s",
    "model_ref",
    "task_wasm_image",
    "min_k_of_n",
    "module_digest",
    "fuel_budget",
    "min_fuel_ratio",
)


def hyperparams_to_proto(hp: Hyperparams) -> coordinator_pb2.Hyperparams:
    return coordinator_pb2.Hyperparams(
        epochs=hp.epochs, lr=hp.lr, batch_size=hp.batch_size, extra_json=hp.extra_json
    )


def hyperparams_from_proto(msg: coordinator_pb2.Hyperparams) -> Hyperparams:
    """As received: `round_spec.validate` checks extra_json and makes it canonical."""
    return Hyperparams(
        epochs=msg.epochs, lr=msg.lr, batch_size=msg.batch_size, extra_json=msg.extra_json
    )


def audit_to_proto(audit: AuditSpec) -> tensor_pb2.AuditConfig | None:
    """None for no audit (the field left unset, as a request without one has it)."""
    if audit == AuditSpec():
        return None
    return tensor_pb2.AuditConfig(fraction=audit.fraction, seed=audit.seed, policy=audit.policy)


def audit_from_proto(msg: tensor_pb2.AuditConfig) -> AuditSpec:
    """As received: `round_spec.validate` checks it."""
    return AuditSpec(fraction=msg.fraction, seed=msg.seed, policy=msg.policy)


def audit_record_to_proto(outcome: AuditOutcome) -> tensor_pb2.AuditRecord:
    return message_from(tensor_pb2.AuditRecord, outcome)


def audit_record_from_proto(msg: tensor_pb2.AuditRecord) -> AuditOutcome:
    return value_from(AuditOutcome, msg)


def spec_from_proto(msg: SpecMessage) -> RoundSpec:
    """The request's round as asked (zeros kept: `validate` judges and fills them)."""
    return value_from(
        RoundSpec,
        msg,
        participants=tuple(msg.participants),
        hyperparams=hyperparams_from_proto(msg.hyperparams),
        audit=audit_from_proto(msg.audit),
    )


def spec_fields(spec: RoundSpec) -> dict[str, Any]:
    """The keyword arguments that build either request message from `spec`."""
    return {
        **{name: getattr(spec, name) for name in _SPEC_SCALARS},
        "participants": spec.participants,
        "hyperparams": hyperparams_to_proto(spec.hyperparams),
        "audit": audit_to_proto(spec.audit),
    }


def status_to_proto(rnd: Round, *, brief: bool = False) -> coordinator_pb2.RoundStatus:
    """The round's status; `brief` leaves out its per-participant lists (participants,
    reported, failed, audits), O(participants) each."""
    return message_from(
        coordinator_pb2.RoundStatus,
        rnd,
        participants=() if brief else rnd.participants,
        hyperparams=hyperparams_to_proto(rnd.hyperparams),
        state=STATES[rnd.state],
        completed=rnd.state is RoundState.COMPLETED,
        num_updates=rnd.num_updates,
        reported=() if brief else rnd.reported,
        metrics=dict(rnd.metrics),
        new_model_version=rnd.new_model_version or 0,
        failed=()
        if brief
        else [
            coordinator_pb2.ParticipantFailure(proplet_id=f.proplet_id, reason=f.reason)
            for f in rnd.failed
        ],
        audit=audit_to_proto(rnd.audit),
        audits=() if brief else [audit_record_to_proto(a) for a in rnd.audits],
    )


def status_from_proto(msg: coordinator_pb2.RoundStatus) -> Round:
    """The round as its status shows it: everything `status_to_proto` sends, so the two
    round-trip; the base model's tensor specs are not part of a status (left empty)."""
    return value_from(
        Round,
        msg,
        participants=tuple(msg.participants),
        hyperparams=hyperparams_from_proto(msg.hyperparams),
        specs=(),
        state=STATE_OF[msg.state],
        reported=tuple(msg.reported),
        metrics=dict(msg.metrics),
        new_model_version=msg.new_model_version or None,
        failed=tuple(ParticipantFailure(f.proplet_id, f.reason) for f in msg.failed),
        audit=audit_from_proto(msg.audit),
        audits=tuple(audit_record_from_proto(a) for a in msg.audits),
    )


async def answer_round(
    context: Context, method: str, round_id: str, action: Callable[[str], Awaitable[Round]]
) -> coordinator_pb2.RoundStatus:
    """The answer of an RPC that names one round and returns its status (the coordinator's
    StartRound and GetRoundStatus, the manager's GetRoundStatus): `round_id` checked, then
    `action(round_id)`'s round, or the error's status."""
    async with grpc_errors(context, method):
        check_id(round_id, "round_id")
        return status_to_proto(await action(round_id))
