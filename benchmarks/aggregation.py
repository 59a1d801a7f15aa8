"""Aggregation: FedAvg (`server.aggregator.fedavg.FedAvg`: validate and fold one update at a
time, then take the mean) over K updates of D float32 parameters, against a plain numpy
weighted sum of the same arrays in the same run:

    out = np.zeros(D, np.float32)
    for x, n in updates:
        out += x * np.float32(n / total)

The updates cycle through a pool of at most 16 distinct arrays (so K = 1000 x D = 1e6 needs
64 MB of inputs, not 4 GB); subject and baseline read exactly the same arrays, interleaved,
and the ratio is baseline time / FedAvg time (>= 0.8 is the target).

Memory: one aggregation of K updates of D = 2.5e6 float32 (10 MB each) through the
coordinator's gRPC backend into a real Aggregator, in a child process whose peak RSS (VmHWM)
is read at K = 10 and K = 1000. The updates are made one at a time as they are streamed (as
the coordinator's SQLite store reads them), so holding all 1000 would take 10 GB, more than
this benchmark allows itself; folding them in as they arrive keeps the peak the same.

WASM FedAvg (`aggregation-wasm`): the Zig FedAvg strategy module
(wasm-client/src/fedavg_strategy.zig, strategy contract v1) run as strategy "wasm" runs it
(`server.aggregator.strategies.wasm`: the input encoded as one safetensors container, the
module run in the proplet's runtime, its answer decoded and checked), against the numpy
FedAvg above, on the same pooled arrays, interleaved, at K in {10, 100, 1000} x D in {1e3,
1e4, 1e5, 1e6}. A combination whose input (K x D float32) exceeds `WASM_MAX_INPUT_BYTES` is
skipped: the module's stdin is held in memory twice on the host (the container, and
wasmtime's copy). Both results are checked to be bit-identical. Times are split into the
encoding, the module's run and the decoding.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import Child, Recorder, fmt_count, median
from proplet.runner import CompiledModule, Invocation, Limits, WasmRuntime
from server.aggregator.fedavg import FedAvg
from server.aggregator.strategies.wasm import compiled_strategy, decode_output, encode_input
from server.tensors import specs_of

NAME = "aggregation"
TARGET_RATIO = 0.8
POOL = 16
MAX_ELEMENTS = 1_000_000_000  # K x D per point, to bound the run time
# The WASM FedAvg's input (K x D float32) at most: K = 1000 x D = 1e6 (4 GB) is skipped.
WASM_MAX_INPUT_BYTES = 512 << 20

F32 = np.ndarray[Any, np.dtype[np.float32]]


def baseline(pool: Sequence[F32], k: int, weights: Sequence[int]) -> F32:
    """The weighted mean as plain numpy computes it in float64 (what FedAvg computes)."""
    acc = np.zeros(pool[0].shape, np.float64)
    for i in range(k):
        acc += pool[i % len(pool)].astype(np.float64) * weights[i]
    out: F32 = (acc / sum(weights)).astype(np.float32)
    return out


def baseline_f32(pool: Sequence[F32], k: int, weights: Sequence[int]) -> F32:
    """The same in float32 arithmetic throughout: cheaper and less exact."""
    total = float(sum(weights))
    out = np.zeros(pool[0].shape, np.float32)
    for i in range(k):
        out += pool[i % len(pool)] * np.float32(weights[i] / total)
    return out


def fedavg(pool: Sequence[F32], k: int, weights: Sequence[int]) -> F32:
    agg = FedAvg()
    for i in range(k):
        agg.add({"w": pool[i % len(pool)]}, weights[i])
    out: F32 = agg.result()["w"]
    return out


def _timed(fn: Callable[[], F32]) -> tuple[float, F32]:
    started = time.perf_counter()
    out = fn()
    return time.perf_counter() - started, out


def compare(k: int, d: int, reps: int) -> dict[str, float]:
    rng = np.random.default_rng(k * 31 + d)
    pool = [rng.standard_normal(d, dtype=np.float32) for _ in range(min(k, POOL))]
    weights = [int(w) for w in rng.integers(1, 100, size=k)]
    base_s: list[float] = []
    f32_s: list[float] = []
    subj_s: list[float] = []
    for _ in range(reps):
        t, expect = _timed(lambda: baseline(pool, k, weights))
        base_s.append(t)
        t, got = _timed(lambda: fedavg(pool, k, weights))
        subj_s.append(t)
        t, _ = _timed(lambda: baseline_f32(pool, k, weights))
        f32_s.append(t)
    if not np.array_equal(got, expect):
        raise AssertionError(f"FedAvg and the float64 baseline differ at K={k} D={d}")
    b, s, b32 = median(base_s), median(subj_s), median(f32_s)
    return {
        "baseline_ms": round(b * 1000, 3),
        "fedavg_ms": round(s * 1000, 3),
        "ratio": round(b / s, 3),
        "baseline_f32_ms": round(b32 * 1000, 3),
        "ratio_f32": round(b32 / s, 3),
        "fedavg_gb_per_s": round(k * d * 4 / s / 1e9, 2),
    }


def _fedavg_module(runtime: WasmRuntime) -> CompiledModule:
    import hashlib
    import importlib.util

    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location(
        "wasm_client_build", root / "wasm-client/build.py"
    )
    assert spec is not None and spec.loader is not None
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    wasm = build.build_strategy("fedavg").read_bytes()
    return compiled_strategy(runtime, wasm, hashlib.sha256(wasm).hexdigest())


def compare_wasm(
    runtime: WasmRuntime, module: CompiledModule, k: int, d: int, reps: int
) -> dict[str, float]:
    """The module's FedAvg (encode, run, decode) against the numpy FedAvg, interleaved."""
    rng = np.random.default_rng(k * 31 + d)
    pool = [rng.standard_normal(d, dtype=np.float32) for _ in range(min(k, POOL))]
    weights = [int(w) for w in rng.integers(1, 100, size=k)]
    updates = [{"w": pool[i % len(pool)]} for i in range(k)]
    base = {"w": np.zeros(d, np.float32)}
    specs = specs_of(base)
    limits = Limits(timeout_s=600, output_bytes=d * 4 + (1 << 20))
    numpy_s: list[float] = []
    encode_s: list[float] = []
    run_s: list[float] = []
    decode_s: list[float] = []
    # CPU time of this process (all its threads): less disturbed than wall time when other
    # work shares the cores.
    numpy_cpu: list[float] = []
    wasm_cpu: list[float] = []
    # A first run maps the module's memory and warms the instance: not what a round pays
    # again (the runtime keeps the module compiled).
    warm = encode_input(base, updates[:1], weights[:1])
    runtime.run_sync(module, Invocation(["strategy"], {}, limits, warm))
    for _ in range(reps):
        cpu = time.process_time()
        t, expect = _timed(lambda: fedavg(pool, k, weights))
        numpy_cpu.append(time.process_time() - cpu)
        numpy_s.append(t)
        cpu = time.process_time()
        started = time.perf_counter()
        stdin = encode_input(base, updates, weights)
        encoded = time.perf_counter()
        out = runtime.run_sync(module, Invocation(["strategy"], {}, limits, stdin))
        del stdin
        ran = time.perf_counter()
        got = decode_output(out.stdout, specs, k)[0]["w"]
        decoded = time.perf_counter()
        wasm_cpu.append(time.process_time() - cpu)
        encode_s.append(encoded - started)
        run_s.append(ran - encoded)
        decode_s.append(decoded - ran)
        if not np.array_equal(got, expect):
            raise AssertionError(f"WASM FedAvg and numpy FedAvg differ at K={k} D={d}")
    total = [a + b + c for a, b, c in zip(encode_s, run_s, decode_s, strict=True)]
    n, w = median(numpy_s), median(total)
    return {
        "numpy_ms": round(n * 1000, 3),
        "wasm_ms": round(w * 1000, 3),
        "wasm_encode_ms": round(median(encode_s) * 1000, 3),
        "wasm_run_ms": round(median(run_s) * 1000, 3),
        "wasm_decode_ms": round(median(decode_s) * 1000, 3),
        "ratio": round(n / w, 3),
        "ratio_run_only": round(n / median(run_s), 3),
        "numpy_cpu_ms": round(median(numpy_cpu) * 1000, 3),
        "wasm_cpu_ms": round(median(wasm_cpu) * 1000, 3),
        "ratio_cpu": round(median(numpy_cpu) / median(wasm_cpu), 3),
    }


