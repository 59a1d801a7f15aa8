"""The Coordinator over gRPC with the real ModelRegistry and Aggregator servers, a real
Mosquitto, and a subscriber listening for round-complete on the deployment namespace."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

import grpc
import numpy as np
import pytest

from propeller.v1 import coordinator_pb2, coordinator_pb2_grpc
from server.config import MqttConfig
from server.coordinator.rounds import RoundState, Update
from server.grpc_server import channel
from server.manager.coordinator import CoordinatorClient
from server.tensors import Tensors
from tests.coordinator.helpers import fedavg, make_update
from tests.support.clients import Clients, clients
from tests.support.cluster import round_notes, round_services
from tests.support.ports import free_port
from tests.support.security import service_tls
from tests.test_round_spec import NOT_FINITE_OR_NEGATIVE

V0 = "fl/models/global_model_v0"
V1 = "fl/models/global_model_v1"
S = coordinator_pb2  # states and event types


@dataclass
class Cluster(Clients):
    """Clients of the coordinator and the registry, and the round-complete announcements."""

    announcements: asyncio.Queue[dict[str, Any]]


@asynccontextmanager
async def cluster(mqtt: MqttConfig, dimension: int = 3, **overrides: Any) -> AsyncIterator[Cluster]:
    """Registry (v0 of `dimension` zeros), aggregator and coordinator in this process; the
    coordinator's settings are these unless `overrides` (`aggregator_addr` included) say else."""
    settings: dict[str, Any] = {"rpc_timeout_s": 30.0, "tick_s": 0.05, **overrides}
    async with (
        round_notes(mqtt) as announcements,
        round_services(mqtt, dimension=dimension, **settings) as services,
        clients(services) as c,
    ):
        yield Cluster(c.channels, announcements, **c.connection())


@pytest.fixture
async def fl(mqtt: MqttConfig) -> AsyncIterator[Cluster]:
    async with cluster(mqtt) as c:
        yield c


UPDATES = [
    make_update("a", [1.0, 2.0, 3.0], 1.0, 10, loss=0.9),
    make_update("b", [0.0, -1.0, 4.0], -2.0, 30, loss=0.3),
    make_update("c", [5.0, 5.0, 5.0], 0.5, 60, loss=0.1),
]


def assert_model(actual: Tensors, expected: Tensors) -> None:
    assert list(actual) == list(expected)
    for name in expected:
        assert actual[name].dtype == expected[name].dtype
        np.testing.assert_allclose(actual[name], expected[name], rtol=1e-12)


async def rpc_error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await call
    return exc.value


# ---- the happy path --------------------------------------------------------------------


async def test_three_participants_make_v1_and_announce_it(fl: Cluster) -> None:
    st = await fl.configure(k_of_n=3, experiment_id="exp")
    assert st.state == S.ROUND_STATE_OPEN
    assert st.k_of_n == 3 and st.model_ref == V0
    assert st.deadline == pytest.approx(st.started_at + 60.0)
    assert (st.hyperparams.epochs, st.hyperparams.lr, st.hyperparams.batch_size) == (1, 0.01, 1)

    for i, u in enumerate(UPDATES):
        resp = await fl.submit("r1", u)
        assert (resp.accepted, resp.duplicate, resp.num_updates, resp.k_of_n) == (
            True,
            False,
            i + 1,
            3,
        )
    assert resp.state in (S.ROUND_STATE_AGGREGATING, S.ROUND_STATE_COMPLETED)

    st = await fl.wait_state("r1", S.ROUND_STATE_COMPLETED, S.ROUND_STATE_FAILED)
    assert st.state == S.ROUND_STATE_COMPLETED, st.failure_reason
    assert st.completed
    assert (st.new_model_version, st.new_model_uri, st.closed_by) == (1, V1, "k_of_n")
    assert list(st.reported) == ["a", "b", "c"]
    assert st.num_updates == 3
    assert st.failure_reason == ""
    assert st.metrics["loss"] == pytest.approx((0.9 * 10 + 0.3 * 30 + 0.1 * 60) / 100)

    assert await fl.versions() == [0, 1]
    assert_model(await fl.model(1), fedavg(UPDATES))

    msg = await asyncio.wait_for(fl.announcements.get(), 10)
    assert msg["round_id"] == "r1"
    assert msg["new_model_version"] == 1
    assert msg["model_uri"] == V1
    assert msg["status"] == "complete"
    assert msg["num_updates"] == 3
    assert msg["closed_by"] == "k_of_n"


