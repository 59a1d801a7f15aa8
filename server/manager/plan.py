"""What makes an experiment many rounds (`ExperimentPlan`), how a request's first round is
checked against it (`check_experiment`), and the pure rules the manager's experiment loop
applies between two rounds: the id of round r (`round_id_for`), who takes part
in it (`sample`, reproducible), its k_of_n (`round_k`), and whether the experiment ends after
it (`verdict`: max rounds, a target on a metric, a plateau).

No I/O and no protobufs: the servicer translates (`server/manager/service.py`), the
orchestrator (`server/manager/orchestrator.py`) applies these between rounds.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from server.errors import InvalidArgument
from server.ids import MAX_ENTRIES, MAX_ID_LENGTH, check_name, check_text, valid_id, valid_name
from server.round_spec import RoundSpec, validate

# The most rounds one experiment may ask for: every round is a record kept with the
# experiment (its history), so the history stays bounded.
MAX_ROUNDS = 10_000


class MetricSource(enum.Enum):
    EVALUATION = "evaluation"
    TRAINING = "training"


class MetricGoal(enum.Enum):
    MINIMIZE = "minimize"
    MAXIMIZE = "maximize"


class EndReason(enum.Enum):
    MAX_ROUNDS = "max_rounds"
    TARGET_REACHED = "target_reached"
    PLATEAU = "plateau"
    STOPPED = "stopped"
    FAILED = "failed"


def _fraction(name: str, value: float) -> None:
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise InvalidArgument(f"{name}: {value} must be between 0 and 1 (0 = the default)")


def _count(name: str, value: int, limit: int) -> None:
    if not 0 <= value <= limit:
        raise InvalidArgument(f"{name}: {value} must be between 0 (the default) and {limit}")


@dataclass(frozen=True)
class Sampling:
    """Which alive candidates a round runs on: `fraction` of them (rounded up; 0 = all unless
    `count`), at least `count` (capped at the alive ones); the round waits for
    `min_available` (0 -> 1) alive candidates."""

    fraction: float = 0.0
    count: int = 0
    min_available: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        _fraction("sampling.fraction", self.fraction)
        _count("sampling.count", self.count, 1 << 30)
        _count("sampling.min_available", self.min_available, 1 << 30)
        if not 0 <= self.seed < 1 << 64:
            raise InvalidArgument(f"sampling.seed: {self.seed} must fit in 64 bits unsigned")

    def size(self, available: int) -> int:
        """How many of `available` alive candidates a round samples."""
        if not self.fraction and not self.count:
            return available
        by_fraction = math.ceil(self.fraction * available) if self.fraction else 0
        return min(available, max(by_fraction, self.count))


@dataclass(frozen=True)
class EvaluationPlan:
    every_rounds: int = 0  # 0: never
    fraction: float = 0.0  # 0 -> all alive candidates
    timeout_s: float = 0.0  # 0 -> the round's timeout

    def __post_init__(self) -> None:
        _count("evaluation.every_rounds", self.every_rounds, MAX_ROUNDS)
        _fraction("evaluation.fraction", self.fraction)
        if not (math.isfinite(self.timeout_s) and self.timeout_s >= 0):
            raise InvalidArgument(f"evaluation.timeout_s: {self.timeout_s} must be >= 0")

    def due(self, index: int) -> bool:
        return self.every_rounds > 0 and index % self.every_rounds == 0


@dataclass(frozen=True)
class StoppingRule:
    """Ends the experiment early on `metric` of the finished rounds (from their evaluation or
    their training): when it reaches `target` (None: no target), or when `patience_rounds`
    rounds that have it bring no improvement by more than `min_delta` over the best before
    them (0: no plateau rule)."""

    metric: str = ""
    source: MetricSource = MetricSource.EVALUATION
    goal: MetricGoal | None = None
    target: float | None = None
    patience_rounds: int = 0
    min_delta: float = 0.0

    def __post_init__(self) -> None:
        check_name(self.metric, "stopping.metric", optional=True)
        _count("stopping.patience_rounds", self.patience_rounds, MAX_ROUNDS)
        if not (math.isfinite(self.min_delta) and self.min_delta >= 0):
            raise InvalidArgument(f"stopping.min_delta: {self.min_delta} must be >= 0")
        if self.target is not None and not math.isfinite(self.target):
            raise InvalidArgument(f"stopping.target: {self.target} must be finite")
        if not self.metric:
            if self.target is not None or self.patience_rounds:
                raise InvalidArgument("stopping.metric: a target or a patience needs a metric")
            return
        if self.goal is None:
            raise InvalidArgument(
                f"stopping.goal: say whether {self.metric!r} is to be minimized or maximized"
            )
        if self.target is None and not self.patience_rounds:
            raise InvalidArgument(
                f"stopping.metric: {self.metric!r} given without a target or patience_rounds"
            )

    def better(self, value: float, than: float) -> bool:
        """`value` improves on `than` by more than min_delta."""
        if self.goal is MetricGoal.MAXIMIZE:
            return value > than + self.min_delta
        return value < than - self.min_delta

    def reached(self, value: float) -> bool:
        if self.target is None:
            return False
        if self.goal is MetricGoal.MAXIMIZE:
            return value >= self.target
        return value <= self.target


@dataclass(frozen=True)
class ExperimentPlan:
    """An experiment's rounds beyond the seed's one: the defaults are the seed's one round on
    the request's participants."""

    rounds: int = 1
    strategy_name: str = ""
    strategy_params_json: str = ""
    all_alive: bool = False
    sampling: Sampling = field(default_factory=Sampling)
    k_fraction: float = 0.0
    evaluation: EvaluationPlan = field(default_factory=EvaluationPlan)
    stopping: StoppingRule = field(default_factory=StoppingRule)

    def __post_init__(self) -> None:
        if not 1 <= self.rounds <= MAX_ROUNDS:
            raise InvalidArgument(f"rounds: {self.rounds} must be between 0 (= 1) and {MAX_ROUNDS}")
        check_name(self.strategy_name, "strategy_name", optional=True)
        check_text(self.strategy_params_json, "strategy_params_json")
        if self.strategy_params_json:
            try:
                params = json.loads(self.strategy_params_json)
            except ValueError as exc:
                raise InvalidArgument(f"strategy_params_json: not JSON: {exc}") from None
            if not isinstance(params, dict):
                raise InvalidArgument("strategy_params_json: must be a JSON object")
        _fraction("k_fraction", self.k_fraction)

    @property
    def sampled(self) -> bool:
        """Rounds sample their participants (otherwise: the request's, the seed's rule)."""
        return self.all_alive or self.sampling != Sampling() or self.k_fraction > 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stopping"]["source"] = self.stopping.source.value
        d["stopping"]["goal"] = self.stopping.goal.value if self.stopping.goal else None
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ExperimentPlan:
        stop = dict(d["stopping"])
        stop["source"] = MetricSource(stop["source"])
        stop["goal"] = MetricGoal(stop["goal"]) if stop["goal"] else None
        return cls(
            **{k: v for k, v in d.items() if k not in ("sampling", "evaluation", "stopping")},
            sampling=Sampling(**d["sampling"]),
            evaluation=EvaluationPlan(**d["evaluation"]),
            stopping=StoppingRule(**stop),
        )


