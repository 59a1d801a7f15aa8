"""server/mlp.py: the MLP's initial model (layout, scale, reproducible) and its scores, against
the trainer's independent numpy reference (tests/wasm_client/mlp_reference.py)."""

from __future__ import annotations

import math

import numpy as np

from server.mlp import evaluate, initial_model
from tests.wasm_client import mlp_reference as ref


def test_initial_model_has_the_trainers_layout_and_is_reproducible() -> None:
    model = initial_model((64, 32, 10), seed=3)
    assert {k: v.shape for k, v in model.items()} == {
        "l0.w": (64, 32),
        "l0.b": (32,),
        "l1.w": (32, 10),
        "l1.b": (10,),
    }
    assert all(v.dtype == np.float64 for v in model.values())
    assert not model["l0.b"].any() and not model["l1.b"].any()
    # He scaling: weights' spread is sqrt(2 / fan-in).
    assert math.isclose(float(np.std(model["l0.w"])), math.sqrt(2 / 64), rel_tol=0.1)
    again = initial_model((64, 32, 10), seed=3)
    assert all(np.array_equal(model[k], again[k]) for k in model)
    other = initial_model((64, 32, 10), seed=4)
    assert not np.array_equal(model["l0.w"], other["l0.w"])


def test_scores_match_the_reference() -> None:
    model = ref.make_mlp([12, 7, 5, 4], seed=9)
    x, y = ref.make_data(50, 12, 4, seed=2)
    loss, accuracy = evaluate(model, x, y)
    want_loss, want_accuracy = ref.metrics(model, x, y)
    assert math.isclose(loss, want_loss, rel_tol=1e-12)
    assert accuracy == want_accuracy
    assert 0.0 < accuracy < 1.0  # neither all right nor all wrong: the comparison says something
