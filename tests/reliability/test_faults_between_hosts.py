"""Faults between hosts: proplets as separate hosts (network namespaces, a veth pair each, made
by `tests.support.netns`), the services, a real mosquitto and a real OCI registry on the host
side of the links, mutual TLS on every hop. A link is cut mid-round and restored: the round
closes by k_of_n when k_of_n is reachable without the cut proplet, at its deadline with what
arrived when it is not; the cut proplet is seen gone, comes back (heartbeats again), takes
part in the next round, and its late update for the closed round counts nowhere. With 100 ms
of delay and 10% loss each way on every proplet's link, rounds still complete, each model the
FedAvg of exactly the updates the round took (no timing is asserted anywhere).

Needs root (namespaces, links). docs/reliability.md, "Faults between hosts".
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from propeller.v1 import coordinator_pb2, manager_pb2, model_registry_pb2
from server.config import MqttConfig, TlsConfig
from server.coordinator.rounds import Update
from server.models import model_uri
from server.pki import CertificateAuthority, Identity, Kind
from server.stack import Stack, StackConfig
from server.tensors import specs_from_proto, split_payload
from server.topics import Topics
from tests.coordinator.helpers import fedavg
from tests.support.clients import Clients, clients, header_and_data
from tests.support.infra import mosquitto, oci_registry, push_wasm
from tests.support.netns import Host, Network, ip, network
from tests.support.processes import ChildProcess, service_environment, started
from tests.support.security import tls_env
from tests.support.waits import eventually

pytestmark = pytest.mark.process

log = logging.getLogger(__name__)
S = coordinator_pb2
ROOT = Path(__file__).resolve().parents[2]
PROPLETS = 3
# A proplet silent this long (4 heartbeats of 0.5 s) is listed not alive: how the test sees
# that a cut took effect, and that the proplet came back.
ALIVE_WINDOW_S = 2.0
# Enough epochs that a proplet trains for a while: the test cuts its link after it reports
# Running and before its update can be sent.
SLOW_EPOCHS = 300_000
LONG_S = 120.0  # a deadline no k_of_n round here reaches
# The deadline of the round that cannot reach k_of_n: the two reachable proplets train well
# within it, even on a busy machine.
DEADLINE_S = 20.0


@dataclass
class Fleet:
    """The network, the services on its gateway, the proplets (one process per host)."""

    net: Network
    stack: Stack
    c: Clients
    image: str
    ids: list[str]
    host_of: dict[str, Host]
    process_of: dict[str, ChildProcess]

    async def cut(self, proplet_id: str) -> None:
        """Cut the proplet's link, and wait until the manager no longer hears it."""
        self.net.cut(self.host_of[proplet_id])
        await eventually(
            self.c.alive,
            lambda alive: proplet_id not in alive,
            timeout=30,
            what=f"{proplet_id} listed not alive after its link was cut",
        )

    async def restore(self, proplet_id: str) -> None:
        """Restore the link, and wait until the manager hears the proplet again."""
        self.net.restore(self.host_of[proplet_id])
        await eventually(
            self.c.alive,
            lambda alive: proplet_id in alive,
            timeout=60,
            what=f"{proplet_id} alive again after its link was restored",
        )

    async def task_of(self, round_id: str, proplet_id: str) -> manager_pb2.Task:
        [task] = [t for t in await self.c.round_tasks(round_id) if t.proplet_id == proplet_id]
        return task

    async def wait_task(self, round_id: str, proplet_id: str, *states: int) -> manager_pb2.Task:
        return await eventually(
            lambda: self.task_of(round_id, proplet_id),
            lambda t: t.state in states,
            timeout=60,
            what=f"{proplet_id}'s task of {round_id} in {states}",
        )

    async def round_with_a_cut(
        self, round_id: str, *, k_of_n: int, timeout_s: float, wait_s: float
    ) -> S.RoundStatus:
        """A slow round of every proplet whose last proplet's link is cut while it trains
        (it has its task, Running): the round's status once it finished, which must be
        COMPLETED with the updates of the others."""
        *reachable, cut = self.ids
        hyper = S.Hyperparams(epochs=SLOW_EPOCHS, lr=0.01, batch_size=16)
        await self.c.start_experiment(
            round_id, self.ids, self.image, k_of_n=k_of_n, timeout_s=timeout_s, hyperparams=hyper
        )
        await self.wait_task(round_id, cut, manager_pb2.TASK_STATE_RUNNING)
        await self.cut(cut)
        status = await self.c.wait_state(round_id, timeout=wait_s)
        assert status.state == S.ROUND_STATE_COMPLETED, status.failure_reason
        assert sorted(status.reported) == sorted(reachable)
        return status


@pytest.fixture
async def fleet(tmp_path: Path, trainer_wasm: Path) -> AsyncIterator[Fleet]:
    async with hosts_fleet(tmp_path, trainer_wasm) as made:
        yield made


