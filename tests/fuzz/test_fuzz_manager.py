"""Manager under fuzzed requests: every RPC, at least 1,000 requests each.

Besides the shared known-good state this module adds pools of PENDING and SCHEDULED tasks
that StartTask / StopTask may legitimately move, so those RPCs succeed too. Reading RPCs run
before the ones that add tasks and experiments, so list answers stay small.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from hypothesis import strategies as st

from propeller.v1 import coordinator_pb2, manager_pb2
from tests.fuzz import strategies as S
from tests.fuzz.harness import FuzzEnv, Outcome, Rpc, all_methods, fuzz_empty_request, fuzz_messages
from tests.fuzz.known import (
    EXPERIMENT,
    IMAGE,
    KNOWN_PROPLETS,
    KNOWN_ROUNDS,
    KNOWN_URIS,
    PROPLET,
    PROPLET_TWO,
    RPC_TIMEOUT,
    V0_URI,
    V1_URI,
)

MP = manager_pb2
CP = coordinator_pb2
START_EXPERIMENT = Rpc.of("Manager.StartExperiment")
GET_EXPERIMENT = Rpc.of("Manager.GetExperiment")
LIST_EXPERIMENTS = Rpc.of("Manager.ListExperiments")
ROUND_STATUS = Rpc.of("Manager.GetRoundStatus")
LIST_PROPLETS = Rpc.of("Manager.ListProplets")
GET_PROPLET = Rpc.of("Manager.GetProplet")
CREATE_TASK = Rpc.of("Manager.CreateTask")
START_TASK = Rpc.of("Manager.StartTask")
STOP_TASK = Rpc.of("Manager.StopTask")
GET_TASK = Rpc.of("Manager.GetTask")
LIST_TASKS = Rpc.of("Manager.ListTasks")
STOP_EXPERIMENT = Rpc.of("Manager.StopExperiment")
WATCH_EXPERIMENT = Rpc.of("Manager.WatchExperiment", first_only=True)
EXPERIMENT_ROUNDS = Rpc.of("Manager.ListExperimentRounds")
FUZZED = (START_EXPERIMENT, GET_EXPERIMENT, LIST_EXPERIMENTS, ROUND_STATUS, LIST_PROPLETS,
          GET_PROPLET, CREATE_TASK, START_TASK, STOP_TASK, GET_TASK, LIST_TASKS,
          STOP_EXPERIMENT, WATCH_EXPERIMENT, EXPERIMENT_ROUNDS)  # fmt: skip
# Experiments of many rounds the StopExperiment fuzz may (legitimately) stop.
STOPPABLE = [f"fz-stop-{i}" for i in range(5)]
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")
POOL = 150
FRESH = itertools.count()


@dataclass
class Pools:
    pending: list[str]
    scheduled: list[str]


@pytest.fixture(scope="module")
async def pools(env: FuzzEnv) -> Pools:
    pending, scheduled = [], []
    for i in range(2 * POOL):
        task = await env.manager.CreateTask(
            MP.CreateTaskRequest(name=f"pool-{i}", image_url=IMAGE, proplet_id=PROPLET),
            timeout=RPC_TIMEOUT,
        )
        if i % 2:
            await env.manager.StartTask(MP.TaskRef(task_id=task.id), timeout=RPC_TIMEOUT)
            scheduled.append(task.id)
        else:
            pending.append(task.id)
    return Pools(pending, scheduled)


def test_every_manager_rpc_is_fuzzed() -> None:
    assert {r.name for r in FUZZED} == all_methods("Manager")


async def test_list_proplets(env: FuzzEnv) -> None:
    await fuzz_empty_request(env, LIST_PROPLETS)


async def test_list_experiments(env: FuzzEnv) -> None:
    await fuzz_empty_request(env, LIST_EXPERIMENTS)


def ids_of_requested(attr: str, response_attr: str) -> Any:
    def check(body: Any, outcome: Outcome) -> None:
        if outcome.ok and not isinstance(body, bytes):
            assert getattr(outcome.response, response_attr) == getattr(body, attr)

    return check


async def test_get_proplet(env: FuzzEnv) -> None:
    requests = st.builds(lambda p: MP.GetPropletRequest(proplet_id=p), S.texts(KNOWN_PROPLETS))
    await fuzz_messages(env, GET_PROPLET, requests, ids_of_requested("proplet_id", "id"))


async def test_get_experiment(env: FuzzEnv) -> None:
    requests = st.builds(
        lambda x: MP.GetExperimentRequest(experiment_id=x), S.texts((EXPERIMENT, "exp-r-exp"))
    )
    await fuzz_messages(
        env,
        GET_EXPERIMENT,
        requests,
        ids_of_requested("experiment_id", "experiment_id"),
    )


async def test_watch_experiment(env: FuzzEnv) -> None:
    requests = st.builds(
        lambda x: MP.WatchExperimentRequest(experiment_id=x), S.texts((EXPERIMENT,))
    )

    def snapshot_first(body: Any, outcome: Outcome) -> None:
        if outcome.ok and not isinstance(body, bytes):
            assert outcome.response.type == MP.EXPERIMENT_EVENT_TYPE_SNAPSHOT
            assert outcome.response.experiment.experiment_id == body.experiment_id

    await fuzz_messages(env, WATCH_EXPERIMENT, requests, snapshot_first)


async def test_list_experiment_rounds(env: FuzzEnv) -> None:
    requests = st.builds(
        lambda x, n, t: MP.ListExperimentRoundsRequest(experiment_id=x, page_size=n, page_token=t),
        S.texts((EXPERIMENT,)),
        S.int32s(),
        S.texts(),
    )

    def in_order(body: Any, outcome: Outcome) -> None:
        if outcome.ok and not isinstance(body, bytes):
            indices = [r.index for r in outcome.response.rounds]
            assert indices == sorted(indices) and all(i >= 1 for i in indices)

    await fuzz_messages(env, EXPERIMENT_ROUNDS, requests, in_order)


async def test_stop_experiment(env: FuzzEnv) -> None:
    for eid in STOPPABLE:
        await env.manager.StartExperiment(
            MP.StartExperimentRequest(
                experiment_id=eid,
                model_ref=V0_URI,
                participants=[PROPLET],
                timeout_s=24 * 3600,
                task_wasm_image=IMAGE,
                rounds=10,
            ),
            timeout=RPC_TIMEOUT,
        )
    requests = st.builds(lambda x: MP.StopExperimentRequest(experiment_id=x), S.texts(STOPPABLE))

    def ended(body: Any, outcome: Outcome) -> None:
        if outcome.ok and not isinstance(body, bytes):
            assert outcome.response.experiment_id == body.experiment_id
            assert outcome.response.state == MP.EXPERIMENT_STATE_STOPPED

    await fuzz_messages(env, STOP_EXPERIMENT, requests, ended)


async def test_get_round_status(env: FuzzEnv) -> None:
    requests = st.builds(lambda r: CP.GetRoundStatusRequest(round_id=r), S.texts(KNOWN_ROUNDS))
    await fuzz_messages(env, ROUND_STATUS, requests, ids_of_requested("round_id", "round_id"))


def task_ids(env: FuzzEnv, *extra: str) -> st.SearchStrategy[str]:
    return S.weighted((1, st.sampled_from([*extra])), (2, S.texts())) if extra else S.texts()


async def test_get_task(env: FuzzEnv) -> None:
    requests = st.builds(
        lambda t: MP.TaskRef(task_id=t), task_ids(env, env.task_id, env.scheduled_task_id)
    )
    await fuzz_messages(env, GET_TASK, requests, ids_of_requested("task_id", "id"))


async def test_list_tasks(env: FuzzEnv) -> None:
    requests = st.builds(
        lambda n, p, s: MP.ListTasksRequest(name_prefix=n, proplet_id=p, state=s),
        S.texts(("fz-", "fl-round-", "pool-")),
        S.texts(KNOWN_PROPLETS),
        S.enums(list(range(8))),
    )

    def filtered(body: Any, outcome: Outcome) -> None:
        if outcome.ok and not isinstance(body, bytes):
            for task in outcome.response.tasks:
                assert task.name.startswith(body.name_prefix)
                assert body.state in (0, task.state)

    await fuzz_messages(env, LIST_TASKS, requests, filtered)


async def test_stop_task(env: FuzzEnv, pools: Pools) -> None:
    # The known PENDING task cannot be stopped; pool tasks may be (legitimately) stopped.
    known = env.task_id
    requests = st.builds(
        lambda t: MP.TaskRef(task_id=t),
        task_ids(env, known, *pools.scheduled, *pools.pending[:20]),
    )

    def known_refused(body: Any, outcome: Outcome) -> None:
        if not isinstance(body, bytes) and body.task_id == known:
            assert outcome.code == grpc.StatusCode.FAILED_PRECONDITION

    await fuzz_messages(env, STOP_TASK, requests, known_refused)


async def test_start_task(env: FuzzEnv, pools: Pools) -> None:
    # The known SCHEDULED task cannot be started again; pool tasks may be (legitimately).
    known = env.scheduled_task_id
    requests = st.builds(
        lambda t: MP.TaskRef(task_id=t), task_ids(env, known, *pools.pending, *pools.scheduled)
    )

    def known_refused(body: Any, outcome: Outcome) -> None:
        if not isinstance(body, bytes) and body.task_id == known:
            assert outcome.code == grpc.StatusCode.FAILED_PRECONDITION
        if outcome.ok:
            assert outcome.response.state in (MP.TASK_STATE_SCHEDULED, MP.TASK_STATE_RUNNING)

    await fuzz_messages(env, START_TASK, requests, known_refused)


# Valid environment variable names (no '=', no NUL: the rest of the text is the hostile part).
ENV_KEYS = st.text(st.characters(exclude_characters="=\x00"), min_size=1, max_size=6)
TASK_FIELDS = ["none", "name", "image_url", "file", "env", "cli_args", "proplet_id", "both"]


@st.composite
def create_task_requests(draw: st.DrawFn) -> MP.CreateTaskRequest:
    """A valid task (inline module or image) with at most one field hostile."""
    req = MP.CreateTaskRequest(
        name=draw(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,11}", fullmatch=True)),
        env=draw(st.dictionaries(ENV_KEYS, st.text(max_size=6), max_size=3)),
        cli_args=draw(st.lists(st.text(max_size=6), max_size=3)),
        proplet_id=draw(S.weighted((1, st.just("")), (1, st.sampled_from(KNOWN_PROPLETS)))),
    )
    if draw(st.booleans()):
        req.image_url = draw(st.sampled_from([IMAGE, "file:///tmp/x.wasm"]))
    else:
        req.file = draw(st.binary(min_size=1, max_size=16))
    field = draw(st.sampled_from(TASK_FIELDS))
    if field == "name":
        req.name = draw(S.texts())
    elif field == "image_url":
        req.image_url = draw(S.texts())
        req.file = draw(st.sampled_from([b"", b"\x00asm"]))
    elif field == "file":
        req.file = draw(S.binaries())
        req.image_url = draw(st.sampled_from(["", IMAGE]))
    elif field == "env":
        req.env.clear()
        req.env.update(draw(S.string_maps(("", "ROUND_ID", "MODEL_URI"))))
    elif field == "cli_args":
        req.cli_args[:] = draw(S.string_lists())
    elif field == "proplet_id":
        req.proplet_id = draw(S.texts(KNOWN_PROPLETS))
    elif field == "both":
        req.image_url, req.file = IMAGE, b"\x00asm"
    return req


async def test_create_task(env: FuzzEnv) -> None:
    requests = create_task_requests()

    def created_as_sent(body: Any, outcome: Outcome) -> None:
        if outcome.ok and not isinstance(body, bytes):
            task = outcome.response
            assert task.state == MP.TASK_STATE_PENDING and task.id
            assert (task.name, task.image_url, task.file) == (body.name, body.image_url, body.file)
            assert dict(task.env) == dict(body.env) and task.proplet_id == body.proplet_id

    await fuzz_messages(env, CREATE_TASK, requests, created_as_sent)


EXPERIMENT_FIELDS = [
    "none",
    "experiment_id",
    "round_id",
    "model_ref",
    "participants",
    "hyperparams",
    "k_of_n",
    "timeout_s",
    "task_wasm_image",
    "min_k_of_n",
    "module_digest",
    "rounds",
    "strategy",
    "all_alive",
    "sampling",
    "k_fraction",
    "evaluation",
    "stopping",
]


@st.composite
def start_experiment_requests(draw: st.DrawFn) -> MP.StartExperimentRequest:
    """A valid experiment (values at their extremes) with at most one field hostile."""
    fresh = st.builds(lambda: f"fx-{next(FRESH)}")  # a new id on every draw
    participants = draw(
        S.weighted(
            (3, st.lists(st.sampled_from([PROPLET, PROPLET_TWO, "p-gone", "p-x"]), min_size=1,
                         max_size=4, unique=True)),
            (1, st.just([f"fz-{i}" for i in range(2000)] + [PROPLET])),
        )
    )  # fmt: skip
    req = MP.StartExperimentRequest(
        experiment_id=draw(S.weighted((2, st.just("")), (3, fresh), (1, st.just(EXPERIMENT)))),
        round_id=draw(S.weighted((4, fresh), (1, st.sampled_from(KNOWN_ROUNDS)))),
        model_ref=draw(st.sampled_from([V0_URI, V1_URI, "fl/models/global_model_v7"])),
        participants=participants,
        hyperparams=CP.Hyperparams(
            epochs=draw(st.sampled_from([0, 1, 2**31 - 1])),
            lr=draw(st.sampled_from([0.0, 5e-324, 0.01, 1e308])),
            batch_size=draw(st.sampled_from([0, 1, 2**31 - 1])),
        ),
        k_of_n=draw(st.integers(0, len(participants))),
        timeout_s=draw(st.sampled_from([0.0, 1e-300, 0.5, 3600.0, 1e308])),
        task_wasm_image=draw(st.sampled_from([IMAGE, "x", "😀"])),
    )  # fmt: skip
    # Usually a quorum the live participants can meet, so the success path is reached.
    req.min_k_of_n = draw(S.weighted((3, st.just(1)), (1, st.integers(0, req.k_of_n or 1))))
    field = draw(st.sampled_from(EXPERIMENT_FIELDS))
    if field == "experiment_id":
        req.experiment_id = draw(S.texts((EXPERIMENT,)))
    elif field == "round_id":
        req.round_id = draw(S.texts(KNOWN_ROUNDS))
    elif field == "model_ref":
        req.model_ref = draw(S.model_refs(KNOWN_URIS))
    elif field == "participants":
        req.participants[:] = draw(S.string_lists((PROPLET, PROPLET_TWO)))
    elif field == "hyperparams":
        req.hyperparams.CopyFrom(
            CP.Hyperparams(
                epochs=draw(S.int32s()), lr=draw(S.doubles()), batch_size=draw(S.int32s())
            )
        )
    elif field == "k_of_n":
        req.k_of_n = draw(S.int32s())
    elif field == "timeout_s":
        req.timeout_s = draw(S.doubles())
    elif field == "task_wasm_image":
        req.task_wasm_image = draw(S.texts())
    elif field == "min_k_of_n":
        req.min_k_of_n = draw(S.int32s())
    elif field == "module_digest":
        req.module_digest = draw(S.texts(("sha256:" + "0" * 64,)))
    elif field == "rounds":
        req.rounds = draw(S.int32s())
    elif field == "strategy":
        req.strategy_name = draw(S.texts(("fedavg",)))
        req.strategy_params_json = draw(S.texts(("{}", '{"mu": 0.1}', "[]", "{")))
    elif field == "all_alive":
        req.all_alive = True
        req.participants[:] = draw(st.sampled_from([[], [PROPLET]]))
    elif field == "sampling":
        req.sampling.CopyFrom(
            MP.Sampling(
                fraction=draw(S.doubles()),
                count=draw(S.int32s()),
                min_available=draw(S.int32s()),
                seed=draw(st.integers(0, 2**64 - 1)),
            )
        )
    elif field == "k_fraction":
        req.k_fraction = draw(S.doubles())
    elif field == "evaluation":
        req.evaluation.CopyFrom(
            MP.EvaluationPlan(
                every_rounds=draw(S.int32s()),
                fraction=draw(S.doubles()),
                timeout_s=draw(S.doubles()),
            )
        )
    elif field == "stopping":
        enums: dict[str, Any] = {  # any int, as the wire allows
            "source": draw(S.enums([0, 1, 2])),
            "goal": draw(S.enums([0, 1, 2])),
        }
        stopping = MP.StoppingRule(
            metric=draw(S.texts(("loss", "accuracy"))),
            patience_rounds=draw(S.int32s()),
            min_delta=draw(S.doubles()),
            **enums,
        )
        if draw(st.booleans()):
            stopping.target = draw(S.doubles())
        req.stopping.CopyFrom(stopping)
    return req


async def test_start_experiment(env: FuzzEnv) -> None:
    requests = start_experiment_requests()

    def scheduled_only_live(body: Any, outcome: Outcome) -> None:
        if outcome.ok and not isinstance(body, bytes):
            resp = outcome.response
            assert {s.proplet_id for s in resp.scheduled} <= {PROPLET, PROPLET_TWO}
            sampled = body.all_alive or body.HasField("sampling") or body.k_fraction
            if not sampled:
                assert len(resp.scheduled) + len(resp.skipped) == len(body.participants)
            elif body.participants:
                assert {s.proplet_id for s in resp.scheduled} <= set(body.participants)

    await fuzz_messages(env, START_EXPERIMENT, requests, scheduled_only_live)
