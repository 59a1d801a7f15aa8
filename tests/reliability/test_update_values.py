"""One participant cannot fail a round for the others (issue 10, item 4): an update whose
values would overflow the aggregation (finite, near float64's maximum) is refused at the
coordinator with INVALID_ARGUMENT naming the tensor, counts for nothing, and the round
completes with the other participants' updates."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from propeller.v1 import coordinator_pb2
from server.config import MqttConfig
from server.coordinator.app import CoordinatorConfig
from server.coordinator.rounds import Update
from server.tensors import Tensors
from tests.support.clients import TEST_MODULE, V0, clients
from tests.support.cluster import round_services


def update(proplet_id: str, w: list[float], b: float, n: int) -> Update:
    tensors: Tensors = {"w": np.array(w, np.float64), "b": np.array(b, np.float64)}
    return Update(proplet_id, V0, n, {"loss": 0.5}, tensors, module_digest=TEST_MODULE)


@pytest.mark.parametrize("huge", [1e308, -1.7e308, 1e31])
async def test_an_update_that_would_overflow_is_refused_and_the_round_completes(
    mqtt: MqttConfig, huge: float
) -> None:
    async with round_services(mqtt) as services, clients(services) as c:
        await c.configure("r1", participants=["a", "b", "c"], k_of_n=2)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await c.submit("r1", update("a", [huge, huge, 1.0], 0.0, 50))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (refused.value.details() or "").startswith(
            f"tensors.w: holds a value of magnitude {abs(huge):.6g}, beyond the coordinator's "
            "bound 1e+30 (max_update_value"
        )
        status = await c.status("r1")
        assert status.num_updates == 0 and status.state == coordinator_pb2.ROUND_STATE_OPEN
        await c.submit("r1", update("b", [1.0, 2.0, 3.0], 0.5, 10))
        await c.submit("r1", update("c", [3.0, 2.0, 1.0], -0.5, 30))
        done = await c.wait_state("r1")
        assert done.state == coordinator_pb2.ROUND_STATE_COMPLETED, done.failure_reason
        assert list(done.reported) == ["b", "c"] and done.new_model_version == 1
        v1 = await c.model(1)
        np.testing.assert_allclose(v1["w"], [2.5, 2.0, 1.5], rtol=1e-15)
        assert float(v1["b"]) == pytest.approx(-0.25)


async def test_the_value_bound_is_configurable_within_what_cannot_overflow(
    mqtt: MqttConfig,
) -> None:
    async with round_services(mqtt, max_update_value=10.0) as services, clients(services) as c:
        await c.configure("r1", participants=["a"])
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await c.submit("r1", update("a", [1.0, 2.0, 3.0], -11.0, 5))
        assert (refused.value.details() or "").startswith(
            "tensors.b: holds a value of magnitude 11"
        )
    # A bound under which the aggregation could overflow is refused at configuration.
    with pytest.raises(ValueError, match="max_update_value"):
        CoordinatorConfig(max_update_value=1e300, tls=None)
    env = {"PROPELLER_MAX_UPDATE_VALUE": "1e6", "PROPELLER_INSECURE": "1"}
    assert CoordinatorConfig.from_env(env).bounds.max_abs_value == 1e6
