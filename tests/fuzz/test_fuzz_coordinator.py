"""Coordinator under fuzzed requests: every RPC, at least 1,000 requests each.

Besides the shared known-good state this module adds a FAILED round (for "cannot start a
finished round" and late updates), a wide-open round whose thousands of participants the
SubmitUpdate fuzzer may legitimately report for, so accepted updates are exercised too, and a
round (min_k_of_n 1) whose thousands of participants the ReportParticipantFailure fuzzer may
legitimately report failed.
"""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from hypothesis import strategies as st

from propeller.v1 import coordinator_pb2, tensor_pb2
from tests.fuzz import strategies as S
from tests.fuzz.harness import FuzzEnv, Outcome, Rpc, all_methods, fuzz_messages
from tests.fuzz.known import (
    EXPERIMENT_ROUND,
    IMAGE,
    KNOWN_ROUNDS,
    KNOWN_URIS,
    MODULE,
    PROPLET,
    PROPLET_TWO,
    ROUND,
    RPC_TIMEOUT,
    SEEDED_ROUND,
    V0_URI,
    V1_URI,
    snapshot,
)

CP = coordinator_pb2
CONFIGURE = Rpc.of("Coordinator.ConfigureRound")
START = Rpc.of("Coordinator.StartRound")
SUBMIT = Rpc.of("Coordinator.SubmitUpdate")
STATUS = Rpc.of("Coordinator.GetRoundStatus")
LIST = Rpc.of("Coordinator.ListRounds")
WATCH = Rpc.of("Coordinator.WatchRound", first_only=True)
REPORT = Rpc.of("Coordinator.ReportParticipantFailure")
FUZZED = (CONFIGURE, START, SUBMIT, STATUS, LIST, WATCH, REPORT)
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")

FAILED_ROUND = "r-failed"
OPEN_ROUND = "r-open"  # the fuzzer may report for its participants
OPEN_PARTICIPANTS = [f"q-{i}" for i in range(3000)]
# Its participants may be reported failed: min_k_of_n 1 keeps it open through 1,000 reports.
FAILING_ROUND = "r-failing"
FAILING_PARTICIPANTS = [f"f-{i}" for i in range(3000)]
ROUND_IDS = (*KNOWN_ROUNDS, FAILED_ROUND, OPEN_ROUND, FAILING_ROUND)
# (round, participant) pairs whose valid update would be accepted and change known-good state:
# the fuzzer only ever sends them updates that must be rejected.
NOT_YET_REPORTED = {(ROUND, PROPLET_TWO): V1_URI, (EXPERIMENT_ROUND, PROPLET): V0_URI}
ROUND_BASE = {ROUND: V1_URI, EXPERIMENT_ROUND: V0_URI, FAILED_ROUND: V1_URI, OPEN_ROUND: V1_URI}


@pytest.fixture(scope="module")
async def env(env: FuzzEnv) -> FuzzEnv:
    """The shared known-good state plus FAILED_ROUND (failed at its deadline), OPEN_ROUND and
    FAILING_ROUND."""
    await env.coordinator.ConfigureRound(
        CP.ConfigureRoundRequest(
            round_id=FAILED_ROUND, participants=[PROPLET], timeout_s=0.01, start=True
        ),
        timeout=RPC_TIMEOUT,
    )
    await env.wait_state(FAILED_ROUND, CP.ROUND_STATE_FAILED, timeout=30)
    for round_id, participants, min_k_of_n in (
        (OPEN_ROUND, OPEN_PARTICIPANTS, 0),
        (FAILING_ROUND, FAILING_PARTICIPANTS, 1),
    ):
        await env.coordinator.ConfigureRound(
            CP.ConfigureRoundRequest(
                round_id=round_id,
                participants=participants,
                timeout_s=24 * 3600,
                model_ref=V1_URI,
                min_k_of_n=min_k_of_n,
                start=True,
            ),
            timeout=RPC_TIMEOUT,
        )
    env.extra_rounds.append(FAILED_ROUND)
    env.snapshot_at_start = await snapshot(env)
    return env


