#!/usr/bin/env python3
"""Build the propeller-fl wasm training client (and a foreign minimal module).

Importable (``build()``, ``build_minimal()``) and runnable::

    python wasm-client/build.py [--target wasm32-wasi] [--out DIR] [--optimize ReleaseFast]
    python wasm-client/build.py --minimal [--out DIR]
    python wasm-client/build.py --strategy fedavg|fedmedian [--out DIR]

Each prints the path of the built artefact.  Zig comes from the ``ziglang``
PyPI wheel of the running interpreter (``sys.executable -m ziglang``); the Zig
caches live in ``wasm-client/build/zig-cache`` so a clean machine (root, no
HOME) works.  A rebuild is skipped when a content-hash stamp next to the output
matches the sources, the compiler version and the build flags.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC_DIR = HERE / "src"
MAIN_ZIG = SRC_DIR / "main.zig"
MLP_ZIG = SRC_DIR / "mlp.zig"
MINIMAL_C = HERE / "examples" / "minimal.c"
# The aggregation strategies written as modules (strategy contract v1): name -> source.
STRATEGY_SOURCES = {
    "fedavg": SRC_DIR / "fedavg_strategy.zig",
    "fedmedian": SRC_DIR / "fedmedian_strategy.zig",
}
DEFAULT_OUT_DIR = HERE / "build"
CACHE_DIR = DEFAULT_OUT_DIR / "zig-cache"

WASM_NAME = "fl-client.wasm"
NATIVE_NAME = "fl-client-native"
MINIMAL_NAME = "minimal-client.wasm"
MLP_WASM_NAME = "fl-mlp.wasm"
MLP_NATIVE_NAME = "fl-mlp-native"
# WASM SIMD for the MLP's vector loops (wasmtime supports simd128 by default).
WASM_SIMD_CPU = "generic+simd128"

OPTIMIZE_MODES = ("Debug", "ReleaseSafe", "ReleaseFast", "ReleaseSmall")


class BuildError(RuntimeError):
    """The Zig compiler failed."""


def _zig_version() -> str:
    try:
        return importlib.metadata.version("ziglang")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - broken install
        return "unknown"


def _zig_env() -> dict[str, str]:
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["ZIG_GLOBAL_CACHE_DIR"] = str(CACHE_DIR / "global")
    env["ZIG_LOCAL_CACHE_DIR"] = str(CACHE_DIR / "local")
    return env


def _digest(sources: Sequence[Path], flags: Sequence[str]) -> str:
    h = hashlib.sha256()
    h.update(f"ziglang={_zig_version()}\0".encode())
    for flag in flags:
        h.update(flag.encode() + b"\0")
    for src in sources:
        h.update(src.name.encode() + b"\0")
        h.update(src.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def _stamp_path(output: Path) -> Path:
    return output.with_name(output.name + ".stamp")


def _up_to_date(output: Path, digest: str) -> bool:
    stamp = _stamp_path(output)
    if not output.is_file() or not stamp.is_file():
        return False
    return stamp.read_text(encoding="utf-8").strip() == digest


def _compile(args: list[str], output: Path, digest: str) -> Path:
    """Run ``zig <args> <emit-to tmp>`` and atomically move the result into place."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    if args[0] == "build-exe":
        cmd = [sys.executable, "-m", "ziglang", *args, f"-femit-bin={tmp}"]
    else:
        cmd = [sys.executable, "-m", "ziglang", *args, "-o", str(tmp)]
    proc = subprocess.run(
        cmd, env=_zig_env(), cwd=HERE, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise BuildError(
            f"zig failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout}{proc.stderr}"
        )
    os.replace(tmp, output)
    stamp_tmp = _stamp_path(tmp)
    stamp_tmp.write_text(digest + "\n", encoding="utf-8")
    os.replace(stamp_tmp, _stamp_path(output))
    return output


def output_name(target: str) -> str:
    """Artefact file name for a Zig target triple."""
    if target.startswith("wasm"):
        return WASM_NAME
    if "windows" in target:
        return NATIVE_NAME + ".exe"
    return NATIVE_NAME


def build(
    target: str = "wasm32-wasi", out_dir: Path | None = None, optimize: str = "ReleaseFast"
) -> Path:
    """Build ``src/main.zig`` (the linear trainer, contract v1) for ``target``; return the
    artefact path.

    ``target`` is a Zig triple (``wasm32-wasi``, ``x86_64-linux`` or ``native``).
    The build is skipped when the existing artefact's stamp matches.
    """
    return _build_zig(MAIN_ZIG, output_name(target), target, out_dir, optimize, [])


def build_mlp(
    target: str = "wasm32-wasi",
    out_dir: Path | None = None,
    optimize: str = "ReleaseFast",
    simd: bool = True,
) -> Path:
    """Build ``src/mlp.zig`` (the MLP trainer, contract v2) for ``target``; return the path.

    For wasm the exported marker ``propeller_contract_v2`` is kept (``-rdynamic``) and,
    with ``simd``, the module uses WASM SIMD (simd128)."""
    extra = []
    if target.startswith("wasm"):
        extra = ["-rdynamic"] + (["-mcpu", WASM_SIMD_CPU] if simd else [])
        name = MLP_WASM_NAME if simd else "fl-mlp-nosimd.wasm"
    else:
        name = MLP_NATIVE_NAME + (".exe" if "windows" in target else "")
    return _build_zig(MLP_ZIG, name, target, out_dir, optimize, extra)


def build_strategy(name: str, out_dir: Path | None = None, optimize: str = "ReleaseFast") -> Path:
    """Build the strategy module ``name`` (``fedavg`` or ``fedmedian``, ``STRATEGY_SOURCES``)
    for wasm32-wasi as ``<name>-strategy.wasm``; the marker ``propeller_strategy_v1`` is kept
    (``-rdynamic``). WASM SIMD (simd128, deterministic; never relaxed-simd): lanes are
    separate elements, so the arithmetic per element is the scalar one."""
    if name not in STRATEGY_SOURCES:
        raise ValueError(f"strategy must be one of {sorted(STRATEGY_SOURCES)}, not {name!r}")
    return _build_zig(
        STRATEGY_SOURCES[name],
        f"{name}-strategy.wasm",
        "wasm32-wasi",
        out_dir,
        optimize,
        ["-rdynamic", "-mcpu", WASM_SIMD_CPU],
    )


def _build_zig(
    source: Path,
    name: str,
    target: str,
    out_dir: Path | None,
    optimize: str,
    extra: list[str],
) -> Path:
    if optimize not in OPTIMIZE_MODES:
        raise ValueError(f"optimize must be one of {OPTIMIZE_MODES}, not {optimize!r}")
    out = (out_dir if out_dir is not None else DEFAULT_OUT_DIR).resolve() / name
    sources = sorted(SRC_DIR.rglob("*.zig"))
    args = [
        "build-exe",
        "-target",
        target,
        "-O",
        optimize,
        "-fstrip",
        *extra,
        "--cache-dir",
        str(CACHE_DIR / "local"),
        "--global-cache-dir",
        str(CACHE_DIR / "global"),
        str(source),
    ]
    digest = _digest(sources, ["build-exe", source.name, target, optimize, "-fstrip", *extra])
    if _up_to_date(out, digest):
        return out
    return _compile(args, out, digest)


def build_minimal(out_dir: Path | None = None) -> Path:
    """Build ``examples/minimal.c``, a foreign client honouring the same contract, for WASI."""
    out = (out_dir if out_dir is not None else DEFAULT_OUT_DIR).resolve() / MINIMAL_NAME
    flags = ["cc", "-target", "wasm32-wasi", "-O2", "-s"]
    digest = _digest([MINIMAL_C], flags)
    if _up_to_date(out, digest):
        return out
    return _compile([*flags, str(MINIMAL_C)], out, digest)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the propeller-fl training client.")
    parser.add_argument(
        "--target", default="wasm32-wasi", help="Zig target triple (default wasm32-wasi)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="output directory (default wasm-client/build)"
    )
    parser.add_argument("--optimize", default="ReleaseFast", choices=OPTIMIZE_MODES)
    parser.add_argument("--minimal", action="store_true", help="build examples/minimal.c instead")
    parser.add_argument("--mlp", action="store_true", help="build the MLP trainer (src/mlp.zig)")
    parser.add_argument(
        "--strategy", choices=sorted(STRATEGY_SOURCES), help="build a strategy module instead"
    )
    ns = parser.parse_args(argv)
    try:
        if ns.minimal:
            path = build_minimal(ns.out)
        elif ns.strategy:
            path = build_strategy(ns.strategy, ns.out, ns.optimize)
        elif ns.mlp:
            path = build_mlp(ns.target, ns.out, ns.optimize)
        else:
            path = build(ns.target, ns.out, ns.optimize)
    except BuildError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