async def test_two_of_three_close_the_round(fl: Cluster) -> None:
    await fl.configure(k_of_n=2)
    await fl.submit("r1", UPDATES[2])
    resp = await fl.submit("r1", UPDATES[0])
    assert resp.num_updates == 2
    st = await fl.wait_state("r1", S.ROUND_STATE_COMPLETED, S.ROUND_STATE_FAILED)
    assert st.state == S.ROUND_STATE_COMPLETED, st.failure_reason
    assert list(st.reported) == ["c", "a"]
    assert_model(await fl.model(1), fedavg([UPDATES[2], UPDATES[0]]))

    err = await rpc_error(fl.submit("r1", UPDATES[1]))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "late update not counted" in (err.details() or "")
    assert (await fl.status()).num_updates == 2
    msg = await asyncio.wait_for(fl.announcements.get(), 10)
    assert (msg["new_model_version"], msg["num_updates"]) == (1, 2)


async def test_a_second_round_gets_the_next_version(fl: Cluster) -> None:
    await fl.configure("r1", k_of_n=1)
    await fl.submit("r1", UPDATES[0])
    assert (await fl.wait_state("r1", S.ROUND_STATE_COMPLETED)).new_model_version == 1
    await fl.configure("r2", k_of_n=1, model_ref="")  # empty: the latest, v1
    update = replace(UPDATES[1], base_model_uri=V1)
    await fl.submit("r2", update)
    st = await fl.wait_state("r2", S.ROUND_STATE_COMPLETED)
    assert (st.model_ref, st.new_model_version) == (V1, 2)
    assert await fl.versions() == [0, 1, 2]


# ---- deadlines -------------------------------------------------------------------------


async def test_deadline_with_one_update_completes(fl: Cluster) -> None:
    st = await fl.configure(k_of_n=3, timeout_s=1.0)
    assert st.deadline == pytest.approx(st.started_at + 1.0)
    await fl.submit("r1", UPDATES[1])
    st = await fl.wait_state("r1", S.ROUND_STATE_COMPLETED, S.ROUND_STATE_FAILED)
    assert st.state == S.ROUND_STATE_COMPLETED, st.failure_reason
    assert st.closed_by == "deadline"
    assert st.failure_reason == ""
    assert (st.num_updates, st.k_of_n) == (1, 3)
    assert_model(await fl.model(1), UPDATES[1].tensors)
    msg = await asyncio.wait_for(fl.announcements.get(), 10)
    assert (msg["new_model_version"], msg["closed_by"]) == (1, "deadline")


async def test_deadline_with_no_update_fails_with_reason(fl: Cluster) -> None:
    await fl.configure(k_of_n=2, timeout_s=1.0)
    st = await fl.wait_state("r1", S.ROUND_STATE_COMPLETED, S.ROUND_STATE_FAILED)
    assert st.state == S.ROUND_STATE_FAILED
    assert st.failure_reason == "deadline passed with 0 of 2 updates"
    assert st.closed_by == "deadline"
    assert not st.completed
    assert await fl.versions() == [0]


