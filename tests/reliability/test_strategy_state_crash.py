"""An experiment's strategy state across a coordinator killed with SIGKILL (issue 11): the
coordinator as a real process over its SQLite state directory, the registry and aggregator in
this process, real Mosquitto. Two FedAdam rounds of one experiment; the coordinator dies
during the first round's completion, either after the new version is stored but before the
completion (and the Adam moments) are committed, or right after that commit. After the
restart the first round completes once (one version), and the second round's model is the
paper's formula over both rounds: the moments were neither lost nor applied twice."""

from __future__ import annotations

import contextlib
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from propeller.v1 import coordinator_pb2
from server.aggregator.app import AggregatorApp, AggregatorConfig
from server.config import MqttConfig
from server.coordinator.rounds import Update
from server.faults import KILL_AT_ENV
from server.registry.app import RegistryApp, RegistryConfig
from server.tensors import Tensors
from tests.cli.helpers import make_cli, tls_flags
from tests.coordinator.helpers import FedAdamReference
from tests.support.clients import Clients, clients
from tests.support.cluster import LOCAL, serve_app
from tests.support.processes import ServiceProcess, mqtt_env, service_process
from tests.support.security import service_tls

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


@contextlib.asynccontextmanager
async def setup(
    mqtt: MqttConfig, tmp_path: Path, kill_at: str
) -> AsyncIterator[tuple[ServiceProcess, Clients, str]]:
    """Registry (v0: zeros) and aggregator in this process; the coordinator process (not
    started) over a state directory, armed to kill itself at `kill_at`; and the registry's
    address."""
    async with contextlib.AsyncExitStack() as stack:
        aggregator = await stack.enter_async_context(
            serve_app(
                AggregatorApp(AggregatorConfig(LOCAL, tls=service_tls("aggregator"))),
                tls=service_tls("aggregator"),
            )
        )
        registry = await stack.enter_async_context(
            serve_app(
                RegistryApp(RegistryConfig(LOCAL, tls=service_tls("registry"))),
                tls=service_tls("registry"),
            )
        )
        reg = await stack.enter_async_context(clients({"registry": registry}))
        await reg.init_model(DIMENSION)
        env = {
            **mqtt_env(mqtt),
            "AGGREGATOR_ADDR": aggregator,
            "MODEL_REGISTRY_ADDR": registry,
            "PROPELLER_STATE_DIR": str(tmp_path / "state"),
            "PROPELLER_COORDINATOR_TICK_S": "0.05",
            "PROPELLER_COORDINATOR_RPC_TIMEOUT_S": "10",
            "PROPELLER_NUM_SAMPLES_CAP": "none",
            KILL_AT_ENV: kill_at,
        }
        yield stack.enter_context(service_process("coordinator", env, tmp_path)), reg, registry


@contextlib.asynccontextmanager
async def running(proc: ServiceProcess) -> AsyncIterator[Clients]:
    await proc.restart()
    async with clients({"coordinator": proc.addr}) as c:
        yield c


async def completed(c: Clients, round_id: str) -> coordinator_pb2.RoundStatus:
    status = await c.wait_state(round_id, timeout=60)
    assert status.state == S.ROUND_STATE_COMPLETED, status.failure_reason
    return status


@pytest.mark.parametrize("kill_at", ["coordinator.model_stored", "coordinator.round_completed"])
async def test_the_state_survives_a_kill_and_is_applied_once(
    mqtt: MqttConfig, tmp_path: Path, kill_at: str, capsys: pytest.CaptureFixture[str]
) -> None:
    async with setup(mqtt, tmp_path, kill_at) as (coord, reg, registry):
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
