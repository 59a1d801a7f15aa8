"""`propeller-fl demo` as a user runs it: a real subprocess in an empty directory, nothing but
this package installed. Its numbers are checked against an independent recomputation from
the record and the data (the process is gone by then, so nothing is fetched)."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from server.datastore.datasets import synthetic_dataset

F64 = npt.NDArray[np.float64]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DEMO_TIMEOUT_S = 180


def run_cli(
    cwd: Path, *args: str, timeout: float = DEMO_TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server.cli.main", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def log_loss_and_accuracy(tensors: dict[str, Any], x: F64, y: F64) -> tuple[float, float]:
    """The documented metric, written out again: mean log-loss of sigmoid(clamp(x.w + b, +-20))
    with p clipped to [1e-12, 1 - 1e-12], and accuracy of p >= 0.5."""
    w = np.asarray(tensors["w"], dtype=np.float64)
    b = float(tensors["b"])
    losses, correct = [], 0
    for row, label in zip(x, y, strict=True):
        z = min(20.0, max(-20.0, float(np.dot(row, w)) + b))
        p = min(1 - 1e-12, max(1e-12, 1.0 / (1.0 + math.exp(-z))))
        losses.append(-(label * math.log(p) + (1 - label) * math.log(1 - p)))
        correct += int((p >= 0.5) == (label == 1.0))
    return float(np.mean(losses)), correct / len(y)


def model_sha256(tensors: dict[str, Any]) -> str:
    """sha256 over the float64 tensor bytes in header order (w, then b)."""
    h = hashlib.sha256()
    h.update(np.asarray(tensors["w"], dtype="<f8").tobytes())
    h.update(np.asarray(tensors["b"], dtype="<f8").tobytes())
    return h.hexdigest()


def table_rows(stdout: str, prefix: str) -> list[list[str]]:
    return [line.split() for line in stdout.splitlines() if line.startswith(prefix)]


def check_run(record: dict[str, Any], rounds: int, x: F64, y: F64) -> None:
    """What every successful demo run must show, recomputed from the record and the data."""
    assert record["status"] == "completed"
    rows = record["rounds"]
    assert [r["round"] for r in rows] == list(range(1, rounds + 1))
    assert [r["model_version"] for r in rows] == list(range(1, rounds + 1))
    assert [m["version"] for m in record["models"]] == list(range(rounds + 1))
    # The loss really falls, every round, from the zero model's ln 2.
    losses = [record["initial"]["loss"], *(r["loss"] for r in rows)]
    assert math.isclose(losses[0], math.log(2), rel_tol=1e-12)
    assert all(a > b for a, b in itertools.pairwise(losses)), losses
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    # Each stored model's numbers equal a recomputation on the same data, and its weights are
    # the registry's (same sha256).
    for model, row in zip(record["models"], [record["initial"], *rows], strict=True):
        assert model["sha256"] == row["sha256"] == model_sha256(model["tensors"])
        loss, acc = log_loss_and_accuracy(model["tensors"], x, y)
        assert math.isclose(loss, row["loss"], rel_tol=1e-12)
        assert acc == row["accuracy"]
    assert record["final_model"] == record["models"][-1]
    final_loss, _ = log_loss_and_accuracy(record["final_model"]["tensors"], x, y)
    assert math.isclose(final_loss, rows[-1]["loss"], rel_tol=1e-12)


def check_artifacts(stdout: str, record: dict[str, Any], png: Path) -> None:
    rows = record["rounds"]
    printed = table_rows(stdout, "demo-r")
    assert len(printed) == len(rows), stdout
    for cells, row in zip(printed, rows, strict=True):
        # round id, model version, reported n/k, loss, accuracy, wall time
        assert cells[0] == row["round_id"]
        assert cells[1] == f"v{row['model_version']}"
        assert cells[2] == f"{row['num_reported']}/{row['k_of_n']}"
        assert cells[3] == f"{row['loss']:.4f}" and cells[4] == f"{row['accuracy']:.4f}"
        assert cells[5].endswith("s") and float(cells[5][:-1]) > 0
    initial = table_rows(stdout, "initial")
    assert initial == [
        [
            "initial",
            "v0",
            "-",
            f"{record['initial']['loss']:.4f}",
            f"{record['initial']['accuracy']:.4f}",
            "-",
        ]
    ]
    assert png.read_bytes().startswith(PNG_SIGNATURE)


def test_demo_three_rounds(tmp_path: Path, trainer_wasm: Path) -> None:
    done = run_cli(tmp_path, "demo", "--rounds", "3")
    assert done.returncode == 0, done.stderr
    record = json.loads((tmp_path / "propeller-fl-demo.json").read_text())
    cfg = record["config"]
    assert cfg["rounds"] == 3 and cfg["proplets"] == 3 and cfg["k_of_n"] == 3
    ids = record["proplet_ids"]
    assert len(ids) == 3
    # The data store's seeding function, called again here with the recorded ids.
    parts = [synthetic_dataset(pid, cfg["samples_per_proplet"], cfg["features"]) for pid in ids]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    check_run(record, 3, x, y)
    check_artifacts(done.stdout, record, tmp_path / "propeller-fl-demo.png")
    # The zero model says p = 0.5 everywhere, which counts as predicting 1.
    assert record["initial"]["accuracy"] == float(np.mean(y == 1.0))
    for row in record["rounds"]:
        assert sorted(row["reported"]) == sorted(ids) and row["closed_by"] == "k_of_n"
        # Each trainer's own numbers, from its task result.
        assert set(row["proplet_metrics"]) == set(ids)
        for pid, m in row["proplet_metrics"].items():
            assert m["num_samples"] == 64, pid
            assert m["metrics"]["loss"] < m["metrics"]["loss_before"]
        local = np.mean([m["metrics"]["loss"] for m in row["proplet_metrics"].values()])
        assert math.isclose(row["round_metrics"]["loss"], float(local), rel_tol=1e-9)
    assert record["trainer"]["sha256"] == hashlib.sha256(trainer_wasm.read_bytes()).hexdigest()


def test_demo_on_a_csv_file(tmp_path: Path, trainer_wasm: Path) -> None:
    rng = np.random.default_rng(7)
    x = rng.normal(0.0, 1.0, size=(150, 2))
    y = (rng.random(150) < 1.0 / (1.0 + np.exp(-(x @ np.array([2.0, -1.5]) + 0.3)))).astype(float)
    csv = tmp_path / "data.csv"
    rows = zip(x.tolist(), y.tolist(), strict=True)
    lines = ["f1,f2,label", *(f"{a!r},{b!r},{int(c)}" for (a, b), c in rows)]
    csv.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    done = run_cli(
        tmp_path,
        "demo",
        "--rounds",
        "3",
        "--proplets",
        "3",
        "--dataset",
        str(csv),
        "--plot",
        str(out / "curve.png"),
        "--record",
        str(out / "run.json"),
    )
    assert done.returncode == 0, done.stderr
    record = json.loads((out / "run.json").read_text())
    assert record["data"]["source"] == "file" and record["data"]["num_features"] == 2
    assert list(record["data"]["samples_per_proplet"].values()) == [50, 50, 50]
    check_run(record, 3, x, y)
    check_artifacts(done.stdout, record, out / "curve.png")
    assert not (tmp_path / "propeller-fl-demo.json").exists()


def test_a_failing_round_exits_non_zero_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "not-a-module.wasm"
    bad.write_bytes(b"\x00asm but not really")
    done = run_cli(tmp_path, "demo", "--rounds", "2", "--wasm", str(bad), timeout=60)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    # The round fails as soon as a task failure leaves fewer than k_of_n able to report.
    assert last.startswith(
        "propeller-fl demo: round 1 (demo-r1) failed: k_of_n 3 can no longer be reached: "
    ), last
    assert "invalid wasm module" in last
    record = json.loads((tmp_path / "propeller-fl-demo.json").read_text())
    assert record["status"] == "failed" and record["rounds"] == []
    assert record["error"] in last


def mlp_scores(tensors: dict[str, Any], x: Any, y: Any) -> tuple[float, float]:
    """Mean softmax cross-entropy and accuracy of the MLP {l<i>.w, l<i>.b}, written out again
    sample by sample (ReLU between layers, the first largest output is the prediction)."""
    layers = sum(1 for name in tensors if name.endswith(".w"))
    ws = [np.asarray(tensors[f"l{i}.w"], dtype=np.float64) for i in range(layers)]
    bs = [np.asarray(tensors[f"l{i}.b"], dtype=np.float64) for i in range(layers)]
    losses, correct = [], 0
    for row, label in zip(x, y, strict=True):
        a = row
        for i in range(layers):
            a = a @ ws[i] + bs[i]
            if i < layers - 1:
                a = np.maximum(a, 0.0)
        top = float(np.max(a))
        losses.append(math.log(sum(math.exp(v - top) for v in a)) - (a[int(label)] - top))
        correct += int(int(np.argmax(a)) == int(label))
    return float(np.mean(losses)), correct / len(y)


def test_demo_on_digits_trains_the_mlp(tmp_path: Path, mlp_wasm: Path) -> None:
    from server.datastore import catalog

    done = run_cli(tmp_path, "demo", "--dataset", "digits", "--rounds", "3")
    assert done.returncode == 0, done.stderr
    record = json.loads((tmp_path / "propeller-fl-demo.json").read_text())
    assert record["status"] == "completed"
    assert record["trainer"]["sha256"] == hashlib.sha256(mlp_wasm.read_bytes()).hexdigest()
    cfg = record["config"]
    assert (cfg["epochs"], cfg["lr"], cfg["batch_size"]) == (2, 0.1, 16)
    data = record["data"]
    assert data["source"] == "digits" and data["num_classes"] == 10
    corpus = catalog.digits()
    # The whole train split, dealt out over the three proplets (sizes differ by at most one).
    sizes = list(data["samples_per_proplet"].values())
    assert sum(sizes) == corpus.train.size == 1438 and max(sizes) - min(sizes) <= 1
    assert data["test_samples"] == corpus.test.size
    rows = [record["initial"], *record["rounds"]]
    assert [r["model_version"] for r in rows] == [0, 1, 2, 3]
    # Every model's numbers recomputed from its recorded weights: on the pooled train split
    # (the proplets' data, in another order: the mean is the same) and the held-out test split.
    for model, row in zip(record["models"], rows, strict=True):
        loss, acc = mlp_scores(model["tensors"], corpus.train.features, corpus.train.labels)
        assert math.isclose(loss, row["loss"], rel_tol=1e-9) and math.isclose(acc, row["accuracy"])
        t_loss, t_acc = mlp_scores(model["tensors"], corpus.test.features, corpus.test.labels)
        assert math.isclose(t_loss, row["test_loss"], rel_tol=1e-9)
        assert math.isclose(t_acc, row["test_accuracy"])
    # It learns: from about chance (10 classes) to well above it on data it never saw.
    test_acc = [r["test_accuracy"] for r in rows]
    assert test_acc[0] < 0.3 and test_acc[-1] > 0.8, test_acc
    assert all(a > b for a, b in itertools.pairwise(r["loss"] for r in rows))
    # The table has the held-out accuracy as its last column.
    printed = table_rows(done.stdout, "demo-r")
    assert [c[-1] for c in printed] == [f"{r['test_accuracy']:.4f}" for r in rows[1:]]
    assert table_rows(done.stdout, "initial")[0][-1] == f"{test_acc[0]:.4f}"
    assert (tmp_path / "propeller-fl-demo.png").read_bytes().startswith(PNG_SIGNATURE)


def test_digits_refusals_are_one_line(tmp_path: Path) -> None:
    too_many = run_cli(tmp_path, "demo", "--dataset", "digits", "--proplets", "200")
    assert too_many.returncode == 1
    assert too_many.stderr.strip().splitlines() == [
        "propeller-fl demo: --proplets: 200 proplets x --min-samples 10 need 2000 samples, "
        "the train split has 1438"
    ]
    typo = run_cli(tmp_path, "demo", "--dataset", "digitz")
    assert typo.returncode == 1
    assert typo.stderr.strip().splitlines() == [
        "propeller-fl demo: --dataset: digitz: no such file (or a shipped dataset: digits)"
    ]
    assert not list(tmp_path.iterdir())  # nothing written