async def test_deadline_counts_from_start_not_configuration(fl: Cluster) -> None:
    st = await fl.configure(k_of_n=1, timeout_s=0.5, start=False)
    assert st.state == S.ROUND_STATE_PENDING
    assert st.deadline == 0
    err = await rpc_error(fl.submit("r1", UPDATES[0]))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    started = await fl.coordinator.StartRound(
        coordinator_pb2.StartRoundRequest(round_id="r1"), timeout=10
    )
    assert started.state == S.ROUND_STATE_OPEN
    assert started.deadline == pytest.approx(started.started_at + 0.5)
    again = await fl.coordinator.StartRound(
        coordinator_pb2.StartRoundRequest(round_id="r1"), timeout=10
    )
    assert again.deadline == started.deadline


# ---- events ----------------------------------------------------------------------------


async def test_watch_round_delivers_events_in_order(fl: Cluster) -> None:
    await fl.configure(k_of_n=2, start=False)
    call = fl.coordinator.WatchRound(coordinator_pb2.WatchRoundRequest(round_id="r1"), timeout=30)
    stream = call.__aiter__()
    first = await anext(stream)
    assert first.type == S.ROUND_EVENT_TYPE_SNAPSHOT
    assert first.status.state == S.ROUND_STATE_PENDING

    await fl.coordinator.StartRound(coordinator_pb2.StartRoundRequest(round_id="r1"), timeout=10)
    await fl.submit("r1", UPDATES[0])
    await fl.submit("r1", UPDATES[0])  # a duplicate changes nothing, so no event
    await fl.submit("r1", UPDATES[1])
    rest = [event async for event in stream]
    assert [(e.type, e.proplet_id) for e in rest] == [
        (S.ROUND_EVENT_TYPE_STARTED, ""),
        (S.ROUND_EVENT_TYPE_UPDATE_ACCEPTED, "a"),
        (S.ROUND_EVENT_TYPE_UPDATE_ACCEPTED, "b"),
        (S.ROUND_EVENT_TYPE_AGGREGATING, ""),
        (S.ROUND_EVENT_TYPE_COMPLETED, ""),
    ]
    assert [e.status.num_updates for e in rest] == [0, 1, 2, 2, 2]
    assert rest[-1].status.new_model_version == 1
    assert all(e.timestamp > 0 for e in rest)

    # Already finished: the snapshot, then the end of the stream.
    done = fl.coordinator.WatchRound(coordinator_pb2.WatchRoundRequest(round_id="r1"), timeout=10)
    events = [e async for e in done]
    assert [e.type for e in events] == [S.ROUND_EVENT_TYPE_SNAPSHOT]
    assert events[0].status.state == S.ROUND_STATE_COMPLETED


async def test_a_brief_watch_tells_updates_without_the_lists(fl: Cluster) -> None:
    """WatchRound with `brief`: an accepted update's event names its proplet and the count
    so far, without the round's lists (O(participants) each, so O(participants^2) a round);
    the snapshot and each change of state carry the full status. The manager's client
    watches briefly and is told the changes of state only."""
    await fl.configure(k_of_n=2, start=False)
    call = fl.coordinator.WatchRound(
        coordinator_pb2.WatchRoundRequest(round_id="r1", brief=True), timeout=30
    )
    async with channel(fl.coordinator_addr, service_tls("manager")) as chan:
        client = CoordinatorClient(coordinator_pb2_grpc.CoordinatorStub(chan), timeout_s=10.0)
        manager_view = client.watch_round("r1", 30)
        assert (await anext(manager_view)).state is RoundState.PENDING
        await fl.coordinator.StartRound(coordinator_pb2.StartRoundRequest(round_id="r1"))
        await fl.submit("r1", UPDATES[0])
        await fl.submit("r1", UPDATES[1])
        events = [e async for e in call]
        states = [r.state async for r in manager_view]
    assert [(e.type, e.proplet_id) for e in events] == [
        (S.ROUND_EVENT_TYPE_SNAPSHOT, ""),
        (S.ROUND_EVENT_TYPE_STARTED, ""),
        (S.ROUND_EVENT_TYPE_UPDATE_ACCEPTED, "a"),
        (S.ROUND_EVENT_TYPE_UPDATE_ACCEPTED, "b"),
        (S.ROUND_EVENT_TYPE_AGGREGATING, ""),
        (S.ROUND_EVENT_TYPE_COMPLETED, ""),
    ]
    for e in events:
        lists = (list(e.status.participants), list(e.status.reported))
        if e.type == S.ROUND_EVENT_TYPE_UPDATE_ACCEPTED:
            assert lists == ([], [])
        else:
            assert lists[0] == ["a", "b", "c"]
    assert [e.status.num_updates for e in events] == [0, 0, 1, 2, 2, 2]
    assert list(events[-1].status.reported) == ["a", "b"]
    assert states == [
        RoundState.OPEN,
        RoundState.AGGREGATING,
        RoundState.COMPLETED,
    ]


