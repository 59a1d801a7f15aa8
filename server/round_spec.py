"""What a round is asked to be: its hyperparameters, its configuration, their checks and their
defaults, in one place for the manager (StartExperiment), the coordinator (ConfigureRound)
and the CLI.

Zeros mean "the default" on the wire, so a spec holds the values as requested; `validate`
checks them (INVALID_ARGUMENT naming the field and saying what is wrong) and fills the
hyperparameter defaults, `with_defaults` applies the coordinator's own (k_of_n 0 -> every
participant, timeout_s 0 -> its default deadline). No protobufs here: the gRPC edges translate
(`server/coordinator/wire.py`).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

from server.aggregator.strategies import choose_strategy
from server.errors import InvalidArgument
from server.ids import (
    MAX_ID_LENGTH,
    MAX_PARTICIPANTS,
    check_id,
    check_ids,
    check_text,
    shown,
    valid_id,
)
from server.models import parse_model_uri
from server.provenance import check_module_digest

# Hyperparameters a request leaves at 0: one local epoch of per-example SGD (the original's
# algorithm) with learning rate 0.01.
DEFAULT_EPOCHS = 1
DEFAULT_LR = 0.01
DEFAULT_BATCH_SIZE = 1
# A round's deadline, in seconds from its start, when its configuration says 0 (the
# coordinator's `default_timeout_s`, PROPELLER_ROUND_DEFAULT_TIMEOUT_S).
DEFAULT_TIMEOUT_S = 60.0
# The keys Hyperparams holds as fields; the free part (`extra_json`) must not repeat them.
CORE_HYPERPARAMS = ("epochs", "lr", "batch_size")
# Keys of HYPERPARAMS the proplet itself sets: "task" from the task's FL_TASK (train or
# evaluate, wasm-client/README.md), never from a round's configuration.
RESERVED_HYPERPARAMS = ("task",)
# The free part of the hyperparameters: a JSON object of at most this many bytes (UTF-8), its
# values nested at most this deep. Enough for any strategy's or trainer's knobs; bounded because
# it is stored with every round and passed in every task's environment.
MAX_EXTRA_JSON_BYTES = 4096
MAX_EXTRA_JSON_DEPTH = 8
# What the re-execution audit (docs/verifiability.md) does with an update whose re-run does
# not match: drop it before aggregation ("reject", the default), or aggregate it and mark the
# round ("flag").
AUDIT_REJECT = "reject"
AUDIT_FLAG = "flag"
AUDIT_POLICIES = (AUDIT_REJECT, AUDIT_FLAG)
MAX_AUDIT_SEED = 2**64 - 1
# A round's fuel budget fits a signed 64-bit column (proplet.runner.MAX_FUEL).
MAX_FUEL_BUDGET = 2**63 - 1


@dataclass(frozen=True)
class Hyperparams:
    """As requested: 0 means the default (epochs 1, lr 0.01, batch_size 1). `extra_json` holds
    the further keys of the HYPERPARAMS object the module receives (e.g. FedProx's "mu"), as a
    JSON object text: "" = none; `validate` checks it and makes it canonical (sorted keys, no
    spaces), so equal requests compare equal."""

    epochs: int = 0
    lr: float = 0.0
    batch_size: int = 0
    extra_json: str = ""

    def filled(self) -> Hyperparams:
        return replace(
            self,
            epochs=self.epochs or DEFAULT_EPOCHS,
            lr=self.lr or DEFAULT_LR,
            batch_size=self.batch_size or DEFAULT_BATCH_SIZE,
        )

    def extra(self) -> dict[str, Any]:
        """The further keys (checked by `validate`; {} when there are none)."""
        if not self.extra_json:
            return {}
        parsed = json.loads(self.extra_json)
        assert isinstance(parsed, dict)
        return parsed

    def to_dict(self) -> dict[str, Any]:
        """The merged object: epochs, lr and batch_size, then the further keys. Without
        further keys exactly the seed's three."""
        return {
            "epochs": self.epochs,
            "lr": self.lr,
            "batch_size": self.batch_size,
            **self.extra(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Hyperparams:
        extra = {k: v for k, v in d.items() if k not in CORE_HYPERPARAMS}
        return cls(
            epochs=int(d["epochs"]),
            lr=float(d["lr"]),
            batch_size=int(d["batch_size"]),
            extra_json=_canonical(extra) if extra else "",
        )

    def to_json(self) -> str:
        """The HYPERPARAMS environment value the wasm module reads (also how the stores keep
        them)."""
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> Hyperparams:
        """The inverse of `to_json` (a stored record, a task's HYPERPARAMS)."""
        parsed = json.loads(text)
        assert isinstance(parsed, dict)
        return cls.from_dict(parsed)


@dataclass(frozen=True)
class AuditSpec:
    """The re-execution audit of a round's updates (docs/verifiability.md): the share of its
    updates re-run by the coordinator's auditor (0 = none, the default; 1 = every one), the
    seed of the choice (0: the coordinator draws one when it creates the round, kept with
    the round and never shown), and the policy on a mismatch ("reject" or "flag"; "" =
    "reject")."""

    fraction: float = 0.0
    seed: int = 0
    policy: str = ""

    @property
    def enabled(self) -> bool:
        return self.fraction > 0

    @property
    def rejects(self) -> bool:
        """A mismatched update is left out of the aggregation (policy "reject", or "")."""
        return self.policy != AUDIT_FLAG

    def to_dict(self) -> dict[str, Any]:
        return {"fraction": self.fraction, "seed": self.seed, "policy": self.policy}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AuditSpec:
        return cls(
            fraction=float(d.get("fraction", 0.0)),
            seed=int(d.get("seed", 0)),
            policy=str(d.get("policy", "")),
        )


def check_audit(audit: AuditSpec) -> AuditSpec:
    """`audit` with its policy in lower case ("" stays "": "reject"), or INVALID_ARGUMENT
    naming the field:
    audit.fraction a number in [0, 1], audit.seed in [0, 2**64), audit.policy "reject" or
    "flag"."""
    if not (math.isfinite(audit.fraction) and 0.0 <= audit.fraction <= 1.0):
        raise InvalidArgument(
            f"audit.fraction: {audit.fraction} must be between 0 (no audit) and 1 (every update)"
        )
    if not 0 <= audit.seed <= MAX_AUDIT_SEED:
        raise InvalidArgument(f"audit.seed: {audit.seed} must be between 0 and 2**64 - 1")
    policy = audit.policy.strip().lower()
    if policy and policy not in AUDIT_POLICIES:
        raise InvalidArgument(
            f"audit.policy: {shown(audit.policy)} is not one of {', '.join(AUDIT_POLICIES)}"
        )
    return replace(audit, policy=policy)


def _canonical(value: dict[str, Any]) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _reject_constant(name: str) -> Any:
    # json.loads would otherwise turn NaN, Infinity and -Infinity into floats.
    raise ValueError(f"{name} is not a finite number")


def _check_extra_value(value: Any, field: str, depth: int) -> None:
    if depth > MAX_EXTRA_JSON_DEPTH:
        raise InvalidArgument(f"{field}: nested deeper than {MAX_EXTRA_JSON_DEPTH} levels")
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, int | float):
        try:
            finite = math.isfinite(float(value))
        except OverflowError:
            finite = False
        if not finite:
            raise InvalidArgument(f"{field}: {shown(str(value))} is not a finite number")
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_extra_value(item, f"{field}[{i}]", depth + 1)
        return
    assert isinstance(value, dict)
    for key, item in value.items():
        _check_extra_value(item, f"{field}.{key}", depth + 1)


def check_extra_json(text: str, field: str = "hyperparams.extra_json") -> str:
    """The free hyperparameters `text` in canonical form ("" stays ""), or INVALID_ARGUMENT
    naming `field` (and `field.<key>` for a bad value): a JSON object of at most
    `MAX_EXTRA_JSON_BYTES` bytes, no key repeating epochs, lr or batch_size nor a reserved
    one ("task"), every number
    finite, nested at most `MAX_EXTRA_JSON_DEPTH` deep."""
    if not text.strip():
        return ""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_EXTRA_JSON_BYTES:
        raise InvalidArgument(f"{field}: {size} bytes, at most {MAX_EXTRA_JSON_BYTES}")
    try:
        parsed = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise InvalidArgument(f"{field}: not valid JSON ({shown(str(exc))})") from None
    if not isinstance(parsed, dict):
        raise InvalidArgument(f"{field}: must be a JSON object, got {type(parsed).__name__}")
    for key, value in parsed.items():
        name = f"{field}.{key}"
        if key in CORE_HYPERPARAMS:
            raise InvalidArgument(
                f"{name}: repeats the hyperparameter {key}; set hyperparams.{key} instead"
            )
        if key in RESERVED_HYPERPARAMS:
            raise InvalidArgument(
                f"{name}: reserved: the proplet sets it from the task (FL_TASK), not the round"
            )
        if not key.strip():
            raise InvalidArgument(f"{field}: keys must not be empty")
        _check_extra_value(value, name, 1)
    return _canonical(parsed)


@dataclass(frozen=True)
class RoundSpec:
    """A round's configuration. `model_ref` "" asks the coordinator for the latest stored
    version; `experiment_id` "" on an experiment becomes "exp-{round_id}"."""

    round_id: str
    participants: tuple[str, ...]
    experiment_id: str = ""
    k_of_n: int = 0  # 0 -> every participant
    timeout_s: float = 0.0  # 0 -> the coordinator's default
    model_ref: str = ""
    hyperparams: Hyperparams = field(default_factory=Hyperparams)
    task_wasm_image: str = ""
    # The fewest participants the round may run with when others cannot take part (not alive
    # at the start, or their task failed); 0 -> k_of_n: none of k_of_n may be missing.
    min_k_of_n: int = 0
    # The module the round runs ("sha256:<hex>" of its wasm bytes; "" = not pinned). The
    # manager resolves task_wasm_image to it at StartExperiment (a request may name the
    # digest it expects).
    module_digest: str = ""
    # How the aggregator combines the round's updates (docs/strategies.md): "" = fedavg; the
    # parameters as a JSON object, made canonical with every default filled in by `validate`
    # ("" = the defaults).
    strategy_name: str = ""
    strategy_params_json: str = ""
    # The re-execution audit of the round's updates (none by default).
    audit: AuditSpec = field(default_factory=AuditSpec)
    # Fuel receipts (docs/verifiability.md): the most wasmtime fuel one participant's run may
    # consume (0 = the proplet's own limit), and the fuel plausibility rule: an update whose
    # fuel per sample is below `min_fuel_ratio` times the experiment's reference is refused
    # (0 = off; `server.coordinator.fuel`).
    fuel_budget: int = 0
    min_fuel_ratio: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "round_id": self.round_id,
            "participants": list(self.participants),
            "experiment_id": self.experiment_id,
            "k_of_n": self.k_of_n,
            "timeout_s": self.timeout_s,
            "model_ref": self.model_ref,
            "hyperparams": self.hyperparams.to_dict(),
            "task_wasm_image": self.task_wasm_image,
            "min_k_of_n": self.min_k_of_n,
            "module_digest": self.module_digest,
            "strategy_name": self.strategy_name,
            "strategy_params_json": self.strategy_params_json,
            "audit": self.audit.to_dict(),
            "fuel_budget": self.fuel_budget,
            "min_fuel_ratio": self.min_fuel_ratio,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RoundSpec:
        return cls(
            round_id=str(d["round_id"]),
            participants=tuple(str(p) for p in d["participants"]),
            experiment_id=str(d["experiment_id"]),
            k_of_n=int(d["k_of_n"]),
            timeout_s=float(d["timeout_s"]),
            model_ref=str(d["model_ref"]),
            hyperparams=Hyperparams.from_dict(d["hyperparams"]),
            task_wasm_image=str(d["task_wasm_image"]),
            min_k_of_n=int(d.get("min_k_of_n", 0)),  # absent in records of older versions
            module_digest=str(d.get("module_digest", "")),
            strategy_name=str(d.get("strategy_name", "")),
            strategy_params_json=str(d.get("strategy_params_json", "")),
            audit=AuditSpec.from_dict(d.get("audit") or {}),
            fuel_budget=int(d.get("fuel_budget", 0)),
            min_fuel_ratio=float(d.get("min_fuel_ratio", 0.0)),
        )


def _non_negative(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise InvalidArgument(f"{name}: {value} must be finite")
    if value < 0:
        raise InvalidArgument(f"{name}: {value} must be >= 0 (0 = the default)")


def validate(spec: RoundSpec, *, experiment: bool = False) -> RoundSpec:
    """Check `spec`, raising INVALID_ARGUMENT naming the first bad field; returns it with the
    hyperparameter defaults filled.

    The round id, the experiment id (when given) and every participant follow the id rule
    (`server.ids`: at most 128 characters A-Z a-z 0-9 . _ -), at most `MAX_PARTICIPANTS` of
    them; the image reference is a bounded text.

    `experiment=True` is the manager's StartExperiment, which runs the round as one task per
    participant and records it as an experiment: the tasks need the image to run and the model
    named. The experiment id defaults to "exp-{round_id}". The coordinator alone
    (`experiment=False`) takes an empty image and model_ref ("" = the latest version) and
    leaves the experiment id as given."""
    check_id(spec.round_id, "round_id")
    experiment_id = spec.experiment_id or (f"exp-{spec.round_id}" if experiment else "")
    if experiment_id and not spec.experiment_id and not valid_id(experiment_id):
        raise InvalidArgument(
            f"experiment_id: empty, and its default 'exp-' + round_id would be longer than "
            f"{MAX_ID_LENGTH} characters; give one"
        )
    check_id(spec.experiment_id, "experiment_id", optional=True)
    if not spec.participants:
        raise InvalidArgument("participants: must not be empty")
    check_ids(spec.participants, "participants", MAX_PARTICIPANTS)
    dups = sorted(p for p, n in Counter(spec.participants).items() if n > 1)
    if dups:
        raise InvalidArgument(f"participants: duplicate proplet ids {dups}")
    n = len(spec.participants)
    if spec.k_of_n < 0 or spec.k_of_n > n:
        raise InvalidArgument(
            f"k_of_n: {spec.k_of_n} must be between 0 (all) and {n} (the participants)"
        )
    k = spec.k_of_n or n
    if spec.min_k_of_n < 0 or spec.min_k_of_n > k:
        raise InvalidArgument(
            f"min_k_of_n: {spec.min_k_of_n} must be between 0 (= k_of_n) and {k} (k_of_n)"
        )
    _non_negative("timeout_s", spec.timeout_s)
    if experiment and not spec.model_ref:
        raise InvalidArgument("model_ref: must not be empty")
    if spec.model_ref:
        parse_model_uri(spec.model_ref, "model_ref")
    hp = spec.hyperparams
    _non_negative("hyperparams.epochs", hp.epochs)
    _non_negative("hyperparams.lr", hp.lr)
    _non_negative("hyperparams.batch_size", hp.batch_size)
    hp = replace(hp, extra_json=check_extra_json(hp.extra_json))
    if experiment and not spec.task_wasm_image:
        raise InvalidArgument("task_wasm_image: must not be empty")
    check_text(spec.task_wasm_image, "task_wasm_image")
    check_module_digest(spec.module_digest, "module_digest")
    if not 0 <= spec.fuel_budget <= MAX_FUEL_BUDGET:
        raise InvalidArgument(
            f"fuel_budget: {spec.fuel_budget} must be between 0 (the proplet's own limit) and "
            f"{MAX_FUEL_BUDGET}"
        )
    if not (math.isfinite(spec.min_fuel_ratio) and 0 <= spec.min_fuel_ratio <= 1):
        raise InvalidArgument(
            f"min_fuel_ratio: {spec.min_fuel_ratio} must be between 0 (off) and 1 (a fraction "
            "of the reference fuel per sample)"
        )
    # The same registry the aggregator runs the strategy from: a round it would refuse is
    # refused here, before any participant trains for it.
    strategy = choose_strategy(spec.strategy_name, spec.strategy_params_json)
    if k < strategy.min_updates:
        raise InvalidArgument(
            f"k_of_n: {k}, but {strategy.name} with {strategy.params.as_json()} needs at least "
            f"{strategy.min_updates} updates"
        )
    params = strategy.params.as_json() if spec.strategy_params_json.strip() else ""
    return replace(
        spec,
        experiment_id=experiment_id,
        hyperparams=hp.filled(),
        strategy_params_json=params,
        audit=check_audit(spec.audit),
    )


def with_defaults(spec: RoundSpec, default_timeout_s: float = DEFAULT_TIMEOUT_S) -> RoundSpec:
    """The round the coordinator runs for a validated `spec`: k_of_n 0 -> every participant,
    timeout_s 0 -> `default_timeout_s`."""
    return replace(
        spec,
        k_of_n=spec.k_of_n or len(spec.participants),
        timeout_s=spec.timeout_s or default_timeout_s,
    )
