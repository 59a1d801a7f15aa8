"""Two manager processes on one PostgreSQL database (`server.manager.replicas`), with the
registry, aggregator, data store and coordinator as `serve` processes, a real Mosquitto and
three real proplets training the real module.

An experiment started on one replica is driven by it, and watched and read, the same, on
the other; every task result, which both replicas receive, is applied by one of them only.
Then the replica that drives a second experiment is killed with SIGKILL in the middle of a
round (its fan-out: two of round 2's three task starts sent); the other takes the experiment
over once the lease expires, finishes the round and the experiment, each round once with one
task per proplet, and stores the same models as the experiment that ran without a crash:
each proplet's update byte for byte the uninterrupted run's where the base was the same
bytes (round 1), each counted once, and the models equal to float rounding (not byte for
byte: the coordinator sums a round's updates in their order of arrival, which differs
between any two runs; test_coordinator_replica_processes.py shows the same bytes for the
same order). Last,
StopExperiment on the replica that does not drive an experiment: the driver stops it and the
answer says it stopped; and the same StartExperiment sent to both at once: recorded once,
both answers the same.

Twice: under mutual TLS, as deployed (every hop; a Mosquitto of the test's own whose ACL
names the two replicas, `certs mqtt-acl --manager-replica`), each replica with a certificate
of its own, the service `manager-{replica_id}`, from which it takes its replica id and which
the broker makes its client id: neither takes the other's session over, and a replica's
certificate calls the coordinator as the manager's does but not what only operators may; and
with every hop plaintext, each replica naming its session by PROPELLER_MANAGER_REPLICA_ID
(docs/reliability.md, "Manager replicas").
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest

from propeller.v1 import coordinator_pb2, manager_pb2, model_registry_pb2
from server.config import Endpoints, MqttConfig
from server.faults import KILL_AT_ENV
from server.manager.experiments import round_task_name
from server.manager.plan import round_id_for
from server.pki import manager_replica_service
from server.topics import Topics
from tests.reliability.test_experiment_crash import ended, experiment
from tests.reliability.test_experiment_crash import request as experiment_request
from tests.reliability.test_manager_crash import fleet_processes, the_answer
from tests.support.clients import Clients, clients
from tests.support.cluster import run_proplets
from tests.support.infra import mosquitto
from tests.support.processes import RPC_S, ServiceProcess, service_process
from tests.support.security import service_tls, session_ca, tls_env
from tests.support.state import StateBackend

pytestmark = pytest.mark.process

IDS = ["edge-a", "edge-b", "edge-c"]
ROUNDS = 2
# Without the shuffle (whose seed is the round id) an update depends only on the model it
# trains from and the proplet's data: two experiments from v0 store the same bytes.
HYPER = coordinator_pb2.Hyperparams(
    epochs=1, lr=0.01, batch_size=16, extra_json='{"shuffle":false}'
)
LEASE_S = "2"
REPLICAS = ("replica-a", "replica-b")


def request(eid: str, image: str) -> manager_pb2.StartExperimentRequest:
    """test_experiment_crash's experiment, with two rounds and no shuffle."""
    r = experiment_request(eid, image)
    r.rounds = ROUNDS
    r.hyperparams.CopyFrom(HYPER)
    return r


async def ran_once(c: Clients, eid: str) -> list[int]:
    """The experiment completed its rounds, each once (the coordinator holds exactly them),
    each with one completed task per proplet; the versions it stored."""
    e = await ended(c, eid)
    assert e.state == manager_pb2.EXPERIMENT_STATE_COMPLETED, e.end
    ids = [round_id_for(eid, i) for i in range(1, ROUNDS + 1)]
    assert [r.round_id for r in e.rounds] == ids
    listed = await c.coordinator.ListRounds(
        coordinator_pb2.ListRoundsRequest(experiment_id=eid), timeout=RPC_S
    )
    assert [r.round_id for r in listed.rounds] == ids
    for r in e.rounds:
        assert r.state == coordinator_pb2.ROUND_STATE_COMPLETED, r.failure_reason
        assert sorted(r.reported) == IDS
        tasks = await c.round_tasks(r.round_id)
        assert sorted(t.proplet_id for t in tasks) == IDS, [t.name for t in tasks]
        assert {t.state for t in tasks} == {manager_pb2.TASK_STATE_COMPLETED}
    return [r.new_model_version for r in e.rounds]