async def test_watch_round_ends_on_failure(fl: Cluster) -> None:
    await fl.configure(k_of_n=2, timeout_s=1.0)
    call = fl.coordinator.WatchRound(coordinator_pb2.WatchRoundRequest(round_id="r1"), timeout=30)
    events = [e async for e in call]
    assert [e.type for e in events] == [S.ROUND_EVENT_TYPE_SNAPSHOT, S.ROUND_EVENT_TYPE_FAILED]
    assert events[-1].status.failure_reason == "deadline passed with 0 of 2 updates"


async def test_a_failure_report_is_answered_without_the_lists_when_brief(fl: Cluster) -> None:
    """ReportParticipantFailure with `brief` (what the manager sends, through
    `CoordinatorClient`): the round's state and counts, but none of its per-participant lists,
    which a burst of reports in a big round would carry once per report; without it, the full
    status. Either way the failure is recorded."""
    await fl.configure(participants=["a", "b", "c", "d", "e"], min_k_of_n=1)
    await fl.submit("r1", UPDATES[0])
    async with channel(fl.coordinator_addr, service_tls("manager")) as chan:
        client = CoordinatorClient(coordinator_pb2_grpc.CoordinatorStub(chan), timeout_s=10.0)
        assert await client.report_failure("r1", "b", "task failed: trap") is RoundState.OPEN
        stub = coordinator_pb2_grpc.CoordinatorStub(chan)
        brief = await stub.ReportParticipantFailure(
            coordinator_pb2.ReportParticipantFailureRequest(
                round_id="r1", proplet_id="d", reason="lost", brief=True
            ),
            timeout=10,
        )
        assert (brief.state, brief.num_updates, brief.k_of_n) == (S.ROUND_STATE_OPEN, 1, 5)
        assert (list(brief.participants), list(brief.reported), list(brief.failed)) == ([], [], [])
        full = await stub.ReportParticipantFailure(
            coordinator_pb2.ReportParticipantFailureRequest(
                round_id="r1", proplet_id="c", reason="stopped"
            ),
            timeout=10,
        )
    assert full.state == S.ROUND_STATE_OPEN
    assert list(full.participants) == ["a", "b", "c", "d", "e"] and list(full.reported) == ["a"]
    assert [(f.proplet_id, f.reason) for f in full.failed] == [
        ("b", "task failed: trap"),
        ("d", "lost"),
        ("c", "stopped"),
    ]


