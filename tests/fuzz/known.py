"""The known-good state the fuzzers must leave exactly as it is: what it holds, how it is put
in through the public interfaces (`seed`), and how it is read back for comparison
(`snapshot`)."""

from __future__ import annotations

import hashlib
import uuid
from typing import TYPE_CHECKING, Any

import numpy as np
from google.protobuf.message import Message

from propeller.v1 import coordinator_pb2, datastore_pb2, manager_pb2, model_registry_pb2, tensor_pb2
from server.messages import PropletAnnounce
from server.models import model_uri
from server.mqtt import MqttSession
from server.streams import UpdateMeta, model_stream, update_stream
from server.tensors import Tensors, sha256_of, tensor_to_proto
from tests.support.clients import header_and_data
from tests.support.waits import eventually

if TYPE_CHECKING:
    from tests.fuzz.harness import FuzzEnv

CP, DS, MP, MR = coordinator_pb2, datastore_pb2, manager_pb2, model_registry_pb2
# The bound of every call the harness makes (a fuzzed one included).
RPC_TIMEOUT = 30.0

PROPLET = "p-good"  # registered (MQTT announcement), has a seeded dataset, reported in ROUND
PROPLET_TWO = "p-two"  # registered, participant of ROUND that has not reported
DATASET_PUT = "p-put"  # dataset stored through PutDataset
ROUND = "r-good"  # configured and open, one accepted update (PROPLET's)
EXPERIMENT = "exp-good"
EXPERIMENT_ROUND = "r-exp"
V0_URI = model_uri(0)
V1_URI = model_uri(1)
# The fuzz stack's manager reaches every image's registry at the test registry, where the
# trainer is pushed as fl-client-wasm:latest: StartExperiment pins it.
IMAGE = "registry.example:5000/fl-client-wasm:latest"
# The module digest updates claim (no round here pins one).
MODULE = "sha256:" + "5" * 64
V1: Tensors = {
    "w": np.array([0.5, -1.25, 2.0], dtype=np.float64),
    "b": np.array(0.75, dtype=np.float64),
}
UPDATE: Tensors = {
    "w": np.array([0.25, 0.5, -0.5], dtype=np.float64),
    "b": np.array(-0.125, dtype=np.float64),
}
PUT_FEATURES = np.array([[1.0, 2.0], [3.0, -4.5], [0.0, 0.25]], dtype=np.float64)
PUT_LABELS = np.array([1.0, 0.0, 1.0], dtype=np.float64)

KNOWN_PROPLETS = (PROPLET, PROPLET_TWO, DATASET_PUT)
KNOWN_DATASETS = (PROPLET, DATASET_PUT)
KNOWN_ROUNDS = (ROUND, EXPERIMENT_ROUND)
KNOWN_URIS = (V0_URI, V1_URI, model_uri(2), model_uri(999))
# ROUND's configuration, as seeded (and started).
SEEDED_ROUND = coordinator_pb2.ConfigureRoundRequest(
    round_id=ROUND,
    experiment_id="exp-manual",
    participants=[PROPLET, PROPLET_TWO],
    k_of_n=2,
    timeout_s=24 * 3600,
    model_ref=V1_URI,
    task_wasm_image=IMAGE,
)


def sha256_of_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _bytes(message: Message) -> bytes:
    return message.SerializeToString(deterministic=True)


async def snapshot(env: FuzzEnv) -> dict[str, bytes]:
    """Every piece of known-good state, serialised (deterministically) for comparison."""
    out: dict[str, bytes] = {}
    for version in (0, 1):
        header, data = await model_bytes(env, version)
        assert sha256_of_bytes(data) == header.sha256, f"v{version}: bytes do not hash"
        out[f"model v{version} header"] = _bytes(header)
        out[f"model v{version} bytes"] = data
    coord, mgr, reg, data = env.coordinator, env.manager, env.registry, env.datastore
    reads: list[tuple[str, Any, Message]] = []  # (key, RPC, request)
    for v in (0, 1):
        reads.append((f"model v{v} info", reg.GetModelInfo, MR.GetModelRequest(version=v)))
    for p in KNOWN_DATASETS:
        reads.append((f"dataset {p}", data.GetDataset, DS.GetDatasetRequest(proplet_id=p)))
    for r in (*KNOWN_ROUNDS, *env.extra_rounds):
        request = CP.GetRoundStatusRequest(round_id=r)
        reads.append((f"round {r}", coord.GetRoundStatus, request))
        reads.append((f"round {r} via manager", mgr.GetRoundStatus, request))
    for t in (env.task_id, env.scheduled_task_id):
        reads.append((f"task {t}", mgr.GetTask, MP.TaskRef(task_id=t)))
    for p in (PROPLET, PROPLET_TWO):
        reads.append((f"proplet {p}", mgr.GetProplet, MP.GetPropletRequest(proplet_id=p)))
    experiment = MP.GetExperimentRequest(experiment_id=EXPERIMENT)
    reads.append(("experiment", mgr.GetExperiment, experiment))
    for key, method, message in reads:
        out[key] = _bytes(await method(message, timeout=RPC_TIMEOUT))
    models = await reg.ListModels(MR.ListModelsRequest(), timeout=RPC_TIMEOUT)
    for m in models.models:
        if m.version in (0, 1):
            out[f"listed v{m.version}"] = _bytes(m)
    datasets = await data.ListDatasets(DS.ListDatasetsRequest(), timeout=RPC_TIMEOUT)
    for info in datasets.datasets:
        if info.proplet_id in KNOWN_DATASETS:
            out[f"listed dataset {info.proplet_id}"] = _bytes(info)
    return out


