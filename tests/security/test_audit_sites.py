"""The re-execution audit at a site coordinator (hierarchical aggregation,
docs/verifiability.md): the site re-runs its proplets' updates like a flat coordinator and
forwards to the root the partial of those it kept; the root itself refuses an audit (its
updates are partials: tests/coordinator/test_audit_rules.py)."""

from __future__ import annotations

import contextlib
from pathlib import Path

from propeller.v1 import coordinator_pb2, datastore_pb2, tensor_pb2
from server.config import MqttConfig
from tests.e2e.test_hierarchy_proplets import coordinator, train
from tests.support.auditing import LyingDataProplet
from tests.support.clients import HYPER, Clients, clients
from tests.support.cluster import cluster

HONEST = "p-east-honest"
LIAR = "p-east-liar"


async def test_a_site_audits_its_proplets_and_forwards_only_what_it_kept(
    mqtt: MqttConfig, trainer_wasm: Path, tmp_path: Path
) -> None:
    image = f"file://{trainer_wasm}"
    async with (
        cluster(
            mqtt, tmp_path, proplets=[HONEST, LIAR], image=image, built={LIAR: LyingDataProplet}
        ) as d,
        contextlib.AsyncExitStack() as stack,
    ):
        ep = d.stack.endpoints
        root_addr = await stack.enter_async_context(
            coordinator(ep, mqtt, "coordinator", "root-coordinator", tier="root")
        )
        root: Clients = await stack.enter_async_context(
            clients({"coordinator": root_addr, "registry": ep.registry})
        )
        site_addr = await stack.enter_async_context(
            coordinator(
                ep,
                mqtt,
                "site-east",
                "site-east",
                tier="site",
                upstream_addr=root_addr,
                site_id="east",
            )
        )
        site: Clients = await stack.enter_async_context(clients({"coordinator": site_addr}))
        await root.configure("r1", participants=["east"], hyperparams=HYPER)
        await site.configure(
            "r1",
            participants=[HONEST, LIAR],
            hyperparams=HYPER,
            timeout_s=30,
            min_k_of_n=1,
            task_wasm_image=image,
            audit=tensor_pb2.AuditConfig(fraction=1.0),
        )
        await train(d, "r1", {HONEST: site_addr, LIAR: site_addr})
        at_site = await site.wait_state("r1", timeout=60)
        assert at_site.state == coordinator_pb2.ROUND_STATE_COMPLETED, at_site.failure_reason
        outcomes = {a.proplet_id: (a.outcome, a.rejected) for a in at_site.audits}
        assert outcomes == {HONEST: ("match", False), LIAR: ("mismatch", True)}
        at_root = await root.wait_state("r1", timeout=60)
        assert at_root.state == coordinator_pb2.ROUND_STATE_COMPLETED, at_root.failure_reason
        # The site's partial weighs only the update it kept: the honest proplet's samples.
        honest = await d.datastore.GetDatasetInfo(
            datastore_pb2.GetDatasetRequest(proplet_id=HONEST), timeout=10
        )
        assert at_root.num_samples == honest.size > 0
