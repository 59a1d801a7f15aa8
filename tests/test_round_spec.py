"""The round spec: one set of checks and defaults for the manager's experiments and the
coordinator's rounds."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from typing import Any

import pytest

from server.errors import InvalidArgument
from server.ids import MAX_ID_LENGTH
from server.round_spec import AuditSpec, Hyperparams, RoundSpec, validate, with_defaults

ROUND = RoundSpec(round_id="r1", participants=("a", "b", "c"))
EXPERIMENT = RoundSpec(
    experiment_id="exp-1",
    round_id="r-1",
    model_ref="fl/models/global_model_v0",
    participants=("p1", "p2", "p3"),
    hyperparams=Hyperparams(epochs=1, lr=0.01, batch_size=16),
    k_of_n=3,
    timeout_s=60,
    task_wasm_image="local-registry:5000/fl-client-wasm:latest",
)


def test_coordinator_defaults() -> None:
    c = with_defaults(validate(ROUND), default_timeout_s=42.0)
    assert c.k_of_n == 3
    assert c.timeout_s == 42.0
    assert c.hyperparams == Hyperparams(epochs=1, lr=0.01, batch_size=1)
    assert c.model_ref == ""
    assert c.experiment_id == ""
    assert with_defaults(validate(ROUND)).timeout_s == 60.0


def test_given_values_are_kept() -> None:
    spec = replace(
        ROUND,
        k_of_n=2,
        timeout_s=5.5,
        model_ref="fl/models/global_model_v7",
        hyperparams=Hyperparams(epochs=3, lr=0.1, batch_size=16),
        experiment_id="e",
        task_wasm_image="img",
    )
    c = with_defaults(validate(spec))
    assert (c.k_of_n, c.timeout_s, c.model_ref) == (2, 5.5, "fl/models/global_model_v7")
    assert c.hyperparams == Hyperparams(3, 0.1, 16)
    assert (c.experiment_id, c.task_wasm_image) == ("e", "img")


def test_valid_experiment_passes_unchanged() -> None:
    assert validate(EXPERIMENT, experiment=True) == EXPERIMENT


def test_experiment_id_derived_from_round_id_for_experiments_only() -> None:
    spec = replace(EXPERIMENT, experiment_id="")
    assert validate(spec, experiment=True).experiment_id == "exp-r-1"
    assert validate(spec).experiment_id == ""


def test_experiment_hyperparam_defaults_filled_k_and_timeout_kept() -> None:
    out = validate(
        replace(EXPERIMENT, hyperparams=Hyperparams(), k_of_n=0, timeout_s=0), experiment=True
    )
    assert out.hyperparams == Hyperparams(epochs=1, lr=0.01, batch_size=1)
    # 0 stays 0: the manager caps k_of_n at the scheduled participants, and the coordinator
    # fills the timeout.
    assert (out.k_of_n, out.timeout_s) == (0, 0.0)


BOTH = (False, True)


@pytest.mark.parametrize(
    ("change", "field", "modes"),
    [
        ({"round_id": ""}, "round_id", BOTH),
        ({"round_id": "r 1"}, "round_id", BOTH),
        ({"round_id": "r/1"}, "round_id", BOTH),
        ({"round_id": "r" * (MAX_ID_LENGTH + 1)}, "round_id", BOTH),
        ({"experiment_id": "e+1"}, "experiment_id", BOTH),
        ({"experiment_id": "", "round_id": "r" * MAX_ID_LENGTH}, "experiment_id", (True,)),
        ({"participants": ("p1", "p#")}, r"participants\[1\]", BOTH),
        ({"participants": tuple(f"p{i}" for i in range(10_001))}, "participants", BOTH),
        ({"task_wasm_image": "x" * 5000}, "task_wasm_image", BOTH),
        ({"participants": ()}, "participants", BOTH),
        ({"participants": ("p1", "p2", "p1")}, "participants", BOTH),
        ({"participants": ("p1", "")}, r"participants\[1\]", BOTH),
        ({"model_ref": ""}, "model_ref", (True,)),
        ({"model_ref": "models/v0"}, "model_ref", BOTH),
        ({"model_ref": "global_model_v1"}, "model_ref", BOTH),
        ({"model_ref": "fl/models/global_model_vx"}, "model_ref", BOTH),
        ({"task_wasm_image": ""}, "task_wasm_image", (True,)),
        ({"k_of_n": -1}, "k_of_n", BOTH),
        ({"k_of_n": 4}, "k_of_n", BOTH),
        ({"timeout_s": -1.0}, "timeout_s", BOTH),
        ({"timeout_s": math.nan}, "timeout_s", BOTH),
        ({"timeout_s": math.inf}, "timeout_s", BOTH),
        ({"hyperparams": Hyperparams(epochs=-1)}, "hyperparams.epochs", BOTH),
        ({"hyperparams": Hyperparams(lr=-0.1)}, "hyperparams.lr", BOTH),
        ({"hyperparams": Hyperparams(lr=math.nan)}, "hyperparams.lr", BOTH),
        ({"hyperparams": Hyperparams(lr=math.inf)}, "hyperparams.lr", BOTH),
        ({"hyperparams": Hyperparams(batch_size=-2)}, "hyperparams.batch_size", BOTH),
        ({"fuel_budget": -1}, "fuel_budget", BOTH),
        ({"fuel_budget": 2**63}, "fuel_budget", BOTH),
        ({"min_fuel_ratio": -0.5}, "min_fuel_ratio", BOTH),
        ({"min_fuel_ratio": 1.01}, "min_fuel_ratio", BOTH),
        ({"min_fuel_ratio": math.nan}, "min_fuel_ratio", BOTH),
    ],
)
def test_invalid_field_is_named(
    change: dict[str, Any], field: str, modes: tuple[bool, ...]
) -> None:
    for experiment in modes:
        with pytest.raises(InvalidArgument, match=f"^{field}:"):
            validate(replace(EXPERIMENT, **change), experiment=experiment)


def test_experiment_only_rules_leave_the_coordinator_alone() -> None:
    # The coordinator alone takes "the latest model" and no image.
    spec = replace(EXPERIMENT, model_ref="", task_wasm_image="")
    assert validate(spec).model_ref == ""


def test_ids_at_the_limits_pass() -> None:
    spec = replace(
        EXPERIMENT,
        round_id="r" * (MAX_ID_LENGTH - 4),
        experiment_id="",
        participants=tuple(f"p{i}" for i in range(10_000)),
    )
    assert validate(spec, experiment=True).experiment_id == "exp-" + "r" * (MAX_ID_LENGTH - 4)


# (field, value, the whole message): a non-finite number is not "negative". The manager's and
# the coordinator's gRPC tests send the same table.
NOT_FINITE_OR_NEGATIVE: list[tuple[str, float, str]] = [
    ("timeout_s", math.nan, "timeout_s: nan must be finite"),
    ("timeout_s", math.inf, "timeout_s: inf must be finite"),
    ("timeout_s", -math.inf, "timeout_s: -inf must be finite"),
    ("timeout_s", -1.5, "timeout_s: -1.5 must be >= 0 (0 = the default)"),
    ("lr", math.nan, "hyperparams.lr: nan must be finite"),
    ("lr", math.inf, "hyperparams.lr: inf must be finite"),
    ("lr", -0.5, "hyperparams.lr: -0.5 must be >= 0 (0 = the default)"),
]


@pytest.mark.parametrize("experiment", BOTH)
@pytest.mark.parametrize(("field", "value", "message"), NOT_FINITE_OR_NEGATIVE)
def test_non_finite_and_negative_say_which(
    field: str, value: float, message: str, experiment: bool
) -> None:
    if field == "lr":
        spec = replace(EXPERIMENT, hyperparams=Hyperparams(lr=value))
    else:
        spec = replace(EXPERIMENT, timeout_s=value)
    with pytest.raises(InvalidArgument) as exc:
        validate(spec, experiment=experiment)
    assert str(exc.value) == message


def test_duplicate_participants_are_named() -> None:
    with pytest.raises(InvalidArgument, match=r"\['a'\]"):
        validate(replace(ROUND, participants=("a", "b", "a")))


def test_dict_round_trip() -> None:
    assert RoundSpec.from_dict(EXPERIMENT.to_dict()) == EXPERIMENT
    fuel = replace(EXPERIMENT, fuel_budget=2**63 - 1, min_fuel_ratio=0.5)
    expected = replace(validate(EXPERIMENT), fuel_budget=2**63 - 1, min_fuel_ratio=0.5)
    assert validate(fuel) == expected
    assert RoundSpec.from_dict(fuel.to_dict()) == fuel
    # A record from before fuel receipts: no budget, no rule.
    old = {k: v for k, v in EXPERIMENT.to_dict().items() if "fuel" not in k}
    assert RoundSpec.from_dict(old) == EXPERIMENT
    assert Hyperparams.from_dict(EXPERIMENT.hyperparams.to_dict()) == EXPERIMENT.hyperparams


# ----------------------------------------------------------------------- free hyperparameters


def test_free_hyperparameters_are_checked_once_and_made_canonical() -> None:
    spec = replace(
        EXPERIMENT,
        hyperparams=Hyperparams(epochs=2, extra_json=' {"shuffle": false, "mu": 0.01} '),
    )
    hp = validate(spec, experiment=True).hyperparams
    assert hp.extra_json == '{"mu":0.01,"shuffle":false}'
    # Equal requests written differently are the same round.
    written_otherwise = Hyperparams(epochs=2, extra_json='{"shuffle":false,"mu":1e-2}')
    other = replace(spec, hyperparams=written_otherwise)
    assert validate(other, experiment=True) == validate(spec, experiment=True)
    # The module receives one merged object.
    assert json.loads(hp.to_json()) == {
        "epochs": 2,
        "lr": 0.01,
        "batch_size": 1,
        "mu": 0.01,
        "shuffle": False,
    }


def test_without_free_hyperparameters_the_object_is_the_seeds() -> None:
    hp = validate(EXPERIMENT, experiment=True).hyperparams
    assert hp.extra_json == ""
    assert hp.to_json() == '{"epochs": 1, "lr": 0.01, "batch_size": 16}'
    assert validate(replace(EXPERIMENT, hyperparams=Hyperparams(extra_json="  "))).hyperparams == (
        Hyperparams(1, 0.01, 1)
    )


def test_free_hyperparameters_round_trip_through_the_stored_dict() -> None:
    spec = validate(
        replace(
            EXPERIMENT,
            hyperparams=Hyperparams(1, 0.1, 4, '{"mode":"literal","nested":{"a":[1,2.5,null]}}'),
        ),
        experiment=True,
    )
    assert RoundSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert Hyperparams.from_json(spec.hyperparams.to_json()) == spec.hyperparams


@pytest.mark.parametrize(
    ("extra_json", "message"),
    [
        ("[1, 2]", r"^hyperparams\.extra_json: must be a JSON object, got list$"),
        ('"mu"', r"^hyperparams\.extra_json: must be a JSON object"),
        ("{", r"^hyperparams\.extra_json: not valid JSON"),
        ('{"epochs": 3}', r"^hyperparams\.extra_json\.epochs: repeats the hyperparameter"),
        ('{"lr": 0.1}', r"^hyperparams\.extra_json\.lr: repeats"),
        ('{"batch_size": 2}', r"^hyperparams\.extra_json\.batch_size: repeats"),
        ('{"mu": NaN}', r"^hyperparams\.extra_json: not valid JSON \(.*NaN"),
        ('{"mu": Infinity}', r"^hyperparams\.extra_json: not valid JSON \(.*Infinity"),
        ('{"mu": 1e400}', r"^hyperparams\.extra_json\.mu: 'inf' is not a finite number$"),
        ('{"w": [1, -1e999]}', r"^hyperparams\.extra_json\.w\[1\]: '-inf' is not a finite"),
        ('{"big": ' + "9" * 400 + "}", r"^hyperparams\.extra_json\.big: .* is not a finite"),
        ('{"a": {"b": {"c": -Infinity}}}', r"^hyperparams\.extra_json: not valid JSON"),
        ('{"": 1}', r"^hyperparams\.extra_json: keys must not be empty$"),
        ('{"task": "evaluate"}', r"^hyperparams\.extra_json\.task: reserved"),
        ('{"d": ' + "[" * 9 + "]" * 9 + "}", r"^hyperparams\.extra_json\.d.*: nested deeper"),
        ('{"deep": ' + "[" * 3000 + "]" * 3000 + "}", r"^hyperparams\.extra_json"),
        ('{"s": "' + "x" * 5000 + '"}', r"^hyperparams\.extra_json: 5009 bytes, at most 4096$"),
    ],
)
@pytest.mark.parametrize("experiment", BOTH)
def test_bad_free_hyperparameters_are_named(
    extra_json: str, message: str, experiment: bool
) -> None:
    spec = replace(EXPERIMENT, hyperparams=Hyperparams(extra_json=extra_json))
    with pytest.raises(InvalidArgument, match=message):
        validate(spec, experiment=experiment)


# ---- the re-execution audit (docs/verifiability.md) ------------------------------------


def test_the_audit_is_off_by_default_and_its_policy_defaults_to_reject() -> None:
    c = validate(ROUND)
    assert c.audit == AuditSpec(fraction=0.0, seed=0, policy="")
    assert not c.audit.enabled
    assert c.audit.rejects
    flagged = validate(replace(ROUND, audit=AuditSpec(fraction=0.25, seed=7, policy="FLAG")))
    assert flagged.audit == AuditSpec(fraction=0.25, seed=7, policy="flag")
    assert not flagged.audit.rejects


@pytest.mark.parametrize(
    ("audit", "message"),
    [
        (AuditSpec(fraction=-0.1), "audit.fraction: -0.1 must be between 0"),
        (AuditSpec(fraction=1.5), "audit.fraction: 1.5 must be between 0"),
        (AuditSpec(fraction=math.nan), "audit.fraction: nan must be between 0"),
        (AuditSpec(fraction=0.5, seed=-1), "audit.seed: -1 must be between 0 and 2**64 - 1"),
        (AuditSpec(fraction=0.5, seed=2**64), "audit.seed: "),
        (AuditSpec(fraction=0.5, policy="maybe"), "audit.policy: 'maybe' is not one of reject"),
    ],
)
def test_bad_audit_settings_are_refused_naming_the_field(audit: AuditSpec, message: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        validate(replace(EXPERIMENT, audit=audit), experiment=True)
    assert str(err.value).startswith(message), str(err.value)


def test_the_audit_round_trips_through_the_stored_dict() -> None:
    spec = validate(replace(EXPERIMENT, audit=AuditSpec(0.5, 2**64 - 1, "flag")), experiment=True)
    assert RoundSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    # A record written before audits existed reads as no audit.
    old = {k: v for k, v in spec.to_dict().items() if k != "audit"}
    assert RoundSpec.from_dict(old).audit == AuditSpec()
