"""The Coordinator contract on the wire: round specs, hyperparameters and round statuses
between `propeller.v1` messages and the domain types (`server.round_spec`, `rounds.Round`).

Both ends translate here, the coordinator's servicer and its clients (the manager's
`CoordinatorClient` and servicer), so they read the contract the same way. The manager's
StartExperimentRequest carries the same round fields as ConfigureRoundRequest (manager.proto
builds on coordinator.proto), so one reader serves both.
"""

from __future__ import annotations

from typing import Any

from propeller.v1 import coordinator_pb2, manager_pb2
from server.coordinator.rounds import Round, RoundState
from server.round_spec import Hyperparams, RoundSpec

STATES: dict[RoundState, coordinator_pb2.RoundState] = {
    RoundState.PENDING: coordinator_pb2.ROUND_STATE_PENDING,
    RoundState.OPEN: coordinator_pb2.ROUND_STATE_OPEN,
    RoundState.AGGREGATING: coordinator_pb2.ROUND_STATE_AGGREGATING,
    RoundState.COMPLETED: coordinator_pb2.ROUND_STATE_COMPLETED,
    RoundState.FAILED: coordinator_pb2.ROUND_STATE_FAILED,
}
_STATE_OF: dict[int, RoundState] = {int(v): k for k, v in STATES.items()}

SpecMessage = coordinator_pb2.ConfigureRoundRequest | manager_pb2.StartExperimentRequest


def hyperparams_to_proto(hp: Hyperparams) -> coordinator_pb2.Hyperparams:
    return coordinator_pb2.Hyperparams(epochs=hp.epochs, lr=hp.lr, batch_size=hp.batch_size)


def hyperparams_from_proto(msg: coordinator_pb2.Hyperparams) -> Hyperparams:
    return Hyperparams(epochs=msg.epochs, lr=msg.lr, batch_size=msg.batch_size)


def spec_from_proto(msg: SpecMessage) -> RoundSpec:
    """The request's round as asked (zeros kept: `validate` judges and fills them)."""
    return RoundSpec(
        round_id=msg.round_id,
        participants=tuple(msg.participants),
        experiment_id=msg.experiment_id,
        k_of_n=msg.k_of_n,
        timeout_s=msg.timeout_s,
        model_ref=msg.model_ref,
        hyperparams=hyperparams_from_proto(msg.hyperparams),
        task_wasm_image=msg.task_wasm_image,
    )


def spec_fields(spec: RoundSpec) -> dict[str, Any]:
    """The keyword arguments that build either request message from `spec`."""
    return {
        "round_id": spec.round_id,
        "participants": spec.participants,
        "experiment_id": spec.experiment_id,
        "k_of_n": spec.k_of_n,
        "timeout_s": spec.timeout_s,
        "model_ref": spec.model_ref,
        "hyperparams": hyperparams_to_proto(spec.hyperparams),
        "task_wasm_image": spec.task_wasm_image,
    }


def status_to_proto(rnd: Round) -> coordinator_pb2.RoundStatus:
    return coordinator_pb2.RoundStatus(
        round_id=rnd.round_id,
        experiment_id=rnd.experiment_id,
        state=STATES[rnd.state],
        completed=rnd.state is RoundState.COMPLETED,
        num_updates=rnd.num_updates,
        k_of_n=rnd.k_of_n,
        participants=rnd.participants,
        reported=rnd.reported,
        model_ref=rnd.model_ref,
        timeout_s=rnd.timeout_s,
        hyperparams=hyperparams_to_proto(rnd.hyperparams),
        task_wasm_image=rnd.task_wasm_image,
        started_at=rnd.started_at,
        deadline=rnd.deadline,
        completed_at=rnd.completed_at,
        new_model_version=rnd.new_model_version or 0,
        new_model_uri=rnd.new_model_uri,
        failure_reason=rnd.failure_reason,
        closed_by=rnd.closed_by,
        metrics=dict(rnd.metrics),
    )


def status_from_proto(msg: coordinator_pb2.RoundStatus) -> Round:
    """The round as its status shows it: everything `status_to_proto` sends, so the two
    round-trip; the base model's tensor specs are not part of a status (left empty)."""
    return Round(
        round_id=msg.round_id,
        experiment_id=msg.experiment_id,
        participants=tuple(msg.participants),
        k_of_n=msg.k_of_n,
        timeout_s=msg.timeout_s,
        model_ref=msg.model_ref,
        specs=(),
        hyperparams=hyperparams_from_proto(msg.hyperparams),
        task_wasm_image=msg.task_wasm_image,
        state=_STATE_OF[msg.state],
        started_at=msg.started_at,
        deadline=msg.deadline,
        completed_at=msg.completed_at,
        reported=tuple(msg.reported),
        metrics=dict(msg.metrics),
        new_model_version=msg.new_model_version or None,
        new_model_uri=msg.new_model_uri,
        failure_reason=msg.failure_reason,
        closed_by=msg.closed_by,
    )
