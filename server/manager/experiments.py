"""Experiments (the seed's `POST /fl/experiments`): a round (`server.round_spec`, checked with
`experiment=True`) fanned out as one task per participant, and what that fan-out derives from
it: the coordinator's k_of_n, the per-participant task name and environment.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from server.config import Endpoints
from server.manager.proplets import Skipped
from server.manager.records import InMemoryStore, RecordStore
from server.round_spec import Hyperparams, RoundSpec


def effective_k_of_n(requested: int, scheduled: int) -> int:
    """The k_of_n the coordinator gets: the request (0 = all), capped at the participants
    that actually received a task, so a round never waits for updates nobody will send."""
    return min(requested or scheduled, scheduled)


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


@dataclass(frozen=True)
class Experiment:
    experiment_id: str
    config: RoundSpec
    scheduled: Sequence[ScheduledParticipant]
    skipped: Sequence[Skipped]
    created_at: float

    @property
    def key(self) -> str:
        return self.experiment_id


# Where experiment records live: in memory, or manager.sqlite (`sqlite_store`); `list` is
# in creation order.
ExperimentStore = RecordStore[Experiment]
InMemoryExperimentStore = InMemoryStore[Experiment]