@contextlib.asynccontextmanager
async def hosts_fleet(
    tmp_path: Path, trainer_wasm: Path, *, alive_window_s: float = ALIVE_WINDOW_S
) -> AsyncIterator[Fleet]:
    """PROPLETS hosts; on the gateway: a mosquitto (TLS, the deployment's ACL), an OCI
    registry holding the trainer module, the five services (`Stack`); one proplet process in
    each host; v0 stored and every proplet alive before it yields. One CA of its own, whose
    service certificates name the gateway address the proplets reach the services at."""
    ids = [str(uuid.uuid4()) for _ in range(PROPLETS)]
    with contextlib.ExitStack() as infra:
        net = infra.enter_context(network(PROPLETS))
        ca = CertificateAuthority.create(tmp_path / "ca")
        broker = infra.enter_context(mosquitto(tmp_path / "mosquitto", ca=ca, host=net.gateway))
        registry = infra.enter_context(oci_registry(tmp_path / "oci", bind=net.gateway))
        image = push_wasm(registry, trainer_wasm)
        topics = Topics(domain=f"n{uuid.uuid4().hex[:8]}", channel="fl")
        mqtt = MqttConfig(host=net.gateway, port=broker.port, topics=topics)
        config = StackConfig(
            mqtt=mqtt,
            host=net.gateway,
            seed_proplet_ids=tuple(ids),
            alive_window_s=alive_window_s,
            coordinator_tick_s=0.05,
            oci_insecure=True,
            ca_dir=ca.dir,
        )
        # The proplets stop before the services, the services before the network goes.
        async with Stack(config) as stack, contextlib.AsyncExitStack() as proplets:
            endpoints = stack.endpoints
            process_of: dict[str, ChildProcess] = {}
            for i, (pid, host) in enumerate(zip(ids, net.hosts, strict=True)):
                bundle = ca.ensure(Identity(Kind.PROPLET, pid))
                env = {
                    **service_environment(),
                    **tls_env(TlsConfig.bundle(bundle.dir, crl=ca.crl_path)),
                    "PROPLET_ID": pid,
                    "PROPLET_NAME": f"host-{i}",
                    "PROPLET_HEARTBEAT_S": "0.5",
                    "PROPLET_RESULT_RESEND_S": "0.5",
                    "PROPLET_WORK_DIR": str(tmp_path / f"proplet-{i}"),
                    "PROPLET_INSECURE_REGISTRIES": registry.host,
                    "PROPELLER_MQTT_HOST": net.gateway,
                    "PROPELLER_MQTT_PORT": str(broker.port),
                    "PROPELLER_DOMAIN_ID": topics.domain,
                    "PROPELLER_CHANNEL_ID": topics.channel,
                    "COORDINATOR_ADDR": endpoints.coordinator,
                    "MODEL_REGISTRY_ADDR": endpoints.registry,
                    "DATA_STORE_ADDR": endpoints.datastore,
                    "PROPELLER_LOG_LEVEL": "INFO",
                }
                argv = net.run_in(host, [sys.executable, "-m", "proplet"])
                process = ChildProcess(f"proplet-{i}", argv, tmp_path / "logs", env=env, cwd=ROOT)
                process_of[pid] = proplets.enter_context(started(process, grace=5.0))
            async with clients(endpoints, tls=stack.operator_tls) as c:
                await c.init_model(3)
                await c.wait_alive(ids)
                yield Fleet(
                    net,
                    stack,
                    c,
                    image,
                    ids,
                    dict(zip(ids, net.hosts, strict=True)),
                    process_of,
                )


async def lineage_of(c: Clients, version: int) -> tuple[model_registry_pb2.Lineage, list[Update]]:
    """The version's lineage and the updates it lists, as the registry kept them."""
    call = c.registry.GetLineage(model_registry_pb2.GetModelRequest(version=version), timeout=30)
    header, data = await header_and_data(call)
    updates, offset = [], 0
    for i, contribution in enumerate(header.contributions):
        h = contribution.header
        specs = specs_from_proto(h.tensors, f"contributions[{i}]")
        size = sum(s.nbytes for s in specs)
        tensors = split_payload(data[offset : offset + size], specs, f"contributions[{i}]")
        offset += size
        updates.append(Update(h.proplet_id, h.base_model_uri, h.num_samples, {}, tensors))
    assert offset == len(data)
    return header, updates


async def assert_counted_once(c: Clients, status: coordinator_pb2.RoundStatus) -> None:
    """The round's new version is the FedAvg of exactly the updates the status says it took,
    one per reporting proplet, computed here from the bytes the registry kept."""
    lineage, updates = await lineage_of(c, status.new_model_version)
    assert lineage.round_id == status.round_id
    senders = [u.proplet_id for u in updates]
    assert sorted(senders) == sorted(status.reported) and len(set(senders)) == len(senders)
    assert status.num_updates == len(updates)
    model = await c.model(status.new_model_version)
    expected = fedavg(updates)
    assert list(model) == list(expected)
    for name, array in expected.items():
        np.testing.assert_allclose(model[name], array, rtol=1e-6, atol=1e-9)


