"""Aggregator under fuzzed request streams: at least 1,000 streams."""

from __future__ import annotations

import hashlib
import itertools
from typing import Any

import numpy as np
import pytest
from hypothesis import strategies as st

from propeller.v1 import aggregator_pb2, tensor_pb2
from server.aggregator.strategies import STRATEGIES
from server.errors import PropellerError
from server.tensors import specs_from_proto
from tests.fuzz import strategies as S
from tests.fuzz.harness import FuzzEnv, Outcome, Rpc, all_methods, fuzz_messages

AGGREGATE = Rpc.of("Aggregator.Aggregate")
FUZZED = (AGGREGATE,)
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")


def test_every_aggregator_rpc_is_fuzzed() -> None:
    assert {r.name for r in FUZZED} == all_methods("Aggregator")


SHAPES = [[3], [], [2, 2], [0], [1, 0], [2**40, 0]]
NAMES = ["", *STRATEGIES]
PARAMS = [
    '{"beta": 0.1}',
    '{"num_malicious": 1}',
    '{"num_malicious": 0, "num_to_keep": 2}',
    '{"eta": 0.5, "tau": 0.01}',
    '{"server_momentum": 0.9}',
    '{"mu": 0.1}',
    "null",
    "{",
    '{"x": 1}',
    '{"eta": -1}',
]
AGG_MUTATIONS = [
    "none",
    "none",
    "none",
    "no_aggregate_header",
    "two_aggregate_headers",
    "aggregate_header_late",
    "no_updates",
    "empty_chunk",
]


@st.composite
def aggregate_streams(draw: st.DrawFn) -> list[aggregator_pb2.AggregateChunk]:
    """An AggregateHeader, then 1..4 updates (header + data chunks), each possibly broken."""
    # The tensors every update should share; updates may deviate in name, shape or dtype.
    base = draw(
        S.weighted(
            (4, st.just([("w", 2, [3]), ("b", 2, [])])),
            (2, st.lists(st.tuples(st.sampled_from("wbxyz"), st.sampled_from([1, 2]),
                                   st.sampled_from(SHAPES)), min_size=1, max_size=3,
                         unique_by=lambda t: t[0])),
        )
    )  # fmt: skip
    # Clean streams reach the folding and the result; the others stop somewhere on the way.
    clean = draw(st.booleans())
    round_id = draw(S.weighted((3, st.just("r-agg")), (1, S.texts())))
    name = draw(
        st.sampled_from(NAMES) if clean else S.weighted((3, st.sampled_from(NAMES)), (1, S.texts()))
    )
    params = draw(
        S.weighted(
            (3, st.just("")), (2, st.sampled_from(PARAMS)), *([] if clean else [(1, S.texts())])
        )
    )
    header = aggregator_pb2.AggregateHeader(
        strategy=draw(st.sampled_from([0, 1]) if clean else S.enums([0, 1])),  # type: ignore[arg-type]
        round_id=round_id,
        strategy_name=name,
        strategy_params_json=params,
    )
    # The base model and the strategy's state, before the updates: sent when the strategy
    # needs them (clean) or at random, each possibly broken like an update.
    chunks: list[tuple[str, Any]] = []
    model_specs = [S.spec(n, d, s) for n, d, s in base]
    rule = STRATEGIES.get(name or "fedavg")
    if (clean and rule is not None and rule.needs_base) or not draw(st.integers(0, 3)):
        chunks += draw(_model_part("base", model_specs, clean))
        if rule is not None and rule.stateful and draw(st.booleans()):
            try:
                state = [s.to_proto() for s in rule.state_specs(specs_from_proto(model_specs, "s"))]
            except PropellerError:
                state = model_specs
            chunks += draw(_model_part("state", state, clean))
    for _ in range(draw(st.integers(1, 4))):
        if clean or draw(st.integers(0, 3)):
            specs = [S.spec(n, d, s) for n, d, s in base]
        else:
            specs = draw(S.spec_lists(("w", "b")))
        data = draw(S.tensor_bytes(specs, finite=True if clean else None))
        if clean:
            samples = st.integers(1, 2**40)
        else:
            samples = S.weighted((4, st.integers(1, 100)), (1, S.int64s()))
        update = tensor_pb2.UpdateHeader(
            round_id=round_id
            if clean
            else draw(S.weighted((4, st.just(round_id)), (1, S.texts()))),
            proplet_id=draw(S.texts(("p-1", "p-2"))),
            num_samples=draw(samples),
            metrics=draw(S.weighted((3, st.just({})), (1, S.double_maps()))),
            tensors=specs,
            total_bytes=draw(
                S.weighted((4, st.just(S.matched_nbytes(specs) or 0)), (1, S.int64s()))
            )
            if not clean
            else S.matched_nbytes(specs) or 0,
        )
        mutation = "rechunk" if clean else draw(_update_mutation())
        chunks += draw(S.mutated_stream(update, data, mutation))
    m = "none" if clean else draw(st.sampled_from(AGG_MUTATIONS))
    head: list[tuple[str, Any]] = [("aggregate_header", header)]
    if m == "no_aggregate_header":
        head = []
    elif m == "two_aggregate_headers":
        head = head * 2
    elif m == "aggregate_header_late":
        chunks.append(("aggregate_header", header))
    elif m == "no_updates":
        chunks = []
    elif m == "empty_chunk":
        chunks.insert(draw(st.integers(0, len(chunks))), ("empty", None))
    return [S.aggregate_chunk(kind, value) for kind, value in head + chunks]