def memory(k: int, d: int, workdir: Path, strategy: str = "") -> dict[str, float]:
    child = Child(
        "aggmem",
        {"k": k, "d": d, "strategy": strategy},
        log_path=workdir / f"aggmem-{strategy or 'fedavg'}-{k}.log",
    )
    try:
        ready = child.ready
    finally:
        child.stop()
    return {
        "peak_rss_mb": round(ready["vmhwm_kib"] / 1024, 1),
        "seconds": round(ready["seconds"], 2),
    }


async def run(rec: Recorder, smoke: bool) -> None:
    ks = [10, 100] if smoke else [10, 100, 1000]
    ds = [1_000, 100_000] if smoke else [1_000, 10_000, 100_000, 1_000_000, 10_000_000]
    reps = 2 if smoke else 5
    for k in ks:
        for d in ds:
            if k * d > MAX_ELEMENTS:
                continue
            fig = compare(k, d, reps)
            rec.record(
                NAME,
                {"k": k, "d": d, "dtype": "float32", "reps": reps},
                fig,
                targets={f">= {TARGET_RATIO} of numpy": fig["ratio"] >= TARGET_RATIO},
                summary=(
                    f"K={k:<5} D={fmt_count(d):<6} fedavg {fig['fedavg_ms']:9.2f} ms, numpy "
                    f"{fig['baseline_ms']:9.2f} ms, ratio {fig['ratio']:.2f} "
                    f"({fig['fedavg_gb_per_s']:.1f} GB/s; float32 numpy "
                    f"{fig['baseline_f32_ms']:.2f} ms, ratio {fig['ratio_f32']:.2f})"
                ),
            )
    await run_wasm(rec, smoke)
    d_mem = 10_000 if smoke else 2_500_000
    ks = [2, 20] if smoke else [10, 100, 1000]
    # FedAvg, and a server optimiser of its family (the base streamed in, float64 moments
    # kept and answered): both fold updates as they arrive.
    for strategy in ("", "fedadam"):
        with tempfile.TemporaryDirectory(prefix="bench-agg-") as tmp:
            peaks = {k: memory(k, d_mem, Path(tmp), strategy) for k in ks}
        small, big = peaks[ks[0]], peaks[ks[-1]]
        growth = big["peak_rss_mb"] / small["peak_rss_mb"]
        all_bytes = ks[-1] * d_mem * 4
        rec.record(
            NAME + "-memory" + (f"-{strategy}" if strategy else ""),
            {"d": d_mem, "k": ks, "update_mb": d_mem * 4 / 1e6, "strategy": strategy or "fedavg"},
            {
                **{f"peak_rss_mb_k{k}": p["peak_rss_mb"] for k, p in peaks.items()},
                "growth": round(growth, 3),
                f"seconds_k{ks[-1]}": big["seconds"],
                f"all_updates_mb_k{ks[-1]}": round(all_bytes / 1e6),
            },
            targets={f"flat in K (K={ks[-1]} < 1.25x K={ks[0]})": growth < 1.25},
            summary=(
                f"{strategy or 'fedavg'}, coordinator->aggregator over gRPC, "
                f"D={fmt_count(d_mem)} float32: peak RSS "
                + ", ".join(f"{p['peak_rss_mb']:.0f} MB at K={k}" for k, p in peaks.items())
                + f" (all K={ks[-1]} updates: {all_bytes / 1e6:.0f} MB); K={ks[-1]} took "
                f"{big['seconds']:.1f} s"
            ),
        )