def test_every_coordinator_rpc_is_fuzzed() -> None:
    assert {r.name for r in FUZZED} == all_methods("Coordinator")


def round_ids() -> st.SearchStrategy[str]:
    return S.weighted((1, st.sampled_from(ROUND_IDS)), (1, S.texts(ROUND_IDS)))


# Free hyperparameters (extra_json): valid objects, the refused shapes, and any text.
EXTRA_JSON = (
    "",
    '{"mu": 0.01}',
    '{"shuffle": false, "mode": "literal"}',
    '{"lr": 0.1}',
    '{"task": "evaluate"}',
    '{"mu": NaN}',
    '{"mu": 1e400}',
    "[1]",
    "{",
)


def hyperparams() -> st.SearchStrategy[CP.Hyperparams]:
    return st.builds(
        lambda e, lr, b, x: CP.Hyperparams(epochs=e, lr=lr, batch_size=b, extra_json=x),
        S.int32s(),
        S.doubles(),
        S.int32s(),
        S.weighted((3, st.sampled_from(EXTRA_JSON)), (1, S.texts(EXTRA_JSON))),
    )


# The seeded configuration of ROUND, replayed exactly: an idempotent retry, nothing changes.
SEEDED = SEEDED_ROUND


# A round's strategy: valid names and parameters, refused ones, and any text.
STRATEGY_NAMES = ("", "fedavg", "fedadam", "krum", "bulyan", "fedmedian", "fedsgd")
STRATEGY_PARAMS = (
    "",
    '{"eta": 0.1}',
    '{"num_malicious": 0}',
    '{"num_malicious": 100}',
    '{"beta": 0.2}',
    '{"eta": -1}',
    '{"x": 1}',
    "[]",
    "{",
)

CONFIG_FIELDS = [
    "none",
    "strategy",
    "round_id",
    "experiment_id",
    "participants",
    "k_of_n",
    "timeout_s",
    "model_ref",
    "hyperparams",
    "task_wasm_image",
    "min_k_of_n",
    "module_digest",
]


@st.composite
def valid_configure(draw: st.DrawFn) -> CP.ConfigureRoundRequest:
    """A valid configuration (values at their extremes) with at most one field hostile."""
    participants = draw(
        S.weighted(
            (4, st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=5, unique=True)),
            (1, st.just([f"fz-{i}" for i in range(2000)])),
        )
    )
    req = CP.ConfigureRoundRequest(
        round_id=draw(S.weighted((3, st.text(min_size=1, max_size=16)), (1, round_ids()))),
        experiment_id=draw(st.text(max_size=8)),
        participants=participants,
        k_of_n=draw(st.integers(0, len(participants))),
        timeout_s=draw(st.sampled_from([0.0, -0.0, 1e-300, 5e-324, 0.5, 3600.0, 1e308])),
        model_ref=draw(st.sampled_from(["", V0_URI, V1_URI])),
        hyperparams=CP.Hyperparams(
            epochs=draw(st.sampled_from([0, 1, 2**31 - 1])),
            lr=draw(st.sampled_from([0.0, 1e-300, 0.01, 1e308])),
            batch_size=draw(st.sampled_from([0, 1, 2**31 - 1])),
        ),
        task_wasm_image=draw(S.texts((IMAGE,))),
        start=draw(st.booleans()),
        module_digest=draw(st.sampled_from(["", MODULE])),
    )
    req.min_k_of_n = draw(st.integers(0, req.k_of_n or len(participants)))
    field = draw(st.sampled_from(CONFIG_FIELDS))
    if field == "round_id":
        req.round_id = draw(S.texts(ROUND_IDS))
    elif field == "experiment_id":
        req.experiment_id = draw(S.texts())
    elif field == "participants":
        req.participants[:] = draw(S.string_lists((PROPLET, PROPLET_TWO)))
    elif field == "k_of_n":
        req.k_of_n = draw(S.int32s())
    elif field == "timeout_s":
        req.timeout_s = draw(S.doubles())
    elif field == "model_ref":
        req.model_ref = draw(S.model_refs(KNOWN_URIS))
    elif field == "hyperparams":
        req.hyperparams.CopyFrom(draw(hyperparams()))
    elif field == "task_wasm_image":
        req.task_wasm_image = draw(S.texts())
    elif field == "min_k_of_n":
        req.min_k_of_n = draw(S.int32s())
    elif field == "module_digest":
        req.module_digest = draw(S.texts((MODULE,)))
    elif field == "strategy":
        req.strategy_name = draw(S.weighted((3, st.sampled_from(STRATEGY_NAMES)), (1, S.texts())))
        req.strategy_params_json = draw(
            S.weighted((3, st.sampled_from(STRATEGY_PARAMS)), (1, S.texts(STRATEGY_PARAMS)))
        )
    return req


