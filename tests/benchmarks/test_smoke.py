"""The benchmarks' one command at smoke size (what CI runs): every benchmark runs end to end
against the real services and mosquitto, prints its figures and appends its results. Nothing
here looks at how fast anything was."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks import BENCHMARK_NAMES

ROOT = Path(__file__).resolve().parents[2]
FIELDS = {"timestamp", "run", "commit", "smoke", "benchmark", "case", "figures", "machine"}


def test_smoke_run_prints_figures_and_appends_results(tmp_path: Path) -> None:
    results = tmp_path / "results.jsonl"
    results.write_text('{"earlier": "line"}\n')  # appended to, never rewritten
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--smoke", "--results", str(results)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = results.read_text().splitlines()
    assert lines[0] == '{"earlier": "line"}'
    entries = [json.loads(line) for line in lines[1:]]
    assert entries, proc.stdout
    for entry in entries:
        assert set(entry) >= FIELDS, entry
        assert entry["smoke"] is True
        assert entry["figures"], entry
        assert entry["machine"]["cores"] >= 1
    assert {e["benchmark"].split("-")[0] for e in entries} == set(BENCHMARK_NAMES)
    assert len({e["run"] for e in entries}) == 1
    # Every result line was also printed, with its figures.
    for name in BENCHMARK_NAMES:
        printed = [line for line in proc.stdout.splitlines() if line.startswith(name)]
        assert any(any(ch.isdigit() for ch in line) for line in printed), proc.stdout


def test_table_renders_the_latest_run(tmp_path: Path) -> None:
    results = tmp_path / "results.jsonl"
    entry = {
        "timestamp": "2026-01-01T00:00:00+00:00",
        "run": "r1",
        "commit": "abc",
        "smoke": False,
        "benchmark": "wasm",
        "case": {},
        "figures": {"x": 1},
        "targets": {">= 0.5 of native": True},
        "summary": "wasm 1 M samples/s",
        "machine": {
            "cpu": "cpu",
            "cores": 2,
            "mem_gib": 1.0,
            "os": "Linux",
            "python": "3.11",
            "numpy": "2",
            "grpcio": "1",
            "wasmtime": "50",
        },
    }
    results.write_text(json.dumps(entry) + "\n")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--table", "--results", str(results)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "| wasm | wasm 1 M samples/s | >= 0.5 of native: met |" in proc.stdout