async def run_wasm(rec: Recorder, smoke: bool) -> None:
    runtime = WasmRuntime()
    module = _fedavg_module(runtime)
    ks = [10] if smoke else [10, 100, 1000]
    ds = [1_000] if smoke else [1_000, 10_000, 100_000, 1_000_000]
    reps = 2 if smoke else 5
    skipped = []
    for k in ks:
        for d in ds:
            if k * d * 4 > WASM_MAX_INPUT_BYTES:
                skipped.append(f"K={k} D={fmt_count(d)}")
                continue
            fig = compare_wasm(runtime, module, k, d, reps)
            rec.record(
                NAME + "-wasm",
                {"k": k, "d": d, "dtype": "float32", "reps": reps},
                fig,
                summary=(
                    f"K={k:<5} D={fmt_count(d):<6} wasm fedavg {fig['wasm_ms']:9.2f} ms "
                    f"(encode {fig['wasm_encode_ms']:.2f}, run {fig['wasm_run_ms']:.2f}, decode "
                    f"{fig['wasm_decode_ms']:.2f}), numpy fedavg {fig['numpy_ms']:9.2f} ms, "
                    f"numpy/wasm {fig['ratio']:.2f} (run only {fig['ratio_run_only']:.2f}; "
                    f"CPU time {fig['wasm_cpu_ms']:.2f} vs {fig['numpy_cpu_ms']:.2f} ms, "
                    f"{fig['ratio_cpu']:.2f})"
                ),
            )
    if skipped:
        print(
            f"{NAME}-wasm skipped (input over {WASM_MAX_INPUT_BYTES >> 20} MiB): "
            + ", ".join(skipped)
        )
