"""WASM trainer speed: the Zig trainer in wasmtime (through the proplet's `WasmRuntime`) vs
the same Zig source built natively for x86_64 vs a plain Python per-example loop, all on the
same inputs; plus the cost of a cold task start (compile) vs a warm one (cached module).

Training throughput is samples per second of per-example SGD (batch_size 1, the original
demo's rule): each implementation is timed with `epochs = E` and with `epochs = 0` on the same
data, and the difference (parsing, start-up and output cancel out) gives E x n samples. All
three must print the same update, which is checked.

The MLP trainer (`wasm-client/src/mlp.zig`, trainer contract v2: safetensors on stdin and
stdout) the same way, as `wasm-mlp`: in wasmtime with WASM SIMD (the build the proplet runs)
and without, the same Zig built natively, and the same algorithm in numpy (whole batches as
matrix products), on a digits-sized task (64 features, one hidden layer of 128, 10 classes,
mini-batches of 32). Samples per second again come from `epochs = E` minus `epochs = 0`, but
in CPU seconds (the wasm run's thread, the native child, this process for numpy): on a shared
machine wall-clock ratios of sub-second runs swing by 2x, CPU time much less.

What fuel metering costs, as `wasm-fuel`: both trainers (linear and MLP) in the proplet's
runtime (`WasmRuntime()`, fuel metering on, as proplets run round tasks) and in one without
metering (`WasmRuntime(metering=False)`), runs interleaved, samples per second from
`epochs = E` minus `epochs = 0` in CPU seconds of the run's thread; the ratio metered /
unmetered (target: >= 0.85, at most 15% slower), the fuel a sample-epoch costs and whether every
repetition consumed the same fuel. (The `wasm` and `wasm-mlp` figures above are metered too.)
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import itertools
import json
import math
import os
import resource
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from benchmarks.common import ROOT, Recorder, median
from proplet import safetensors
from proplet.runner import Invocation, Limits, WasmRuntime

NAME = "wasm"
MLP_NAME = "wasm-mlp"
FUEL_NAME = "wasm-fuel"
# Metered training at least this fraction of unmetered (issue 15: at most 15% slower).
FUEL_TARGET_RATIO = 0.85
TARGET_RATIO = 0.5
MLP_TARGET_RATIO = 0.7
MASK64 = (1 << 64) - 1


def _build_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "wasm_client_build", ROOT / "wasm-client" / "build.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def trainer_wasm() -> Path:
    path: Path = _build_module().build(target="wasm32-wasi")
    return path


@functools.cache
def trainer_native() -> Path:
    path: Path = _build_module().build(target="x86_64-linux")
    return path


@functools.cache
def mlp_wasm(simd: bool = True) -> Path:
    path: Path = _build_module().build_mlp(target="wasm32-wasi", simd=simd)
    return path


@functools.cache
def mlp_native() -> Path:
    path: Path = _build_module().build_mlp(target="x86_64-linux")
    return path


# ---- inputs -------------------------------------------------------------------------------


def make_env(n: int, d: int, epochs: int, seed: int = 7) -> dict[str, str]:
    """A task env as a proplet builds it. Values have 3 decimals so the dataset of the native
    run fits in one environment string (Linux caps each at 128 KiB)."""
    rng = np.random.default_rng(seed)
    x = np.round(rng.normal(0.0, 1.0, size=(n, d)), 3)
    w_true = rng.normal(0.0, 1.0, size=d)
    y = (x @ w_true + rng.normal(0.0, 0.5, size=n) > 0).astype(int)
    data = [{"x": row, "y": int(label)} for row, label in zip(x.tolist(), y.tolist(), strict=True)]
    return {
        "ROUND_ID": "bench-round",
        "PROPLET_ID": "bench-proplet",
        "MODEL_URI": "fl/models/global_model_v0",
        "HYPERPARAMS": json.dumps({"epochs": epochs, "lr": 0.01, "batch_size": 1}),
        "MODEL_DATA": json.dumps({"w": [0.0] * d, "b": 0.0}),
        "DATASET_DATA": json.dumps(
            {"schema": "fl-demo-dataset-v1", "proplet_id": "bench-proplet", "data": data}
        ),
    }


# ---- the plain Python per-example loop --------------------------------------------------------


def _fnv1a(h: int, data: bytes) -> int:
    for c in data:
        h = ((h ^ c) * 0x100000001B3) & MASK64
    return h


def _shuffle(n: int, seed: int) -> list[int]:
    order = list(range(n))
    state = seed
    for i in range(n - 1, 0, -1):
        state = (state + 0x9E3779B97F4A7C15) & MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        z ^= z >> 31
        j = z % (i + 1)
        order[i], order[j] = order[j], order[i]
    return order


def python_trainer(env: dict[str, str]) -> dict[str, Any]:
    """The trainer's documented algorithm (wasm-client/README.md), batch_size 1, as a plain
    Python loop over the examples: what one would write without numpy or WASM."""
    hyper = json.loads(env["HYPERPARAMS"])
    model = json.loads(env["MODEL_DATA"])
    data = json.loads(env["DATASET_DATA"])["data"]
    xs = [[float(v) for v in s["x"]] for s in data]
    ys = [float(s["y"]) for s in data]
    w = [float(v) for v in model["w"]]
    b = float(model["b"])
    lr = float(hyper["lr"])
    n = len(xs)
    prefix = env["ROUND_ID"].encode() + b"\0" + env["PROPLET_ID"].encode() + b"\0"
    for epoch in range(int(hyper["epochs"])):
        seed = _fnv1a(0xCBF29CE484222325, prefix + epoch.to_bytes(8, "little"))
        for i in _shuffle(n, seed):
            x = xs[i]
            z = b
            for wj, xj in zip(w, x, strict=True):
                z += wj * xj
            z = min(20.0, max(-20.0, z))
            err = 1.0 / (1.0 + math.exp(-z)) - ys[i]
            w = [wj - lr * err * xj for wj, xj in zip(w, x, strict=True)]
            b -= lr * err
    return {"w": w, "b": b}


# ---- runners ----------------------------------------------------------------------------------


class WasmTrainer:
    def __init__(self, runtime: WasmRuntime) -> None:
        self.runtime = runtime
        data = trainer_wasm().read_bytes()
        self.compiled = runtime.compile(data, hashlib.sha256(data).hexdigest())
        self.limits = Limits(timeout_s=600, memory_bytes=512 << 20, output_bytes=16 << 20)

    def run(self, env: dict[str, str]) -> tuple[float, dict[str, Any]]:
        started = time.perf_counter()
        out = self.runtime.run_sync(self.compiled, Invocation(["fl-client"], env, self.limits))
        seconds = time.perf_counter() - started
        update: dict[str, Any] = json.loads(out.stdout)["update"]
        return seconds, update


def run_native(env: dict[str, str]) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    proc = subprocess.run(
        [str(trainer_native())],
        env={**env, "PATH": os.environ.get("PATH", "")},
        capture_output=True,
        check=True,
    )
    seconds = time.perf_counter() - started
    update: dict[str, Any] = json.loads(proc.stdout)["update"]
    return seconds, update


def run_python(env: dict[str, str]) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    update = python_trainer(env)
    return time.perf_counter() - started, update


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return bool(
        np.allclose(a["w"], b["w"], rtol=1e-9, atol=1e-12)
        and math.isclose(float(a["b"]), float(b["b"]), rel_tol=1e-9, abs_tol=1e-12)
    )


def _start_costs(reps: int) -> dict[str, float]:
    """Cold start: a fresh engine compiles the module, then the demo task runs (64 x 3).
    Warm start: the module is already compiled; a new Store, instantiation and the run."""
    data = trainer_wasm().read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    env = make_env(64, 3, 1)
    limits = Limits(timeout_s=60)
    cold, compile_s, warm = [], [], []
    for _ in range(reps):
        runtime = WasmRuntime()
        started = time.perf_counter()
        compiled = runtime.compile(data, sha)
        runtime.run_sync(compiled, Invocation(["fl-client"], env, limits))
        cold.append(time.perf_counter() - started)
        compile_s.append(compiled.compile_s)
        for _ in range(5):
            started = time.perf_counter()
            hit = runtime.cached(sha)
            assert hit is not None
            runtime.run_sync(hit, Invocation(["fl-client"], env, limits))
            warm.append(time.perf_counter() - started)
    return {
        "cold_start_ms": round(median(cold) * 1000, 2),
        "compile_ms": round(median(compile_s) * 1000, 2),
        "warm_start_ms": round(median(warm) * 1000, 3),
    }


# ---- the MLP (contract v2) ----------------------------------------------------------------

MLP_SIZES = (64, 128, 10)
MLP_BATCH = 32
MLP_LR = 0.05


@dataclass(frozen=True)
class MlpTask:
    """One MLP training task: its env (HYPERPARAMS with `epochs`) and its stdin."""

    env: dict[str, str]
    stdin: bytes
    params: dict[str, Any]
    x: Any
    y: Any
    epochs: int


def make_mlp_task(n: int, epochs: int, seed: int = 11) -> MlpTask:
    rng = np.random.default_rng(seed)
    params: dict[str, Any] = {}
    for i, (n_in, n_out) in enumerate(itertools.pairwise(MLP_SIZES)):
        params[f"l{i}.w"] = rng.normal(size=(n_in, n_out)) * math.sqrt(2.0 / n_in)
        params[f"l{i}.b"] = np.zeros(n_out)
    x = rng.normal(size=(n, MLP_SIZES[0]))
    y = np.argmax(x @ rng.normal(size=(MLP_SIZES[0], MLP_SIZES[-1])), axis=1).astype(np.float64)
    env = {
        "ROUND_ID": "bench-round",
        "PROPLET_ID": "bench-proplet",
        "HYPERPARAMS": json.dumps({"epochs": epochs, "lr": MLP_LR, "batch_size": MLP_BATCH}),
    }
    stdin = safetensors.encode(params) + safetensors.encode({"x": x, "y": y})
    return MlpTask(env, stdin, params, x, y, epochs)


def numpy_mlp(task: MlpTask) -> dict[str, Any]:
    """The MLP trainer's algorithm (wasm-client/README.md) in numpy, a batch at a time."""
    theta = {k: v.copy() for k, v in task.params.items()}
    count = len(theta) // 2
    n = len(task.y)
    labels = task.y.astype(np.int64)
    prefix = b"bench-round\0bench-proplet\0"
    for epoch in range(task.epochs):
        order = _shuffle(n, _fnv1a(0xCBF29CE484222325, prefix + epoch.to_bytes(8, "little")))
        for start in range(0, n, MLP_BATCH):
            idx = order[start : start + MLP_BATCH]
            acts, zs = [task.x[idx]], []
            for i in range(count):
                z = acts[-1] @ theta[f"l{i}.w"] + theta[f"l{i}.b"]
                zs.append(z)
                if i < count - 1:
                    acts.append(np.maximum(z, 0.0))
            e = np.exp(zs[-1] - zs[-1].max(axis=1, keepdims=True))
            dz = e / e.sum(axis=1, keepdims=True)
            dz[np.arange(len(idx)), labels[idx]] -= 1.0
            for i in reversed(range(count)):
                gw, gb = acts[i].T @ dz, dz.sum(axis=0)
                if i:
                    dz = (dz @ theta[f"l{i}.w"].T) * (zs[i - 1] > 0)
                theta[f"l{i}.w"] -= MLP_LR * gw / len(idx)
                theta[f"l{i}.b"] -= MLP_LR * gb / len(idx)
    return theta