def round_id_for(experiment_id: str, index: int) -> str:
    """Round `index` (1-based) of `experiment_id`: "{experiment_id}-r{index}", within the id
    rule (`server.ids`, 64 characters): a longer one keeps the start of the experiment id and
    a digest of all of it, so two experiments never share a round id."""
    suffix = f"-r{index}"
    plain = experiment_id + suffix
    if len(plain) <= MAX_ID_LENGTH:
        return plain
    digest = hashlib.sha256(experiment_id.encode()).hexdigest()[:12]
    keep = MAX_ID_LENGTH - len(suffix) - len(digest) - 1
    rid = f"{experiment_id[:keep]}-{digest}{suffix}"
    assert valid_id(rid), rid
    return rid


def check_experiment(request: RoundSpec, plan: ExperimentPlan) -> RoundSpec:
    """The request's round checked (`validate`, INVALID_ARGUMENT naming the field) with what
    many rounds add: all_alive instead of participants; the first round's id derived from the
    experiment id when the request gives none."""
    spec = request
    if not spec.round_id:
        if not spec.experiment_id:
            raise InvalidArgument("round_id: give a round_id or an experiment_id")
        spec = replace(spec, round_id=round_id_for(spec.experiment_id, 1))
    if plan.rounds > 1:
        eid = spec.experiment_id or f"exp-{spec.round_id}"
        later = {round_id_for(eid, i): i for i in range(2, plan.rounds + 1)}
        if spec.round_id in later:
            raise InvalidArgument(
                f"round_id: {spec.round_id!r} is the id of round {later[spec.round_id]} of "
                f"experiment {eid!r}; give another or none"
            )
    if not plan.all_alive:
        return validate(spec, experiment=True)
    if spec.participants:
        raise InvalidArgument("participants: must be empty with all_alive (every alive proplet)")
    # Checked as if with as many participants as k_of_n asks for: all_alive has them at the
    # round's start or the round waits for them (sampling.min_available).
    stand_in = tuple(f"p{i}" for i in range(max(spec.k_of_n, spec.min_k_of_n, 1)))
    return replace(validate(replace(spec, participants=stand_in), experiment=True), participants=())


