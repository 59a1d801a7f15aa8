"""The MLP trainer's model (wasm-client/README.md, "The MLP trainer"): layers l0..l{L-1}, each
a weight `l<i>.w` [in, out] and a bias `l<i>.b` [out], ReLU between layers, softmax
cross-entropy over the last. What the demo and the quality benchmark start from and score
global models with; training itself is the module's."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import numpy as np

from server.tensors import Array, Tensors


def initial_model(sizes: Sequence[int], seed: int = 0) -> Tensors:
    """Layers for `sizes` (inputs, hidden..., classes): He-scaled normal weights drawn from a
    generator seeded with `seed` (the same model on every machine), zero biases, float64."""
    rng = np.random.default_rng(seed)
    model: Tensors = {}
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        model[f"l{i}.w"] = rng.normal(size=(n_in, n_out)) * np.sqrt(2.0 / n_in)
        model[f"l{i}.b"] = np.zeros(n_out)
    return model


def evaluate(model: Mapping[str, Array], features: Array, labels: Array) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of `model` on (features, labels [n] holding class
    indices), as the trainer computes them: the prediction is the largest output, the first
    on ties (numpy's argmax)."""
    a = np.asarray(features, dtype=np.float64)
    layers = sum(1 for name in model if name.endswith(".w"))
    for i in range(layers):
        a = a @ np.asarray(model[f"l{i}.w"], np.float64) + np.asarray(model[f"l{i}.b"], np.float64)
        if i < layers - 1:
            a = np.maximum(a, 0.0)
    y = np.asarray(labels).astype(np.int64)
    shifted = a - a.max(axis=1, keepdims=True)
    log_sum = np.log(np.exp(shifted).sum(axis=1))
    loss = float(np.mean(log_sum - shifted[np.arange(len(y)), y]))
    accuracy = float(np.mean(np.argmax(a, axis=1) == y))
    return loss, accuracy
