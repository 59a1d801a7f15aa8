"""Experiments (the seed's `POST /fl/experiments`): a round (`server.round_spec`, checked with
`experiment=True`) fanned out as one task per participant, and what that fan-out derives from
it: whether enough participants are alive (`quorum`), the round the coordinator is asked for
(`round_of`), the per-participant task name and environment.

An experiment is recorded before its fan-out (`FanOut.RECORDED`: the request, who is scheduled
under which task id, who is skipped and why) and marked `FanOut.DONE` once every task start
is published, so a manager that dies in between finishes the fan-out from the record.

An experiment of many rounds (`server.manager.plan`) keeps the same record for its current
round (`current`: the round's spec; `scheduled`, `skipped` and `fan_out`: its fan-out) and the
history of every round so far (`rounds`, the last one being the current one). Round r + 1 is
recorded (one write: round r's outcome and round r + 1's plan) before anything of it leaves
the manager, so a restart neither starts a round twice nor skips one.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace

from server.config import Endpoints
from server.coordinator.rounds import FINISHED, RoundState
from server.errors import AlreadyExists, FailedPrecondition
from server.manager.plan import EndReason, ExperimentPlan
from server.manager.proplets import Skipped
from server.manager.records import InMemoryStore, RecordStore
from server.manager.tasks import Task, Tasks
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


def eval_task_name(round_id: str, proplet_id: str) -> str:
    return f"fl-eval-{round_id}-{proplet_id}"


# An evaluation task's environment: a round task's, plus FL_TASK=evaluate (the proplet then
# evaluates MODEL_URI on its held-out split and reports {"num_samples": n, "metrics": {...}}
# as the task's results, submitting no update).
FL_TASK = "FL_TASK"
EVALUATE = "evaluate"


def round_task_env(
    *,
    round_id: str,
    model_uri: str,
    hyperparams: Hyperparams,
    proplet_id: str,
    endpoints: Endpoints,
    deadline: float = 0.0,
    module_digest: str = "",
    fuel_budget: int = 0,
) -> dict[str, str]:
    """The environment of a federated task: the seed's ROUND_ID, MODEL_URI and HYPERPARAMS
    plus the gRPC targets (host:port) the proplet fetches from and reports to, and, when the
    round has one, ROUND_DEADLINE: the coordinator's deadline in unix seconds, until which the
    proplet retries services it cannot reach; and MODULE_DIGEST, the module the round pinned
    (the proplet runs no other); and FUEL_BUDGET, the round's fuel budget for one run (the
    proplet's own limit, if lower, still applies)."""
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
    if module_digest:
        env["MODULE_DIGEST"] = module_digest
    if fuel_budget:
        env["FUEL_BUDGET"] = str(fuel_budget)
    return env


def participant_task(
    tasks: Tasks,
    endpoints: Endpoints,
    experiment: Experiment,
    spec: RoundSpec,
    s: ScheduledParticipant,
    *,
    round_id: str,
    model_uri: str,
    deadline: float,
    module_digest: str,
    evaluate: bool = False,
) -> Task:
    """A participant's round or evaluation task: the experiment's module with the spec's
    hyperparameters, created under the id the experiment recorded for it unless an earlier
    fan-out did."""
    task = tasks.store.get(s.task_id)
    if task is not None:
        return task
    env = round_task_env(
        round_id=round_id,
        model_uri=model_uri,
        hyperparams=spec.hyperparams,
        proplet_id=s.proplet_id,
        endpoints=endpoints,
        deadline=deadline,
        module_digest=module_digest,
        fuel_budget=spec.fuel_budget,
    )
    return tasks.create(
        s.task_name,
        task_id=s.task_id,
        image_url=experiment.image or spec.task_wasm_image,
        env={**env, FL_TASK: EVALUATE} if evaluate else env,
        proplet_id=s.proplet_id,
    )


@dataclass(frozen=True)
class ScheduledParticipant:
    proplet_id: str
    task_id: str
    task_name: str


class FanOut(enum.Enum):
    """How far an experiment's fan-out got."""

    RECORDED = "recorded"  # recorded; its round and tasks may not exist yet
    DONE = "done"  # every task start published (or its failure recorded)


class ExperimentState(enum.Enum):
    RUNNING = "running"
    COMPLETED = "completed"  # by its round count, a target or a plateau
    STOPPED = "stopped"  # by the operator
    FAILED = "failed"


@dataclass(frozen=True)
class RoundRecord:
    """One round of an experiment as the manager keeps it: its plan, then its outcome as the
    coordinator reported it (`state` None while it runs)."""

    index: int
    round_id: str
    model_ref: str
    sampled: tuple[str, ...]
    started_at: float = 0.0
    state: RoundState | None = None
    new_model_version: int = 0
    new_model_uri: str = ""
    reported: tuple[str, ...] = ()
    closed_by: str = ""
    failure_reason: str = ""
    train_metrics: Mapping[str, float] = field(default_factory=dict)
    eval_metrics: Mapping[str, float] = field(default_factory=dict)
    eval_num_samples: int = 0
    evaluated: tuple[str, ...] = ()
    eval_missing: tuple[Skipped, ...] = ()
    finished_at: float = 0.0
    # Its evaluation, when the plan has one after this round: the tasks (recorded before
    # they start), until when results are awaited, and whether it is over.
    eval_tasks: tuple[ScheduledParticipant, ...] = ()
    eval_deadline: float = 0.0
    eval_done: bool = False

    @property
    def finished(self) -> bool:
        return self.state in FINISHED