async def lineage(c: Clients, version: int) -> tuple[str, dict[str, str]]:
    """The sha256 of the base model a version was trained from, and of each proplet's
    update it was aggregated from."""
    async for chunk in c.registry.GetLineage(
        model_registry_pb2.GetModelRequest(version=version), timeout=RPC_S
    ):
        if chunk.HasField("header"):
            h = chunk.header
            return h.base_model_sha256, {u.header.proplet_id: u.sha256 for u in h.contributions}
    raise AssertionError(f"no lineage for v{version}")


async def same_models(c: Clients, versions: list[int], reference: list[int]) -> None:
    """Round by round: trained from the same base bytes (round 1: v0), every proplet's update
    is byte for byte the reference's; the model is the same to float rounding (summed in
    another order, so the next round's base may differ in its last bits)."""
    for version, ref in zip(versions, reference, strict=True):
        (base, ours), (ref_base, theirs) = await lineage(c, version), await lineage(c, ref)
        assert sorted(ours) == IDS and sorted(theirs) == IDS, version
        if base == ref_base:
            assert ours == theirs, version
        model, expected = await c.model(version), await c.model(ref)
        assert list(model) == list(expected)
        for name in expected:
            np.testing.assert_allclose(model[name], expected[name], rtol=1e-5, atol=1e-7)
    first = [(await lineage(c, v))[0] for v in (versions[0], reference[0])]
    assert first[0] == first[1]  # round 1 of both from v0: its updates were compared


def applied(log: str, task_id: str) -> int:
    """How many times a replica's log says it applied the task's Completed result."""
    return len(re.findall(rf"task_id={task_id} name=\S+ state=COMPLETED$", log, re.MULTILINE))


def replica_env(replica_id: str, insecure: bool) -> dict[str, str]:
    """What makes a manager process the replica `replica_id`: under mutual TLS its own
    certificate (the id is read from it), in plaintext the id itself."""
    if insecure:
        return {"PROPELLER_MANAGER_REPLICA_ID": replica_id}
    return tls_env(service_tls(manager_replica_service(replica_id)))