class WasmMlp:
    def __init__(self, runtime: WasmRuntime, simd: bool) -> None:
        self.runtime = runtime
        data = mlp_wasm(simd).read_bytes()
        self.compiled = runtime.compile(data, hashlib.sha256(data).hexdigest())
        self.limits = Limits(timeout_s=600, memory_bytes=512 << 20, output_bytes=16 << 20)

    def run(self, task: MlpTask) -> tuple[float, dict[str, Any]]:
        """CPU seconds of the run (`run_sync` runs the module in this thread)."""
        started = time.thread_time()
        out = self.runtime.run_sync(
            self.compiled, Invocation(["fl-mlp"], task.env, self.limits, task.stdin)
        )
        seconds = time.thread_time() - started
        return seconds, dict(safetensors.decode(out.stdout, "update").tensors)


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_native_mlp(task: MlpTask) -> tuple[float, dict[str, Any]]:
    started = _children_cpu_s()
    proc = subprocess.run(
        [str(mlp_native())],
        input=task.stdin,
        env={**task.env, "PATH": os.environ.get("PATH", "")},
        capture_output=True,
        check=True,
    )
    seconds = _children_cpu_s() - started
    return seconds, dict(safetensors.decode(proc.stdout, "update").tensors)


def run_numpy_mlp(task: MlpTask) -> tuple[float, dict[str, Any]]:
    """CPU seconds of the whole process (numpy's BLAS may use threads of its own)."""
    started = time.process_time()
    update = numpy_mlp(task)
    return time.process_time() - started, update