@st.composite
def configure_requests(draw: st.DrawFn) -> CP.ConfigureRoundRequest:
    if not draw(st.integers(0, 9)):
        replay = CP.ConfigureRoundRequest()
        replay.CopyFrom(SEEDED)
        replay.start = draw(st.booleans())
        return replay
    if draw(st.booleans()):
        return draw(valid_configure())
    req = CP.ConfigureRoundRequest(
        round_id=draw(round_ids()),
        experiment_id=draw(S.texts(("exp-manual", "exp-good"))),
        participants=draw(S.string_lists((PROPLET, PROPLET_TWO))),
        k_of_n=draw(S.int32s()),
        timeout_s=draw(S.doubles()),
        model_ref=draw(S.weighted((2, st.just("")), (3, S.model_refs(KNOWN_URIS)))),
        task_wasm_image=draw(S.texts((IMAGE,))),
        start=draw(st.booleans()),
    )
    if draw(st.booleans()):
        req.hyperparams.CopyFrom(draw(hyperparams()))
    return req


async def test_list_rounds(env: FuzzEnv) -> None:
    requests = st.builds(
        lambda e: CP.ListRoundsRequest(experiment_id=e), S.texts(("exp-manual", "exp-good"))
    )
    await fuzz_messages(env, LIST, requests)


def status_of_requested(body: Any, outcome: Outcome) -> None:
    if outcome.ok and not isinstance(body, bytes):
        status = outcome.response
        if isinstance(status, CP.RoundEvent):
            assert status.type == CP.ROUND_EVENT_TYPE_SNAPSHOT
            status = status.status
        assert status.round_id == body.round_id


async def test_get_round_status(env: FuzzEnv) -> None:
    requests = st.builds(lambda r: CP.GetRoundStatusRequest(round_id=r), round_ids())
    await fuzz_messages(env, STATUS, requests, status_of_requested)


async def test_watch_round(env: FuzzEnv) -> None:
    requests = st.builds(lambda r: CP.WatchRoundRequest(round_id=r), round_ids())
    await fuzz_messages(env, WATCH, requests, status_of_requested)


async def test_start_round(env: FuzzEnv) -> None:
    requests = st.builds(lambda r: CP.StartRoundRequest(round_id=r), round_ids())

    def finished_stays_finished(body: Any, outcome: Outcome) -> None:
        if not isinstance(body, bytes) and body.round_id == FAILED_ROUND:
            assert outcome.code == grpc.StatusCode.FAILED_PRECONDITION

    await fuzz_messages(env, START, requests, finished_stays_finished)


SEMANTIC_BREAKS = [
    "wrong_base",
    "nan_value",
    "inf_value",
    "zero_samples",
    "negative_samples",
    "nan_metric",
    "inf_metric",
    "wrong_shape",
    "wrong_dtype",
    "missing_tensor",
    "extra_tensor",
    "renamed_tensor",
    "no_module",
    "bad_module",
    "huge_value",
]


