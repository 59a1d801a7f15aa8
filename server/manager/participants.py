"""Who takes part in an experiment's round: the record of a new experiment (`first_round`)
and of its round `index` (`plan_round`): the participants alive now, each with its task's id
chosen before anything leaves the manager, and the others with the reason they are left out.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import replace

from server.errors import FailedPrecondition
from server.manager.experiments import (
    Experiment,
    FanOut,
    RoundRecord,
    ScheduledParticipant,
    round_of,
    round_task_name,
)
from server.manager.modules import PinnedModule
from server.manager.plan import ExperimentPlan, round_k, sample
from server.manager.proplets import Proplets, Skipped
from server.round_spec import RoundSpec

log = logging.getLogger(__name__)


def first_round(
    config: RoundSpec, plan: ExperimentPlan, module: PinnedModule, now: float
) -> Experiment:
    """The experiment to record before its first round is planned (`plan_round`), with the
    module it pins."""
    return Experiment(
        experiment_id=config.experiment_id,
        config=config,
        scheduled=[],
        skipped=[],
        created_at=now,
        fan_out=FanOut.RECORDED,
        image=module.image,
        module_digest=module.digest,
        plan=plan,
    )


def plan_round(
    proplets: Proplets, experiment: Experiment, index: int, spec: RoundSpec
) -> Experiment:
    """`experiment` with round `index` (configured as `spec`, but for its participants)
    recorded as its current round, not fanned out yet: the participants alive now, each
    with its task's id, and the others with the reason they are left out. With fixed
    participants (the seed's rule): those of `spec` that are alive, k_of_n as requested
    (FAILED_PRECONDITION if too few are alive for it); sampled (`plan.sampled`): a sample
    of the alive candidates, k_of_n of the sample."""
    plan = experiment.plan
    if plan.sampled:
        candidates = spec.participants or tuple(p.id for p in proplets.all())
        alive, _ = proplets.split(candidates)
        wanted = plan.sampling.min_available or 1
        if len(alive) < wanted:
            raise FailedPrecondition(
                f"sampling.min_available: round {index} needs {wanted} alive "
                f"candidate(s), {len(alive)} of {len(candidates)} are alive"
            )
        chosen = sample(plan.sampling, alive, index)
        k = round_k(spec.k_of_n, plan.k_fraction, len(chosen))
        spec = replace(
            spec,
            participants=tuple(chosen),
            k_of_n=k,
            min_k_of_n=min(spec.min_k_of_n, k),
        )
        skipped: list[Skipped] = []
    else:
        chosen, skipped = proplets.split(spec.participants)
        for s in skipped:
            log.warning(
                "[Manager.StartExperiment] round_id=%s proplet_id=%s skipped: %s",
                spec.round_id,
                s.proplet_id,
                s.reason,
            )
        if not chosen:
            reasons = "; ".join(f"{s.proplet_id}: {s.reason}" for s in skipped)
            raise FailedPrecondition(
                f"participants: none of the {len(spec.participants)} participants is "
                f"alive: {reasons}"
            )
    planned = replace(
        experiment,
        current=spec,
        scheduled=[
            ScheduledParticipant(pid, str(uuid.uuid4()), round_task_name(spec.round_id, pid))
            for pid in chosen
        ],
        skipped=skipped,
        fan_out=FanOut.RECORDED,
        rounds=(
            *experiment.rounds,
            RoundRecord(index, spec.round_id, spec.model_ref, tuple(chosen)),
        ),
    )
    round_of(planned)  # FAILED_PRECONDITION if too few are alive for its k_of_n
    return planned
