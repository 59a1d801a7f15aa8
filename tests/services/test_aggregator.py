"""FedAvg: exact weighted mean (property-tested), validation, and the Aggregate stream through
a real grpc.aio server with the client the coordinator uses."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any, cast

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from propeller.v1 import aggregator_pb2, aggregator_pb2_grpc
from server.aggregator.app import AggregatorApp, AggregatorConfig
from server.aggregator.client import AggregatorClient, UpdateInput, aggregate_requests
from server.aggregator.fedavg import FedAvg, aggregate_fedavg
from server.errors import InvalidArgument
from server.streams import UpdateMeta, read_model_stream
from server.tensors import Array, Tensors, sha256_of
from tests.services.harness import RPC_TIMEOUT, served
from tests.support.security import service_tls

Stub = Any  # generated gRPC stubs carry no type information


@pytest.fixture
async def aggregator() -> AsyncIterator[grpc.aio.Channel]:
    config = AggregatorConfig(addr="127.0.0.1:0", tls=service_tls("aggregator"))
    # Only the coordinator may call the aggregator.
    async with AggregatorApp(config) as app, served(app.bindings, service_tls("coordinator")) as ch:
        yield ch


def meta(num_samples: int, proplet_id: str = "p", round_id: str = "r1") -> UpdateMeta:
    return UpdateMeta(
        round_id=round_id,
        proplet_id=proplet_id,
        base_model_uri="fl/models/global_model_v0",
        num_samples=num_samples,
        metrics={"loss": 0.5},
    )


def model(w: list[float], b: float, dtype: str = "<f8") -> Tensors:
    return {"w": np.asarray(w, dtype=dtype), "b": np.asarray(b, dtype=dtype)}


async def one_by_one(updates: Iterable[UpdateInput]) -> AsyncIterator[UpdateInput]:
    for u in updates:
        yield u


async def aggregate_via(
    channel: grpc.aio.Channel, updates: Iterable[UpdateInput], round_id: str = "r1"
) -> Tensors:
    """The aggregate through the client the coordinator uses; its digest is the bytes'."""
    tensors, digest = await AggregatorClient(channel, timeout_s=RPC_TIMEOUT).aggregate(
        round_id, one_by_one(updates)
    )
    assert digest == sha256_of(tensors)
    return tensors


def reference(updates: list[tuple[Tensors, int]]) -> Tensors:
    weights = np.array([n for _, n in updates], dtype=np.float64)
    return {
        name: np.average(np.stack([t[name] for t, _ in updates]), axis=0, weights=weights)
        for name in updates[0][0]
    }


# --- FedAvg, the logic -----------------------------------------------------------------


@st.composite
def update_sets(draw: st.DrawFn) -> list[tuple[Tensors, int]]:
    k = draw(st.integers(1, 8))
    d = draw(st.integers(1, 64))
    values = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)
    out: list[tuple[Tensors, int]] = []
    for _ in range(k):
        w = draw(hnp.arrays(np.float64, (d,), elements=values))
        b = draw(hnp.arrays(np.float64, (), elements=values))
        out.append(({"w": w, "b": b}, draw(st.integers(1, 1_000_000))))
    return out


@given(update_sets())
@settings(max_examples=200, deadline=None)
def test_fedavg_is_the_exact_weighted_mean(updates: list[tuple[Tensors, int]]) -> None:
    got = aggregate_fedavg(updates)
    want = reference(updates)
    # Relative to the inputs' magnitude: cancellation can make the mean itself tiny.
    scale = max(float(np.abs(t[name]).max()) for t, _ in updates for name in t)
    for name in want:
        assert got[name].dtype == np.float64
        assert got[name].shape == want[name].shape
        np.testing.assert_allclose(got[name], want[name], rtol=1e-12, atol=1e-12 * scale)


def test_fedavg_weights_by_num_samples() -> None:
    got = aggregate_fedavg([(model([1.0, 2.0], 0.0), 10), (model([5.0, 6.0], 4.0), 30)])
    np.testing.assert_allclose(got["w"], [4.0, 5.0], rtol=1e-15)
    np.testing.assert_allclose(got["b"], 3.0, rtol=1e-15)


def test_fedavg_keeps_float32_and_averages_in_float64() -> None:
    rng = np.random.default_rng(3)
    updates = [
        ({"w": rng.standard_normal(1000).astype(np.float32)}, int(n)) for n in (3, 1_000_000, 7)
    ]
    got = aggregate_fedavg(updates)["w"]
    assert got.dtype == np.float32
    exact = reference([({"w": t["w"].astype(np.float64)}, n) for t, n in updates])["w"]
    np.testing.assert_array_equal(got, exact.astype(np.float32))