@st.composite
def update_streams(draw: st.DrawFn) -> list[tensor_pb2.UpdateChunk]:
    round_id, proplet_id = draw(
        S.weighted(
            (3, st.tuples(st.just(OPEN_ROUND), st.sampled_from(OPEN_PARTICIPANTS))),
            (3, st.tuples(st.sampled_from(ROUND_IDS), st.sampled_from([PROPLET, PROPLET_TWO]))),
            (2, st.tuples(round_ids(), S.texts((PROPLET, PROPLET_TWO, "p-stranger")))),
        )
    )
    must_fail = (round_id, proplet_id) in NOT_YET_REPORTED
    clean = draw(st.booleans())
    base = ROUND_BASE.get(round_id, V1_URI)
    specs = [
        tensor_pb2.TensorSpec(name="w", dtype=tensor_pb2.DTYPE_FLOAT64, shape=[3]),
        tensor_pb2.TensorSpec(name="b", dtype=tensor_pb2.DTYPE_FLOAT64, shape=[]),
    ]
    header = tensor_pb2.UpdateHeader(
        round_id=round_id,
        proplet_id=proplet_id,
        base_model_uri=base,
        num_samples=draw(st.integers(1, 10_000)),
        metrics=draw(st.dictionaries(S.texts(("loss",)), st.floats(-1e6, 1e6), max_size=3)),
        module_digest=MODULE,
    )
    if not clean:
        header.module_digest = draw(S.weighted((4, st.just(MODULE)), (1, S.texts((MODULE,)))))
        header.base_model_uri = draw(S.weighted((4, st.just(base)), (2, S.model_refs(KNOWN_URIS))))
        header.num_samples = draw(S.weighted((2, st.integers(1, 100)), (1, S.int64s())))
        header.metrics.clear()
        header.metrics.update(draw(S.double_maps()))
        specs = draw(S.weighted((2, st.just(specs)), (1, S.spec_lists())))
    values: list[float] = draw(st.lists(st.floats(-1e3, 1e3), min_size=4, max_size=4))
    mutation = "rechunk" if clean else draw(st.sampled_from(S.STREAM_MUTATIONS))
    if must_fail:
        brk = draw(st.sampled_from(S.BREAKING_MUTATIONS + SEMANTIC_BREAKS))
        if brk in S.BREAKING_MUTATIONS:
            mutation = brk
        else:
            mutation = "rechunk"
            header.base_model_uri = base
            if header.num_samples <= 0:
                header.num_samples = 1
            for key in list(header.metrics):
                if header.metrics[key] != header.metrics[key] or abs(header.metrics[key]) == S.INF:
                    del header.metrics[key]
            specs, values = _break(draw, brk, header, values, base)
    header.tensors.extend(specs)
    if S.matched_nbytes(specs) is not None and sum(_count(s) for s in specs) == len(values):
        data = _encode(specs, values)
    else:
        data = draw(S.tensor_bytes(specs))
    header.total_bytes = S.matched_nbytes(specs) or 0
    if not clean and not must_fail and not draw(st.integers(0, 4)):
        header.total_bytes = draw(S.int64s())
    return S.chunk_messages(draw(S.mutated_stream(header, data, mutation)), tensor_pb2.UpdateChunk)


def _encode(specs: list[tensor_pb2.TensorSpec], values: list[float]) -> bytes:
    out, i = b"", 0
    for spec in specs:
        n = _count(spec)
        out += S.encode_values(values[i : i + n], spec.dtype)
        i += n
    return out


def _count(spec: tensor_pb2.TensorSpec) -> int:
    n = 1
    for d in spec.shape:
        n *= d
    return n


