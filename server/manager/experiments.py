"""Experiments (the seed's `POST /fl/experiments`): validating the request and deriving what a
round needs — the coordinator's k_of_n, the per-participant task name and environment.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from server.config import Endpoints
from server.errors import InvalidArgument
from server.manager.proplets import Skipped
from server.models import parse_model_uri

DEFAULT_EPOCHS = 1
DEFAULT_LR = 0.01
DEFAULT_BATCH_SIZE = 1


@dataclass(frozen=True)
class Hyperparams:
    """0 means "the default": epochs 1, lr 0.01, batch_size 1 (per-example SGD)."""

    epochs: int = 0
    lr: float = 0.0
    batch_size: int = 0

    def filled(self) -> Hyperparams:
        return Hyperparams(
            epochs=self.epochs or DEFAULT_EPOCHS,
            lr=self.lr or DEFAULT_LR,
            batch_size=self.batch_size or DEFAULT_BATCH_SIZE,
        )

    def to_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "lr": self.lr, "batch_size": self.batch_size}

    def to_json(self) -> str:
        """The HYPERPARAMS environment value the wasm module reads."""
        return json.dumps(self.to_dict())


@dataclass(frozen=True)
class ExperimentConfig:
    experiment_id: str
    round_id: str
    model_ref: str
    participants: list[str]
    hyperparams: Hyperparams = field(default_factory=Hyperparams)
    k_of_n: int = 0  # 0 -> every scheduled participant
    timeout_s: float = 0.0  # 0 -> the coordinator's default
    task_wasm_image: str = ""


def validate(config: ExperimentConfig) -> ExperimentConfig:
    """Check a request; INVALID_ARGUMENT naming the first bad field. Returns the config with
    experiment_id derived when empty ("exp-{round_id}") and hyperparameter defaults filled."""
    if not config.round_id:
        raise InvalidArgument("round_id: must not be empty")
    if any(c.isspace() for c in config.round_id):
        raise InvalidArgument(f"round_id: {config.round_id!r} must not contain whitespace")
    if not config.participants:
        raise InvalidArgument("participants: must not be empty")
    seen: set[str] = set()
    for i, pid in enumerate(config.participants):
        if not pid:
            raise InvalidArgument(f"participants: entry {i} is empty")
        if pid in seen:
            raise InvalidArgument(f"participants: {pid!r} is listed more than once")
        seen.add(pid)
    if not config.model_ref:
        raise InvalidArgument("model_ref: must not be empty")
    parse_model_uri(config.model_ref, "model_ref")
    if not config.task_wasm_image:
        raise InvalidArgument("task_wasm_image: must not be empty")
    n = len(config.participants)
    if config.k_of_n < 0 or config.k_of_n > n:
        raise InvalidArgument(
            f"k_of_n: {config.k_of_n} must be between 0 (all) and the {n} participants"
        )
    if not math.isfinite(config.timeout_s) or config.timeout_s < 0:
        raise InvalidArgument(f"timeout_s: {config.timeout_s} must be >= 0 (0 = default)")
    hp = config.hyperparams
    if hp.epochs < 0:
        raise InvalidArgument(f"hyperparams.epochs: {hp.epochs} must be >= 0")
    if not math.isfinite(hp.lr) or hp.lr < 0:
        raise InvalidArgument(f"hyperparams.lr: {hp.lr} must be >= 0")
    if hp.batch_size < 0:
        raise InvalidArgument(f"hyperparams.batch_size: {hp.batch_size} must be >= 0")
    return replace(
        config,
        experiment_id=config.experiment_id or f"exp-{config.round_id}",
        participants=list(config.participants),
        hyperparams=hp.filled(),
    )


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
    config: ExperimentConfig
    scheduled: Sequence[ScheduledParticipant]
    skipped: Sequence[Skipped]
    created_at: float


class ExperimentStore(Protocol):
    """Where experiment records live: in memory, or manager.sqlite (`sqlite_store`). `list`
    is in creation order."""

    def get(self, experiment_id: str) -> Experiment | None: ...

    def put(self, experiment: Experiment) -> None: ...

    def list(self) -> list[Experiment]: ...


class InMemoryExperimentStore:
    def __init__(self) -> None:
        self._experiments: dict[str, Experiment] = {}

    def get(self, experiment_id: str) -> Experiment | None:
        return self._experiments.get(experiment_id)

    def put(self, experiment: Experiment) -> None:
        self._experiments[experiment.experiment_id] = experiment

    def list(self) -> list[Experiment]:
        return list(self._experiments.values())
