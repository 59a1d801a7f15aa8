"""The seed walkthrough driven only through `propeller-fl`: push the trainer, init v0, start an
experiment with --watch on three real proplets, inspect rounds and models, then the manual
federated task path (round configure --start, tasks create/start)."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from server.config import MqttConfig
from server.stack import Stack, StackConfig
from tests.cli.helpers import Cli, flags, table_rows
from tests.support.infra import OciRegistry
from tests.support.security import session_ca
from tests.support.waits import eventually

HYPER = {"epochs": 1, "lr": 0.01, "batch_size": 16}
# The same in a --json answer, which shows every field of the message (no free keys here).
HYPER_JSON = HYPER | {"extra_json": ""}


@dataclass
class Fl:
    stack: Stack
    ids: list[str]
    flags: list[str]
    image: str


@pytest.fixture
async def fl(
    cli: Cli, mqtt: MqttConfig, registry: OciRegistry, trainer_wasm: Path, tmp_path: Path
) -> AsyncIterator[Fl]:
    """Stack + three proplets with seeded datasets, the trainer pushed with `wasm push`, v0."""
    ids = [str(uuid.uuid4()) for _ in range(3)]
    config = StackConfig(
        mqtt=mqtt,
        seed_proplet_ids=tuple(ids),
        proplet_ids=tuple(ids),
        proplet_work_dir=tmp_path,
        proplet_task_timeout_s=30,
        ca_dir=session_ca().dir,
    )
    async with Stack(config) as stack:
        f = flags(stack.endpoints)
        image = f"{registry.host}/fl-client-wasm:cli-{uuid.uuid4().hex[:6]}"
        (await cli("wasm", "push", str(trainer_wasm), "--image", image)).ok()
        await eventually(
            lambda: cli("proplets", "list", "--json", *f),
            lambda r: sum(p["alive"] for p in r.json()["proplets"]) == 3,
        )
        init = (await cli("models", "init", "--dimension", "3", "--json", *f)).ok().json()
        assert init["model_uri"] == "fl/models/global_model_v0"
        yield Fl(stack, ids, f, image)


async def test_experiment_start_watch_end_to_end(cli: Cli, fl: Fl) -> None:
    f = fl.flags
    r1 = f"r-{uuid.uuid4().hex[:8]}"
    run = await cli(
        "experiment", "start", "--round-id", r1, "--experiment-id", f"exp-{r1}",
        "--model-ref", "fl/models/global_model_v0",
        "--participant", fl.ids[0], "--participants", f"{fl.ids[1]},{fl.ids[2]}",
        "--epochs", "1", "--lr", "0.01", "--batch-size", "16", "--k-of-n", "3",
        "--timeout-s", "60", "--image", fl.image, "--watch", *f,
    )  # fmt: skip
    run.ok()
    head, _, rest = run.out.partition("\n\n")
    assert re.search(rf"^experiment:\s+exp-{r1}$", head, re.M)
    assert re.search(r"^k_of_n:\s+3$", head, re.M)
    # The scheduled table: proplet, task id, task name per participant.
    sched_block, _, rest = rest.partition("\n\n")
    lines = sched_block.splitlines()
    assert lines[0] == "scheduled (3):"
    header, rows = table_rows("\n".join(lines[1:]))
    assert header == ["PROPLET", "TASK ID", "TASK NAME"]
    assert sorted((r[0], r[2]) for r in rows) == sorted((p, f"fl-round-{r1}-{p}") for p in fl.ids)
    skipped, _, events = rest.partition("\n\n")
    assert skipped == "skipped: none"
    # Then the live events: snapshot, three accepted updates, ..., completed.
    kinds = [line.split()[1] for line in events.splitlines()]
    assert kinds[0] == "SNAPSHOT" and kinds[-1] == "COMPLETED"
    accepted = [line for line in events.splitlines() if " UPDATE_ACCEPTED " in line]
    assert len(accepted) == 3
    assert {line.split("proplet=")[1] for line in accepted} == set(fl.ids)
    assert [line.split()[2] for line in accepted] == ["1/3", "2/3", "3/3"]
    assert "model=fl/models/global_model_v1 closed_by=k_of_n" in events.splitlines()[-1]

    # round status (through the manager) and round watch on the finished round.
    status = (await cli("round", "status", r1, "--json", *f)).ok().json()
    assert status["state"] == "ROUND_STATE_COMPLETED" and status["completed"] is True
    assert status["num_updates"] == 3 and status["new_model_version"] == 1
    assert set(status["reported"]) == set(fl.ids)
    assert status["hyperparams"] == HYPER_JSON and "loss" in status["metrics"]
    human = (await cli("round", "status", r1, *f)).ok().out
    assert re.search(r"^state:\s+COMPLETED$", human, re.M)
    assert re.search(r"^updates:\s+3/3$", human, re.M)
    again = (await cli("round", "watch", r1, *f)).ok().out.splitlines()
    assert len(again) == 1 and again[0].split()[1:4] == ["SNAPSHOT", "3/3", "COMPLETED"]

    # A second round from v1 with --watch --json: JSON lines, the response then the events.
    r2 = f"r-{uuid.uuid4().hex[:8]}"
    run2 = await cli(
        "experiment", "start", "--round-id", r2, "--model-ref", "fl/models/global_model_v1",
        "--participants", ",".join(fl.ids), "--image", fl.image, "--watch", "--json", *f,
    )  # fmt: skip
    docs = run2.ok().json_lines()
    assert docs[0]["round_id"] == r2 and docs[0]["experiment_id"] == f"exp-{r2}"
    assert len(docs[0]["scheduled"]) == 3 and docs[0]["skipped"] == []
    assert docs[0]["round"]["k_of_n"] == 3  # 0 = every participant
    assert docs[1]["type"] == "ROUND_EVENT_TYPE_SNAPSHOT"
    assert docs[-1]["type"] == "ROUND_EVENT_TYPE_COMPLETED"
    assert docs[-1]["status"]["new_model_uri"] == "fl/models/global_model_v2"

    # Rounds, experiments and models as tables.
    header, rows = table_rows((await cli("round", "list", *f)).ok().out)
    assert header == [
        "ROUND", "EXPERIMENT", "STATE", "UPDATES", "PARTICIPANTS", "MODEL", "NEW MODEL", "CLOSED",
    ]  # fmt: skip
    assert sorted(r[:5] for r in rows) == sorted(
        [[r, f"exp-{r}", "COMPLETED", "3/3", "3"] for r in (r1, r2)]
    )
    only = (await cli("round", "list", "--experiment-id", f"exp-{r2}", "--json", *f)).ok().json()
    assert [r["round_id"] for r in only["rounds"]] == [r2]
    header, rows = table_rows((await cli("experiment", "list", *f)).ok().out)
    assert header == ["EXPERIMENT", "ROUND", "MODEL", "SCHEDULED", "SKIPPED", "CREATED"]
    assert sorted(r[0] for r in rows) == sorted([f"exp-{r1}", f"exp-{r2}"])
    exp = (await cli("experiment", "get", f"exp-{r1}", "--json", *f)).ok().json()
    assert exp["config"]["round_id"] == r1 and exp["config"]["hyperparams"] == HYPER_JSON
    models = (await cli("models", "list", "--json", *f)).ok().json()
    assert [m["version"] for m in models["models"]] == [0, 1, 2]
    v1 = (await cli("models", "get", "1", "--json", *f)).ok().json()
    assert v1["model"]["w"] != [0.0, 0.0, 0.0]

    # Tasks of the round, as the seed lists them.
    tasks = (await cli("tasks", "list", "--name-prefix", f"fl-round-{r1}", "--json", *f)).ok()
    listed = tasks.json()["tasks"]
    assert sorted(t["proplet_id"] for t in listed) == sorted(fl.ids)
    for t in listed:
        assert t["env"]["ROUND_ID"] == r1 and json.loads(t["env"]["HYPERPARAMS"]) == HYPER


async def test_experiment_skips_unknown_and_rejects_bad_config(cli: Cli, fl: Fl) -> None:
    f = fl.flags
    r = f"r-{uuid.uuid4().hex[:8]}"
    base = ["experiment", "start", "--round-id", r, "--image", fl.image, *f]
    with_ghost = [
        "--model-ref",
        "fl/models/global_model_v0",
        "--participants",
        f"{fl.ids[0]},ghost",
    ]
    # Every participant (k_of_n 0) cannot take part: refused, naming the one missing.
    (await cli(*base, *with_ghost)).failed_with(
        "FAILED_PRECONDITION: participants: k_of_n 2 needs 2 live participants",
        "missing: ghost: unknown proplet",
    )
    run = await cli(*base, *with_ghost, "--min-k-of-n", "1")  # unless a quorum of 1 will do
    out = run.ok().out
    skipped = out.split("skipped (1):\n", 1)[1]
    header, rows = table_rows(skipped)
    assert header == ["PROPLET", "REASON"] and rows == [["ghost", "unknown proplet"]]
    done = (await cli("round", "watch", r, "--json", *f)).ok().json_lines()
    assert done[-1]["status"]["state"] == "ROUND_STATE_COMPLETED"
    assert done[-1]["status"]["reported"] == [fl.ids[0]]

    # Invalid arguments come back from the manager naming the field, one line.
    (await cli(*base, "--model-ref", "v0", "--participant", fl.ids[0])).failed_with(
        "propeller-fl experiment start: INVALID_ARGUMENT: model_ref"
    )
    (
        await cli(*base, "--model-ref", "fl/models/global_model_v0", "--participant", fl.ids[0],
                  "--k-of-n", "5")
    ).failed_with("INVALID_ARGUMENT: k_of_n")  # fmt: skip
    (await cli(*base, "--model-ref", "fl/models/global_model_v0")).failed_with(
        "INVALID_ARGUMENT: participants: must not be empty"
    )
    # The same experiment id twice; and nobody schedulable.
    (
        await cli(*base, "--model-ref", "fl/models/global_model_v0", "--participant", fl.ids[0])
    ).failed_with("ALREADY_EXISTS: experiment_id")
    r_none = f"r-{uuid.uuid4().hex[:8]}"
    (
        await cli("experiment", "start", "--round-id", r_none, "--image", fl.image, *f,
                  "--model-ref", "fl/models/global_model_v0", "--participant", "ghost")
    ).failed_with("propeller-fl experiment start: FAILED_PRECONDITION")  # fmt: skip


async def test_manual_federated_task_and_failed_round(cli: Cli, fl: Fl) -> None:
    """The seed's "run one federated task manually": configure and open the round on the
    coordinator, then create and start one task by hand."""
    f = fl.flags
    ep = fl.stack.endpoints
    pid = fl.ids[0]
    rid = f"manual-r-{uuid.uuid4().hex[:8]}"
    configured = await cli(
        "round", "configure", "--round-id", rid, "--participant", pid, "--k-of-n", "1",
        "--timeout-s", "60", "--model-ref", "fl/models/global_model_v0", "--start", "--json", *f,
    )  # fmt: skip
    st = configured.ok().json()
    assert st["state"] == "ROUND_STATE_OPEN" and st["participants"] == [pid]
    assert st["hyperparams"] == HYPER_JSON
    created = await cli(
        "tasks", "create", "--name", f"fl-manual-{rid}", "--image", fl.image, "--proplet", pid,
        "--env", f"ROUND_ID={rid}", "--env", "MODEL_URI=fl/models/global_model_v0",
        "--env", f"HYPERPARAMS={json.dumps(HYPER)}", "--env", f"COORDINATOR_URL={ep.coordinator}",
        "--env", f"MODEL_REGISTRY_URL={ep.registry}", "--env", f"DATA_STORE_URL={ep.datastore}",
        "--json", *f,
    )  # fmt: skip
    task = created.ok().json()
    assert task["state"] == "TASK_STATE_PENDING" and task["env"]["ROUND_ID"] == rid
    finished = (await cli("tasks", "start", task["id"], "--wait", "--json", *f)).ok().json()
    assert finished["state"] == "TASK_STATE_COMPLETED", finished["error"]
    watched = (await cli("round", "watch", rid, "--json", *f)).ok().json_lines()
    final = watched[-1]["status"]
    assert final["completed"] and final["reported"] == [pid] and final["new_model_version"] == 1

    # A manual task for a round nobody configured fails; --wait exits 1 with the reason.
    stray = await cli(
        "tasks", "create", "--name", "fl-manual-stray", "--image", fl.image, "--proplet", pid,
        "--env", f"ROUND_ID=unknown-{rid}", "--env", "MODEL_URI=fl/models/global_model_v0",
        "--json", *f,
    )  # fmt: skip
    stray_id = stray.ok().json()["id"]
    line = (await cli("tasks", "start", stray_id, "--wait", *f)).failed_with(
        f"propeller-fl tasks start: task {stray_id} FAILED: ", "NOT_FOUND"
    )
    assert line

    # A round whose only participant never reports fails at its deadline: watch exits 1.
    lonely = f"lonely-{uuid.uuid4().hex[:8]}"
    (
        await cli("round", "configure", "--round-id", lonely, "--participant", "ghost",
                  "--timeout-s", "1", "--start", *f)
    ).ok()  # fmt: skip
    res = await cli("round", "watch", lonely, *f)
    res.failed_with(f"propeller-fl round watch: round {lonely} FAILED: ")
    assert res.out.splitlines()[-1].split()[1] == "FAILED"
    (await cli("round", "status", "no-such-round", *f)).failed_with(
        "propeller-fl round status: NOT_FOUND"
    )
    (await cli("round", "watch", "no-such-round", *f)).failed_with("NOT_FOUND")
