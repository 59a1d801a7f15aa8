"""The Zig training client (and a foreign C client) run in wasmtime against the contract in
wasm-client/README.md, checked against a numpy reference implementation."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from server.datastore.datasets import synthetic_dataset
from tests.wasm_client.harness import (
    Problem,
    WasmRunner,
    assert_close,
    env_for,
    epoch_seed,
    is_number,
    make_problem,
    reference_metrics,
    reference_train,
    seed_reference_run,
    shuffled_order,
)

TOL = 1e-9


# ------------------------------------------------------------------------------- shape


def test_output_json_shape(fl_client: WasmRunner) -> None:
    problem = make_problem(n=20, dim=3, seed=1)
    env = env_for(
        problem,
        round_id="r-42",
        proplet_id='prop-\u00e9"x',
        model_uri="fl/models/global_model_v7",
        hyperparams={"epochs": 2, "lr": 0.1, "batch_size": 1},
    )
    result = fl_client.run(env)
    out = result.json()
    assert set(out) == {
        "round_id",
        "proplet_id",
        "base_model_uri",
        "num_samples",
        "metrics",
        "update",
    }
    assert out["round_id"] == "r-42"
    assert out["proplet_id"] == 'prop-\u00e9"x'
    assert out["base_model_uri"] == "fl/models/global_model_v7"
    assert out["num_samples"] == 20
    assert set(out["metrics"]) == {"loss", "accuracy", "loss_before", "accuracy_before", "epochs"}
    assert out["metrics"]["epochs"] == 2
    for key in ("loss", "accuracy", "loss_before", "accuracy_before"):
        assert is_number(out["metrics"][key]), key
    assert set(out["update"]) == {"w", "b"}
    assert len(out["update"]["w"]) == 3
    assert all(is_number(v) for v in out["update"]["w"])
    assert is_number(out["update"]["b"])
    assert "fl-client" in result.stderr  # diagnostics go to stderr, never stdout


def test_missing_optional_env_uses_defaults(fl_client: WasmRunner) -> None:
    problem = make_problem(n=8, dim=2, seed=2)
    env = {
        "ROUND_ID": "r",
        "MODEL_DATA": problem.model_json(),
        "DATASET_DATA": problem.dataset_json(),
    }
    out = fl_client.run(env).json()
    assert out["proplet_id"] == ""
    assert out["base_model_uri"] == ""
    assert out["metrics"]["epochs"] == 1
    w, b = reference_train(problem, epochs=1, lr=0.01, batch_size=1, round_id="r", proplet_id="")
    assert_close(out["update"]["w"], w, TOL)
    assert out["update"]["b"] == pytest.approx(b, abs=TOL)


# ------------------------------------------------------------------------------- training


@pytest.mark.parametrize("dim", [1, 3, 50])
@pytest.mark.parametrize("batch_extra", [0, 5])
def test_full_batch_matches_numpy(fl_client: WasmRunner, dim: int, batch_extra: int) -> None:
    """batch_size >= n is full-batch gradient descent: independent of the shuffle."""
    problem = make_problem(n=40, dim=dim, seed=dim, zero_model=False)
    hp = {"epochs": 5, "lr": 0.3, "batch_size": 40 + batch_extra}
    out = fl_client.run(env_for(problem, hyperparams=hp)).json()
    w, b = reference_train(
        problem, epochs=5, lr=0.3, batch_size=40, round_id="-", proplet_id="-", shuffle=False
    )
    assert_close(out["update"]["w"], w, TOL)
    assert out["update"]["b"] == pytest.approx(b, abs=TOL)
    assert out["num_samples"] == 40


@pytest.mark.parametrize("dim", [1, 3, 50])
def test_per_example_sgd_matches_documented_shuffle(fl_client: WasmRunner, dim: int) -> None:
    problem = make_problem(n=33, dim=dim, seed=10 + dim)
    hp = {"epochs": 3, "lr": 0.05, "batch_size": 1}
    out = fl_client.run(env_for(problem, round_id="r7", proplet_id="p9", hyperparams=hp)).json()
    w, b = reference_train(problem, epochs=3, lr=0.05, batch_size=1, round_id="r7", proplet_id="p9")
    assert_close(out["update"]["w"], w, TOL)
    assert out["update"]["b"] == pytest.approx(b, abs=TOL)


def test_minibatch_with_short_last_batch_matches_reference(fl_client: WasmRunner) -> None:
    problem = make_problem(n=23, dim=4, seed=5, zero_model=False)
    hp = {"epochs": 4, "lr": 0.2, "batch_size": 5}
    out = fl_client.run(env_for(problem, round_id="mb", proplet_id="q", hyperparams=hp)).json()
    w, b = reference_train(problem, epochs=4, lr=0.2, batch_size=5, round_id="mb", proplet_id="q")
    assert_close(out["update"]["w"], w, TOL)
    assert out["update"]["b"] == pytest.approx(b, abs=TOL)


def test_shuffle_reference_is_a_permutation() -> None:
    for n in (1, 2, 17, 64):
        order = shuffled_order(n, epoch_seed("r", "p", 0))
        assert sorted(order) == list(range(n))
    assert shuffled_order(64, epoch_seed("r", "p", 0)) != shuffled_order(
        64, epoch_seed("r", "p", 1)
    )


def test_sgd_is_deterministic_and_seeded_by_round_and_proplet(fl_client: WasmRunner) -> None:
    problem = make_problem(n=64, dim=3, seed=3)
    hp = {"epochs": 2, "lr": 0.1, "batch_size": 1}
    first = fl_client.run(env_for(problem, proplet_id="a", hyperparams=hp))
    second = fl_client.run(env_for(problem, proplet_id="a", hyperparams=hp))
    assert first.stdout == second.stdout

    other_proplet = fl_client.run(env_for(problem, proplet_id="b", hyperparams=hp)).json()
    other_round = fl_client.run(env_for(problem, round_id="r2", proplet_id="a", hyperparams=hp))
    base = first.json()["update"]
    assert other_proplet["update"] != base
    assert other_round.json()["update"] != base
    # Same data, only the visiting order differs: the results stay close.
    assert_close(other_proplet["update"]["w"], base["w"], 0.05)


def test_hyperparams_integers_written_as_floats_and_unknown_fields(fl_client: WasmRunner) -> None:
    problem = make_problem(n=16, dim=2, seed=4)
    as_int = fl_client.run(
        env_for(problem, hyperparams={"epochs": 3, "lr": 1, "batch_size": 4})
    ).stdout
    as_float = fl_client.run(
        env_for(
            problem,
            hyperparams={"epochs": 3.0, "lr": 1.0, "batch_size": 4.0, "momentum": 0.9, "x": [1]},
        )
    ).stdout
    assert as_int == as_float
    assert json.loads(as_int)["metrics"]["epochs"] == 3


def test_unknown_fields_in_model_and_dataset_are_ignored(fl_client: WasmRunner) -> None:
    problem = make_problem(n=10, dim=2, seed=6)
    env = env_for(problem, hyperparams={"epochs": 1})
    plain = fl_client.run(env).stdout
    model = json.loads(env["MODEL_DATA"]) | {"version": 3, "meta": {"a": [1, 2]}}
    dataset = json.loads(env["DATASET_DATA"])
    dataset["extra"] = {"nested": True}
    for sample in dataset["data"]:
        sample["id"] = "s"
    env |= {"MODEL_DATA": json.dumps(model), "DATASET_DATA": json.dumps(dataset)}
    assert fl_client.run(env).stdout == plain


def test_zero_epochs_returns_the_received_model(fl_client: WasmRunner) -> None:
    problem = make_problem(n=12, dim=3, seed=7, zero_model=False)
    out = fl_client.run(env_for(problem, hyperparams={"epochs": 0})).json()
    assert_close(out["update"]["w"], problem.w, 0.0)
    assert out["update"]["b"] == problem.b
    assert out["metrics"]["loss"] == out["metrics"]["loss_before"]


# ------------------------------------------------------------------------------- FedProx, shuffle


@pytest.mark.parametrize("batch_size", [1, 5, 40])
@pytest.mark.parametrize("mu", [0.01, 0.5, 3.0])
def test_fedprox_mu_matches_numpy(fl_client: WasmRunner, batch_size: int, mu: float) -> None:
    problem = make_problem(n=37, dim=4, seed=30, zero_model=False)
    hp = {"epochs": 3, "lr": 0.1, "batch_size": batch_size, "mu": mu}
    out = fl_client.run(env_for(problem, round_id="rp", proplet_id="pp", hyperparams=hp)).json()
    w, b = reference_train(
        problem, epochs=3, lr=0.1, batch_size=batch_size, round_id="rp", proplet_id="pp", mu=mu
    )
    assert_close(out["update"]["w"], w, TOL)
    assert out["update"]["b"] == pytest.approx(b, abs=TOL)
    # The metrics stay the plain log-loss: the proximal term is not part of them.
    loss, _ = reference_metrics(problem.x, problem.y, out["update"]["w"], out["update"]["b"])
    assert out["metrics"]["loss"] == pytest.approx(loss, abs=1e-9)


def test_fedprox_keeps_the_update_near_the_global_model(fl_client: WasmRunner) -> None:
    problem = make_problem(n=64, dim=3, seed=31)
    base = np.append(problem.w, problem.b)

    def distance(mu: float) -> float:
        hp = {"epochs": 5, "lr": 0.2, "mu": mu}
        u = fl_client.run(env_for(problem, hyperparams=hp)).json()["update"]
        return float(np.linalg.norm(np.append(u["w"], u["b"]) - base))

    assert distance(2.0) < 0.5 * distance(0.0)


def test_mu_zero_is_the_plain_algorithm(fl_client: WasmRunner) -> None:
    problem = make_problem(n=20, dim=3, seed=32, zero_model=False)
    for bs in (1, 4):
        plain = fl_client.run(env_for(problem, hyperparams={"epochs": 2, "batch_size": bs}))
        zero = fl_client.run(
            env_for(problem, hyperparams={"epochs": 2, "batch_size": bs, "mu": 0, "shuffle": True})
        )
        assert zero.stdout == plain.stdout


@pytest.mark.parametrize("batch_size", [1, 6])
def test_shuffle_off_trains_in_data_order(fl_client: WasmRunner, batch_size: int) -> None:
    problem = make_problem(n=29, dim=3, seed=33, zero_model=False)
    hp = {"epochs": 3, "lr": 0.2, "batch_size": batch_size, "shuffle": False}
    out = fl_client.run(env_for(problem, round_id="rs", proplet_id="ps", hyperparams=hp)).json()
    w, b = reference_train(
        problem,
        epochs=3,
        lr=0.2,
        batch_size=batch_size,
        round_id="-",
        proplet_id="-",
        shuffle=False,
    )
    assert_close(out["update"]["w"], w, TOL)
    assert out["update"]["b"] == pytest.approx(b, abs=TOL)
    # Data order is the same for every round and proplet; the shuffled run is not.
    other = fl_client.run(env_for(problem, round_id="r2", proplet_id="p2", hyperparams=hp))
    assert other.json()["update"] == out["update"]
    shuffled = fl_client.run(env_for(problem, hyperparams=hp | {"shuffle": True})).json()
    assert shuffled["update"] != out["update"]


# ------------------------------------------------------------------------------- literal mode

# The seed walkthrough's request (step 6): epochs 1, lr 0.01, batch_size 16, from the all-zero
# three-feature v0, on each proplet's 64 seeded samples.
SEED_HYPERPARAMS = {"epochs": 1, "lr": 0.01, "batch_size": 16}


@pytest.mark.parametrize("proplet_id", ["proplet-1", "proplet-2", "proplet-3"])
@pytest.mark.parametrize("epochs", [1, 5])
def test_literal_mode_reproduces_the_seed_reference_run(
    fl_client: WasmRunner, proplet_id: str, epochs: int
) -> None:
    features, labels = synthetic_dataset(proplet_id)
    x, y = features.astype(np.float64), labels.astype(np.float64)
    problem = Problem(x=x, y=y, w=np.zeros(3), b=0.0)
    hp = SEED_HYPERPARAMS | {"epochs": epochs, "mode": "literal"}
    out = fl_client.run(env_for(problem, proplet_id=proplet_id, hyperparams=hp)).json()
    w, b = seed_reference_run(
        features.tolist(), labels.tolist(), [0.0] * 3, 0.0, lr=0.01, epochs=epochs
    )
    # Same operations in the same order: only exp() may differ in its last bit between the
    # module's and the C library's implementations.
    assert_close(out["update"]["w"], w, 2e-16)
    assert abs(out["update"]["b"] - b) <= 2e-16
    assert out["num_samples"] == 64 and out["metrics"]["epochs"] == epochs


def test_literal_mode_ignores_batch_size_and_shuffle(fl_client: WasmRunner) -> None:
    problem = make_problem(n=30, dim=2, seed=34, zero_model=False)
    outs = [
        fl_client.run(
            env_for(problem, round_id=r, proplet_id=p, hyperparams=hp | {"mode": "literal"})
        ).json()
        for r, p, hp in [
            ("ra", "pa", {"batch_size": 1}),
            ("rb", "pb", {"batch_size": 7, "shuffle": True}),
            ("rc", "pc", {"batch_size": 30, "shuffle": False}),
        ]
    ]
    assert outs[0]["update"] == outs[1]["update"] == outs[2]["update"]
    assert outs[0]["metrics"] == outs[1]["metrics"] == outs[2]["metrics"]
    # One SGD step per example in data order, not the full-batch step batch_size 30 means.
    out = outs[0]
    w, b = reference_train(
        problem, epochs=1, lr=0.01, batch_size=1, round_id="", proplet_id="", shuffle=False
    )
    assert_close(out["update"]["w"], w, TOL)
    assert out["update"]["b"] == pytest.approx(b, abs=TOL)


# ------------------------------------------------------------------------------- evaluation


@pytest.mark.parametrize("dim", [1, 3, 50])
def test_evaluate_mode_reports_the_models_metrics_without_training(
    fl_client: WasmRunner, dim: int
) -> None:
    problem = make_problem(n=45, dim=dim, seed=40 + dim, zero_model=False)
    hp = {"task": "evaluate", "epochs": 5, "lr": 0.5}
    result = fl_client.run(env_for(problem, hyperparams=hp))
    out = result.json()
    assert set(out) == {"num_samples", "metrics"}
    assert out["num_samples"] == 45
    assert set(out["metrics"]) == {"loss", "accuracy"}
    loss, accuracy = reference_metrics(problem.x, problem.y, problem.w, problem.b)
    assert out["metrics"]["loss"] == pytest.approx(loss, abs=1e-12)
    assert out["metrics"]["accuracy"] == accuracy
    # The training run of the same inputs starts from exactly these numbers.
    trained = fl_client.run(env_for(problem, hyperparams={"epochs": 5, "lr": 0.5})).json()
    assert trained["metrics"]["loss_before"] == out["metrics"]["loss"]
    assert trained["metrics"]["loss"] != out["metrics"]["loss"]


def test_evaluate_mode_checks_its_inputs(fl_client: WasmRunner) -> None:
    env = env_for(make_problem(n=6, dim=3), hyperparams={"task": "evaluate"})
    env["MODEL_DATA"] = json.dumps({"w": [0.0, 0.0], "b": 0.0})
    result = fl_client.run(env)
    assert result.code == 1 and result.stdout == "" and "dimension" in result.stderr


# ------------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("dim", [1, 3, 50])
def test_metrics_are_real(fl_client: WasmRunner, dim: int) -> None:
    problem = make_problem(n=64, dim=dim, seed=20 + dim)
    assert set(np.unique(problem.y)) == {0.0, 1.0}  # strictly 0/1 labels, both classes
    out = fl_client.run(
        env_for(problem, hyperparams={"epochs": 10, "lr": 0.5, "batch_size": 1})
    ).json()
    m = out["metrics"]
    assert m["loss_before"] == pytest.approx(math.log(2.0), abs=1e-12)
    # p = 0.5 for the zero model; threshold p >= 0.5 predicts class 1.
    assert m["accuracy_before"] == pytest.approx(float(np.mean(problem.y)), abs=1e-12)
    assert m["loss"] < m["loss_before"]
    assert 0.0 <= m["accuracy"] <= 1.0
    assert m["accuracy"] >= m["accuracy_before"]

    loss, accuracy = reference_metrics(problem.x, problem.y, out["update"]["w"], out["update"]["b"])
    assert m["loss"] == pytest.approx(loss, abs=1e-9)
    assert m["accuracy"] == accuracy


def test_metrics_before_for_nonzero_model(fl_client: WasmRunner) -> None:
    problem = make_problem(n=30, dim=5, seed=8, zero_model=False)
    m = fl_client.run(env_for(problem)).json()["metrics"]
    loss, accuracy = reference_metrics(problem.x, problem.y, problem.w, problem.b)
    assert m["loss_before"] == pytest.approx(loss, abs=1e-9)
    assert m["accuracy_before"] == accuracy


# ------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("round_id", [None, "", "  "])
def test_missing_round_id_exits_2(fl_client: WasmRunner, round_id: str | None) -> None:
    env = env_for(make_problem(n=4, dim=2))
    if round_id is None:
        del env["ROUND_ID"]
    else:
        env["ROUND_ID"] = round_id
    result = fl_client.run(env)
    assert result.code == 2
    assert result.stdout == ""
    assert "ROUND_ID" in result.stderr


def test_model_dimension_mismatch_fails(fl_client: WasmRunner) -> None:
    env = env_for(make_problem(n=6, dim=3))
    env["MODEL_DATA"] = json.dumps({"w": [0.0, 0.0], "b": 0.0})
    result = fl_client.run(env)
    assert result.code != 0
    assert result.stdout == ""
    assert "dimension" in result.stderr


def test_ragged_samples_fail(fl_client: WasmRunner) -> None:
    env = env_for(make_problem(n=6, dim=3))
    dataset = json.loads(env["DATASET_DATA"])
    dataset["data"][4]["x"] = [1.0, 2.0]
    env["DATASET_DATA"] = json.dumps(dataset)
    result = fl_client.run(env)
    assert result.code != 0
    assert result.stdout == ""


@pytest.mark.parametrize(
    "dataset",
    [
        {"data": [], "size": 0},
        {"size": 3},
        "not json",
        {"data": [{"x": [1.0, 2.0], "y": -1}]},
        {"data": [{"x": [1.0, 2.0], "y": 0.5}]},
        {"data": [{"x": [1.0, "a"], "y": 1}]},
    ],
)
def test_bad_dataset_fails(fl_client: WasmRunner, dataset: object) -> None:
    env = env_for(make_problem(n=2, dim=2))
    env["DATASET_DATA"] = dataset if isinstance(dataset, str) else json.dumps(dataset)
    result = fl_client.run(env)
    assert result.code == 1
    assert result.stdout == ""
    assert result.stderr


@pytest.mark.parametrize(
    "hyperparams", ['{"epochs": -1}', '{"epochs": 1.5}', '{"batch_size": 0}', "[1]", "{"]
)
def test_bad_hyperparams_fail(fl_client: WasmRunner, hyperparams: str) -> None:
    result = fl_client.run(env_for(make_problem(n=4, dim=2), hyperparams=hyperparams))
    assert result.code == 1
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("hyperparams", "named"),
    [
        ({"mu": -0.1}, "HYPERPARAMS.mu"),
        ({"mu": "0.1"}, "HYPERPARAMS.mu"),
        ({"shuffle": 0}, "HYPERPARAMS.shuffle"),
        ({"shuffle": "false"}, "HYPERPARAMS.shuffle"),
        ({"mode": "seed"}, "HYPERPARAMS.mode"),
        ({"mode": 1}, "HYPERPARAMS.mode"),
        ({"task": "eval"}, "HYPERPARAMS.task"),
        ({"mode": "literal", "mu": 0.1}, "HYPERPARAMS.mu"),
    ],
)
def test_bad_new_hyperparams_fail_naming_the_key(
    fl_client: WasmRunner, hyperparams: dict[str, object], named: str
) -> None:
    result = fl_client.run(env_for(make_problem(n=4, dim=2), hyperparams=hyperparams))
    assert result.code == 1
    assert result.stdout == ""
    assert named in result.stderr


def test_divergence_is_reported_not_emitted(fl_client: WasmRunner) -> None:
    problem = make_problem(n=8, dim=2, seed=9)
    result = fl_client.run(env_for(problem, hyperparams={"lr": 1e308, "epochs": 3}))
    assert result.code == 1
    assert result.stdout == ""
    assert "diverged" in result.stderr


# ------------------------------------------------------------------------------- foreign module


def test_minimal_c_client_honours_the_contract(minimal_client: WasmRunner) -> None:
    problem = make_problem(n=37, dim=4, seed=11, zero_model=False)
    env = env_for(problem, round_id="rc", proplet_id="pc", hyperparams={"lr": 0.25, "epochs": 9})
    out = minimal_client.run(env).json()
    assert out["round_id"] == "rc"
    assert out["proplet_id"] == "pc"
    assert out["base_model_uri"] == "fl/models/global_model_v0"
    assert out["num_samples"] == 37
    assert is_number(out["metrics"]["loss"])
    # Its documented algorithm: one pass of per-example SGD in data order.
    w, b = reference_train(
        problem, epochs=1, lr=0.25, batch_size=1, round_id="", proplet_id="", shuffle=False
    )
    assert_close(out["update"]["w"], w, TOL)
    assert out["update"]["b"] == pytest.approx(b, abs=TOL)
    loss, _ = reference_metrics(problem.x, problem.y, w, b)
    assert out["metrics"]["loss"] == pytest.approx(loss, abs=1e-9)


def test_minimal_c_client_requires_round_id(minimal_client: WasmRunner) -> None:
    env = env_for(make_problem(n=3, dim=2))
    del env["ROUND_ID"]
    assert minimal_client.run(env).code == 2


# ------------------------------------------------------------------------------- build


def test_build_is_cached_and_cli_prints_path(
    wasm_build: ModuleType, fl_client_wasm: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mtime = fl_client_wasm.stat().st_mtime_ns
    assert wasm_build.build() == fl_client_wasm
    assert fl_client_wasm.stat().st_mtime_ns == mtime  # stamp matched: no rebuild
    assert wasm_build.main([]) == 0
    assert capsys.readouterr().out.strip() == str(fl_client_wasm)
    assert fl_client_wasm.read_bytes()[:4] == b"\x00asm"


def test_warm_run_is_fast(fl_client: WasmRunner) -> None:
    env = env_for(make_problem(n=64, dim=2, seed=12), hyperparams={"epochs": 1})
    fl_client.run(env)
    best = min(fl_client.run(env).seconds for _ in range(5))
    assert best < 0.25, f"one module execution took {best * 1000:.1f} ms"


def test_the_linear_trainer_refuses_k_class_data_by_its_schema(fl_client: WasmRunner) -> None:
    """A part of digits as the proplet hands it over: refused with the reason, even a part
    whose labels happen to be only 0 and 1 (non-IID parts can be)."""
    from proplet.federated import dataset_to_json
    from server.datastore import catalog
    from server.datastore.datasets import CLASSES_SCHEMA

    digits = catalog.digits()
    two_classes = np.flatnonzero(digits.train.labels < 2)[:20]
    for idx in (np.arange(30), two_classes):
        env = env_for(make_problem(n=2, dim=64))
        env["DATASET_DATA"] = dataset_to_json(
            "proplet-a", CLASSES_SCHEMA, digits.train.features[idx], digits.train.labels[idx]
        )
        result = fl_client.run(env)
        assert result.code == 1 and result.stdout == ""
        assert 'DATASET_DATA.schema is "fl-classes-dataset-v1" (k classes)' in result.stderr
        assert "2-class logistic model" in result.stderr
