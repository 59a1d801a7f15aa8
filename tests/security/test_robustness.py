"""Robust aggregation shown (issue 11, item 6): ten real proplets of which two are compromised
(real certificates, the pinned module, then an update sign-flipped and scaled ten times,
base - 10 * (trained - base), signed with their own keys: `tests/support/poisoning.py`). The
same experiment runs clean and poisoned for FedAvg, FedMedian, FedTrimmedAvg and Krum; the
final model's accuracy is measured on a global held-out test set (the data store's own
generator, for proplets that took no part). FedMedian, FedTrimmedAvg and Krum stay within 2
points of their clean run; FedAvg visibly degrades.

The coordinator's distance bound is turned off here (`max_update_distance=0`): it is a defence
of its own and would blunt the attack before any strategy sees it. The last part shows that:
with the bound clipping every update to a few times an honest step, FedAvg under the same
attack stays within 2 points of its clean run (one bound for every update: it also limits
how far an honest round may move the model, which the robust rules do not)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from propeller.v1 import model_registry_pb2
from server.config import MqttConfig
from server.datastore.datasets import synthetic_dataset
from server.models import model_uri
from server.streams import read_model_stream
from tests.cli.helpers import Cli, flags
from tests.support.cluster import Cluster, cluster
from tests.support.poisoning import Poisoning, PoisoningProplet

V0 = model_uri(0)
PROPLETS = 10
POISONERS = 2  # 20%
ROUNDS = 3
# Samples per proplet: enough that honest proplets' local models agree (their data differs in
# its feature shift only), so what a robust rule keeps is close to the clean mean.
SAMPLES = 512
TRAINING = ("--epochs", "5", "--lr", "0.1", "--batch-size", "16")
# Strategy -> its parameters for 10 updates of which 2 are bad.
ROBUST = {
    "fedmedian": "{}",
    "fedtrimmedavg": '{"beta": 0.2}',
    "krum": '{"num_malicious": 2}',
}


def held_out() -> tuple[np.ndarray[Any, np.dtype[np.float64]], np.ndarray[Any, Any]]:
    """Features and labels of proplets that never train: the same true model, their own
    shifts (so the test set spans the population, not one proplet)."""
    parts = [synthetic_dataset(f"held-out-{i}", 100) for i in range(20)]
    return np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])


TEST_X, TEST_Y = held_out()


def accuracy(model: dict[str, Any]) -> float:
    logits = TEST_X @ np.asarray(model["w"], np.float64) + float(model["b"])
    return float(np.mean((logits > 0) == (TEST_Y > 0.5)))


async def final_accuracy(cli: Cli, c: Cluster, strategy: str, params: str) -> float:
    """Run one experiment of ROUNDS rounds from v0 and measure the version it ends with."""
    eid = f"exp-{strategy}-{uuid.uuid4().hex[:6]}"
    run = await cli(
        "experiment", "run", "--experiment-id", eid, "--model-ref", V0,
        "--participants", ",".join(c.proplet_ids), "--image", c.image,
        "--k-of-n", str(PROPLETS), "--rounds", str(ROUNDS), "--strategy", strategy,
        "--strategy-params", params, *TRAINING, "--watch", *flags(c.endpoints),
    )  # fmt: skip
    run.ok()
    rounds = (await cli("experiment", "history", eid, "--json", *flags(c.endpoints))).ok().json()
    last = rounds["rounds"][-1]["new_model_uri"]
    _, model = await read_model_stream(
        c.registry.GetModel(model_registry_pb2.GetModelRequest(model_uri=last))
    )
    return accuracy(model)


@pytest.fixture
async def poisoned_world(
    mqtt: MqttConfig, tmp_path: Path, trainer_wasm: Path, request: pytest.FixtureRequest
) -> AsyncIterator[tuple[Cluster, Poisoning]]:
    # Fixed ids: each proplet's data is seeded by its id, so every run sees the same data.
    ids = [f"robust-{i}" for i in range(PROPLETS)]
    poisoning = Poisoning()
    built = {pid: lambda cfg: PoisoningProplet(cfg, poisoning) for pid in ids[:POISONERS]}
    bound: dict[str, Any] = request.param
    async with cluster(
        mqtt,
        tmp_path,
        proplets=ids,
        image=f"file://{trainer_wasm}",
        stack={"seed_proplet_ids": tuple(ids), "num_samples": SAMPLES, **bound},
        built=built,
    ) as c:
        yield c, poisoning


NO_BOUND = {"max_update_distance": 0.0}


@pytest.mark.parametrize("poisoned_world", [NO_BOUND], indirect=True)
async def test_robust_rules_keep_accuracy_under_20_percent_poisoners_and_fedavg_does_not(
    poisoned_world: tuple[Cluster, Poisoning], cli: Cli
) -> None:
    c, poisoning = poisoned_world
    rules = {"fedavg": "{}", **ROBUST}
    clean = {name: await final_accuracy(cli, c, name, params) for name, params in rules.items()}
    poisoning.active = True
    attacked = {name: await final_accuracy(cli, c, name, params) for name, params in rules.items()}
    report = {name: (round(clean[name], 3), round(attacked[name], 3)) for name in rules}
    # The clean runs learn something worth protecting.
    assert all(acc > 0.75 for acc in clean.values()), report
    for name in ROBUST:
        assert attacked[name] >= clean[name] - 0.02, (name, report)
    # FedAvg is dragged off: far more than 2 points lost.
    assert attacked["fedavg"] < clean["fedavg"] - 0.10, report


# Every update's difference from its base clipped to L2 norm 1.
CLIP = {"max_update_distance": 1.0, "update_distance_action": "clip"}


@pytest.mark.parametrize("poisoned_world", [CLIP], indirect=True)
async def test_the_distance_bound_alone_blunts_the_attack_on_fedavg(
    poisoned_world: tuple[Cluster, Poisoning], cli: Cli
) -> None:
    c, poisoning = poisoned_world
    clean = await final_accuracy(cli, c, "fedavg", "{}")
    poisoning.active = True
    attacked = await final_accuracy(cli, c, "fedavg", "{}")
    assert clean > 0.75 and attacked >= clean - 0.02, (clean, attacked)
