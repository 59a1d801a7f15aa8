"""Experiments (the seed's `POST /fl/experiments`): a round (`server.round_spec`, checked with
`experiment=True`) fanned out as one task per participant, and what that fan-out derives from
it: whether enough participants are alive (`quorum`), the round the coordinator is asked for
(`round_of`), the per-participant task name and environment.

An experiment is recorded before its fan-out (`FanOut.RECORDED`: the request, who is scheduled
under which task id, who is skipped and why) and marked `FanOut.DONE` once every task start
is published, so a manager that dies in between finishes the fan-out from the record.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, replace

from server.config import Endpoints
from server.errors import FailedPrecondition
from server.manager.proplets import Skipped
from server.manager.records import InMemoryStore, RecordStore
from server.round_spec import Hyperparams, RoundSpec


def quorum(config: RoundSpec, alive: int, skipped: Sequence[Skipped]) -> int:
    """The k_of_n a round of `config` runs with when `alive` of its participants are alive
    (`skipped` are the others): the request's (0 = all), or, when fewer are alive, the alive
    ones if the request allows that many (`min_k_of_n`). Otherwise FAILED_PRECONDITION naming
    the participants that are missing: k_of_n is never lowered silently."""
    n = len(config.participants)
    wanted = config.k_of_n or n
    if alive >= wanted:
        return wanted
    if config.min_k_of_n and alive >= config.min_k_of_n:
        return alive
    allowance = (
        f"min_k_of_n is {config.min_k_of_n}"
        if config.min_k_of_n
        else "set min_k_of_n to run with fewer"
    )
    missing = "; ".join(f"{s.proplet_id}: {s.reason}" for s in skipped)
    raise FailedPrecondition(
        f"participants: k_of_n {wanted} needs {wanted} live participants, {alive} of {n} are "
        f"alive ({allowance}); missing: {missing}"
    )


def round_task_name(round_id: str, proplet_id: str) -> str:
    return f"fl-round-{round_id}-{proplet_id}"


def round_task_env(
    *,
    round_id: str,
    model_uri: str,
    hyperparams: Hyperparams,
    proplet_id: str,
    endpoints: Endpoints,
    deadline: float = 0.0,
) -> dict[str, str]:
    """The environment of a federated task: the seed's ROUND_ID, MODEL_URI and HYPERPARAMS
    plus the gRPC targets (host:port) the proplet fetches from and reports to, and, when the
    round has one, ROUND_DEADLINE: the coordinator's deadline in unix seconds, until which the
    proplet retries services it cannot reach."""
    env = {
        "ROUND_ID": round_id,
        "MODEL_URI": model_uri,
        "HYPERPARAMS": hyperparams.filled().to_json(),
        "PROPLET_ID": proplet_id,
        "COORDINATOR_URL": endpoints.coordinator,
        "MODEL_REGISTRY_URL": endpoints.registry,
        "DATA_STORE_URL": endpoints.datastore,
    }
    if deadline > 0:
        env["ROUND_DEADLINE"] = repr(float(deadline))
    return env


@dataclass(frozen=True)
class ScheduledParticipant:
    proplet_id: str
    task_id: str
    task_name: str


class FanOut(enum.Enum):
    """How far an experiment's fan-out got."""

    RECORDED = "recorded"  # recorded; its round and tasks may not exist yet
    DONE = "done"  # every task start published (or its failure recorded)


@dataclass(frozen=True)
class Experiment:
    experiment_id: str
    config: RoundSpec
    # Until the fan-out is DONE: the participants alive at the start, each with the id its
    # task gets; then those whose task start was published.
    scheduled: Sequence[ScheduledParticipant]
    skipped: Sequence[Skipped]
    created_at: float
    fan_out: FanOut = FanOut.DONE

    @property
    def key(self) -> str:
        return self.experiment_id


def round_of(experiment: Experiment) -> RoundSpec:
    """The round the coordinator is asked for (while the experiment is RECORDED): the scheduled
    participants only, with the k_of_n they can reach (`quorum`: FAILED_PRECONDITION if that is
    less than the request allows)."""
    config = experiment.config
    ids = tuple(s.proplet_id for s in experiment.scheduled)
    return replace(config, participants=ids, k_of_n=quorum(config, len(ids), experiment.skipped))


# Where experiment records live: in memory, or manager.sqlite (`sqlite_store`); `list` is
# in creation order.
ExperimentStore = RecordStore[Experiment]
InMemoryExperimentStore = InMemoryStore[Experiment]
