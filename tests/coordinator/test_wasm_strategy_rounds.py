"""Strategy "wasm" through real rounds (registry, aggregator and coordinator in this process,
real Mosquitto, the module pulled by digest from a real OCI registry): the Zig FedAvg and
FedMedian modules give the built-in rules' models to the last bit; a module that traps,
loops, over-allocates, exits non-zero, floods stdout, answers the wrong shape or does not
declare the contract fails the round with a reason naming the module, and no model version
is stored; an unpinned module is refused when the round is configured
(docs/verifiability.md, "Strategies as sandboxed modules")."""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import wasmtime

from propeller.v1 import coordinator_pb2
from proplet.runner import WasmRuntime
from server.aggregator.strategies import choose_strategy
from server.aggregator.strategies.wasm import load_strategy
from server.config import MqttConfig
from server.errors import Unavailable
from server.oci import ImageRef, OciClient
from server.tensors import Tensors
from tests.conftest import load_wasm_build
from tests.coordinator.helpers import make_update
from tests.support.clients import Clients
from tests.support.cluster import round_clients
from tests.support.infra import OciRegistry, oci_registry

pytestmark = pytest.mark.integration

S = coordinator_pb2
V0 = "fl/models/global_model_v0"
UPDATES = [
    make_update("a", [1.0, 2.0, 3.0], 1.0, 10),
    make_update("b", [0.0, -1.0, 4.0], -2.0, 30),
    make_update("c", [5.0, 5.0, 5.5], 0.5, 60),
    make_update("d", [0.25, 7.0, -3.0], 0.125, 7),
]


def push(registry: OciRegistry, path: Path, repo: str) -> str:
    """Push `path` as `repo:latest`; the reference pinned to the pushed manifest."""
    client = OciClient(registry.host, insecure=True, timeout=30.0)
    try:
        result = client.push(path, ImageRef.push_target(f"{registry.host}/{repo}:latest"))
    finally:
        client.close()
    assert result.pinned
    return result.pinned


def wat_module(tmp_path: Path, name: str, body: str, marker: bool = True) -> Path:
    """A WASI command written in WAT, declaring the strategy contract unless told not to."""
    export = '(func (export "propeller_strategy_v1"))' if marker else ""
    text = f"""(module
      (import "wasi_snapshot_preview1" "fd_write"
        (func $fd_write (param i32 i32 i32 i32) (result i32)))
      (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
      (memory (export "memory") 1)
      {export}
      {body})"""
    path = tmp_path / f"{name}.wasm"
    path.write_bytes(wasmtime.wat2wasm(text))
    return path


def wrong_shape_body() -> str:
    """Writes a well-formed container whose `w` has 2 elements (the model's has 3)."""
    header = json.dumps(
        {
            "w": {"dtype": "F64", "shape": [2], "data_offsets": [0, 16]},
            "b": {"dtype": "F64", "shape": [], "data_offsets": [16, 24]},
        }
    ).encode()
    header += b" " * (-len(header) % 8)
    container = struct.pack("<Q", len(header)) + header + bytes(24)
    data = "".join(f"\\{b:02x}" for b in container)
    return f"""(data (i32.const 64) "{data}")
      (func (export "_start")
        (i32.store (i32.const 0) (i32.const 64))
        (i32.store (i32.const 4) (i32.const {len(container)}))
        (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8))))"""


BAD_MODULES = {
    "trap": ('(func (export "_start") unreachable)', "trap: ", True),
    "loop": ('(func (export "_start") (loop (br 0)))', "deadline exceeded after 1s", True),
    "alloc": (
        """(func (export "_start")
          (loop (br_if 0 (i32.ne (memory.grow (i32.const 16)) (i32.const -1))))
          unreachable)""",
        "memory limit exceeded",
        True,
    ),
    "shape": (wrong_shape_body(), "output: tensor w is float64 [2], the model's is", True),
    "exit": ('(func (export "_start") (call $proc_exit (i32.const 3)))', "exit status 3", True),
    # Writes 60,000 bytes at a time for ever: past the model's bytes + 64 KiB + 64 an update.
    "flood": (
        """(func (export "_start")
          (i32.store (i32.const 0) (i32.const 1024))
          (i32.store (i32.const 4) (i32.const 60000))
          (loop
            (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
            (br 0)))""",
        "output too large: more than 65824 bytes on stdout",
        True,
    ),
    "unmarked": ('(func (export "_start"))', "no export propeller_strategy_v1", False),
}


@pytest.fixture(scope="module")
def zig_modules(registry: OciRegistry) -> dict[str, str]:
    build = load_wasm_build()
    return {
        name: push(registry, build.build_strategy(name), f"strategies/{name}")
        for name in ("fedavg", "fedmedian")
    }


@pytest.fixture
async def fl(mqtt: MqttConfig) -> AsyncIterator[Clients]:
    async with round_clients(mqtt) as c:
        yield c


