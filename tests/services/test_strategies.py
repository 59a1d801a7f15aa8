"""Aggregation strategies (issue 11, item 4): each one through the real Aggregate service and
the client the coordinator uses, against a reference of its paper's formula written here in
plain numpy on fixed inputs (over the model flattened into one vector, not tensor by tensor as
the strategies work); the state across two rounds for the server optimisers; outliers chosen
so that Krum, MultiKrum and Bulyan's selection matters; bad parameters, a base or state that
does not fit, and the held-bytes limit answered with the status that names them; memory flat
in the number of updates for the FedAvg family."""

from __future__ import annotations

import tracemalloc
from collections.abc import AsyncIterator, Iterator, Sequence

import grpc
import numpy as np
import pytest

from propeller.v1 import aggregator_pb2, aggregator_pb2_grpc, tensor_pb2
from server.aggregator.app import AggregatorApp, AggregatorConfig
from server.aggregator.client import (
    Aggregated,
    AggregatorClient,
    UpdateInput,
    model_part_requests,
    read_answer,
    stream_header,
    update_requests,
)
from server.aggregator.fedavg import aggregate_fedavg
from server.aggregator.strategies import STRATEGIES, choose_strategy
from server.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from server.streams import UpdateMeta
from server.tensors import Tensors
from tests.services.harness import RPC_TIMEOUT, served
from tests.support.security import service_tls

Vector = np.ndarray[tuple[int], np.dtype[np.float64]]


@pytest.fixture
async def aggregator() -> AsyncIterator[grpc.aio.Channel]:
    config = AggregatorConfig(addr="127.0.0.1:0", tls=service_tls("aggregator"))
    async with AggregatorApp(config) as app, served(app.bindings, service_tls("coordinator")) as ch:
        yield ch


# --- fixed inputs and the flat-vector view the references use ---------------------------

SHAPES = {"w": (2, 2), "b": (2,)}


def flat(t: Tensors) -> Vector:
    return np.concatenate([np.asarray(t[n], np.float64).ravel() for n in SHAPES])


def unflat(v: Vector) -> Tensors:
    out: Tensors = {}
    at = 0
    for name, shape in SHAPES.items():
        size = int(np.prod(shape))
        out[name] = v[at : at + size].reshape(shape)
        at += size
    return out


def vec(*values: float) -> Tensors:
    return unflat(np.asarray(values, np.float64))


BASE0 = vec(0.5, -1.0, 2.0, 0.0, 0.1, -0.2)
ROUND1 = [
    (vec(0.7, -0.8, 1.5, 0.3, 0.0, -0.1), 10),
    (vec(0.2, -1.4, 2.2, -0.5, 0.4, 0.0), 30),
    (vec(0.6, -0.9, 1.9, 0.1, 0.2, -0.6), 20),
]
ROUND2_STEPS = [  # round 2's updates, as differences from round 1's model
    (np.array([0.3, 0.1, -0.2, 0.0, 0.05, 0.1]), 5),
    (np.array([-0.1, 0.4, 0.1, 0.2, -0.3, 0.0]), 15),
]


def weighted_mean(updates: Sequence[tuple[Tensors, int]]) -> Vector:
    """sum_i n_i x_i / sum_i n_i (McMahan et al.)."""
    total = sum(n for _, n in updates)
    acc = np.zeros(6)
    for t, n in updates:
        acc = acc + n * flat(t)
    out: Vector = acc / total
    return out


def meta(n: int, i: int) -> UpdateMeta:
    return UpdateMeta("r1", f"p{i}", "fl/models/global_model_v0", n, {})


async def as_stream(updates: Sequence[tuple[Tensors, int]]) -> AsyncIterator[UpdateInput]:
    for i, (t, n) in enumerate(updates):
        yield meta(n, i), t


async def aggregate(
    channel: grpc.aio.Channel,
    name: str,
    updates: Sequence[tuple[Tensors, int]],
    params: str = "",
    base: Tensors | None = None,
    state: Tensors | None = None,
) -> Aggregated:
    client = AggregatorClient(channel, timeout_s=RPC_TIMEOUT)
    return await client.aggregate_round(
        "r1",
        as_stream(updates),
        strategy_name=name,
        strategy_params_json=params,
        base=base,
        state=state,
    )


