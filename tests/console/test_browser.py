"""The console in headless Chromium over the whole stack (five services in process, real
proplets running the trainer, mutual TLS, the console reading as an operator): the page
loads and lists the proplets alive, an experiment started by the test shows up and its
rounds complete on the page with their timings, the convergence plot has each round's
points (the values the manager recorded), and a screenshot is saved. A console started after
the experiment ended shows its rounds too."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from propeller.v1 import coordinator_pb2, manager_pb2
from server.config import MqttConfig
from server.console.app import Console, ConsoleConfig
from tests.support.browser import Browser, browser
from tests.support.clients import HYPER, V0
from tests.support.cluster import Cluster, cluster
from tests.support.security import operator_tls
from tests.support.waits import eventually

pytestmark = pytest.mark.process  # Chromium and chromedriver are child processes

ROUNDS = 3
# Each training series and each evaluation series: loss and accuracy.
SERIES = {
    "train_loss": ("train", "loss"),
    "train_accuracy": ("train", "accuracy"),
    "eval_loss": ("eval", "loss"),
    "eval_accuracy": ("eval", "accuracy"),
}
TIMEOUT = 120.0
# Rounds of a few tenths of a second (64 samples x 60,000 epochs of the linear trainer), so the
# console (polling every 0.1 s) learns of the experiment while its first round is open and
# watches each later round from its start: a round of ~30 ms can close between two polls, and
# then no close time is ever seen (RoundStatus has none).
SLOW = coordinator_pb2.Hyperparams(epochs=60_000, lr=HYPER.lr, batch_size=HYPER.batch_size)

# What the page shows, read from its DOM (the rows and plot points it drew).
PAGE = """
const rows = (sel) => [...document.querySelectorAll(sel)];
return {
  status: document.getElementById("status").textContent,
  proplets: rows("#proplets tbody tr").map((r) => [r.dataset.id, r.dataset.alive]),
  experiments: rows("#experiments tbody tr").map((r) => [r.dataset.experimentId, r.dataset.state]),
  rounds: rows("#rounds tbody tr").map((r) => ({
    id: r.dataset.roundId, state: r.dataset.state,
    cells: [...r.cells].map((c) => c.textContent),
  })),
  points: rows("#plot circle").map((c) => [c.dataset.series, +c.dataset.round, +c.dataset.value]),
};
"""
# The rounds table's columns, as the page heads them.
COLUMNS = (
    "#",
    "round",
    "state",
    "updates",
    "started",
    "closed",
    "completed",
    "closed by",
    "version",
    "train loss",
    "train acc",
    "eval loss",
    "eval acc",
)


@pytest.fixture
async def stack(mqtt: MqttConfig, trainer_image: str, tmp_path: Path) -> AsyncIterator[Cluster]:
    async with cluster(mqtt, tmp_path, proplets=2, image=trainer_image) as c:
        yield c


@pytest.fixture
async def console(stack: Cluster) -> AsyncIterator[Console]:
    config = ConsoleConfig(
        endpoints=stack.endpoints, tls=operator_tls(), listen="127.0.0.1:0", poll_s=0.1
    )
    async with Console(config) as running:
        yield running


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[Browser]:
    with browser(tmp_path / "chromium-profile") as b:
        yield b


async def page(b: Browser) -> dict[str, Any]:
    shown: dict[str, Any] = await asyncio.to_thread(b.script, PAGE)
    return shown


async def test_a_round_shows_up_completes_and_is_plotted(
    stack: Cluster, console: Console, chromium: Browser, tmp_path: Path
) -> None:
    c = stack
    await asyncio.to_thread(chromium.open, console.url)
    loaded = await eventually(
        lambda: page(chromium),
        lambda p: p["status"] == "live" and len(p["proplets"]) == 2,
        timeout=30,
        what="the page live with both proplets",
    )
    assert sorted(loaded["proplets"]) == sorted([pid, "yes"] for pid in c.proplet_ids)
    assert loaded["experiments"] == [] and loaded["points"] == []

    experiment_id = f"console-{uuid.uuid4().hex[:6]}"
    await c.manager.StartExperiment(
        manager_pb2.StartExperimentRequest(
            experiment_id=experiment_id,
            model_ref=V0,
            participants=c.proplet_ids,
            hyperparams=SLOW,
            timeout_s=60,
            task_wasm_image=c.image,
            rounds=ROUNDS,
            evaluation=manager_pb2.EvaluationPlan(every_rounds=1),
        ),
        timeout=60,
    )
    round_ids = [f"{experiment_id}-r{i}" for i in range(1, ROUNDS + 1)]
    shown = await eventually(
        lambda: page(chromium),
        lambda p: (
            p["experiments"] == [[experiment_id, "COMPLETED"]]
            and [r["state"] for r in p["rounds"]] == ["COMPLETED"] * ROUNDS
            # Every series, a point per round.
            and len(p["points"]) == len(SERIES) * ROUNDS
        ),
        timeout=TIMEOUT,
        what=f"experiment {experiment_id} completed on the page",
    )
    screenshot = chromium.screenshot(tmp_path / "console.png")
    assert screenshot.stat().st_size > 10_000

    # The rounds as the manager recorded them: the page shows the same.
    e = await c.manager.GetExperiment(
        manager_pb2.GetExperimentRequest(experiment_id=experiment_id), timeout=10
    )
    assert [r.round_id for r in e.rounds] == round_ids
    closed_seen = 0
    for r, row in zip(e.rounds, shown["rounds"], strict=True):
        cells = dict(zip(COLUMNS, row["cells"], strict=True))
        assert row["id"] == r.round_id and cells["#"] == str(r.index)
        assert cells["updates"] == "2/2" and cells["closed by"] == r.closed_by == "k_of_n"
        assert cells["version"] == f"v{r.new_model_version}"
        # Started and completed are the round's own (RoundStatus); completed after the start.
        assert "—" not in (cells["started"], cells["completed"]), cells
        assert "(+" in cells["completed"], cells
        # RoundStatus has no close time: the page knows it from the watch's AGGREGATING event,
        # so a round that closed before the console watched it (the first, here, may close
        # before the console has even listed the experiment) shows "—" (docs/console.md).
        if cells["closed"] != "—":
            assert "(+" in cells["closed"], cells
            closed_seen += 1
        assert cells["train loss"] == f"{r.train_metrics['loss']:.4f}"
        assert cells["eval acc"] == f"{r.eval_metrics['accuracy']:.4f}"
    assert closed_seen >= 1, shown["rounds"]  # the rounds watched while open show it
    metrics = {"train": lambda r: r.train_metrics, "eval": lambda r: r.eval_metrics}
    expected = {
        (series, r.index, round(metrics[source](r)[metric], 6))
        for r in e.rounds
        for series, (source, metric) in SERIES.items()
    }
    assert {(s, i, round(v, 6)) for s, i, v in shown["points"]} == expected

    # A console that starts later learns the ended experiment's rounds from the lists (the
    # close time only a live watch sees: RoundStatus has none), their places in the
    # experiment and evaluation metrics from the manager's (what the plot is drawn from).
    async with Console(dataclasses.replace(console.config)) as later:
        rounds = await eventually(
            lambda: _rounds(later),
            lambda rs: (
                [r.get("state") for r in rs] == ["COMPLETED"] * ROUNDS
                and all(r.get("started_at") and r.get("completed_at") for r in rs)
                and [r.get("index") for r in rs] == list(range(1, ROUNDS + 1))
            ),
            what="the rounds in a later console",
        )
    assert [r["round_id"] for r in rounds] == round_ids
    assert [r["train"]["loss"] for r in rounds] == [r.train_metrics["loss"] for r in e.rounds]
    assert [r["eval"] for r in rounds] == [dict(r.eval_metrics) for r in e.rounds]


async def _rounds(console: Console) -> list[dict[str, Any]]:
    rounds: list[dict[str, Any]] = console.board.snapshot()["rounds"]
    return sorted(rounds, key=lambda r: r.get("index") or 0)