async def test_watch_unknown_round_is_not_found(fl: Cluster) -> None:
    call = fl.coordinator.WatchRound(coordinator_pb2.WatchRoundRequest(round_id="zz"), timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        _ = [e async for e in call]
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND


# ---- rejections ------------------------------------------------------------------------


FP = grpc.StatusCode.FAILED_PRECONDITION
INVALID = grpc.StatusCode.INVALID_ARGUMENT
DENIED = grpc.StatusCode.PERMISSION_DENIED


def bad_updates() -> Sequence[tuple[str, str, Update, grpc.StatusCode, str]]:
    """(what, round_id, update, expected code, field the message names)."""
    ok = UPDATES[1]
    return [
        # Over mutual TLS the proplet's own certificate: a question of its rights.
        ("non-participant", "r1", replace(ok, proplet_id="mallory"), DENIED, "proplet_id"),
        ("unknown round", "zz", ok, grpc.StatusCode.NOT_FOUND, "round_id"),
        ("wrong base", "r1", replace(ok, base_model_uri=V1), FP, "base_model_uri"),
        ("wrong shape", "r1", make_update("b", [1.0, 2.0], 0.0, 5), INVALID, "tensors.w"),
        ("NaN", "r1", make_update("b", [1.0, np.nan, 0.0], 0.0, 5), INVALID, "tensors.w"),
        ("Inf", "r1", make_update("b", [1.0, 0.0, 0.0], np.inf, 5), INVALID, "tensors.b"),
        ("no samples", "r1", make_update("b", [1.0, 0.0, 0.0], 0.0, 0), INVALID, "num_samples"),
        ("no proplet", "r1", replace(ok, proplet_id=""), INVALID, "proplet_id"),
        ("no round", "", ok, INVALID, "round_id"),
    ]


async def test_bad_updates_are_rejected_and_change_nothing(fl: Cluster) -> None:
    await fl.configure(k_of_n=3)
    await fl.submit("r1", UPDATES[0])
    before = await fl.status()
    for what, round_id, update, code, field in bad_updates():
        err = await rpc_error(fl.submit(round_id, update))
        assert err.code() == code, what
        assert field in (err.details() or ""), (what, err.details())
    dup = await fl.submit("r1", replace(UPDATES[0], num_samples=999))
    assert (dup.accepted, dup.duplicate, dup.num_updates) == (True, True, 1)
    assert await fl.status() == before
    # The round still completes with the first update of "a".
    await fl.submit("r1", UPDATES[1])
    await fl.submit("r1", UPDATES[2])
    st = await fl.wait_state("r1", S.ROUND_STATE_COMPLETED)
    assert_model(await fl.model(st.new_model_version), fedavg(UPDATES))


async def test_pending_round_refuses_updates(fl: Cluster) -> None:
    await fl.configure(start=False)
    err = await rpc_error(fl.submit("r1", UPDATES[0]))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (await fl.status()).num_updates == 0


async def test_completed_round_refuses_updates_and_restarts(fl: Cluster) -> None:
    await fl.configure(k_of_n=1)
    await fl.submit("r1", UPDATES[0])
    await fl.wait_state("r1", S.ROUND_STATE_COMPLETED)
    err = await rpc_error(fl.submit("r1", UPDATES[1]))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "completed; late update not counted" in (err.details() or "")
    err = await rpc_error(
        fl.coordinator.StartRound(coordinator_pb2.StartRoundRequest(round_id="r1"), timeout=10)
    )
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    st = await fl.status()
    assert st.num_updates == 1
    assert await fl.versions() == [0, 1]


# ---- configuration ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"round_id": ""}, "round_id"),
        ({"participants": []}, "participants"),
        ({"participants": ["a", "a"]}, "participants"),
        ({"k_of_n": 4}, "k_of_n"),
        ({"k_of_n": -1}, "k_of_n"),
        ({"timeout_s": -1.0}, "timeout_s"),
        ({"timeout_s": float("nan")}, "timeout_s"),
        ({"hyperparams": coordinator_pb2.Hyperparams(lr=-1.0)}, "hyperparams.lr"),
        ({"hyperparams": coordinator_pb2.Hyperparams(epochs=-1)}, "hyperparams.epochs"),
        ({"hyperparams": coordinator_pb2.Hyperparams(batch_size=-1)}, "hyperparams.batch_size"),
        ({"model_ref": "v1"}, "model_ref"),
    ],
)
async def test_configure_rejects_invalid_config(
    fl: Cluster, kw: dict[str, Any], field: str
) -> None:
    err = await rpc_error(fl.configure(**kw))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.details() or "").startswith(f"{field}:")


