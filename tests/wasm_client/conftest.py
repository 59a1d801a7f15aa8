"""Session fixtures for the wasm training-client tests: build both modules once, compile
them once with wasmtime, and hand out runners."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import wasmtime

from tests.wasm_client.harness import WasmRunner

WASM_CLIENT_DIR = Path(__file__).resolve().parents[2] / "wasm-client"


def _load_build_module() -> ModuleType:
    # `wasm-client` is not a valid package name, so load build.py by path.
    spec = importlib.util.spec_from_file_location(
        "wasm_client_build_tests", WASM_CLIENT_DIR / "build.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def wasm_build() -> ModuleType:
    return _load_build_module()


@pytest.fixture(scope="session")
def fl_client_wasm(wasm_build: ModuleType) -> Path:
    path: Path = wasm_build.build()
    return path


@pytest.fixture(scope="session")
def minimal_client_wasm(wasm_build: ModuleType) -> Path:
    path: Path = wasm_build.build_minimal()
    return path


@pytest.fixture(scope="session")
def wasm_engine() -> wasmtime.Engine:
    return wasmtime.Engine()


@pytest.fixture(scope="session")
def fl_client(wasm_engine: wasmtime.Engine, fl_client_wasm: Path) -> WasmRunner:
    return WasmRunner(wasm_engine, fl_client_wasm)


@pytest.fixture(scope="session")
def minimal_client(wasm_engine: wasmtime.Engine, minimal_client_wasm: Path) -> WasmRunner:
    return WasmRunner(wasm_engine, minimal_client_wasm)