def _break(
    draw: st.DrawFn, brk: str, header: tensor_pb2.UpdateHeader, values: list[float], base: str
) -> tuple[list[tensor_pb2.TensorSpec], list[float]]:
    """One thing wrong with an otherwise valid update (every value is consumed in order)."""
    f64 = tensor_pb2.DTYPE_FLOAT64
    w = tensor_pb2.TensorSpec(name="w", dtype=f64, shape=[3])
    b = tensor_pb2.TensorSpec(name="b", dtype=f64, shape=[])
    if brk == "wrong_base":
        header.base_model_uri = draw(
            st.sampled_from([u for u in (*KNOWN_URIS, "", "x") if u != base])
        )
    elif brk in ("nan_value", "inf_value"):
        values[draw(st.integers(0, 3))] = S.NAN if brk == "nan_value" else -S.INF
    elif brk == "huge_value":
        values[draw(st.integers(0, 3))] = draw(st.sampled_from([1e308, -1.7e308, 1e31]))
    elif brk == "no_module":
        header.module_digest = ""
    elif brk == "bad_module":
        header.module_digest = draw(st.sampled_from(["sha256:" + "A" * 64, "md5:00", MODULE[:-1]]))
    elif brk == "zero_samples":
        header.num_samples = 0
    elif brk == "negative_samples":
        header.num_samples = draw(st.sampled_from([-1, -(2**63)]))
    elif brk in ("nan_metric", "inf_metric"):
        header.metrics["loss"] = S.NAN if brk == "nan_metric" else S.INF
    elif brk == "wrong_shape":
        return [tensor_pb2.TensorSpec(name="w", dtype=f64, shape=[4]), b], [*values, 0.0]
    elif brk == "wrong_dtype":
        return [
            tensor_pb2.TensorSpec(name="w", dtype=tensor_pb2.DTYPE_FLOAT32, shape=[3]),
            b,
        ], values
    elif brk == "missing_tensor":
        return [w], values[:3]
    elif brk == "extra_tensor":
        return [w, b, tensor_pb2.TensorSpec(name="z", dtype=f64, shape=[1])], [*values, 1.0]
    elif brk == "renamed_tensor":
        return [tensor_pb2.TensorSpec(name="W", dtype=f64, shape=[3]), b], values
    return [w, b], values


def submit_checks(body: Any, outcome: Outcome) -> None:
    if isinstance(body, list) and body and isinstance(body[0], tensor_pb2.UpdateChunk):
        first = body[0]
        if first.WhichOneof("part") == "header":
            key = (first.header.round_id, first.header.proplet_id)
            if key in NOT_YET_REPORTED:
                assert not outcome.ok, f"an invalid update was accepted for {key}"
    if outcome.ok:
        assert outcome.response.accepted


async def test_submit_update(env: FuzzEnv) -> None:
    streams = update_streams()
    await fuzz_messages(env, SUBMIT, streams, submit_checks)


async def test_configure_round(env: FuzzEnv) -> None:
    requests = configure_requests()
    await fuzz_messages(env, CONFIGURE, requests)


# (round, participant) pairs whose failure would change known-good state (not yet reported,
# or listed on a failed round): the fuzzer never reports them.
CHANGES_KNOWN = {(ROUND, PROPLET_TWO), (EXPERIMENT_ROUND, PROPLET), (FAILED_ROUND, PROPLET)}


@st.composite
def failure_reports(draw: st.DrawFn) -> CP.ReportParticipantFailureRequest:
    round_id, proplet_id = draw(
        S.weighted(
            (4, st.tuples(st.just(FAILING_ROUND), st.sampled_from(FAILING_PARTICIPANTS))),
            (1, st.tuples(st.just(ROUND), st.just(PROPLET))),  # reported: changes nothing
            (2, st.tuples(round_ids(), S.texts(("p-stranger", "", "f-1")))),
        )
    )
    if (round_id, proplet_id) in CHANGES_KNOWN:
        proplet_id = "p-stranger"
    return CP.ReportParticipantFailureRequest(
        round_id=round_id, proplet_id=proplet_id, reason=draw(S.texts(("trap", "")))
    )


async def test_report_participant_failure(env: FuzzEnv) -> None:
    def recorded(body: Any, outcome: Outcome) -> None:
        if not outcome.ok or isinstance(body, bytes):
            return
        status = outcome.response
        assert status.round_id == body.round_id
        if body.round_id == FAILING_ROUND:
            assert status.state == CP.ROUND_STATE_OPEN  # min_k_of_n 1: far from failing
            [failure] = [f for f in status.failed if f.proplet_id == body.proplet_id]
            assert len(failure.reason) <= 1024 and failure.reason

    await fuzz_messages(env, REPORT, failure_reports(), recorded)