async def run_round(c: Clients, round_id: str, **fields: str) -> coordinator_pb2.RoundStatus:
    participants = [u.proplet_id for u in UPDATES]
    await c.configure(round_id, model_ref=V0, participants=participants, **fields)
    for u in UPDATES:
        await c.submit(round_id, u)
    return await c.wait_state(round_id)


def builtin(name: str) -> Tensors:
    strategy = choose_strategy(name, "").start()
    for u in UPDATES:
        strategy.add(u.tensors, u.num_samples)
    return strategy.result(None, None)[0]


@pytest.mark.parametrize("name", ["fedavg", "fedmedian"])
async def test_a_zig_module_round_gives_the_builtin_model(
    fl: Clients, zig_modules: dict[str, str], name: str
) -> None:
    params = json.dumps({"module": zig_modules[name]})
    status = await run_round(fl, "r1", strategy_name="wasm", strategy_params_json=params)
    assert status.state == S.ROUND_STATE_COMPLETED, status.failure_reason
    assert status.strategy_name == "wasm"
    got = await fl.model(status.new_model_version)
    want = builtin(name)
    assert list(got) == list(want)
    for tensor in want:
        np.testing.assert_array_equal(got[tensor], want[tensor].reshape(got[tensor].shape))


@pytest.mark.parametrize("kind", list(BAD_MODULES))
async def test_a_failing_module_fails_the_round_and_stores_nothing(
    fl: Clients, registry: OciRegistry, zig_modules: dict[str, str], tmp_path: Path, kind: str
) -> None:
    body, reason, marker = BAD_MODULES[kind]
    ref = push(registry, wat_module(tmp_path, kind, body, marker), f"strategies/bad-{kind}")
    params = json.dumps({"module": ref, "timeout_s": 1, "memory_mib": 16})
    before = await fl.versions()
    status = await run_round(fl, "r1", strategy_name="wasm", strategy_params_json=params)
    assert status.state == S.ROUND_STATE_FAILED
    assert status.failure_reason.startswith("aggregation failed: "), status.failure_reason
    assert f"strategy wasm: module {ImageRef.parse(ref)}: " in status.failure_reason
    assert reason in status.failure_reason, status.failure_reason
    assert status.new_model_version == 0
    assert await fl.versions() == before
    # The aggregator carries on: the next round, with a sound module, completes.
    params = json.dumps({"module": zig_modules["fedavg"]})
    after = await run_round(fl, "r2", strategy_name="wasm", strategy_params_json=params)
    assert after.state == S.ROUND_STATE_COMPLETED, after.failure_reason


async def test_a_module_missing_from_the_registry_fails_the_round(
    fl: Clients, registry: OciRegistry
) -> None:
    ref = f"{registry.host}/strategies/absent@sha256:{'0' * 64}"
    params = json.dumps({"module": ref})
    before = await fl.versions()
    status = await run_round(fl, "r1", strategy_name="wasm", strategy_params_json=params)
    assert status.state == S.ROUND_STATE_FAILED
    assert "strategies/absent" in status.failure_reason, status.failure_reason
    assert await fl.versions() == before


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ("", "strategy_params_json.module"),
        ('{"module": "127.0.0.1:5000/strategies/fedavg:latest"}', "strategy_params_json.module"),
        ('{"module": 3}', "strategy_params_json.module"),
        (
            '{"module": "127.0.0.1:5000/s@sha256:' + "a" * 64 + '", "memory_mib": 0}',
            "strategy_params_json.memory_mib",
        ),
        (
            '{"module": "127.0.0.1:5000/s@sha256:' + "a" * 64 + '", "timeout_s": 7200}',
            "strategy_params_json.timeout_s",
        ),
    ],
)
async def test_an_unpinned_or_bad_module_parameter_is_refused_when_configured(
    fl: Clients, params: str, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        await fl.configure("r1", strategy_name="wasm", strategy_params_json=params)
    assert excinfo.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (excinfo.value.details() or "").startswith(f"{field}:"), excinfo.value.details()


async def test_a_pinned_module_is_pulled_once(tmp_path: Path) -> None:
    """After the first pull, later rounds find the module compiled without asking the
    registry: here the registry is gone by the second load."""
    runtime = WasmRuntime()
    with oci_registry(tmp_path / "oci") as own:
        ref = ImageRef.parse(push(own, load_wasm_build().build_strategy("fedavg"), "s/avg"))
        first = await load_strategy(runtime, ref)
    assert await load_strategy(runtime, ref) is first
    assert runtime.compiles == 1
    # Another reference is pulled: with the registry gone, it fails naming the image.
    other = dataclasses.replace(ref, digest="sha256:" + "1" * 64)
    with pytest.raises(Unavailable, match="s/avg"):
        await load_strategy(runtime, other)
