"""Session fixtures: one real Mosquitto and one real OCI registry for the whole run; each test
isolates itself with its own MQTT namespace."""

from __future__ import annotations

import importlib.util
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from server.topics import Topics
from tests.infra import Mosquitto, OciRegistry, mosquitto, oci_registry

ROOT = Path(__file__).resolve().parent.parent


def load_wasm_build() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "wasm_client_build", ROOT / "wasm-client" / "build.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    with mosquitto(tmp_path_factory.mktemp("mosquitto")) as b:
        yield b


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OciRegistry]:
    with oci_registry(tmp_path_factory.mktemp("oci")) as r:
        yield r


@pytest.fixture(scope="session")
def trainer_wasm() -> Path:
    path: Path = load_wasm_build().build()
    return path


@pytest.fixture
def topics() -> Topics:
    """A namespace of its own per test, so tests never see each other's messages."""
    return Topics(domain=f"t{uuid.uuid4().hex[:8]}", channel="fl")
