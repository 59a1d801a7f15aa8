"""`propeller-fl experiment run / history / watch / stop` against the stack with three real
proplets: a live line per round, the history as a table and JSON, a stop."""

from __future__ import annotations

import asyncio
import os
import pty
import re
import uuid
from pathlib import Path

import pytest

from tests.cli.helpers import Cli, console_script, table_rows, terminal_screen
from tests.cli.test_client_experiment import Fl, fl  # noqa: F401

V0 = "fl/models/global_model_v0"


async def test_run_watch_history_and_stop(cli: Cli, fl: Fl, tmp_path: Path) -> None:  # noqa: F811
    f = fl.flags
    eid = f"exp-{uuid.uuid4().hex[:8]}"
    run = await cli(
        "experiment", "run", "--experiment-id", eid, "--model-ref", V0,
        "--participants", ",".join(fl.ids), "--image", fl.image, "--rounds", "3",
        "--stop-metric", "loss", "--stop-source", "training", "--stop-goal", "minimize",
        "--patience", "5", "--watch", *f,
    )  # fmt: skip
    run.ok()
    _, _, events = run.out.rpartition("skipped: none\n\n")
    lines = events.splitlines()
    kinds = [line.split()[1] for line in lines]
    assert kinds[0] == "SNAPSHOT" and kinds[-1] == "ENDED"
    finished = [line for line in lines if line.split()[1] == "ROUND_FINISHED"]
    # A live line per round: which round of how many, its outcome, the version it stored.
    assert [line.split()[2:4] for line in finished][-1] == ["round", "3/3"]
    assert f"{eid}-r3  COMPLETED  model=fl/models/global_model_v3 reported=3" in finished[-1]
    assert "loss=" in finished[-1]
    assert "COMPLETED  MAX_ROUNDS after round 3" in lines[-1]

    header, rows = table_rows((await cli("experiment", "history", eid, *f)).ok().out)
    assert header == [
        "ROUND", "ROUND ID", "STATE", "MODEL", "SAMPLED", "REPORTED", "CLOSED", "TRAIN", "EVAL",
        "FUEL",
    ]  # fmt: skip
    assert [r[:7] for r in rows] == [
        [str(i), f"{eid}-r{i}", "COMPLETED", f"v{i}", "3", "3", "k_of_n"] for i in (1, 2, 3)
    ]
    doc = (await cli("experiment", "history", eid, "--json", *f)).ok().json()
    assert [r["new_model_uri"] for r in doc["rounds"]] == [
        f"fl/models/global_model_v{i}" for i in (1, 2, 3)
    ]
    png = tmp_path / "exp.png"
    plotted = (await cli("experiment", "plot", eid, "--output", str(png), "--json", *f)).ok()
    assert plotted.json() == {"experiment_id": eid, "rounds": 3, "plot": str(png)}
    assert png.read_bytes()[:4] == b"\x89PNG"
    got = (await cli("experiment", "get", eid, *f)).ok().out
    assert re.search(r"^state:\s+COMPLETED$", got, re.M)
    assert re.search(r"^ended:\s+MAX_ROUNDS after round 3", got, re.M)

    # A long one, stopped from another command; its watch ends with the stop.
    long = f"exp-{uuid.uuid4().hex[:8]}"
    started = await cli(
        "experiment", "run", "--experiment-id", long, "--model-ref", V0,
        "--all-alive", "--sample-count", "2", "--image", fl.image, "--rounds", "1000", *f,
    )  # fmt: skip
    started.ok()
    stopped = (await cli("experiment", "stop", long, "--json", *f)).ok().json()
    assert stopped["state"] == "EXPERIMENT_STATE_STOPPED"
    assert stopped["end"]["reason"] == "END_REASON_STOPPED"
    watched = (await cli("experiment", "watch", long, *f)).ok().out.splitlines()
    assert len(watched) == 1 and watched[0].split()[1:3] == ["SNAPSHOT", "round"]

    # Bad values: one line naming the field.
    bad = await cli(
        "experiment", "run", "--experiment-id", "bad", "--model-ref", V0,
        "--participants", ",".join(fl.ids), "--image", fl.image, "--sample-fraction", "2", *f,
    )  # fmt: skip
    bad.failed_with("sampling.fraction")
    (await cli("experiment", "stop", "nope", *f)).failed_with("experiment_id")


@pytest.mark.process
async def test_run_watch_on_a_terminal_redraws_the_rounds_and_a_bar(fl: Fl) -> None:  # noqa: F811
    """The console script on a pseudo-terminal: the rounds' table redrawn in place, a bar of
    the round in flight while it runs, and the end."""
    eid = f"exp-{uuid.uuid4().hex[:8]}"
    master, slave = pty.openpty()
    try:
        proc = await asyncio.create_subprocess_exec(
            console_script(),
            "experiment", "run", "--experiment-id", eid, "--model-ref", V0,
            "--participants", ",".join(fl.ids), "--image", fl.image, "--rounds", "2",
            "--watch", *fl.flags,
            stdin=slave, stdout=slave, stderr=slave,
            env={**os.environ, "TERM": "xterm"},
        )  # fmt: skip
    finally:
        os.close(slave)
    chunks: list[bytes] = []

    def read_all() -> None:
        while True:
            try:
                data = os.read(master, 1 << 16)
            except OSError:  # EIO: the child closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    try:
        await asyncio.wait_for(asyncio.gather(asyncio.to_thread(read_all), proc.wait()), 120)
    finally:
        os.close(master)
    raw = b"".join(chunks).decode()
    assert proc.returncode == 0, raw
    bars = re.findall(r"round (\d)/2 \S+  \[[#-]+\] (\d)/3 updates", raw)
    assert {index for index, _ in bars} == {"1", "2"}, raw  # a bar for each round in flight
    screen = terminal_screen(raw)
    at = next(i for i, line in enumerate(screen) if line.startswith("ROUND "))
    assert [line.split()[:4] for line in screen[at + 1 : at + 3]] == [
        ["1", f"{eid}-r1", "COMPLETED", "v1"],
        ["2", f"{eid}-r2", "COMPLETED", "v2"],
    ]
    assert screen[at + 3].startswith("COMPLETED  MAX_ROUNDS after round 2"), screen