@pytest.mark.parametrize("insecure", [False, True], ids=["mtls", "plaintext"])
async def test_manager_replicas_share_state_and_take_over_a_killed_driver_s_experiment(
    insecure: bool,
    plain_mqtt: MqttConfig,
    topics: Topics,
    tmp_path: Path,
    trainer_wasm: Path,
    database_url: str,
) -> None:
    image = f"file://{trainer_wasm}"
    state = {"PROPELLER_DATABASE_URL": database_url, "PROPELLER_MANAGER_LEASE_S": LEASE_S}
    db = StateBackend("postgres", tmp_path / "state", database_url)
    with contextlib.ExitStack() as brokers:
        if insecure:
            mqtt = plain_mqtt
        else:
            # The deployed broker (TLS, CN as user name and client id, the ACL) naming the two
            # replicas, as `certs mqtt-acl --manager-replica replica-a --manager-replica
            # replica-b` writes it.
            broker = brokers.enter_context(
                mosquitto(tmp_path / "mosquitto", ca=session_ca(), manager_replicas=REPLICAS)
            )
            mqtt = MqttConfig(port=broker.port, topics=topics)
        async with fleet_processes(mqtt, tmp_path, IDS, state, insecure=insecure) as (
            a_proc,
            _,
            endpoints,
        ):
            b_env = {**a_proc.env, **replica_env("replica-b", insecure)}
            a_proc.env.update(replica_env("replica-a", insecure))
            with service_process("manager", b_env, tmp_path / "b", insecure=insecure) as b_proc:
                await a_proc.restart()
                await b_proc.restart()
                stopped_rounds = await replicas_run(
                    a_proc, b_proc, endpoints, mqtt, tmp_path, image, insecure
                )
        if not insecure:
            # Each replica connected as its own identity, once: neither knocked the other off
            # (mosquitto logs a takeover as "already connected, closing old connection").
            broker_log = broker.log_text()
            for r in REPLICAS:
                assert f"as service:{manager_replica_service(r)} " in broker_log, broker.tail()
            assert "closing old connection" not in broker_log, broker.tail()
    leases = dict(db.raw("manager", "SELECT experiment_id, owner FROM experiment_leases"))
    assert db.raw("manager", "SELECT experiment_id, owner FROM experiment_leases ORDER BY 1") == [
        ("calm", "replica-b"),
        ("killed", "replica-b"),
        ("stopped", "replica-b"),
        ("twice", leases["twice"]),
    ]
    assert leases["twice"] in ("replica-a", "replica-b")
    # Each round task once: calm's, killed's, twice's and the stopped one's rounds'. The stop
    # may land in the stopped experiment's last round's fan-out (an experiment ends "after or
    # in" its current round): that round has at most one task per proplet, every other one
    # exactly one.
    names = [name for (name,) in db.raw("manager", "SELECT name FROM tasks")]
    assert len(names) == len(set(names)), sorted(names)
    whole = [round_id_for(e, i) for e in ("calm", "killed") for i in range(1, ROUNDS + 1)]
    whole += [round_id_for("twice", 1), *stopped_rounds[:-1]]
    every = {round_task_name(r, p) for r in whole for p in IDS}
    last = {round_task_name(stopped_rounds[-1], p) for p in IDS}
    assert every <= set(names) <= every | last, sorted(set(names) ^ every)


