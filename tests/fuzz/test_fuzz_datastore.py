"""DataStore under fuzzed requests: every RPC, at least 1,000 requests each."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import strategies as st

from propeller.v1 import datastore_pb2, tensor_pb2
from server.tensors import tensor_from_proto
from tests.fuzz import strategies as S
from tests.fuzz.harness import FuzzEnv, Outcome, Rpc, all_methods, fuzz_empty_request, fuzz_messages
from tests.fuzz.known import KNOWN_PROPLETS

GET = Rpc.of("DataStore.GetDataset")
PUT = Rpc.of("DataStore.PutDataset")
LIST = Rpc.of("DataStore.ListDatasets")
INFO = Rpc.of("DataStore.GetDatasetInfo")
INFOS = Rpc.of("DataStore.GetDatasetInfos")
FUZZED = (GET, PUT, LIST, INFO, INFOS)
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")


def test_every_datastore_rpc_is_fuzzed() -> None:
    assert {r.name for r in FUZZED} == all_methods("DataStore")


async def test_list_datasets(env: FuzzEnv) -> None:
    await fuzz_empty_request(env, LIST)


def found_is_valid(body: Any, outcome: Outcome) -> None:
    """A dataset that is served decodes and has the documented shape."""
    if not outcome.ok:
        return
    ds = outcome.response
    x = tensor_from_proto(ds.features, "features")
    y = tensor_from_proto(ds.labels, "labels")
    assert x.ndim == 2 and y.shape == (x.shape[0],) and np.isin(y, (0.0, 1.0)).all()


SPLITS = ("", "all", "train", "test")


def dataset_requests() -> st.SearchStrategy[datastore_pb2.GetDatasetRequest]:
    return st.builds(
        lambda p, s: datastore_pb2.GetDatasetRequest(proplet_id=p, split=s),
        S.texts(KNOWN_PROPLETS),
        S.weighted((3, st.sampled_from(SPLITS)), (1, S.texts(SPLITS))),
    )


async def test_get_dataset(env: FuzzEnv) -> None:
    await fuzz_messages(env, GET, dataset_requests(), found_is_valid)


async def test_get_dataset_info(env: FuzzEnv) -> None:
    await fuzz_messages(env, INFO, dataset_requests())


def infos_are_asked_for(body: Any, outcome: Outcome) -> None:
    """An answer names only proplets asked for, each once."""
    if not outcome.ok:
        return
    named = [d.proplet_id for d in outcome.response.datasets]
    assert len(named) == len(set(named))
    if isinstance(body, datastore_pb2.GetDatasetInfosRequest):
        assert set(named) <= set(body.proplet_ids)


async def test_get_dataset_infos(env: FuzzEnv) -> None:
    requests = st.builds(
        lambda ids: datastore_pb2.GetDatasetInfosRequest(proplet_ids=ids),
        S.string_lists(KNOWN_PROPLETS),
    )
    await fuzz_messages(env, INFOS, requests, infos_are_asked_for)


@st.composite
def tensors(draw: st.DrawFn, shape: list[int], labels: bool) -> tensor_pb2.Tensor:
    """A Tensor message: mostly consistent (dtype, shape, data length), sometimes not."""
    spec = S.spec("t", draw(S.dtypes()), draw(S.weighted((4, st.just(shape)), (1, S.shapes()))))
    how = draw(st.sampled_from(["matched", "matched", "matched", "junk", "short", "long"]))
    data = draw(S.tensor_bytes([spec])) if how != "junk" else draw(S.binaries())
    if labels and how == "matched" and S.matched_nbytes([spec]) is not None and draw(st.booleans()):
        n = S.matched_nbytes([spec]) or 0
        size = S.DTYPE_SIZES[spec.dtype]
        values = draw(st.lists(st.sampled_from([0.0, 1.0]), min_size=n // size, max_size=n // size))
        data = S.encode_values(values, spec.dtype)
    if how == "short" and data:
        data = data[:-1]
    elif how == "long":
        data += b"\x00"
    return S.tensor(spec.dtype, spec.shape, data)


@st.composite
def datasets(draw: st.DrawFn) -> datastore_pb2.PutDatasetRequest:
    n = draw(S.weighted((5, st.integers(0, 4)), (1, S.int64s())))
    d = draw(S.weighted((5, st.integers(0, 3)), (1, S.int64s())))
    dataset = datastore_pb2.Dataset(
        # Known proplets are left out: a valid dataset for one of them would (rightly) replace
        # the known-good one.
        proplet_id=draw(S.texts().filter(lambda p: p not in KNOWN_PROPLETS)),
        schema=draw(S.weighted((3, st.just("")), (1, S.texts(("fl-demo-dataset-v1",))))),
    )
    if draw(st.integers(0, 9)):
        dataset.features.CopyFrom(draw(tensors([n, d], labels=False)))
    if draw(st.integers(0, 9)):
        dataset.labels.CopyFrom(draw(tensors([n], labels=True)))
    req = datastore_pb2.PutDatasetRequest()
    if draw(st.integers(0, 19)):
        req.dataset.CopyFrom(dataset)
    return req


DATASET_MUTATIONS = [
    "none",
    "none",
    "none",
    "float32",
    "nan_feature",
    "inf_feature",
    "label_half",
    "label_nan",
    "label_two",
    "labels_short",
    "features_1d",
    "features_3d",
    "no_rows",
    "no_features",
    "bad_dtype",
    "data_short",
    "data_long",
    "huge_zero_shape",
]


@st.composite
def mutated_datasets(draw: st.DrawFn) -> datastore_pb2.PutDatasetRequest:
    """A valid dataset with at most one thing wrong with it."""
    n = draw(st.integers(1, 6))
    d = draw(st.integers(1, 4))
    x = np.array(draw(st.lists(st.floats(-1e6, 1e6), min_size=n * d, max_size=n * d)))
    x = x.reshape(n, d)
    y = np.array(draw(st.lists(st.sampled_from([0.0, 1.0]), min_size=n, max_size=n)))
    m = draw(S.weighted((2, st.just("none")), (3, st.sampled_from(DATASET_MUTATIONS))))
    at = draw(st.integers(0, n - 1))
    if m == "float32":
        x, y = x.astype(np.float32), y.astype(np.float32)
    elif m in ("nan_feature", "inf_feature"):
        x[at, 0] = np.nan if m == "nan_feature" else -np.inf
    elif m in ("label_half", "label_nan", "label_two"):
        y[at] = {"label_half": 0.5, "label_nan": np.nan, "label_two": 2.0}[m]
    elif m == "labels_short":
        y = y[:-1]
    elif m == "features_1d":
        x = x.reshape(-1)
    elif m == "features_3d":
        x = x.reshape(n, d, 1)
    elif m == "no_rows":
        x, y = x[:0], y[:0]
    elif m == "no_features":
        x = x[:, :0]
    features = S.tensor(_dtype(x), list(x.shape), x.tobytes())
    labels = S.tensor(_dtype(y), list(y.shape), y.tobytes())
    if m == "bad_dtype":
        features.dtype = draw(st.sampled_from([*S.BAD_ENUMS, 0]))  # type: ignore[assignment]
    elif m == "data_short":
        labels.data = labels.data[:-1]
    elif m == "data_long":
        features.data += b"\x00" * draw(st.sampled_from([1, 8]))
    elif m == "huge_zero_shape":
        features.shape[:] = [draw(st.sampled_from([2**40, 2**62, 2**63 - 1])), 0]
        features.data = b""
    proplet = draw(S.texts().filter(lambda p: p not in KNOWN_PROPLETS))
    return datastore_pb2.PutDatasetRequest(
        dataset=datastore_pb2.Dataset(proplet_id=proplet, features=features, labels=labels)
    )


def _dtype(arr: np.ndarray[Any, Any]) -> int:
    return tensor_pb2.DTYPE_FLOAT32 if arr.dtype == np.float32 else tensor_pb2.DTYPE_FLOAT64


def stored_as_sent(body: Any, outcome: Outcome) -> None:
    """An accepted dataset is described by what was sent."""
    if outcome.ok and not isinstance(body, bytes):
        info = outcome.response
        assert info.proplet_id == body.dataset.proplet_id
        assert info.size == body.dataset.features.shape[0]
        assert info.num_features == body.dataset.features.shape[1]


async def test_put_dataset(env: FuzzEnv) -> None:
    requests = S.weighted((1, datasets()), (1, mutated_datasets()))
    await fuzz_messages(env, PUT, requests, stored_as_sent)