def test_a_rejected_update_leaves_the_aggregate_unchanged() -> None:
    fedavg = FedAvg()
    fedavg.add(model([2.0, 4.0], 1.0), 2)
    with pytest.raises(InvalidArgument, match=r"updates\[1\]\.tensors\.w"):
        fedavg.add(model([1.0, np.nan], 1.0), 5)
    with pytest.raises(InvalidArgument, match=r"updates\[1\]\.num_samples"):
        fedavg.add(model([1.0, 1.0], 1.0), 0)
    fedavg.add(model([4.0, 8.0], 3.0), 2)
    assert fedavg.count == 2
    assert fedavg.total_samples == 4
    result = fedavg.result()
    np.testing.assert_array_equal(result["w"], [3.0, 6.0])
    np.testing.assert_array_equal(result["b"], 2.0)


def test_no_updates_is_invalid_argument() -> None:
    with pytest.raises(InvalidArgument, match="updates"):
        aggregate_fedavg([])


# --- the Aggregate RPC through the client ----------------------------------------------


async def test_weighting_through_the_server(aggregator: grpc.aio.Channel) -> None:
    result = await aggregate_via(
        aggregator,
        [
            (meta(10, "a"), model([1.0, 1.0, 1.0], 1.0)),
            (meta(30, "b"), model([5.0, 5.0, 5.0], 9.0)),
        ],
    )
    assert list(result) == ["w", "b"]
    np.testing.assert_array_equal(result["w"], [4.0, 4.0, 4.0])
    np.testing.assert_array_equal(result["b"], 7.0)


async def test_float32_updates_give_a_float32_model(aggregator: grpc.aio.Channel) -> None:
    first, second = model([2.0], 0.0, "<f4"), model([8.0], 3.0, "<f4")

    async def lazily() -> AsyncIterator[UpdateInput]:  # read just before it is sent
        yield meta(1), first
        yield meta(2, "q"), second

    result, _ = await AggregatorClient(aggregator, timeout_s=RPC_TIMEOUT).aggregate("r1", lazily())
    assert result["w"].dtype == np.float32
    np.testing.assert_array_equal(result["w"], [6.0])
    np.testing.assert_array_equal(result["b"], 2.0)