async def replicas_run(
    a_proc: ServiceProcess,
    b_proc: ServiceProcess,
    endpoints: Endpoints,
    mqtt: MqttConfig,
    tmp_path: Path,
    image: str,
    insecure: bool,
) -> list[str]:
    """The experiments on the two replicas, `a_proc` and `b_proc` (started); the rounds
    the one stopped on the replica that did not drive it started (their ids)."""
    async with (
        run_proplets(
            endpoints,
            mqtt,
            IDS,
            tmp_path / "proplets",
            insecure=insecure,
            heartbeat_s=1.0,
        ),
        clients(endpoints, insecure=insecure) as a,
        clients(replace(endpoints, manager=b_proc.addr), insecure=insecure) as b,
    ):
        await a.wait_alive(IDS)
        await b.wait_alive(IDS)
        if not insecure:
            await a_replica_has_the_manager_s_rights_only(endpoints)

        # Started on b (which drives it), watched and read on a: the same answers
        # from either.
        await b.manager.StartExperiment(request("calm", image), timeout=RPC_S)
        watched = [
            (e.type, e.round.index)
            async for e in a.manager.WatchExperiment(
                manager_pb2.WatchExperimentRequest(experiment_id="calm"), timeout=180
            )
        ]
        assert watched[0][0] == manager_pb2.EXPERIMENT_EVENT_TYPE_SNAPSHOT
        assert watched[-1][0] == manager_pb2.EXPERIMENT_EVENT_TYPE_ENDED
        # Round 2 starts after the watch began (rounds take about a second).
        assert watched[-3:-1] == [
            (manager_pb2.EXPERIMENT_EVENT_TYPE_ROUND_STARTED, 2),
            (manager_pb2.EXPERIMENT_EVENT_TYPE_ROUND_FINISHED, 2),
        ], watched
        calm = await ran_once(a, "calm")
        assert await experiment(a, "calm") == await experiment(b, "calm")
        tasks_a, tasks_b = await a.round_tasks(""), await b.round_tasks("")
        assert [(t.id, t.state) for t in tasks_a] == [(t.id, t.state) for t in tasks_b]
        assert len(tasks_a) == ROUNDS * len(IDS)
        logs = a_proc.log_text() + b_proc.log_text()
        assert [applied(logs, t.id) for t in tasks_a] == [1] * len(tasks_a)
        assert "experiment_id=calm driven by replica replica-b" in b_proc.log_text()

        # a drives the next one and dies in round 2's fan-out (the fifth start it sent).
        await a_proc.terminate_async()
        a_proc.env[KILL_AT_ENV] = "manager.task_start_published:5"
        await a_proc.restart()
        await a.wait_alive(IDS)
        await a.manager.StartExperiment(request("killed", image), timeout=RPC_S)
        assert await a_proc.wait_exit(bound=120) == -signal.SIGKILL, a_proc.tail()
        assert "point=manager.task_start_published pass=5" in a_proc.log_text()
        killed = await ran_once(b, "killed")
        await same_models(b, killed, calm)
        assert calm == [1, 2] and killed == [3, 4]  # no version skipped or stored twice
        assert "experiment_id=killed driven by replica replica-b" in b_proc.log_text()

        # StopExperiment on a replica that does not drive the experiment: the driver
        # stops it, the answer says so.
        del a_proc.env[KILL_AT_ENV]
        await a_proc.restart()
        long = request("stopped", image)
        long.rounds = 1000  # rounds take a second or less: it runs until stopped
        await b.manager.StartExperiment(long, timeout=RPC_S)
        stopped = await a.manager.StopExperiment(
            manager_pb2.StopExperimentRequest(experiment_id="stopped"), timeout=RPC_S * 6
        )
        assert stopped.state == manager_pb2.EXPERIMENT_STATE_STOPPED, stopped
        assert stopped.end.reason == manager_pb2.END_REASON_STOPPED
        assert (await experiment(b, "stopped")).state == stopped.state
        ending = "experiment_id=stopped ended after round"
        assert ending in b_proc.log_text() and ending not in a_proc.log_text()

        # The same StartExperiment to both at once: recorded once, the same answer.
        twice = request("twice", image)
        twice.rounds = 1  # a repeat answers the current round: let there be one
        answers = await asyncio.gather(
            a.manager.StartExperiment(twice, timeout=RPC_S * 6),
            b.manager.StartExperiment(twice, timeout=RPC_S * 6),
        )
        assert the_answer(answers[0]) == the_answer(answers[1])
        assert (await ended(a, "twice")).state == manager_pb2.EXPERIMENT_STATE_COMPLETED
    assert await b_proc.terminate_async() == 0, b_proc.tail()
    return [r.round_id for r in stopped.rounds]


async def a_replica_has_the_manager_s_rights_only(endpoints: Endpoints) -> None:
    """A replica's certificate (service `manager-replica-a`) reads a round from the
    coordinator as the manager does (the round is unknown: NOT_FOUND, past authorization), and
    is refused what only operators or proplets may: starting an experiment, listing rounds,
    asking about a proplet."""
    as_replica = service_tls(manager_replica_service(REPLICAS[0]))
    async with clients(endpoints, tls=as_replica) as r:
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await r.coordinator.GetRoundStatus(
                coordinator_pb2.GetRoundStatusRequest(round_id="no-such-round"), timeout=RPC_S
            )
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND, unknown.value.details()
        refused = [
            r.manager.StartExperiment(request("by-a-replica", "file:///x.wasm"), timeout=RPC_S),
            r.coordinator.ListRounds(coordinator_pb2.ListRoundsRequest(), timeout=RPC_S),
            r.manager.GetProplet(manager_pb2.GetPropletRequest(proplet_id=IDS[0]), timeout=RPC_S),
        ]
        for call in refused:
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await call
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "service 'manager-replica-a' may not call it" in (denied.value.details() or "")