def _same_tensors(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(np.allclose(a[k], b[k], rtol=0, atol=1e-9) for k in a)


def run_mlp(rec: Recorder, smoke: bool) -> None:
    n = 256 if smoke else 1024
    reps = 2 if smoke else 7
    epochs = 2 if smoke else 20
    runtime = WasmRuntime()
    runners = {
        "wasm": WasmMlp(runtime, simd=True).run,
        "native": run_native_mlp,
        "numpy": run_numpy_mlp,
    }
    if not smoke:  # one more build; what SIMD buys is a full run's question
        runners["wasm_nosimd"] = WasmMlp(runtime, simd=False).run
    full, zero = make_mlp_task(n, epochs), make_mlp_task(n, 0)
    updates = {impl: runner(make_mlp_task(n, 2))[1] for impl, runner in runners.items()}
    train_s: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(reps):
        for impl, runner in runners.items():
            t_full, _ = runner(full)
            t_zero, _ = runner(zero)
            train_s[impl].append(max(t_full - t_zero, 1e-9))
    rate = {k: n * epochs / median(v) for k, v in train_s.items()}
    agree = all(_same_tensors(updates["wasm"], u) for u in updates.values())
    ratio = rate["wasm"] / rate["native"]
    figures = {
        **{f"{k}_samples_per_s": round(v) for k, v in rate.items()},
        "wasm_vs_native": round(ratio, 3),
        "wasm_vs_numpy": round(rate["wasm"] / rate["numpy"], 2),
        "same_update": agree,
    }
    if "wasm_nosimd" in rate:
        figures["simd_speedup"] = round(rate["wasm"] / rate["wasm_nosimd"], 2)
    params = sum(a.size for a in full.params.values())
    nosimd = f" (no SIMD {rate['wasm_nosimd'] / 1e3:.1f} k)" if "wasm_nosimd" in rate else ""
    rec.record(
        MLP_NAME,
        {
            "samples": n,
            "layers": list(MLP_SIZES),
            "parameters": params,
            "batch_size": MLP_BATCH,
            "epochs": epochs,
            "reps": reps,
        },
        figures,
        targets={
            f">= {MLP_TARGET_RATIO} of native": ratio >= MLP_TARGET_RATIO,
            "same update": agree,
        },
        summary=(
            f"MLP {'-'.join(map(str, MLP_SIZES))} ({params} params), {n} samples, batch "
            f"{MLP_BATCH}: wasm {rate['wasm'] / 1e3:.1f} k samples/s{nosimd}, native "
            f"{rate['native'] / 1e3:.1f} k/s, numpy "
            f"{rate['numpy'] / 1e3:.1f} k/s; wasm/native {ratio:.2f}, wasm/numpy "
            f"{figures['wasm_vs_numpy']:.2f}"
        ),
    )


async def run(rec: Recorder, smoke: bool) -> None:
    await run_linear(rec, smoke)
    run_mlp(rec, smoke)
    run_fuel(rec, smoke)


@dataclass(frozen=True)
class Metered:
    """One trainer (its wasm bytes) in a runtime with or without fuel metering."""

    runtime: WasmRuntime
    wasm: bytes

    def run(self, argv: str, env: dict[str, str], stdin: bytes = b"") -> tuple[float, int]:
        """(CPU seconds of the run's thread, fuel it consumed)."""
        compiled = self.runtime.compile(self.wasm, hashlib.sha256(self.wasm).hexdigest())
        limits = Limits(timeout_s=600, memory_bytes=512 << 20, output_bytes=16 << 20)
        started = time.thread_time()
        out = self.runtime.run_sync(compiled, Invocation([argv], env, limits, stdin))
        return time.thread_time() - started, out.fuel_consumed


def run_fuel(rec: Recorder, smoke: bool) -> None:
    reps = 2 if smoke else 7
    metered, plain = WasmRuntime(), WasmRuntime(metering=False)
    linear_n, linear_e = (200, 10) if smoke else (1000, 200)
    mlp_n, mlp_e = (256, 2) if smoke else (1024, 20)
    linear = trainer_wasm().read_bytes()
    mlp = mlp_wasm(True).read_bytes()
    mlp_full, mlp_zero = make_mlp_task(mlp_n, mlp_e), make_mlp_task(mlp_n, 0)
    # trainer -> (its wasm, argv[0], samples x epochs, the full run's and the zero-epoch
    # run's (env, stdin)).
    Run = tuple[dict[str, str], bytes]
    cases: dict[str, tuple[bytes, str, int, Run, Run]] = {
        "linear": (
            linear,
            "fl-client",
            linear_n * linear_e,
            (make_env(linear_n, 8, linear_e), b""),
            (make_env(linear_n, 8, 0), b""),
        ),
        "mlp": (
            mlp,
            "fl-mlp",
            mlp_n * mlp_e,
            (mlp_full.env, mlp_full.stdin),
            (mlp_zero.env, mlp_zero.stdin),
        ),
    }
    figures: dict[str, Any] = {}
    targets: dict[str, bool] = {}
    parts = []
    for name, (wasm, argv, work, full, zero) in cases.items():
        runners = {"metered": Metered(metered, wasm), "plain": Metered(plain, wasm)}
        for r in runners.values():  # compile and warm up
            r.run(argv, *zero)
        train_s: dict[str, list[float]] = {k: [] for k in runners}
        fuels: set[int] = set()
        fuel_zero = 0
        for _ in range(reps):
            for kind, r in runners.items():
                t_full, f_full = r.run(argv, *full)
                t_zero, f_zero = r.run(argv, *zero)
                train_s[kind].append(max(t_full - t_zero, 1e-9))
                if kind == "metered":
                    fuels.add(f_full)
                    fuel_zero = f_zero
        rate = {k: work / median(v) for k, v in train_s.items()}
        ratio = rate["metered"] / rate["plain"]
        per_sample = (max(fuels) - fuel_zero) / work
        figures[f"{name}_metered_samples_per_s"] = round(rate["metered"])
        figures[f"{name}_plain_samples_per_s"] = round(rate["plain"])
        figures[f"{name}_metered_vs_plain"] = round(ratio, 3)
        figures[f"{name}_fuel_per_sample_epoch"] = round(per_sample, 1)
        figures[f"{name}_fuel_same_every_run"] = len(fuels) == 1
        targets[f"{name} metered >= {FUEL_TARGET_RATIO} of plain"] = ratio >= FUEL_TARGET_RATIO
        targets[f"{name} fuel deterministic"] = len(fuels) == 1
        parts.append(
            f"{name}: metered {rate['metered'] / 1e3:.1f} k samples/s, plain "
            f"{rate['plain'] / 1e3:.1f} k/s, ratio {ratio:.3f}, {per_sample:.0f} fuel a "
            "sample-epoch"
        )
    rec.record(
        FUEL_NAME,
        {
            "linear": {"samples": linear_n, "features": 8, "epochs": linear_e},
            "mlp": {"samples": mlp_n, "layers": list(MLP_SIZES), "epochs": mlp_e},
            "reps": reps,
        },
        figures,
        targets=targets,
        summary="; ".join(parts),
    )


async def run_linear(rec: Recorder, smoke: bool) -> None:
    n, d = (200, 4) if smoke else (1000, 8)
    reps = 2 if smoke else 5
    epochs = {
        "wasm": 20 if smoke else 1000,
        "native": 20 if smoke else 1000,
        "python": 2 if smoke else 20,
    }
    envs = {impl: (make_env(n, d, e), make_env(n, d, 0)) for impl, e in epochs.items()}
    trainer = WasmTrainer(WasmRuntime())
    runners = {"wasm": trainer.run, "native": run_native, "python": run_python}
    train_s: dict[str, list[float]] = {k: [] for k in runners}
    updates: dict[str, dict[str, Any]] = {}
    for impl, runner in runners.items():  # warm-up (and the updates to compare)
        runner(envs[impl][1])
        _, updates[impl] = runner(make_env(n, d, epochs["python"]))
    for _ in range(reps):
        for impl, runner in runners.items():
            full, _ = runner(envs[impl][0])
            base, _ = runner(envs[impl][1])
            train_s[impl].append(max(full - base, 1e-9))
    rate = {k: n * epochs[k] / median(v) for k, v in train_s.items()}
    agree = _same(updates["wasm"], updates["native"]) and _same(updates["wasm"], updates["python"])
    starts = _start_costs(2 if smoke else 5)
    ratio = rate["wasm"] / rate["native"]
    figures = {
        "wasm_samples_per_s": round(rate["wasm"]),
        "native_samples_per_s": round(rate["native"]),
        "python_samples_per_s": round(rate["python"]),
        "wasm_vs_native": round(ratio, 3),
        "wasm_vs_python": round(rate["wasm"] / rate["python"], 1),
        "same_update": agree,
        **starts,
    }
    rec.record(
        NAME,
        {"samples": n, "features": d, "epochs": epochs, "batch_size": 1, "reps": reps},
        figures,
        targets={f">= {TARGET_RATIO} of native": ratio >= TARGET_RATIO, "same update": agree},
        summary=(
            f"{n}x{d}: wasm {rate['wasm'] / 1e6:.2f} M samples/s, native "
            f"{rate['native'] / 1e6:.2f} M/s, python {rate['python'] / 1e3:.0f} k/s; wasm/native "
            f"{ratio:.2f}, wasm/python {figures['wasm_vs_python']:.0f}x; cold start "
            f"{starts['cold_start_ms']:.1f} ms (compile {starts['compile_ms']:.1f}), warm "
            f"{starts['warm_start_ms']:.2f} ms"
        ),
    )
