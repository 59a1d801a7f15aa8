"""The metrics an operator scrapes follow a real round: five services and three real proplets
running the Zig trainer in wasmtime, `/metrics` served over HTTP as `propeller-fl serve` serves
it, read between the steps of the round (docs/operations.md)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from propeller.v1 import coordinator_pb2
from server.config import MqttConfig
from server.coordinator.rounds import Update
from server.metrics import PHASES, MetricsConfig, MetricsEndpoint, serving_metrics
from tests.operations.scrape import scrape
from tests.support.clients import HYPER, V0
from tests.support.cluster import Cluster, cluster
from tests.support.waits import eventually

pytestmark = pytest.mark.integration

PROPLETS = 3


@pytest.fixture
async def endpoint() -> AsyncIterator[MetricsEndpoint]:
    with serving_metrics(MetricsConfig("127.0.0.1:0")) as served:
        assert served is not None and served.port > 0
        yield served


@pytest.fixture
async def fleet(mqtt: MqttConfig, tmp_path: Path) -> AsyncIterator[Cluster]:
    async with cluster(mqtt, tmp_path, proplets=PROPLETS) as d:
        yield d


async def test_the_metrics_move_as_a_round_does(
    endpoint: MetricsEndpoint, fleet: Cluster, trainer_wasm: Path
) -> None:
    d = fleet
    # The registry is the process's: other tests' rounds are in it too, so the test reads
    # what moved between two scrapes.
    before = await scrape(endpoint.url)
    assert before.value("propeller_proplets_alive") == PROPLETS

    round_id = f"r-{uuid.uuid4().hex[:8]}"
    await d.start_experiment(
        round_id,
        d.proplet_ids,
        f"file://{trainer_wasm}",
        model_ref=V0,
        hyperparams=HYPER,
        k_of_n=PROPLETS,
        timeout_s=60,
    )
    opened = await scrape(endpoint.url)
    # Fanned out: the round is configured and open, its tasks went out.
    assert opened.moved(before).get(("propeller_round_phase_seconds_count", _phase("fan_out")))
    assert (
        opened.value("propeller_rounds_total", state="open")
        - before.value("propeller_rounds_total", state="open")
        == 1
    )
    assert (
        opened.value("propeller_tasks_total", state="scheduled")
        - before.value("propeller_tasks_total", state="scheduled")
        == PROPLETS
    )

    status = await d.wait_state(round_id, timeout=60)
    assert status.state == coordinator_pb2.ROUND_STATE_COMPLETED, status
    # A completed task is reported by MQTT after the update went in: wait for the three.
    done = await eventually(
        lambda: scrape(endpoint.url),
        lambda s: (
            s.value("propeller_tasks_total", state="completed")
            - before.value("propeller_tasks_total", state="completed")
            >= PROPLETS
        ),
        timeout=30,
        what="three completed tasks counted",
    )
    moved = done.moved(before)

    def delta(name: str, **labels: str) -> float:
        return moved.get((name, frozenset(labels.items())), 0.0)

    for state in ("pending", "open", "aggregating", "completed"):
        assert delta("propeller_rounds_total", state=state) == 1, (state, moved)
    assert delta("propeller_rounds_total", state="failed") == 0
    assert delta("propeller_updates_total", outcome="accepted", code="OK", field="") == PROPLETS
    assert done.total("propeller_updates_total", outcome="rejected") == before.total(
        "propeller_updates_total", outcome="rejected"
    )
    expected_counts = {
        "fan_out": 1,
        "training": PROPLETS,
        "upload": PROPLETS,
        "aggregation": 1,
        "store": 1,
    }
    assert set(expected_counts) == set(PHASES)
    for phase, count in expected_counts.items():
        assert delta("propeller_round_phase_seconds_count", phase=phase) == count, phase
        assert delta("propeller_round_phase_seconds_sum", phase=phase) > 0, phase
    assert delta("propeller_wasm_run_seconds_count") == PROPLETS
    # The fuel the three training runs consumed: what their updates' receipts say, summed.
    assert status.fuel_consumed > 0
    assert delta("propeller_wasm_fuel_total") == status.fuel_consumed
    assert delta("propeller_tasks_total", state="completed") == PROPLETS
    # Each proplet downloaded the base model and uploaded an update as chunk streams.
    assert delta("propeller_stream_bytes_total", stream="update", direction="out") > 0
    assert delta("propeller_stream_bytes_total", stream="update", direction="in") == delta(
        "propeller_stream_bytes_total", stream="update", direction="out"
    )
    assert delta("propeller_stream_bytes_total", stream="model", direction="in") > 0
    assert done.value("propeller_proplets_alive") == PROPLETS


async def test_a_rejected_update_is_counted_under_its_reason(
    endpoint: MetricsEndpoint, fleet: Cluster
) -> None:
    d = fleet
    proplet = d.proplet_ids[0]
    round_id = f"r-{uuid.uuid4().hex[:8]}"
    await d.configure(round_id, participants=[proplet])
    before = await scrape(endpoint.url)
    # v0 has 3 + 1 values; an update of 100 is refused from its header.
    too_big = Update(proplet, V0, 1, {}, {"w": np.zeros(100), "b": np.zeros(1)})
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await d.submit(round_id, too_big)
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    after = await scrape(endpoint.url)
    reason = {"outcome": "rejected", "code": "INVALID_ARGUMENT", "field": "update.header.tensors"}
    assert (
        after.value("propeller_updates_total", **reason)
        - before.value("propeller_updates_total", **reason)
        == 1
    ), after.moved(before)
    assert after.total("propeller_updates_total", outcome="accepted") == before.total(
        "propeller_updates_total", outcome="accepted"
    )


def _phase(name: str) -> frozenset[tuple[str, str]]:
    return frozenset({("phase", name)})