async def test_a_cut_proplet_misses_the_round_then_rejoins_and_takes_part_in_the_next(
    fleet: Fleet,
) -> None:
    *reachable, cut = fleet.ids
    first = f"r-{uuid.uuid4().hex[:8]}"
    # Mid-round: the cut proplet has its task and is training when its link goes.
    status = await fleet.round_with_a_cut(first, k_of_n=2, timeout_s=LONG_S, wait_s=LONG_S)
    assert status.closed_by == "k_of_n"
    assert status.new_model_version == 1

    await fleet.restore(cut)
    # Its task for the closed round ends one way or the other once it is back (its update
    # is refused: the round is closed); whatever it sent changes nothing of the round.
    late = await fleet.wait_task(
        first, cut, manager_pb2.TASK_STATE_COMPLETED, manager_pb2.TASK_STATE_FAILED
    )
    log.info("[test] the cut proplet's task of the closed round: %s %s", late.state, late.error)
    after = await fleet.c.status(first)
    assert (after.state, after.num_updates, sorted(after.reported)) == (
        S.ROUND_STATE_COMPLETED,
        2,
        sorted(reachable),
    )
    await assert_counted_once(fleet.c, after)

    second = f"r-{uuid.uuid4().hex[:8]}"
    await fleet.c.start_experiment(
        second, fleet.ids, fleet.image, k_of_n=3, timeout_s=LONG_S, model_ref=model_uri(1)
    )
    status = await fleet.c.wait_state(second, timeout=LONG_S)
    assert status.state == S.ROUND_STATE_COMPLETED, status.failure_reason
    assert (status.closed_by, sorted(status.reported)) == ("k_of_n", sorted(fleet.ids))
    assert status.new_model_version == 2
    await assert_counted_once(fleet.c, status)
    assert await fleet.c.versions() == [0, 1, 2]


async def test_a_cut_that_leaves_k_of_n_unreachable_closes_the_round_at_its_deadline(
    fleet: Fleet,
) -> None:
    cut = fleet.ids[-1]
    rid = f"r-{uuid.uuid4().hex[:8]}"
    status = await fleet.round_with_a_cut(rid, k_of_n=3, timeout_s=DEADLINE_S, wait_s=60)
    assert status.closed_by == "deadline"
    await assert_counted_once(fleet.c, status)

    await fleet.restore(cut)
    # What the cut proplet sends once it is back (its update, or its task's failure: the
    # module could not be fetched) changes nothing of the closed round.
    await fleet.wait_task(rid, cut, manager_pb2.TASK_STATE_COMPLETED, manager_pb2.TASK_STATE_FAILED)
    assert await fleet.c.status(rid) == status


async def test_rounds_over_links_with_latency_and_loss_complete_correctly(
    tmp_path: Path, trainer_wasm: Path
) -> None:
    # Lost heartbeats must not make a proplet "not alive" here: what is tested is the rounds.
    async with hosts_fleet(tmp_path, trainer_wasm, alive_window_s=LONG_S) as fleet:
        with contextlib.ExitStack() as links:
            impairments = [
                links.enter_context(
                    fleet.net.impaired(
                        host, delay_ms=100, loss=0.1, logs=tmp_path / "links", seed=10 * i
                    )
                )
                for i, host in enumerate(fleet.net.hosts)
            ]
            for version in (1, 2):
                rid = f"r-{uuid.uuid4().hex[:8]}"
                await fleet.c.start_experiment(
                    rid,
                    fleet.ids,
                    fleet.image,
                    k_of_n=PROPLETS,
                    timeout_s=LONG_S,
                    model_ref=model_uri(version - 1),
                )
                status = await fleet.c.wait_state(rid, timeout=LONG_S)
                assert status.state == S.ROUND_STATE_COMPLETED, status.failure_reason
                assert (status.closed_by, sorted(status.reported)) == (
                    "k_of_n",
                    sorted(fleet.ids),
                )
                assert status.new_model_version == version
                await assert_counted_once(fleet.c, status)
        assert await fleet.c.versions() == [0, 1, 2]
        # The rounds' traffic went through the impaired links, both ways, and lost frames.
        for impairment in impairments:
            frames = impairment.frames()
            log.info("[test] impaired link: (forwarded, dropped) each way: %s", frames)
            assert len(frames) == 2
            assert all(forwarded > 0 and dropped > 0 for forwarded, dropped in frames), frames


def test_a_network_and_its_impairments_are_removed_even_when_the_test_fails(
    tmp_path: Path,
) -> None:
    with pytest.raises(RuntimeError, match="the test failed"), network(2) as net:
        made = {net.bridge, *(h.link for h in net.hosts)}
        namespaces = {h.name for h in net.hosts}
        with net.impaired(net.hosts[0], delay_ms=100, loss=0.1, logs=tmp_path) as impairment:
            taps = {n for n in links() if n.startswith(net.bridge.removesuffix("b"))} - made
            assert len(taps) == 1  # the services' side tap (the other is in the namespace)
            raise RuntimeError("the test failed")
    assert not (made | taps) & links()
    assert not namespaces & set(ip("netns", "list").split())
    assert all(not relay.running for relay in impairment.relays)


def links() -> set[str]:
    return {str(link["ifname"]) for link in json.loads(ip("-j", "link", "show"))}
