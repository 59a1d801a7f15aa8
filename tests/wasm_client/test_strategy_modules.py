"""The Zig strategy modules (wasm-client/src/fedavg_strategy.zig, fedmedian_strategy.zig;
strategy contract v1) against the aggregator's built-in FedAvg and FedMedian on random
inputs: the same models bit for bit (several K, sizes, dtypes, ties, one tensor spanning
many read chunks) and the same weights; FedAvg folds while it reads, so its memory is the
model's whatever K; and the host's checks of what a module answers (names, dtypes, shapes,
finiteness, trailing bytes, weights)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

import numpy as np
import pytest

from proplet import safetensors
from proplet.runner import CompiledModule, Limits, WasmRuntime
from server.aggregator.strategies import choose_strategy
from server.aggregator.strategies.wasm import (
    compiled_strategy,
    decode_output,
    encode_input,
    run_strategy,
)
from server.errors import FailedPrecondition
from server.tensors import Array, Tensors, specs_of
from tests.conftest import load_wasm_build

RUNTIME = WasmRuntime()


@pytest.fixture(scope="module")
def modules() -> dict[str, CompiledModule]:
    build = load_wasm_build()
    out = {}
    for name in ("fedavg", "fedmedian"):
        wasm = build.build_strategy(name).read_bytes()
        out[name] = compiled_strategy(RUNTIME, wasm, hashlib.sha256(wasm).hexdigest())
    return out


def random_round(
    seed: int, k: int, shapes: Mapping[str, tuple[int, ...]], dtype: type, ties: bool = False
) -> tuple[Tensors, list[Tensors], list[int]]:
    rng = np.random.default_rng(seed)

    def draw(shape: tuple[int, ...]) -> Array:
        if ties:  # few distinct values: medians of equal neighbours, even-K means of ties
            return rng.integers(-3, 4, size=shape).astype(dtype) / 2
        return (rng.normal(size=shape) * 10.0 ** rng.integers(-3, 4)).astype(dtype)

    base = {n: draw(s) for n, s in shapes.items()}
    updates = [{n: draw(s) for n, s in shapes.items()} for _ in range(k)]
    samples = [int(x) for x in rng.integers(1, 10_000, size=k)]
    return base, updates, samples


async def compare(
    modules: dict[str, CompiledModule],
    name: str,
    base: Tensors,
    updates: list[Tensors],
    samples: list[int],
    limits: Limits | None = None,
) -> None:
    strategy = choose_strategy(name, "").start()
    for u, n in zip(updates, samples, strict=True):
        strategy.add(u, n)
    want, _ = strategy.result(base, None)
    specs = specs_of(want)
    got, weights = await run_strategy(
        RUNTIME, modules[name], base, updates, samples, specs, limits or Limits(timeout_s=60)
    )
    assert list(got) == list(want)
    for tensor in want:
        assert got[tensor].dtype == want[tensor].dtype
        np.testing.assert_array_equal(got[tensor], want[tensor])
    assert weights == strategy.weights()  # the JSON floats round-trip exactly


CASES = [
    (1, {"w": (5,)}, np.float64),
    (2, {"w": (3, 4), "b": (4,)}, np.float32),
    (3, {"w": (7,), "b": ()}, np.float64),
    (10, {"l0.w": (16, 8), "l0.b": (8,), "l1.w": (8, 2)}, np.float32),
    (33, {"w": (1000,)}, np.float64),
    (64, {"w": (257, 31)}, np.float32),
    # One tensor over many of the module's 32 KiB read chunks, and a partial last chunk.
    (4, {"w": (70_001,), "b": (3,)}, np.float32),
]


@pytest.mark.parametrize("name", ["fedavg", "fedmedian"])
@pytest.mark.parametrize(("k", "shapes", "dtype"), CASES)
async def test_a_module_gives_the_builtin_model_bit_for_bit(
    modules: dict[str, CompiledModule],
    name: str,
    k: int,
    shapes: dict[str, tuple[int, ...]],
    dtype: type,
) -> None:
    for seed in range(3):
        await compare(modules, name, *random_round(seed * 1000 + k, k, shapes, dtype))


@pytest.mark.parametrize("k", [2, 4, 5, 9])
async def test_fedmedian_with_ties_even_and_odd_k(
    modules: dict[str, CompiledModule], k: int
) -> None:
    await compare(modules, "fedmedian", *random_round(k, k, {"w": (50, 3)}, np.float64, True))


async def test_the_fedavg_module_folds_as_it_reads(modules: dict[str, CompiledModule]) -> None:
    # 64 updates of 1 MiB (f32): 64 MiB on stdin, the module's memory capped at 24 MiB (of
    # which its stack takes 16).
    base, updates, samples = random_round(7, 64, {"w": (1 << 18,)}, np.float32)
    limits = Limits(timeout_s=120, memory_bytes=24 << 20)
    await compare(modules, "fedavg", base, updates, samples, limits)
    # The cap bites: the median, which holds every update, cannot run under it.
    with pytest.raises(FailedPrecondition, match=r"^memory limit exceeded"):
        await compare(modules, "fedmedian", base, updates, samples, limits)


def test_the_input_lays_out_weights_then_base_then_updates() -> None:
    base, updates, samples = random_round(1, 2, {"w": (2,), "b": ()}, np.float32)
    container = safetensors.decode(encode_input(base, updates, samples), "input")
    assert list(container.tensors) == [
        "weights", "base/w", "base/b", "update/0/w", "update/0/b", "update/1/w", "update/1/b",
    ]  # fmt: skip
    assert container.metadata == {
        "strategy_contract": "1",
        "updates": "2",
        "tensors": '["w", "b"]',
    }
    np.testing.assert_array_equal(container.tensors["weights"], samples)
    np.testing.assert_array_equal(container.tensors["update/1/w"], updates[1]["w"])


MODEL = {"w": np.zeros(3, np.float32), "b": np.zeros((), np.float32)}
SPECS = specs_of(MODEL)


def answer(tensors: Mapping[str, Array], weights: object = (0.5, 0.5)) -> bytes:
    meta = {} if weights is None else {"weights": json.dumps(list(weights))}  # type: ignore[call-overload]
    return safetensors.encode(tensors, meta)


def test_a_right_answer_is_taken() -> None:
    model, weights = decode_output(answer(MODEL), SPECS, 2)
    assert list(model) == ["w", "b"] and weights == [0.5, 0.5]


@pytest.mark.parametrize(
    ("stdout", "reason"),
    [
        (b"", "output: 0 bytes, too short"),
        (answer(MODEL) + b"x", "output: 1 bytes after the container"),
        (answer({"w": MODEL["w"]}), "output: tensors ['w'], the model has ['w', 'b']"),
        (answer({"b": MODEL["b"], "w": MODEL["w"]}), "output: tensors ['b', 'w']"),
        (answer({**MODEL, "w": np.zeros(2, np.float32)}), "output: tensor w is float32 [2]"),
        (answer({**MODEL, "w": np.zeros(3, np.float64)}), "output: tensor w is float64 [3]"),
        (answer({**MODEL, "b": np.array(np.nan, np.float32)}), "output: tensor b holds NaN"),
        (answer(MODEL, None), "output: __metadata__.weights missing"),
        (answer(MODEL, (0.5,)), "output: __metadata__.weights must list 2 finite numbers"),
        (answer(MODEL, (0.5, -1)), "output: __metadata__.weights must list 2 finite numbers"),
    ],
)
def test_a_wrong_answer_is_refused_saying_why(stdout: bytes, reason: str) -> None:
    with pytest.raises(FailedPrecondition) as excinfo:
        decode_output(stdout, SPECS, 2)
    assert str(excinfo.value).startswith(reason), excinfo.value


def test_the_codec_writes_any_layout_as_little_endian_row_major() -> None:
    """encode takes views of the tensors where it can; big-endian, transposed (not
    C-contiguous), 0-d and empty tensors come out as their values, row-major, little-endian."""
    rng = np.random.default_rng(3)
    tensors = {
        "big": rng.normal(size=(3, 4)).astype(">f4"),
        "t": rng.normal(size=(5, 3)).T,
        "scalar": np.array(2.5),
        "empty": np.zeros((0, 2), np.float32),
    }
    data = safetensors.encode(tensors)
    back = safetensors.decode(data, "x")
    assert back.size == len(data)
    for name, arr in tensors.items():
        assert back.tensors[name].dtype == arr.dtype.newbyteorder("<")
        np.testing.assert_array_equal(back.tensors[name], arr)
    start = 8 + int.from_bytes(data[:8], "little")
    assert data[start : start + 48] == tensors["big"].astype("<f4").tobytes()