def close(got: Tensors, want: Vector) -> None:
    assert list(got) == list(SHAPES)
    np.testing.assert_allclose(flat(got), want, rtol=1e-12, atol=1e-12)


# --- FedAvg and FedProx ----------------------------------------------------------------


async def test_fedavg_by_name_is_bit_identical_to_the_fedavg_core(
    aggregator: grpc.aio.Channel,
) -> None:
    rng = np.random.default_rng(11)
    updates = [({"w": rng.standard_normal(5000).astype(np.float32)}, int(n)) for n in (3, 99, 7, 1)]
    core = aggregate_fedavg(updates)["w"]
    for name in ("", "fedavg", "fedprox"):
        got = await aggregate(
            aggregator, name, updates, '{"mu": 0.01}' if name == "fedprox" else ""
        )
        assert got.state is None
        assert got.model["w"].dtype == np.float32
        np.testing.assert_array_equal(got.model["w"], core)
    by_enum = await AggregatorClient(aggregator, timeout_s=RPC_TIMEOUT).aggregate(
        "r1", as_stream(updates)
    )
    np.testing.assert_array_equal(by_enum[0]["w"], core)


async def test_fedavg_and_fedprox_are_the_weighted_mean(aggregator: grpc.aio.Channel) -> None:
    for name in ("fedavg", "fedprox"):
        got = await aggregate(aggregator, name, ROUND1, base=BASE0)
        close(got.model, weighted_mean(ROUND1))
        assert got.weights == [10 / 60, 30 / 60, 20 / 60]  # each update's share of the samples


# --- server optimisers over two rounds -------------------------------------------------


def round2(model: Tensors) -> list[tuple[Tensors, int]]:
    return [(unflat(flat(model) + step), n) for step, n in ROUND2_STEPS]


def fedavgm_reference(lr: float, beta: float) -> list[tuple[Vector, Vector]]:
    """Hsu et al. 2019: v <- beta v + (x - mean); x <- x - lr v; v starts at 0."""
    x, v = flat(BASE0), np.zeros(6)
    out = []
    for updates in (ROUND1, None):
        ups = updates if updates is not None else round2(unflat(x))
        v = beta * v + (x - weighted_mean(ups))
        x = x - lr * v
        out.append((x, v))
    return out


async def test_fedavgm_two_rounds(aggregator: grpc.aio.Channel) -> None:
    (x1, v1), (x2, v2) = fedavgm_reference(lr=0.7, beta=0.9)
    params = '{"server_learning_rate": 0.7, "server_momentum": 0.9}'
    first = await aggregate(aggregator, "fedavgm", ROUND1, params, base=BASE0)
    close(first.model, x1)
    assert first.state is not None
    assert list(first.state) == ["momentum.w", "momentum.b"]
    np.testing.assert_allclose(
        np.concatenate([first.state["momentum.w"].ravel(), first.state["momentum.b"]]),
        v1,
        rtol=1e-12,
    )
    second = await aggregate(
        aggregator, "fedavgm", round2(first.model), params, base=first.model, state=first.state
    )
    close(second.model, x2)
    # Momentum matters: without it (the default 0) round 2 lands elsewhere.
    plain = await aggregate(aggregator, "fedavgm", round2(first.model), base=first.model)
    assert not np.allclose(flat(plain.model), x2)
    assert second.state is not None
    np.testing.assert_allclose(
        np.concatenate([second.state["momentum.w"].ravel(), second.state["momentum.b"]]), v2
    )


