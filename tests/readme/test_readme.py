"""Every command shown in README.md is run here, so the README cannot rot.

Each ```bash block in the README carries a marker comment saying how it is exercised:
- readme:setup       the two commands: demo.sh is run; test.sh is what .ci/run executes.
- readme:demo        run as shown (in a temp directory).
- readme:up          run as shown plus port flags (free ports; 1883 may be taken here).
- readme:walkthrough run by bash against that `up`, with `localhost:<seed port>` rewritten to
                     the free ports and the propeller-fl address variables set to match.
- readme:compose     needs a Docker engine, which CI machines lack: tests/compose runs the same
                     compose.yaml as a process cluster; here we check the commands name it.
A bash block without a marker fails the test.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
BIN = Path(sys.executable).parent
SEED_PORTS = {
    "manager": 7070,
    "coordinator": 8086,
    "aggregator": 8085,
    "registry": 8084,
    "datastore": 8083,
}
BLOCK = re.compile(r"<!-- readme:(\w+) -->\n```bash\n(.*?)```", re.S)


def blocks() -> dict[str, list[str]]:
    text = README.read_text()
    found: dict[str, list[str]] = {}
    for kind, body in BLOCK.findall(text):
        found.setdefault(kind, []).append(body)
    assert text.count("```bash") == sum(len(v) for v in found.values()), (
        "every ```bash block in README.md needs a <!-- readme:KIND --> marker"
    )
    return found


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    return e


def run(
    args: list[str], cwd: Path, timeout: float, environ: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`args` as a user runs them from `cwd` (in `environ`, else the test's environment with
    propeller-fl on PATH), their output captured as text."""
    return subprocess.run(
        args, cwd=cwd, env=environ or env(), capture_output=True, text=True, timeout=timeout
    )


def commands(block: str) -> list[str]:
    return [ln.split("#")[0].strip() for ln in block.splitlines() if ln.split("#")[0].strip()]


@pytest.mark.unit  # reads files only
def test_readme_opens_with_the_two_commands() -> None:
    head = README.read_text().split("\n\n")[:3]
    assert any("scripts/demo.sh" in part and "scripts/test.sh" in part for part in head)
    assert commands(blocks()["setup"][0]) == ["scripts/demo.sh", "scripts/test.sh"]
    # .ci/run is exactly the README's test command.
    ci = [
        ln for ln in commands((ROOT / ".ci/run").read_text()) if not ln.startswith(("set ", "cd "))
    ]
    assert ci == ["exec bash scripts/test.sh"]


def test_demo_script_and_demo_command(tmp_path: Path) -> None:
    # The README's first command, exactly (it sets up .venv, then runs the demo).
    proc = run([str(ROOT / "scripts/demo.sh"), "--rounds", "2"], tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"^demo-r2\s+v2\s+3/3", proc.stdout, re.M), proc.stdout
    for cmd in commands(blocks()["demo"][0]):
        proc = run(["bash", "-euo", "pipefail", "-c", cmd], tmp_path, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        rows = re.findall(r"^demo-r(\d)\s+v(\d)\s+3/3", proc.stdout, re.M)
        assert rows == [(str(i), str(i)) for i in range(1, 6)], proc.stdout
        assert (tmp_path / "propeller-fl-demo.png").exists()


@pytest.fixture
def up() -> Iterator[dict[str, int]]:
    (cmd,) = commands(blocks()["up"][0])
    ports = {name: free_port() for name in SEED_PORTS}
    mqtt = free_port()
    flags = [f"--{name}-port={port}" for name, port in ports.items()] + [f"--mqtt-port={mqtt}"]
    proc = subprocess.Popen(
        ["bash", "-c", f"exec {cmd} {' '.join(flags)}"],
        cwd=ROOT,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 120
        lines = []
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.strip() == "ready":
                break
        assert lines and lines[-1].strip() == "ready", "".join(lines)
        yield ports
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()


def test_walkthrough(up: dict[str, int]) -> None:
    script = "\n".join(blocks()["walkthrough"])
    for name, seed_port in SEED_PORTS.items():
        script = script.replace(f"localhost:{seed_port}", f"127.0.0.1:{up[name]}")
    assert "localhost:" not in script
    e = env()
    e.update(
        MANAGER_ADDR=f"127.0.0.1:{up['manager']}",
        COORDINATOR_ADDR=f"127.0.0.1:{up['coordinator']}",
        MODEL_REGISTRY_ADDR=f"127.0.0.1:{up['registry']}",
        DATA_STORE_ADDR=f"127.0.0.1:{up['datastore']}",
    )
    proc = run(["bash", "-euo", "pipefail", "-x", "-c", script], ROOT, timeout=300, environ=e)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "propeller.v1.Manager" in out and '"status": "SERVING"' in out
    assert re.search(r'"model_uri": "fl/models/global_model_v0"', out), out[:3000]
    assert out.count("COMPLETED") >= 2  # round watch, twice
    assert re.search(r"fl-round-r-\d+-[0-9a-f-]{36}", out)
    assert "global_model_v3" in out  # the manual task's round stored v3
    # models verify: the chain v0 -> v2 holds, each round's three signed updates checked.
    assert re.search(r"^v2\s+v1\s+r-\d+-2\s+3\s+[0-9a-f]{12}\s+ok$", out, re.M), out[-3000:]
    # models lineage: v2's round, its parent, its strategy; --chain back to v0.
    assert re.search(r"^parent:\s+v1 \(sha256 [0-9a-f]{12}\)$", out, re.M), out[-3000:]
    # v0 in the chain: no parent, experiment, round, strategy, updates or fuel.
    assert re.search(r"^v0(\s+-){6}\s+no lineage$", out, re.M), out[-3000:]
    # The grpcurl experiment: two fedadam rounds, watched to the end; the last version's
    # lineage names the strategy, its parameters and the state it started from.
    # Watched to its end: the ENDED event, or, when both rounds were over before grpcurl's
    # watch got through its handshake and reflection, the snapshot of the ended experiment
    # (the stream closes either way: grpcurl returned before its -max-time).
    ends = [
        e
        for e in json_objects(out)
        if e.get("type") == "EXPERIMENT_EVENT_TYPE_ENDED"
        or (
            e.get("type") == "EXPERIMENT_EVENT_TYPE_SNAPSHOT"
            and e.get("experiment", {}).get("state") == "EXPERIMENT_STATE_COMPLETED"
        )
    ]
    assert len(ends) == 1, out[-3000:]
    assert re.fullmatch(r"exp-r-\d+-grpc", ends[0]["experiment"]["experiment_id"]), ends
    assert re.search(r'"reason": "END_REASON_MAX_ROUNDS"', out), out[-3000:]
    assert re.search(r"^strategy:\s+fedadam \{.*\"eta\":0\.05", out, re.M), out[-3000:]
    assert re.search(r"^state:\s+from v\d+'s state [0-9a-f]{12}", out, re.M), out[-3000:]


def json_objects(text: str) -> Iterator[dict[str, Any]]:
    """The JSON objects grpcurl printed (each starts with "{" at the start of a line)."""
    decoder = json.JSONDecoder()
    for m in re.finditer(r"^\{", text, re.M):
        try:
            value, _ = decoder.raw_decode(text, m.start())
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            yield value


@pytest.mark.unit  # reads files only
def test_compose_commands_name_the_compose_file() -> None:
    for cmd in commands(blocks()["compose"][0]):
        assert cmd.startswith("docker compose ")
    assert (ROOT / "compose.yaml").exists()
    assert (ROOT / "tests/compose/test_compose.py").exists()