def sample(sampling: Sampling, alive: Sequence[str], index: int) -> list[str]:
    """The proplets round `index` runs on, in id order: `sampling.size` of the alive
    candidates, chosen by a generator seeded from (seed, index, the sorted alive ids) only."""
    candidates = sorted(set(alive))
    size = sampling.size(len(candidates))
    if size >= len(candidates):
        return candidates
    material = json.dumps([sampling.seed, index, candidates]).encode()
    rng = random.Random(int.from_bytes(hashlib.sha256(material).digest()[:8], "big"))
    return sorted(rng.sample(candidates, size))


def round_k(k_of_n: int, k_fraction: float, sampled: int) -> int:
    """k_of_n of a round of `sampled` participants: the fraction of them (rounded up), or
    k_of_n capped at them (0: all of them)."""
    if k_fraction:
        return max(1, math.ceil(k_fraction * sampled))
    return min(k_of_n, sampled) if k_of_n else sampled


@dataclass(frozen=True)
class Verdict:
    reason: EndReason
    detail: str


def verdict(
    plan: ExperimentPlan, index: int, metrics: Sequence[Mapping[str, float]]
) -> Verdict | None:
    """Whether the experiment ends after round `index`, given the stopping rule's metric
    source of every finished round so far (`metrics[i]` for round i + 1); None: go on."""
    rule = plan.stopping
    if rule.metric:
        values = [m[rule.metric] for m in metrics if rule.metric in m]
        latest = metrics[-1].get(rule.metric) if metrics else None
        if latest is not None and rule.reached(latest):
            return Verdict(
                EndReason.TARGET_REACHED,
                f"{rule.source.value} {rule.metric} {latest:g} reached the target {rule.target:g}",
            )
        if rule.patience_rounds and len(values) > rule.patience_rounds:
            before = values[: -rule.patience_rounds]
            best = max(before) if rule.goal is MetricGoal.MAXIMIZE else min(before)
            recent = values[-rule.patience_rounds :]
            if not any(rule.better(v, best) for v in recent):
                return Verdict(
                    EndReason.PLATEAU,
                    f"{rule.source.value} {rule.metric}: no improvement on {best:g} by more "
                    f"than {rule.min_delta:g} in {rule.patience_rounds} round(s)",
                )
    if index >= plan.rounds:
        return Verdict(EndReason.MAX_ROUNDS, f"{plan.rounds} round(s) run")
    return None


@dataclass(frozen=True)
class Evaluation:
    """One proplet's evaluation result: {"num_samples": n, "metrics": {name: value}}."""

    num_samples: int
    metrics: Mapping[str, float]

    @classmethod
    def from_json(cls, text: str) -> Evaluation:
        """The task's results parsed; ValueError saying what is wrong otherwise."""
        try:
            d = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"not JSON: {exc}") from None
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        n = d.get("num_samples")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"num_samples: {n!r} is not a count")
        metrics = d.get("metrics")
        if not isinstance(metrics, dict) or len(metrics) > MAX_ENTRIES:
            raise ValueError(f"metrics: not an object of at most {MAX_ENTRIES} entries")
        checked: dict[str, float] = {}
        for name, value in metrics.items():
            if not valid_name(name):
                raise ValueError(f"metrics: {name!r} is not a metric name")
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"metrics[{name}]: {value!r} is not a number")
            if not math.isfinite(value):
                raise ValueError(f"metrics[{name}]: {value!r} is not finite")
            checked[name] = float(value)
        return cls(n, checked)


def weighted_metrics(evaluations: Sequence[Evaluation]) -> dict[str, float]:
    """Each metric's mean over the evaluations that report it, weighted by num_samples (a
    metric whose evaluations hold no sample at all is left out)."""
    sums: dict[str, float] = {}
    weights: dict[str, int] = {}
    for e in evaluations:
        for name, value in e.metrics.items():
            sums[name] = sums.get(name, 0.0) + e.num_samples * value
            weights[name] = weights.get(name, 0) + e.num_samples
    return {name: sums[name] / weights[name] for name in sums if weights[name] > 0}
