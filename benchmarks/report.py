"""The latest run in a results file as a Markdown table (`python -m benchmarks --table`)."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.common import Json


def latest_run(path: Path, smoke: bool = False) -> list[Json]:
    """For each benchmark, its entries from the last run that ran it (full runs only, unless
    `smoke`), so `--only NAME` refreshes just that benchmark's rows."""
    entries: list[Json] = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                entry = json.loads(line)
                if entry.get("run") and bool(entry.get("smoke")) == smoke:
                    entries.append(entry)
    last_run: dict[str, str] = {}
    for e in entries:
        last_run[e["benchmark"]] = e["run"]
    order = list(dict.fromkeys(e["benchmark"] for e in entries))
    return [
        e
        for name in order
        for e in entries
        if e["benchmark"] == name and e["run"] == last_run[name]
    ]


def _targets(entry: Json) -> str:
    targets: dict[str, bool] = entry.get("targets") or {}
    return "; ".join(f"{k}: {'met' if v else '**not met**'}" for k, v in targets.items()) or "-"


def markdown(path: Path, smoke: bool = False) -> str:
    entries = latest_run(path, smoke)
    if not entries:
        return f"(no {'smoke ' if smoke else ''}results in {path})"
    lines = []
    for run in dict.fromkeys(e["run"] for e in entries):
        first = next(e for e in entries if e["run"] == run)
        m = first["machine"]
        names = ", ".join(dict.fromkeys(e["benchmark"] for e in entries if e["run"] == run))
        lines.append(
            f"- {names}: run {run} at {first['timestamp']}, commit `{first['commit']}`; "
            f"{m['cpu']}, {m['cores']} cores, {m['mem_gib']} GiB, {m['os']}, Python "
            f"{m['python']}, numpy {m['numpy']}, grpcio {m['grpcio']}, wasmtime {m['wasmtime']}."
        )
    lines += ["", "| benchmark | result | target |", "|---|---|---|"]
    for e in entries:
        summary = " ".join(str(e.get("summary", "")).split()).replace("|", "/")
        lines.append(f"| {e['benchmark']} | {summary} | {_targets(e)} |")
    return "\n".join(lines)