async def model_bytes(env: FuzzEnv, version: int) -> tuple[tensor_pb2.ModelHeader, bytes]:
    call = env.registry.GetModel(MR.GetModelRequest(version=version), timeout=RPC_TIMEOUT)
    header, data = await header_and_data(call)
    assert isinstance(header, tensor_pb2.ModelHeader)
    return header, data


async def seed(env: FuzzEnv) -> None:
    """Put the known-good state in through the public interfaces."""
    v0 = await env.init_model(3)
    assert v0.model_uri == V0_URI
    v1 = await env.registry.PutModel(model_stream(V1, 16), timeout=RPC_TIMEOUT)
    assert v1.model_uri == V1_URI and v1.sha256 == sha256_of(V1)

    await env.datastore.PutDataset(
        DS.PutDatasetRequest(
            dataset=DS.Dataset(
                proplet_id=DATASET_PUT,
                features=tensor_to_proto(PUT_FEATURES),
                labels=tensor_to_proto(PUT_LABELS),
            )
        ),
        timeout=RPC_TIMEOUT,
    )

    async with MqttSession(
        env.mqtt, f"fuzz-announcer-{uuid.uuid4().hex[:8]}", clean_session=True
    ) as s:
        for pid in (PROPLET, PROPLET_TWO):
            announce = PropletAnnounce(proplet_id=pid, name=f"{pid}-name", metadata={"os": "fz"})
            await s.publish(env.topics.proplet_create_for(pid), announce.to_json())
    await eventually(
        lambda: env.proplets(),
        lambda ps: {PROPLET, PROPLET_TWO} <= {p.id for p in ps},
        timeout=30,
        what="the known proplets registered",
    )

    configure = CP.ConfigureRoundRequest()
    configure.CopyFrom(SEEDED_ROUND)
    configure.start = True
    await env.coordinator.ConfigureRound(configure, timeout=RPC_TIMEOUT)
    meta = UpdateMeta(ROUND, PROPLET, V1_URI, 10, {"loss": 0.5}, module_digest=MODULE)
    accepted = await env.coordinator.SubmitUpdate(update_stream(meta, UPDATE), timeout=RPC_TIMEOUT)
    assert accepted.accepted and not accepted.duplicate and accepted.num_updates == 1

    started = await env.manager.StartExperiment(
        MP.StartExperimentRequest(
            experiment_id=EXPERIMENT,
            round_id=EXPERIMENT_ROUND,
            model_ref=V0_URI,
            participants=[PROPLET, "p-unknown"],
            k_of_n=1,
            timeout_s=24 * 3600,
            task_wasm_image=IMAGE,
        ),
        timeout=RPC_TIMEOUT,
    )
    assert [s.proplet_id for s in started.scheduled] == [PROPLET]

    task = await env.manager.CreateTask(
        MP.CreateTaskRequest(
            name="fz-task", image_url=IMAGE, env={"A": "1"}, cli_args=["x"], proplet_id=PROPLET
        ),
        timeout=RPC_TIMEOUT,
    )
    env.task_id = task.id
    other = await env.manager.CreateTask(
        MP.CreateTaskRequest(name="fz-scheduled", file=b"\x00asm", proplet_id=PROPLET),
        timeout=RPC_TIMEOUT,
    )
    scheduled = await env.manager.StartTask(MP.TaskRef(task_id=other.id), timeout=RPC_TIMEOUT)
    assert scheduled.state == MP.TASK_STATE_SCHEDULED
    env.scheduled_task_id = other.id
