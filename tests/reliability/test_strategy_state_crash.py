"""An experiment's strategy state across a coordinator killed with SIGKILL (issue 11): the
coordinator as a real process over its SQLite state directory, the registry and aggregator in
this process, real Mosquitto. Two FedAdam rounds of one experiment; the coordinator dies
during the first round's completion, either after the new version is stored but before the
completion (and the Adam moments) are committed, or right after that commit. After the
restart the first round completes once (one version), and the second round's model is the
paper's formula over both rounds: the moments were neither lost nor applied twice."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest

from propeller.v1 import coordinator_pb2
from server.config import MqttConfig
from server.coordinator.rounds import Update
from server.faults import KILL_AT_ENV
from server.tensors import Tensors
from tests.cli.helpers import make_cli, tls_flags
from tests.coordinator.helpers import FedAdamReference
from tests.support.clients import Clients
from tests.support.cluster import coordinator_process, running

pytestmark = pytest.mark.process

S = coordinator_pb2
DIMENSION = 1000
ADAM = {"eta": 0.05, "beta_1": 0.8, "beta_2": 0.95, "tau": 0.001}
STRATEGY = {
    "experiment_id": "exp-adam",
    "strategy_name": "fedadam",
    "strategy_params_json": json.dumps(ADAM),
}


def updates_from(base: Tensors, base_uri: str, seed: int) -> list[Update]:
    """Three participants' updates trained (here: drawn) from `base`."""
    rng = np.random.default_rng(seed)
    return [
        Update(
            proplet_id=p,
            base_model_uri=base_uri,
            num_samples=n,
            metrics={"loss": 0.5},
            tensors={
                "w": base["w"] + rng.standard_normal(DIMENSION) * 0.1,
                "b": np.asarray(base["b"] + rng.standard_normal() * 0.1),
            },
        )
        for p, n in (("a", 10), ("b", 30), ("c", 60))
    ]


async def completed(c: Clients, round_id: str) -> coordinator_pb2.RoundStatus:
    status = await c.wait_state(round_id, timeout=60)
    assert status.state == S.ROUND_STATE_COMPLETED, status.failure_reason
    return status


@pytest.mark.parametrize("kill_at", ["coordinator.model_stored", "coordinator.round_completed"])
async def test_the_state_survives_a_kill_and_is_applied_once(
    mqtt: MqttConfig, tmp_path: Path, kill_at: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # The coordinator process, armed to kill itself at `kill_at`; registry and aggregator
    # in this process.
    armed = coordinator_process(mqtt, tmp_path, dimension=DIMENSION, PROPELLER_TEST_KILL_AT=kill_at)
    async with armed as (coord, reg, registry):
        assert coord.env[KILL_AT_ENV] == kill_at
        v0 = await reg.model(0)
        reference = FedAdamReference(v0, **ADAM)
        first = updates_from(v0, "fl/models/global_model_v0", seed=1)
        async with running(coord) as c:
            await c.configure("r1", model_ref="fl/models/global_model_v0", **STRATEGY)
            for u in first:
                await c.submit("r1", u)
            # The third update closes the round; its aggregation kills the coordinator.
            assert await coord.wait_exit() == -signal.SIGKILL, coord.tail()
        assert f"point={kill_at} pass=1" in coord.log_text()

        del coord.env[KILL_AT_ENV]
        async with running(coord) as c:
            st = await completed(c, "r1")  # resumed, or already committed
            assert st.new_model_version == 1
            # The round's strategy is part of its record on disk.
            assert (st.strategy_name, json.loads(st.strategy_params_json)) == (
                "fedadam",
                {**ADAM, "eta_l": 0.1},
            )
            assert await reg.versions() == [0, 1]  # stored once
            v1 = await reg.model(1)
            want1 = reference.step(first)
            np.testing.assert_allclose(v1["w"], want1["w"], rtol=1e-12, atol=1e-15)

            second = updates_from(v1, "fl/models/global_model_v1", seed=2)
            await c.configure("r2", model_ref="fl/models/global_model_v1", **STRATEGY)
            for u in second:
                await c.submit("r2", u)
            st = await completed(c, "r2")
        v2 = await reg.model(st.new_model_version)
        want2 = reference.step(second)
        for name in want2:
            np.testing.assert_allclose(v2[name], want2[name], rtol=1e-12, atol=1e-15)
        # What a lost state (round 2 from fresh moments) would have given instead; a state
        # applied twice would have shown above (round 1 aggregated again over its own
        # moments: another v1, a second version).
        lost = FedAdamReference(v1, **ADAM).step(second)
        assert not np.allclose(v2["w"], lost["w"], rtol=1e-6)
        # The lineages the coordinator sent (v1's again after the kill) verify: v2 started
        # from the state v1's round left, and both recompute bit for bit.
        cli = make_cli(capsys)
        verify = ("models", "verify", "2", "--json", *tls_flags(), "--registry", registry)
        assert [x["ok"] for x in (await cli(*verify)).ok().json()["chain"]] == [True] * 3
        assert await coord.terminate_async() == 0
