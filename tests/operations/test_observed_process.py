"""A process run as an operator runs it with both settings on: `propeller-fl -v up` with
PROPELLER_METRICS_ADDR (port 0: the bound port printed) and PROPELLER_LOG_FORMAT=json. One
round; the metrics are scraped from outside the process and every line it logged is JSON with
the round's ids."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest

from propeller.v1 import coordinator_pb2
from tests.operations.scrape import scrape
from tests.support.clients import clients
from tests.support.processes import up_ports, up_process

pytestmark = pytest.mark.process

READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 20.0


async def test_up_serves_metrics_and_logs_json_lines(tmp_path: Path, trainer_wasm: Path) -> None:
    env = {"PROPELLER_METRICS_ADDR": "127.0.0.1:0", "PROPELLER_LOG_FORMAT": "json"}
    with up_process(["--proplets", "2"], tmp_path, up_ports(), options=["-v"], env=env) as up:
        printed = await asyncio.to_thread(up.wait_ready, READY_TIMEOUT_S)
        entries = dict(line.split(None, 1) for line in printed if not line.startswith("proplet"))
        ids = [line.split(None, 1)[1] for line in printed if line.startswith("proplet ")]
        url = entries["metrics"]
        assert url.startswith("http://127.0.0.1:") and not url.startswith("http://127.0.0.1:0/")
        first = await scrape(url)
        assert first.value("propeller_proplets_alive") == 2
        assert first.total("propeller_updates_total") == 0

        round_id = f"up-{uuid.uuid4().hex[:8]}"
        tls = up.operator_tls
        manager = entries["manager"]
        async with clients({"manager": manager, "registry": entries["registry"]}, tls=tls) as c:
            await c.init_model(3)
            hyper = coordinator_pb2.Hyperparams(epochs=1, lr=0.1, batch_size=1)
            await c.start_experiment(
                round_id, ids, entries["trainer"], timeout_s=30, hyperparams=hyper
            )
            status = await c.wait_state(round_id, timeout=60, via="manager")
            assert status.state == coordinator_pb2.ROUND_STATE_COMPLETED, status

        after = await scrape(url)
        assert after.value("propeller_updates_total", outcome="accepted", code="OK", field="") == 2
        assert after.value("propeller_rounds_total", state="completed") == 1
        assert after.value("propeller_round_phase_seconds_count", phase="aggregation") == 1
        assert after.value("propeller_wasm_run_seconds_count") == 2
        assert await up.terminate_async(STOP_TIMEOUT_S) == 0, up.tail()

    # The harness marks each start in the log with a "--- " line of its own.
    logged = [t for t in up.log_text().splitlines() if t.strip() and not t.startswith("--- ")]
    lines = [json.loads(text) for text in logged]
    assert lines, "nothing logged"
    for line in lines:
        assert {"time", "level", "logger", "event", "message", "fields"} <= set(line)
        assert {"round_id", "experiment_id", "proplet_id", "trace_id", "span_id"} <= set(line)
    updates = [line for line in lines if line["event"] == "Coordinator.SubmitUpdate"]
    assert sorted(u["proplet_id"] for u in updates) == sorted(ids), updates
    assert all(u["round_id"] == round_id for u in updates)
    started = [line for line in lines if line["event"] == "Manager.StartExperiment"]
    assert any(
        s["experiment_id"] == f"exp-{round_id}" and s["round_id"] == round_id for s in started
    )