async def test_configure_says_non_finite_apart_from_negative(fl: Cluster) -> None:
    for field, value, details in NOT_FINITE_OR_NEGATIVE:
        hp = coordinator_pb2.Hyperparams(lr=value)
        kw: dict[str, Any] = {"hyperparams": hp} if field == "lr" else {field: value}
        err = await rpc_error(fl.configure(**kw))
        assert (err.code(), err.details()) == (grpc.StatusCode.INVALID_ARGUMENT, details)
    err = await rpc_error(fl.status("r1"))
    assert err.code() == grpc.StatusCode.NOT_FOUND


async def test_configure_unknown_model_is_not_found(fl: Cluster) -> None:
    err = await rpc_error(fl.configure(model_ref="fl/models/global_model_v5"))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "model_ref" in (err.details() or "")
    err = await rpc_error(fl.status("r1"))
    assert err.code() == grpc.StatusCode.NOT_FOUND


async def test_configure_is_idempotent(fl: Cluster) -> None:
    first = await fl.configure(k_of_n=2, timeout_s=30.0, experiment_id="e")
    again = await fl.configure(k_of_n=2, timeout_s=30.0, experiment_id="e")
    assert again == first
    err = await rpc_error(fl.configure(k_of_n=3, timeout_s=30.0, experiment_id="e"))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "k_of_n" in (err.details() or "")


async def test_status_and_list(fl: Cluster) -> None:
    await fl.configure("r1", experiment_id="e1")
    await fl.configure("r2", experiment_id="e2", start=False)
    await fl.configure("r3", experiment_id="e1")
    every = await fl.coordinator.ListRounds(coordinator_pb2.ListRoundsRequest(), timeout=10)
    assert [r.round_id for r in every.rounds] == ["r1", "r2", "r3"]
    e1 = await fl.coordinator.ListRounds(
        coordinator_pb2.ListRoundsRequest(experiment_id="e1"), timeout=10
    )
    assert [r.round_id for r in e1.rounds] == ["r1", "r3"]
    for call in (
        fl.status("zz"),
        fl.coordinator.StartRound(coordinator_pb2.StartRoundRequest(round_id="zz"), timeout=10),
    ):
        assert (await rpc_error(call)).code() == grpc.StatusCode.NOT_FOUND


# ---- failures downstream ---------------------------------------------------------------


async def test_unreachable_aggregator_fails_the_round_with_reason(mqtt: MqttConfig) -> None:
    async with cluster(
        mqtt,
        aggregator_addr=f"127.0.0.1:{free_port()}",
        rpc_timeout_s=2.0,
        retry_attempts=3,
        retry_backoff_s=0.01,
    ) as c:
        await c.configure(k_of_n=1)
        await c.submit("r1", UPDATES[0])
        st = await c.wait_state("r1", S.ROUND_STATE_COMPLETED, S.ROUND_STATE_FAILED)
        assert st.state == S.ROUND_STATE_FAILED
        assert st.failure_reason.startswith("aggregation failed: aggregate: 3 attempts")
        assert "UNAVAILABLE" in st.failure_reason
        assert await c.versions() == [0]


# ---- size ------------------------------------------------------------------------------


@pytest.mark.process  # a long end-to-end case: 50 MB through every hop of a round
async def test_fifty_megabyte_update(mqtt: MqttConfig) -> None:
    dimension = 50 * (1 << 20) // 8
    async with cluster(mqtt, dimension=dimension) as c:
        await c.configure(participants=["a", "b"], k_of_n=1)
        rng = np.random.default_rng(7)
        update = Update(
            proplet_id="b",
            base_model_uri=V0,
            num_samples=64,
            metrics={"loss": 0.25},
            tensors={"w": rng.standard_normal(dimension), "b": np.array(0.125)},
        )
        resp = await c.submit("r1", update)
        assert resp.num_updates == 1
        st = await c.wait_state("r1", S.ROUND_STATE_COMPLETED, S.ROUND_STATE_FAILED, timeout=60)
        assert st.state == S.ROUND_STATE_COMPLETED, st.failure_reason
        assert_model(await c.model(1), update.tensors)
