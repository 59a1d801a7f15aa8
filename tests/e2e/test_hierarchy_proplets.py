"""Hierarchical aggregation with real proplets training the real module: the stack's services
(its coordinator flat, the reference), a root coordinator and two site coordinators on the
same registry, aggregator and data store. Each proplet's round task names its site's
coordinator (COORDINATOR_URL) and the round id, as a flat round's task names the coordinator:
nothing on the proplet changes. Every num_samples is capped by the data store, at the sites
per proplet and at the root per site (its contributors' datasets summed)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from propeller.v1 import coordinator_pb2, datastore_pb2, manager_pb2
from server.config import Endpoints, MqttConfig
from server.coordinator.app import CoordinatorApp, CoordinatorConfig
from tests.support.clients import HYPER, Clients, clients
from tests.support.cluster import LOCAL, Cluster, cluster, serve_app
from tests.support.security import service_tls

SITES = {"east": ("p-east-1", "p-east-2"), "west": ("p-west-1", "p-west-2")}
PROPLETS = [p for members in SITES.values() for p in members]


@contextlib.asynccontextmanager
async def coordinator(
    ep: Endpoints, mqtt: MqttConfig, identity: str, mqtt_identity: str, **settings: Any
) -> AsyncIterator[str]:
    tls = service_tls(identity)
    config = CoordinatorConfig(
        addr=LOCAL,
        aggregator_addr=ep.aggregator,
        registry_addr=ep.registry,
        datastore_addr=ep.datastore,
        # Its own MQTT identity: the broker takes the user name as the client id, and the
        # stack's coordinator is "coordinator" already.
        mqtt=mqtt.as_identity(service_tls(mqtt_identity)),
        tls=tls,
        tick_s=0.05,
        num_samples_cap="dataset",
        **settings,
    )
    async with serve_app(CoordinatorApp(config), tls=tls) as addr:
        yield addr


def dataset(proplet_id: str) -> datastore_pb2.GetDatasetRequest:
    return datastore_pb2.GetDatasetRequest(proplet_id=proplet_id)


async def train(d: Cluster, round_id: str, coordinators: Mapping[str, str]) -> None:
    """One round task per proplet, each naming the coordinator it reports to; all complete."""
    tasks = []
    for pid, addr in coordinators.items():
        request = d.round_task(f"fl-{round_id}-{pid}", round_id, pid, coordinator_url=addr)
        tasks.append(await d.run_task(request))
    for task in tasks:
        finished = await d.finished(task.id)
        assert finished.state == manager_pb2.TASK_STATE_COMPLETED, finished.error


async def test_proplets_train_through_their_sites_as_in_a_flat_round(
    mqtt: MqttConfig, trainer_wasm: Path, tmp_path: Path
) -> None:
    async with (
        cluster(mqtt, tmp_path, proplets=PROPLETS, image=f"file://{trainer_wasm}") as d,
        contextlib.AsyncExitStack() as stack,
    ):
        ep = d.stack.endpoints
        root_addr = await stack.enter_async_context(
            coordinator(ep, mqtt, "coordinator", "root-coordinator", tier="root")
        )
        root: Clients = await stack.enter_async_context(
            clients({"coordinator": root_addr, "registry": ep.registry})
        )
        sites: dict[str, Clients] = {}
        site_of: dict[str, str] = {}
        for site_id, members in SITES.items():
            addr = await stack.enter_async_context(
                coordinator(
                    ep,
                    mqtt,
                    f"site-{site_id}",
                    f"site-{site_id}",
                    tier="site",
                    upstream_addr=root_addr,
                    site_id=site_id,
                )
            )
            sites[site_id] = await stack.enter_async_context(clients({"coordinator": addr}))
            site_of.update({p: addr for p in members})

        await root.configure("r1", participants=list(SITES), hyperparams=HYPER)
        for site_id, members in SITES.items():
            await sites[site_id].configure(
                "r1", participants=list(members), hyperparams=HYPER, timeout_s=30
            )
        await train(d, "r1", site_of)
        two_level = await root.wait_state("r1", timeout=60)
        assert two_level.state == coordinator_pb2.ROUND_STATE_COMPLETED, two_level.failure_reason
        assert sorted(two_level.reported) == sorted(SITES)
        datasets = [
            (await d.datastore.GetDatasetInfo(dataset(p), timeout=10)).size for p in PROPLETS
        ]
        assert two_level.num_samples == sum(datasets) > 0

        # The same round (same id: the module's training depends on it) on the flat
        # coordinator, every proplet reporting to it directly.
        await d.configure("r1", participants=PROPLETS, hyperparams=HYPER)
        await train(d, "r1", dict.fromkeys(PROPLETS, ep.coordinator))
        flat = await d.wait_state("r1", timeout=60)
        assert flat.state == coordinator_pb2.ROUND_STATE_COMPLETED, flat.failure_reason
        assert flat.new_model_version != two_level.new_model_version

        hier_model = await d.model(two_level.new_model_version)
        flat_model = await d.model(flat.new_model_version)
        assert list(hier_model) == list(flat_model)
        for name in flat_model:
            assert hier_model[name].dtype == flat_model[name].dtype == np.float64
            np.testing.assert_allclose(hier_model[name], flat_model[name], rtol=1e-13, atol=1e-15)
            # Trained: not the base model's zeros.
            assert np.any(flat_model[name] != 0)