@st.composite
def _model_part(
    draw: st.DrawFn, kind: str, specs: list[tensor_pb2.TensorSpec], clean: bool
) -> list[tuple[str, Any]]:
    header = tensor_pb2.ModelHeader(tensors=specs, total_bytes=S.matched_nbytes(specs) or 0)
    data = draw(S.tensor_bytes(specs, finite=True if clean else None))
    mutation = "rechunk" if clean else draw(_update_mutation())
    return [
        (kind if k == "header" else k, v) for k, v in draw(S.mutated_stream(header, data, mutation))
    ]


def _update_mutation() -> st.SearchStrategy[str]:
    return S.weighted((6, st.just("none")), (1, st.sampled_from(S.STREAM_MUTATIONS)))


def result_is_a_model(body: Any, outcome: Outcome) -> None:
    """An aggregate comes back as a well-formed model stream: header, then exactly its bytes,
    hashing to its sha256, all finite; then, for a strategy with state, the same for the
    state (model_uri "state"); last, the updates' weights (model_uri "weights")."""
    if not outcome.ok:
        return
    heads = [i for i, c in enumerate(outcome.responses) if c.WhichOneof("part") == "header"]
    assert heads[0] == 0 and len(heads) in (2, 3)
    later: list[Any] = [outcome.responses[i] for i in heads[1:]]
    assert [h.header.model_uri for h in later] == ["state", "weights"][3 - len(heads) :]
    bounds = [*heads, len(outcome.responses)]
    for start, stop in itertools.pairwise(bounds):
        _a_model(outcome.responses[start:stop])


def _a_model(chunks: list[Any]) -> None:
    first: Any = chunks[0]
    rest: list[Any] = chunks[1:]
    assert isinstance(first, tensor_pb2.ModelChunk) and first.WhichOneof("part") == "header"
    data = b"".join(c.data for c in rest)
    assert all(c.WhichOneof("part") == "data" for c in rest)
    assert len(data) == first.header.total_bytes
    assert hashlib.sha256(data).hexdigest() == first.header.sha256
    offset = 0
    for spec in first.header.tensors:
        dtype = np.dtype("<f4") if spec.dtype == tensor_pb2.DTYPE_FLOAT32 else np.dtype("<f8")
        n = int(np.prod(spec.shape)) * dtype.itemsize
        assert np.isfinite(np.frombuffer(data[offset : offset + n], dtype=dtype)).all()
        offset += n


async def test_aggregate(env: FuzzEnv) -> None:
    streams = aggregate_streams()
    await fuzz_messages(env, AGGREGATE, streams, result_is_a_model)
