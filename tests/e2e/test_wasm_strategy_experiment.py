"""An experiment whose strategy is a WASM module (issue 15, item 3), through the real Stack
with three real proplets and a real OCI registry: `propeller-fl experiment run --strategy
wasm` with the Zig FedMedian module pinned by digest runs two rounds; each version's lineage
records strategy "wasm" with the pinned module and the module's weights (1/3 each: the
median is unweighted); `models verify` recomputes both versions by running the module again
and finds the chain intact."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from server.config import MqttConfig
from tests.cli.helpers import Cli, flags
from tests.conftest import load_wasm_build
from tests.coordinator.test_wasm_strategy_rounds import push
from tests.support.clients import V0
from tests.support.cluster import Cluster, cluster
from tests.support.infra import OciRegistry


@pytest.fixture
async def world(mqtt: MqttConfig, tmp_path: Path, trainer_wasm: Path) -> AsyncIterator[Cluster]:
    async with cluster(mqtt, tmp_path, proplets=3, image=f"file://{trainer_wasm}") as c:
        yield c


async def test_an_experiment_with_a_wasm_strategy_completes_and_verifies(
    world: Cluster, cli: Cli, registry: OciRegistry
) -> None:
    c, f = world, flags(world.endpoints)
    module = push(registry, load_wasm_build().build_strategy("fedmedian"), "strategies/median")
    params = json.dumps({"module": module})
    eid = f"exp-wasm-{uuid.uuid4().hex[:6]}"
    run = await cli(
        "experiment", "run", "--experiment-id", eid, "--model-ref", V0,
        "--participants", ",".join(c.proplet_ids), "--image", c.image, "--k-of-n", "3",
        "--rounds", "2", "--strategy", "wasm", "--strategy-params", params, "--watch", *f,
    )  # fmt: skip
    run.ok()
    assert await c.versions() == [0, 1, 2]
    for version in (1, 2):
        doc = (await cli("models", "lineage", str(version), "--json", *f)).ok().json()
        got = doc["lineage"]
        assert (got["experiment_id"], got["strategy"]) == (eid, "wasm")
        assert got["strategy_params"] == {"module": module, "timeout_s": 300.0, "memory_mib": 256}
        assert [x["weight"] for x in got["contributions"]] == [1 / 3] * 3
    verified = (await cli("models", "verify", "2", "--json", *f)).ok().json()
    assert [x["ok"] for x in verified["chain"]] == [True, True, True]