def fedopt_reference(rule: str, eta: float, b1: float, b2: float, tau: float) -> list[Vector]:
    """Reddi et al. 2021, Algorithm 2: delta = mean - x; m = b1 m + (1 - b1) delta;
    Adagrad v = v + delta^2, Adam v = b2 v + (1 - b2) delta^2,
    Yogi v = v - (1 - b2) delta^2 sign(v - delta^2); x = x + eta m / (sqrt(v) + tau);
    m and v start at 0. Returns x after each of the two rounds."""
    x, m, v = flat(BASE0), np.zeros(6), np.zeros(6)
    out = []
    for r in range(2):
        ups = ROUND1 if r == 0 else round2(unflat(x))
        delta = weighted_mean(ups) - x
        m = b1 * m + (1 - b1) * delta
        if rule == "fedadagrad":
            v = v + delta**2
        elif rule == "fedadam":
            v = b2 * v + (1 - b2) * delta**2
        else:
            v = v - (1 - b2) * delta**2 * np.sign(v - delta**2)
        x = x + eta * m / (np.sqrt(v) + tau)
        out.append(x)
    return out


FEDOPT_CASES = [
    (
        "fedadam",
        '{"eta": 0.05, "beta_1": 0.8, "beta_2": 0.95, "tau": 0.001}',
        0.05,
        0.8,
        0.95,
        1e-3,
    ),
    ("fedyogi", '{"eta": 0.02, "beta_1": 0.7, "beta_2": 0.9, "tau": 0.01}', 0.02, 0.7, 0.9, 1e-2),
    ("fedadagrad", '{"eta": 0.1, "beta_1": 0.5, "tau": 0.001}', 0.1, 0.5, 0.0, 1e-3),
    ("fedadam", "", 0.1, 0.9, 0.99, 1e-9),  # Flower's defaults
    ("fedyogi", "", 0.01, 0.9, 0.99, 1e-3),
    ("fedadagrad", "", 0.1, 0.0, 0.0, 1e-9),
]


@pytest.mark.parametrize(
    ("name", "params", "eta", "b1", "b2", "tau"),
    FEDOPT_CASES,
    ids=[f"{c[0]}-{'defaults' if not c[1] else 'set'}" for c in FEDOPT_CASES],
)
async def test_adaptive_optimisers_two_rounds(
    aggregator: grpc.aio.Channel,
    name: str,
    params: str,
    eta: float,
    b1: float,
    b2: float,
    tau: float,
) -> None:
    x1, x2 = fedopt_reference(name, eta, b1, b2, tau)
    first = await aggregate(aggregator, name, ROUND1, params, base=BASE0)
    close(first.model, x1)
    assert first.state is not None
    assert sorted(first.state) == ["m.b", "m.w", "v.b", "v.w"]
    assert all(a.dtype == np.float64 for a in first.state.values())
    second = await aggregate(
        aggregator, name, round2(first.model), params, base=first.model, state=first.state
    )
    close(second.model, x2)
    # The state carries across rounds: starting round 2 afresh gives another model.
    afresh = await aggregate(aggregator, name, round2(first.model), params, base=first.model)
    assert not np.allclose(flat(afresh.model), x2)


async def test_a_float32_model_stays_float32_with_float64_state(
    aggregator: grpc.aio.Channel,
) -> None:
    base = {n: a.astype(np.float32) for n, a in BASE0.items()}
    updates = [({n: a.astype(np.float32) for n, a in t.items()}, k) for t, k in ROUND1]
    got = await aggregate(aggregator, "fedadam", updates, base=base)
    assert all(a.dtype == np.float32 for a in got.model.values())
    assert got.state is not None and all(a.dtype == np.float64 for a in got.state.values())


# --- order statistics ------------------------------------------------------------------

HONEST = [
    vec(1.00, 1.00, 1.00, 1.00, 1.00, 1.00),
    vec(1.10, 0.90, 1.05, 0.95, 1.00, 1.02),
    vec(0.92, 1.08, 0.97, 1.04, 0.99, 0.97),
    vec(1.05, 1.03, 0.90, 1.10, 1.06, 0.95),
    vec(0.96, 0.94, 1.08, 0.93, 0.95, 1.05),
]
OUTLIERS = [vec(9.0, -7.0, 8.0, 6.0, -9.0, 7.5), vec(8.5, -6.5, 8.2, 6.3, -8.8, 7.0)]
# Outliers claim many samples: a sample-weighted rule would follow them.
POISONED = (
    [(t, 10) for t in HONEST[:3]]
    + [(OUTLIERS[0], 500)]
    + [(t, 10) for t in HONEST[3:]]
    + [(OUTLIERS[1], 500)]
)