async def test_a_multi_megabyte_update_set(aggregator: grpc.aio.Channel) -> None:
    rng = np.random.default_rng(11)
    d = 1_500_000  # 12 MB per float64 update, 48 MB in all
    updates = [
        ({"w": rng.standard_normal(d), "b": np.asarray(float(i))}, n)
        for i, n in enumerate((5, 17, 64, 3))
    ]

    def lazily() -> Iterator[tuple[UpdateMeta, Tensors]]:
        for i, (tensors, n) in enumerate(updates):
            yield meta(n, f"p{i}"), tensors

    result = await aggregate_via(aggregator, lazily())
    want = reference(updates)
    np.testing.assert_allclose(result["w"], want["w"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(result["b"], want["b"], rtol=1e-12)


def _with(tensors: Tensors, **changes: Array) -> Tensors:
    return {**tensors, **changes}


BASE = model([1.0, 2.0, 3.0], 0.5)
F32 = model([1.0, 2.0, 3.0], 0.5, "<f4")
WITH_NAN = _with(BASE, w=np.array([1.0, np.nan, 3.0]))

BAD_SETS: list[tuple[str, list[tuple[Tensors, int]], str]] = [
    ("zero samples", [(BASE, 4), (BASE, 0)], "updates[1].num_samples"),
    ("negative samples", [(BASE, -3), (BASE, 4)], "updates[0].num_samples"),
    ("shape differs", [(BASE, 1), (model([1.0, 2.0], 0.5), 1)], "updates[1].tensors.w.shape"),
    ("name differs", [(BASE, 1), ({"w": BASE["w"], "c": BASE["b"]}, 1)], "updates[1].tensors"),
    ("tensor missing", [(BASE, 1), ({"w": BASE["w"]}, 1)], "updates[1].tensors"),
    ("dtype differs", [(BASE, 1), (F32, 1)], "updates[1].tensors.w.dtype"),
    ("NaN", [(BASE, 1), (BASE, 1), (WITH_NAN, 1)], "updates[2].tensors.w"),
    ("Inf", [(_with(BASE, b=np.asarray(np.inf)), 1)], "updates[0].tensors.b"),
    ("no updates", [], "updates"),
]


@pytest.mark.parametrize(
    ("updates", "field"), [(u, f) for _, u, f in BAD_SETS], ids=[n for n, _, _ in BAD_SETS]
)
async def test_a_bad_update_is_invalid_argument_naming_it(
    aggregator: grpc.aio.Channel, updates: list[tuple[Tensors, int]], field: str
) -> None:
    with pytest.raises(InvalidArgument) as excinfo:
        await aggregate_via(aggregator, [(meta(n, f"p{i}"), t) for i, (t, n) in enumerate(updates)])
    assert field in str(excinfo.value)
    # The same rules hold for the logic used in-process.
    with pytest.raises(InvalidArgument, match=field.replace("[", r"\[").replace("]", r"\]")):
        aggregate_fedavg(updates)


async def test_a_bad_update_among_big_ones_reports_its_own_error(
    aggregator: grpc.aio.Channel,
) -> None:
    big = {"w": np.zeros(2_000_000)}
    with pytest.raises(InvalidArgument, match=r"updates\[1\]\.num_samples"):
        await aggregate_via(aggregator, [(meta(1), big), (meta(0), big), (meta(1), big)])


async def test_a_caller_error_surfaces_as_itself(aggregator: grpc.aio.Channel) -> None:
    with pytest.raises(InvalidArgument, match="dtype"):
        await aggregate_via(aggregator, [(meta(1), {"w": cast(Any, np.arange(3))})])


# --- the raw stream protocol -----------------------------------------------------------


def chunks_for(updates: list[tuple[Tensors, int]]) -> list[aggregator_pb2.AggregateChunk]:
    return list(aggregate_requests([(meta(n), t) for t, n in updates], "r1", chunk_size=8))


def no_header() -> list[aggregator_pb2.AggregateChunk]:
    return chunks_for([(BASE, 1)])[1:]


def two_headers() -> list[aggregator_pb2.AggregateChunk]:
    parts = chunks_for([(BASE, 1)])
    return [parts[0], *parts]


def truncated_update() -> list[aggregator_pb2.AggregateChunk]:
    return chunks_for([(BASE, 1)])[:-1]


def next_header_too_early() -> list[aggregator_pb2.AggregateChunk]:
    first = chunks_for([(BASE, 1)])[:-1]
    return [*first, *chunks_for([(BASE, 1)])[1:]]


def extra_bytes() -> list[aggregator_pb2.AggregateChunk]:
    return [*chunks_for([(BASE, 1)]), aggregator_pb2.AggregateChunk(data=b"\0" * 8)]


def data_before_update() -> list[aggregator_pb2.AggregateChunk]:
    parts = chunks_for([(BASE, 1)])
    return [parts[0], aggregator_pb2.AggregateChunk(data=b"\0" * 8), *parts[1:]]


def wrong_total_bytes() -> list[aggregator_pb2.AggregateChunk]:
    parts = chunks_for([(BASE, 1)])
    parts[1].update.total_bytes = 7
    return parts


def other_round() -> list[aggregator_pb2.AggregateChunk]:
    parts = chunks_for([(BASE, 1)])
    parts[1].update.round_id = "r2"
    return parts


def unknown_strategy() -> list[aggregator_pb2.AggregateChunk]:
    parts = chunks_for([(BASE, 1)])
    parts[0].header.strategy = 42  # type: ignore[assignment]
    return parts


def empty_chunk() -> list[aggregator_pb2.AggregateChunk]:
    return [*chunks_for([(BASE, 1)]), aggregator_pb2.AggregateChunk()]


BAD_STREAMS = [
    (no_header, "header"),
    (two_headers, "header"),
    (truncated_update, "updates[0].data"),
    (next_header_too_early, "updates[0].data"),
    (extra_bytes, "updates[1]"),
    (data_before_update, "updates[0]"),
    (wrong_total_bytes, "updates[0].total_bytes"),
    (other_round, "updates[0].round_id"),
    (unknown_strategy, "header.strategy"),
    (empty_chunk, "part"),
]


@pytest.mark.parametrize(("make", "field"), BAD_STREAMS, ids=[m.__name__ for m, _ in BAD_STREAMS])
async def test_a_malformed_stream_is_invalid_argument(
    aggregator: grpc.aio.Channel, make: Any, field: str
) -> None:
    stub = aggregator_pb2_grpc.AggregatorStub(aggregator)
    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        await read_model_stream(stub.Aggregate(iter(make()), timeout=RPC_TIMEOUT))
    assert excinfo.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (excinfo.value.details() or ""), excinfo.value.details()


async def test_the_response_is_a_header_without_version_then_data(
    aggregator: grpc.aio.Channel,
) -> None:
    stub = aggregator_pb2_grpc.AggregatorStub(aggregator)
    call = stub.Aggregate(iter(chunks_for([(BASE, 2), (BASE, 3)])), timeout=RPC_TIMEOUT)
    parts = [c async for c in call]
    header = parts[0].header
    assert not header.HasField("version")
    assert header.total_bytes == 32
    assert [t.name for t in header.tensors] == ["w", "b"]
    # Then the updates' weights: FedAvg's n_i / sum(n), one float64 tensor.
    at = next(i for i, p in enumerate(parts[1:], 1) if p.WhichOneof("part") == "header")
    assert all(p.WhichOneof("part") == "data" for p in parts[1:at])
    weights = parts[at].header
    assert (weights.model_uri, [t.name for t in weights.tensors]) == ("weights", ["weight"])
    data = b"".join(p.data for p in parts[at + 1 :])
    assert np.frombuffer(data, "<f8").tolist() == [2 / 5, 3 / 5]


def test_config_from_env() -> None:
    assert AggregatorConfig.from_env({"PROPELLER_INSECURE": "1"}) == AggregatorConfig(tls=None)
    assert AggregatorConfig.from_env(
        {"PROPELLER_INSECURE": "1", "PROPELLER_AGGREGATOR_LISTEN": "0.0.0.0:1"}
    ).addr == ("0.0.0.0:1")