@dataclass(frozen=True)
class End:
    """How an experiment ended: after (or, failed, in) round `round`."""

    reason: EndReason
    round: int
    round_id: str
    detail: str
    ended_at: float


@dataclass(frozen=True)
class Experiment:
    experiment_id: str
    config: RoundSpec
    # Until the fan-out is DONE: the participants alive at the start, each with the id its
    # task gets; then those whose task start was published. Of the current round.
    scheduled: Sequence[ScheduledParticipant]
    skipped: Sequence[Skipped]
    created_at: float
    fan_out: FanOut = FanOut.DONE
    # The module pinned at the start (`server.manager.modules`): the image reference the
    # tasks run and the module's digest ("" in records older than pinning).
    image: str = ""
    module_digest: str = ""
    # Many rounds (the default: the seed's one round), the current round's spec (None: the
    # first round, `config`), every round so far and where the experiment is.
    plan: ExperimentPlan = field(default_factory=ExperimentPlan)
    current: RoundSpec | None = None
    rounds: tuple[RoundRecord, ...] = ()
    state: ExperimentState = ExperimentState.RUNNING
    end: End | None = None

    @property
    def key(self) -> str:
        return self.experiment_id

    @property
    def round_spec(self) -> RoundSpec:
        """The current round's configuration."""
        return self.current or self.config

    @property
    def round_index(self) -> int:
        return len(self.rounds) or 1

    @property
    def current_round(self) -> RoundRecord:
        """The round in flight (or the last one, once ended); records older than many rounds
        have none stored: their one round."""
        if self.rounds:
            return self.rounds[-1]
        spec = self.round_spec
        return RoundRecord(
            1, spec.round_id, spec.model_ref, tuple(s.proplet_id for s in self.scheduled)
        )

    @property
    def running(self) -> bool:
        return self.state is ExperimentState.RUNNING


def round_of(experiment: Experiment) -> RoundSpec:
    """The round the coordinator is asked for (while the experiment is RECORDED): the scheduled
    participants only, with the k_of_n they can reach (`quorum`: FAILED_PRECONDITION if that is
    less than the request allows), running the pinned module."""
    config = experiment.round_spec
    ids = tuple(s.proplet_id for s in experiment.scheduled)
    return replace(
        config,
        participants=ids,
        k_of_n=quorum(config, len(ids), experiment.skipped),
        task_wasm_image=experiment.image or config.task_wasm_image,
        module_digest=experiment.module_digest or config.module_digest,
    )


# Where experiment records live: in memory, or manager.sqlite (`sqlite_store`); `list` is
# in creation order.
ExperimentStore = RecordStore[Experiment]
InMemoryExperimentStore = InMemoryStore[Experiment]


class EventKind(enum.Enum):
    SNAPSHOT = "snapshot"
    ROUND_STARTED = "round_started"
    ROUND_FINISHED = "round_finished"
    ROUND_EVALUATED = "round_evaluated"
    ENDED = "ended"


@dataclass(frozen=True)
class ExperimentEvent:
    kind: EventKind
    experiment: Experiment
    round: RoundRecord | None
    timestamp: float


class ExperimentEvents:
    """WatchExperiment's hub: every watcher of an experiment gets each event emitted for it
    after it subscribed. Events are few (a handful per round), so a watcher's queue is not
    bounded by count; a watcher that goes away unsubscribes."""

    def __init__(self) -> None:
        self._watchers: dict[str, set[asyncio.Queue[ExperimentEvent]]] = {}

    def emit(self, event: ExperimentEvent) -> None:
        for queue in self._watchers.get(event.experiment.experiment_id, ()):
            queue.put_nowait(event)

    async def watch(self, snapshot: ExperimentEvent) -> AsyncIterator[ExperimentEvent]:
        """`snapshot` (the experiment as it is), then its events until the one that ends it
        (at once when the snapshot shows it ended)."""
        eid = snapshot.experiment.experiment_id
        queue: asyncio.Queue[ExperimentEvent] = asyncio.Queue()
        self._watchers.setdefault(eid, set()).add(queue)
        try:
            yield snapshot
            if not snapshot.experiment.running:
                return
            while True:
                event = await queue.get()
                yield event
                if event.kind is EventKind.ENDED:
                    return
        finally:
            watchers = self._watchers.get(eid, set())
            watchers.discard(queue)
            if not watchers:
                self._watchers.pop(eid, None)


def same_request(experiment: Experiment, config: RoundSpec, plan: ExperimentPlan) -> None:
    """ALREADY_EXISTS naming the fields in which `config` and `plan` differ from what
    `experiment` was started with."""
    if experiment.config == config and experiment.plan == plan:
        return
    differ = [
        f.name
        for f in fields(config)
        if getattr(config, f.name) != getattr(experiment.config, f.name)
    ]
    differ += [
        f.name for f in fields(plan) if getattr(plan, f.name) != getattr(experiment.plan, f.name)
    ]
    raise AlreadyExists(
        f"experiment_id: {experiment.experiment_id!r} already exists with a different "
        f"{', '.join(differ)}"
    )