async def test_fedmedian_is_the_coordinatewise_median(aggregator: grpc.aio.Channel) -> None:
    for updates in (POISONED, POISONED[:6]):  # odd and even counts
        got = await aggregate(aggregator, "fedmedian", updates)
        rows = np.array([flat(t) for t, _ in updates])
        want = np.array([sorted(col)[len(col) // 2] for col in rows.T])
        if len(updates) % 2 == 0:
            want = np.array(
                [
                    (sorted(col)[len(col) // 2 - 1] + sorted(col)[len(col) // 2]) / 2
                    for col in rows.T
                ]
            )
        close(got.model, want)
        assert got.state is None
        assert got.weights == [1 / len(updates)] * len(updates)  # unweighted, each once


@pytest.mark.parametrize("beta", [0.0, 0.15, 0.3, 0.45])
async def test_fedtrimmedavg_drops_beta_of_each_end(
    aggregator: grpc.aio.Channel, beta: float
) -> None:
    got = await aggregate(aggregator, "fedtrimmedavg", POISONED, f'{{"beta": {beta}}}')
    k = len(POISONED)
    cut = int(beta * k)  # floor(beta K) from each end
    want = []
    for col in np.array([flat(t) for t, _ in POISONED]).T:
        kept = sorted(col)[cut : k - cut]
        want.append(sum(kept) / len(kept))
    close(got.model, np.array(want))


def krum_reference(vectors: list[Vector], f: int) -> list[float]:
    """Blanchard et al. 2017: score(i) = sum of the squared distances from i to its n - f - 2
    nearest other vectors (at least 1)."""
    n = len(vectors)
    scores = []
    for i in range(n):
        d = sorted(float(np.sum((vectors[i] - vectors[j]) ** 2)) for j in range(n) if j != i)
        scores.append(sum(d[: min(max(1, n - f - 2), n - 1)]))
    return scores


async def test_krum_picks_the_update_closest_to_its_neighbours(
    aggregator: grpc.aio.Channel,
) -> None:
    vectors = [flat(t) for t, _ in POISONED]
    scores = krum_reference(vectors, f=2)
    best = scores.index(min(scores))
    assert best not in (3, 6)  # an honest one, by the inputs' design
    got = await aggregate(aggregator, "krum", POISONED, '{"num_malicious": 2}')
    np.testing.assert_array_equal(flat(got.model), vectors[best])
    # Its weights (what the lineage records): the selected update 1, the others 0.
    assert got.weights == [1.0 if i == best else 0.0 for i in range(len(vectors))]
    # The selection matters: the mean of everything is dragged off by the outliers.
    assert np.abs(weighted_mean(POISONED) - vectors[best]).max() > 3


async def test_multikrum_averages_the_best_scored(aggregator: grpc.aio.Channel) -> None:
    vectors = [flat(t) for t, _ in POISONED]
    for f, m in ((2, 3), (2, 0), (1, 6)):
        scores = krum_reference(vectors, f)
        keep = m or len(vectors) - f
        chosen = sorted(range(len(vectors)), key=lambda i: (scores[i], i))[:keep]
        want = np.sum([vectors[i] for i in chosen], axis=0) / keep  # unweighted (the paper)
        got = await aggregate(
            aggregator, "multikrum", POISONED, f'{{"num_malicious": {f}, "num_to_keep": {m}}}'
        )
        close(got.model, want)
        assert got.weights == [1 / keep if i in chosen else 0.0 for i in range(len(vectors))]
    # Keeping 6 of 7 with f=1 lets exactly one of the two outliers in.
    assert len({3, 6} & set(chosen)) == 1


def bulyan_reference(vectors: list[Vector], f: int) -> Vector:
    """El Mhamdi et al. 2018: choose theta = n - 2f vectors by Krum one at a time (removing
    each), then per coordinate average the beta = theta - 2f chosen values closest to the
    chosen ones' median."""
    pool = list(range(len(vectors)))
    chosen: list[int] = []
    while len(chosen) < len(vectors) - 2 * f:
        scores = krum_reference([vectors[i] for i in pool], f)
        pick = pool[scores.index(min(scores))]
        chosen.append(pick)
        pool.remove(pick)
    beta = len(chosen) - 2 * f
    out = []
    for c in range(len(vectors[0])):
        values = [vectors[i][c] for i in chosen]
        med = float(np.median(values))
        nearest = sorted(range(len(values)), key=lambda j: (abs(values[j] - med), j))[:beta]
        out.append(sum(values[j] for j in nearest) / beta)
    return np.array(out)


async def test_bulyan(aggregator: grpc.aio.Channel) -> None:
    updates = [*POISONED[:6], (vec(1.02, 0.98, 1.01, 0.99, 1.03, 0.97), 10)]  # 6 honest, 1 bad
    vectors = [flat(t) for t, _ in updates]
    want = bulyan_reference(vectors, f=1)
    got = await aggregate(aggregator, "bulyan", updates, '{"num_malicious": 1}')
    close(got.model, want)
    # theta = 7 - 2f = 5 chosen by its Krum phase, 1/5 each; the outlier (3) is not one.
    assert got.weights is not None and got.weights[3] == 0.0
    assert sorted(got.weights) == [0.0, 0.0] + [1 / 5] * 5
    assert np.abs(want - 1.0).max() < 0.1  # the outlier left no trace
    assert np.abs(weighted_mean(updates) - 1.0).max() > 3


async def test_robust_rules_resist_sign_flipped_scaled_updates(
    aggregator: grpc.aio.Channel,
) -> None:
    """20% of the updates poisoned (the honest direction flipped and scaled by 10, claiming
    many samples): the robust rules stay near the clean mean, FedAvg does not. Both halves of
    the comparison are asserted, so the test fails if either stops holding."""
    rng = np.random.default_rng(7)
    step = rng.standard_normal(6)
    honest = [(unflat(step + 0.05 * rng.standard_normal(6)), 10) for _ in range(8)]
    poisoned = [(unflat(-10 * step), 1000) for _ in range(2)]
    updates = [*honest[:4], poisoned[0], *honest[4:], poisoned[1]]
    clean = weighted_mean(honest)
    scale = float(np.linalg.norm(step))

    def off(model: Tensors) -> float:
        return float(np.linalg.norm(flat(model) - clean)) / scale

    plain = await aggregate(aggregator, "fedavg", updates)
    assert off(plain.model) > 5
    for name, params in (
        ("fedmedian", ""),
        ("fedtrimmedavg", '{"beta": 0.2}'),
        ("krum", '{"num_malicious": 2}'),
        ("multikrum", '{"num_malicious": 2}'),
        ("bulyan", '{"num_malicious": 1}'),
    ):
        got = await aggregate(aggregator, name, updates, params)
        assert off(got.model) < 0.2, name


@pytest.mark.parametrize(
    ("name", "params", "k"),
    [
        ("krum", '{"num_malicious": 2}', 6),
        ("bulyan", '{"num_malicious": 1}', 6),
        ("multikrum", '{"num_to_keep": 8}', 7),
    ],
)
async def test_too_few_updates_for_the_rule_is_failed_precondition(
    aggregator: grpc.aio.Channel, name: str, params: str, k: int
) -> None:
    with pytest.raises(FailedPrecondition, match=r"updates|num_to_keep"):
        await aggregate(aggregator, name, POISONED[:k], params)


# --- bad parameters, base and state ------------------------------------------------------

BAD_PARAMS = [
    ("fedadam", '{"eta": -1}', "strategy_params_json.eta"),
    ("fedadam", '{"etaa": 0.1}', "strategy_params_json.etaa"),
    ("fedyogi", '{"beta_2": 1.0}', "strategy_params_json.beta_2"),
    ("fedadagrad", '{"beta_2": 0.9}', "strategy_params_json.beta_2"),
    ("fedavgm", '{"server_momentum": "0.9"}', "strategy_params_json.server_momentum"),
    ("fedprox", '{"mu": -0.1}', "strategy_params_json.mu"),
    ("fedtrimmedavg", '{"beta": 0.5}', "strategy_params_json.beta"),
    ("krum", '{"num_malicious": 1.5}', "strategy_params_json.num_malicious"),
    ("multikrum", '{"num_to_keep": true}', "strategy_params_json.num_to_keep"),
    ("bulyan", '{"num_malicious": -1}', "strategy_params_json.num_malicious"),
    ("fedmedian", '{"beta": 0.1}', "strategy_params_json.beta"),
    ("fedavg", "[1, 2]", "strategy_params_json"),
    ("fedavg", "{not json", "strategy_params_json"),
    ("fedavg", '{"x": "' + "y" * 5000 + '"}', "strategy_params_json"),
    ("fedsgd", "", "header.strategy_name"),
]


@pytest.mark.parametrize(("name", "params", "field"), BAD_PARAMS)
async def test_bad_strategy_or_params_is_invalid_argument_naming_them(
    aggregator: grpc.aio.Channel, name: str, params: str, field: str
) -> None:
    with pytest.raises(InvalidArgument) as excinfo:
        await aggregate(aggregator, name, ROUND1, params, base=BASE0)
    assert f"{field}:" in str(excinfo.value), excinfo.value


def test_every_strategy_takes_its_defaults_and_fills_them_in() -> None:
    assert set(STRATEGIES) == {
        "fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad",
        "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan", "wasm",
    }  # fmt: skip
    for name in STRATEGIES:
        if name == "wasm":
            # The one strategy without a default rule: its module must be named (and pinned).
            with pytest.raises(InvalidArgument, match=r"^strategy_params_json\.module: "):
                choose_strategy(name, "")
            continue
        choice = choose_strategy(name, "")
        assert choice.name == name
        assert choose_strategy(name, choice.params.as_json()) == choice


def with_w(t: Tensors, w: np.ndarray) -> Tensors:
    return {**t, "w": w}


FIRST_STATE = {
    **{f"m.{n}": np.zeros(s) for n, s in SHAPES.items()},
    **{f"v.{n}": np.zeros(s) for n, s in SHAPES.items()},
}
BAD_PARTS = [
    ("fedadam", None, None, "base"),
    ("fedavgm", with_w(BASE0, np.zeros((2, 3))), None, "base.tensors.w.shape"),
    ("fedadam", {"w": BASE0["w"]}, None, "base.tensors"),
    ("fedadam", with_w(BASE0, np.full((2, 2), np.nan)), None, "base.tensors.w"),
    # A base a strategy does not need is still checked (and then ignored).
    ("fedavg", with_w(BASE0, np.zeros(4)), None, "base.tensors.w.shape"),
    ("fedavg", BASE0, FIRST_STATE, "state"),
    ("fedadam", BASE0, {k: v for k, v in FIRST_STATE.items() if k != "v.b"}, "state.tensors"),
    ("fedadam", BASE0, {**FIRST_STATE, "m.w": np.zeros((2, 2), np.float32)}, "state.tensors.m.w"),
    ("fedadam", BASE0, {**FIRST_STATE, "v.b": np.zeros(3)}, "state.tensors.v.b"),
    ("fedadam", BASE0, {**FIRST_STATE, "v.w": np.full((2, 2), np.inf)}, "state.tensors.v.w"),
]


@pytest.mark.parametrize(("name", "base", "state", "field"), BAD_PARTS)
async def test_a_base_or_state_that_does_not_fit_is_invalid_argument_naming_it(
    aggregator: grpc.aio.Channel,
    name: str,
    base: Tensors | None,
    state: Tensors | None,
    field: str,
) -> None:
    with pytest.raises(InvalidArgument) as excinfo:
        await aggregate(aggregator, name, ROUND1, base=base, state=state)
    assert f"{field}:" in str(excinfo.value), excinfo.value


def raw_stream(*parts: str) -> Iterator[aggregator_pb2.AggregateChunk]:
    yield stream_header("r1", strategy_name="fedadam")
    for part in parts:
        if part == "base":
            yield from model_part_requests("base", BASE0)
        elif part == "state":
            yield from model_part_requests("state", FIRST_STATE)
        else:
            yield from update_requests(meta(1, 0), ROUND1[0][0])


@pytest.mark.parametrize(
    ("order", "field"),
    [
        (("state", "base", "update"), "state"),
        (("base", "update", "state"), "state"),
        (("update", "base"), "base"),
        (("base", "base", "update"), "base"),
        (("base", "state", "state", "update"), "state"),
    ],
)
async def test_parts_out_of_order_are_invalid_argument(
    aggregator: grpc.aio.Channel, order: tuple[str, ...], field: str
) -> None:
    stub = aggregator_pb2_grpc.AggregatorStub(aggregator)
    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        await read_answer(stub.Aggregate(raw_stream(*order), timeout=RPC_TIMEOUT))
    assert excinfo.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (excinfo.value.details() or "").startswith(f"{field}:"), excinfo.value.details()


async def test_a_base_too_big_is_refused_from_its_header(aggregator: grpc.aio.Channel) -> None:
    """2 GiB claimed by the base's header: refused before any of its bytes."""
    huge = tensor_pb2.ModelHeader(
        tensors=[tensor_pb2.TensorSpec(name="w", dtype=tensor_pb2.DTYPE_FLOAT64, shape=[1 << 28])]
    )
    chunks = [
        stream_header("r1", strategy_name="fedadam"),
        aggregator_pb2.AggregateChunk(base=huge),
        aggregator_pb2.AggregateChunk(data=b"\0" * 1024),
    ]
    stub = aggregator_pb2_grpc.AggregatorStub(aggregator)
    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        await read_answer(stub.Aggregate(iter(chunks), timeout=RPC_TIMEOUT))
    assert excinfo.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (excinfo.value.details() or "").startswith("base.tensors: 2147483648 bytes, more than")


async def test_the_held_updates_are_bounded() -> None:
    one = 6 * 8  # bytes of one update
    config = AggregatorConfig("127.0.0.1:0", 3 * one, tls=service_tls("aggregator"))
    async with AggregatorApp(config) as app, served(app.bindings, service_tls("coordinator")) as ch:
        got = await aggregate(ch, "fedmedian", ROUND1)  # exactly at the limit
        close(got.model, np.median([flat(t) for t, _ in ROUND1], axis=0))
        refused = r"RESOURCE_EXHAUSTED: updates\[3\]: strategy fedmedian"
        with pytest.raises(ResourceExhausted, match=refused):
            await aggregate(ch, "fedmedian", [*ROUND1, ROUND1[0]])
        # The FedAvg family folds as it goes: the limit does not apply.
        got = await aggregate(ch, "fedavg", [*ROUND1, *ROUND1])
        close(got.model, weighted_mean(ROUND1))


def test_max_held_bytes_from_env() -> None:
    env = {"PROPELLER_INSECURE": "1", "PROPELLER_AGGREGATOR_MAX_HELD_BYTES": "12345"}
    assert AggregatorConfig.from_env(env).max_held_bytes == 12345
    assert AggregatorConfig.from_env({"PROPELLER_INSECURE": "1"}).max_held_bytes == 1 << 30


# --- memory ----------------------------------------------------------------------------

D = 1_000_000  # float32 parameters: 4 MB an update


def peak_bytes(name: str, k: int, d: int) -> int:
    """Peak traced allocation while `name` takes K updates made one at a time (as the intake
    hands them over) and answers. numpy reports its buffers to tracemalloc."""
    base = {"w": np.zeros(d, np.float32)}
    strategy = choose_strategy(name, "").start()
    tracemalloc.start()
    try:
        for i in range(k):
            strategy.add({"w": np.full(d, i % 7, np.float32)}, 1 + i % 3)
        strategy.result(base, None)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("name", ["fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_fedavg_family_memory_is_flat_in_k(name: str) -> None:
    few, many = peak_bytes(name, 20, D), peak_bytes(name, 60, D)
    assert many < 1.1 * few, (few, many)


def test_order_statistics_memory_grows_with_k() -> None:
    """What the bound above is up against: a rule that holds every update (D smaller)."""
    d = D // 4
    few, many = peak_bytes("fedmedian", 20, d), peak_bytes("fedmedian", 60, d)
    assert many - few > 0.9 * 40 * d * 4, (few, many)  # the 40 more updates, held
