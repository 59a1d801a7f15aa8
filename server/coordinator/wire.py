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

from propeller.v1 import coordinator_pb2, manager_pb2
from server.coordinator.rounds import ParticipantFailure, Round, RoundState
from server.errors import grpc_errors
from server.grpc_server import Context
from server.ids import check_id
from server.round_spec import Hyperparams, RoundSpec

STATES: dict[RoundState, coordinator_pb2.RoundState] = {
    RoundState.PENDING: coordinator_pb2.ROUND_STATE_PENDING,
    RoundState.OPEN: coordinator_pb2.ROUND_STATE_OPEN,
    RoundState.AGGREGATING: coordinator_pb2.ROUND_STATE_AGGREGATING,
    RoundState.COMPLETED: coordinator_pb2.ROUND_STATE_COMPLETED,
    RoundState.FAILED: coordinator_pb2.ROUND_STATE_FAILED,
}
STATE_OF: dict[int, RoundState] = {int(v): k for k, v in STATES.items()}

SpecMessage = coordinator_pb2.ConfigureRoundRequest | manager_pb2.StartExperimentRequest

# Fields that keep their name and value between the messages and the domain types; the
# functions below add the ones that change form (repeated fields, hyperparameters, state...).
_SPEC_SCALARS = (
    "round_id",
    "experiment_id",
    "k_of_n",
    "timeout_s",
    "model_ref",
    "task_wasm_image",
    "min_k_of_n",
    "module_digest",
)
# ConfigureRoundRequest's strategy (a StartExperimentRequest may carry it too): read into the
# spec, but not among the fields that build a request from a spec (`spec_fields`), whose
# callers set a request's strategy themselves.
_STRATEGY_SCALARS = ("strategy_name", "strategy_params_json")
_STATUS_SCALARS = (
    *_SPEC_SCALARS,
    *_STRATEGY_SCALARS,
    "started_at",
    "deadline",
    "completed_at",
    "new_model_uri",
    "failure_reason",
    "closed_by",
    "base_model_sha256",
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


def spec_from_proto(msg: SpecMessage) -> RoundSpec:
    """The request's round as asked (zeros kept: `validate` judges and fills them)."""
    present = msg.DESCRIPTOR.fields_by_name
    return RoundSpec(
        **{name: getattr(msg, name) for name in _SPEC_SCALARS},
        **{name: getattr(msg, name) for name in _STRATEGY_SCALARS if name in present},
        participants=tuple(msg.participants),
        hyperparams=hyperparams_from_proto(msg.hyperparams),
    )


def spec_fields(spec: RoundSpec) -> dict[str, Any]:
    """The keyword arguments that build either request message from `spec`."""
    return {
        **{name: getattr(spec, name) for name in _SPEC_SCALARS},
        "participants": spec.participants,
        "hyperparams": hyperparams_to_proto(spec.hyperparams),
    }


def status_to_proto(rnd: Round, *, brief: bool = False) -> coordinator_pb2.RoundStatus:
    """The round's status; `brief` leaves out its per-participant lists (participants,
    reported, failed), O(participants) each."""
    return coordinator_pb2.RoundStatus(
        **{name: getattr(rnd, name) for name in _STATUS_SCALARS},
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
    )


def status_from_proto(msg: coordinator_pb2.RoundStatus) -> Round:
    """The round as its status shows it: everything `status_to_proto` sends, so the two
    round-trip; the base model's tensor specs are not part of a status (left empty)."""
    return Round(
        **{name: getattr(msg, name) for name in _STATUS_SCALARS},
        participants=tuple(msg.participants),
        hyperparams=hyperparams_from_proto(msg.hyperparams),
        specs=(),
        state=STATE_OF[msg.state],
        reported=tuple(msg.reported),
        metrics=dict(msg.metrics),
        new_model_version=msg.new_model_version or None,
        failed=tuple(ParticipantFailure(f.proplet_id, f.reason) for f in msg.failed),
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
