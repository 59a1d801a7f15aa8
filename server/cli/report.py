"""What `propeller-fl demo` reports: the per-round table on stdout, the convergence plot (PNG)
and the JSON record of the run, and the numbers in them (log-loss and accuracy of a global
model on all proplets' data, computed as the trainer does)."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from server.tensors import Array, Tensors

# Same clamps as the trainer (wasm-client/README.md), so the numbers are comparable.
LOGIT_CLAMP = 20.0
PROB_CLIP = 1e-12


def evaluate(model: Tensors, features: Array, labels: Array) -> tuple[float, float]:
    """Mean log-loss and accuracy of the logistic model {w, b} on (features, labels), computed
    as the trainer does: logit clamped to +-20, probability clipped to [1e-12, 1 - 1e-12]."""
    w = np.asarray(model["w"], dtype=np.float64)
    b = float(np.asarray(model["b"], dtype=np.float64))
    z = np.clip(features @ w + b, -LOGIT_CLAMP, LOGIT_CLAMP)
    p = np.clip(1.0 / (1.0 + np.exp(-z)), PROB_CLIP, 1.0 - PROB_CLIP)
    loss = -np.mean(labels * np.log(p) + (1.0 - labels) * np.log(1.0 - p))
    accuracy = np.mean((p >= 0.5) == (labels == 1.0))
    return float(loss), float(accuracy)


@dataclass
class RoundRow:
    """One completed round, as the table, the plot and the record show it."""

    index: int
    round_id: str
    experiment_id: str
    base_model_uri: str
    model_version: int
    model_uri: str
    k_of_n: int
    participants: list[str]
    reported: list[str]
    closed_by: str
    wall_time_s: float
    round_metrics: dict[str, float]
    proplet_metrics: dict[str, dict[str, Any]]
    skipped: dict[str, str] = field(default_factory=dict)
    # Filled in once the new model is evaluated.
    sha256: str = ""
    loss: float = math.nan
    accuracy: float = math.nan
    # On a held-out test split (`demo --dataset digits`); NaN when there is none.
    test_loss: float = math.nan
    test_accuracy: float = math.nan

    def to_record(self) -> dict[str, Any]:
        held_out = (
            {"test_loss": self.test_loss, "test_accuracy": self.test_accuracy}
            if not math.isnan(self.test_accuracy)
            else {}
        )
        return {
            "round": self.index,
            "round_id": self.round_id,
            "experiment_id": self.experiment_id,
            "base_model_uri": self.base_model_uri,
            "model_version": self.model_version,
            "model_uri": self.model_uri,
            "sha256": self.sha256,
            "k_of_n": self.k_of_n,
            "participants": self.participants,
            "skipped": self.skipped,
            "reported": self.reported,
            "num_reported": len(self.reported),
            "closed_by": self.closed_by,
            "loss": self.loss,
            "accuracy": self.accuracy,
            **held_out,
            "wall_time_s": round(self.wall_time_s, 4),
            "round_metrics": self.round_metrics,
            "proplet_metrics": self.proplet_metrics,
        }


class Table:
    """The per-round table on stdout, one row printed as each round completes."""

    HEADER = ("round", "model", "reported", "loss", "accuracy", "time")

    def __init__(self, out: TextIO, first_width: int, *, held_out: bool = False) -> None:
        """`held_out`: a last column, the accuracy on a held-out test split."""
        self.out = out
        self.held_out = held_out
        self.widths: tuple[int, ...] = (max(first_width, 9), 6, 8, 8, 8, 7)
        if held_out:
            self.widths = (*self.widths, 8)

    def _line(self, cells: Sequence[str]) -> None:
        parts = [c.ljust(w) for c, w in zip(cells, self.widths, strict=True)]
        self.out.write("  ".join(parts).rstrip() + "\n")
        self.out.flush()

    def header(self) -> None:
        self._line((*self.HEADER, "test_acc") if self.held_out else self.HEADER)

    def row(
        self,
        label: str,
        version: int,
        reported: str,
        loss: float,
        acc: float,
        wall: str,
        test_acc: float | None = None,
    ) -> None:
        cells = [label, f"v{version}", reported, f"{loss:.4f}", f"{acc:.4f}", wall]
        if self.held_out:
            cells.append("-" if test_acc is None else f"{test_acc:.4f}")
        self._line(cells)


RECORD_ORDER = (
    "command",
    "created_at",
    "status",
    "error",
    "config",
    "trainer",
    "proplet_ids",
    "data",
    "initial",
    "rounds",
    "final_model",
    "models",
    "timings",
)


class Record:
    """The JSON record of a run (docs/demo.md lists its keys), filled in as the run goes and
    written at its end, also when it fails; `plot_rows` are the points of the plot."""

    def __init__(self, config: dict[str, Any], started: float) -> None:
        self.started = started
        self.doc: dict[str, Any] = {
            "command": "propeller-fl demo",
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "status": "running",
            "config": config,
        }
        self.rows: list[RoundRow] = []
        self.plot_rows: list[dict[str, Any]] = []
        self.timings: dict[str, float] = {}
        self.models: list[dict[str, Any]] = []

    def lap(self, name: str, since: float) -> float:
        """Time `name` as the seconds since `since`; now."""
        now = time.perf_counter()
        self.timings[name] = round(now - since, 4)
        return now

    def add_model(self, version: int, uri: str, sha256: str, model: Tensors) -> dict[str, Any]:
        entry = {
            "version": version,
            "model_uri": uri,
            "sha256": sha256,
            "tensors": {name: np.asarray(arr).tolist() for name, arr in model.items()},
        }
        self.models.append(entry)
        return entry

    def finish(self, status: str, error: str = "") -> None:
        self.doc["status"] = status
        if error:
            self.doc["error"] = error
        self.doc["rounds"] = [r.to_record() for r in self.rows if r.sha256]  # evaluated
        self.doc["models"] = self.models
        self.timings["total_s"] = round(time.perf_counter() - self.started, 4)
        self.doc["timings"] = self.timings

    def write(self, path: Path) -> None:
        ordered = {k: self.doc[k] for k in RECORD_ORDER if k in self.doc}
        ordered.update((k, v) for k, v in self.doc.items() if k not in ordered)
        text = json.dumps(ordered, indent=2) + "\n"
        _atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_plot(path: Path, rows: list[dict[str, Any]], title: str) -> None:
    """Loss and accuracy of the global model against the round (0 = the initial model)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rounds = [r["round"] for r in rows]
    fig = Figure(figsize=(9.0, 3.8), dpi=110)
    FigureCanvasAgg(fig)
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.plot(rounds, [r["loss"] for r in rows], marker="o", label="global (all data)")
    local = [(r["round"], r["local_loss"]) for r in rows if r.get("local_loss") is not None]
    if local:
        _dashed(ax_loss, local, marker=".", label="trainers' local, after training")
    ax_loss.set_xlabel("round")
    ax_loss.set_ylabel("log-loss")
    ax_loss.set_title("log-loss")
    ax_loss.legend()
    held_out = [(r["round"], r["test_accuracy"]) for r in rows if "test_accuracy" in r]
    ax_acc.plot(
        rounds,
        [r["accuracy"] for r in rows],
        marker="o",
        color="tab:green",
        label="train (all proplets' data)",
    )
    if held_out:
        _dashed(ax_acc, held_out, marker="s", color="tab:red", label="test (held-out split)")
        ax_acc.legend()
    ax_acc.set_xlabel("round")
    ax_acc.set_ylabel("accuracy")
    ax_acc.set_ylim(0.0, 1.0)
    ax_acc.set_title("accuracy")
    for ax in (ax_loss, ax_acc):
        ax.set_xticks(rounds)
        ax.grid(True, alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


# `experiment plot`: the series drawn, each (panel, label, metric source, metric name).
EXPERIMENT_SERIES = (
    ("loss", "train (updates)", "train", "loss"),
    ("loss", "evaluation (held-out)", "eval", "loss"),
    ("accuracy", "train (updates)", "train", "accuracy"),
    ("accuracy", "evaluation (held-out)", "eval", "accuracy"),
)


def _dashed(ax: Any, points: Sequence[tuple[Any, Any]], **style: Any) -> None:
    """A series known for some rounds only (x, y pairs), dashed beside the solid one."""
    ax.plot([x for x, _ in points], [y for _, y in points], linestyle="--", **style)


def experiment_series(
    rounds: Sequence[tuple[int, Mapping[str, float], Mapping[str, float]]],
) -> dict[tuple[str, str], list[tuple[int, float]]]:
    """The points `experiment plot` draws from (round index, train metrics, eval metrics):
    per (panel, label), the rounds that have the metric; series without a point left out."""
    found: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for panel, label, source, name in EXPERIMENT_SERIES:
        points = [
            (index, (train if source == "train" else evaluation)[name])
            for index, train, evaluation in rounds
            if name in (train if source == "train" else evaluation)
        ]
        if points:
            found[(panel, label)] = points
    return found


def write_experiment_plot(
    path: Path,
    rounds: Sequence[tuple[int, Mapping[str, float], Mapping[str, float]]],
    title: str,
) -> None:
    """Loss and accuracy per round of an experiment: its training metrics (the updates'
    sample-weighted means) and its evaluation metrics (held-out splits), as PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9.0, 3.8), dpi=110)
    FigureCanvasAgg(fig)
    axes = dict(zip(("loss", "accuracy"), fig.subplots(1, 2), strict=True))
    for (panel, label), points in experiment_series(rounds).items():
        axes[panel].plot([x for x, _ in points], [y for _, y in points], marker="o", label=label)
    for panel, ax in axes.items():
        ax.set_xlabel("round")
        ax.set_title(panel)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def _atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
