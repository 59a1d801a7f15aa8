"""The registry's SQLite store (`registry.sqlite` in the state directory) through a real gRPC
server: versions survive a restart with their bytes, sha256, specs and created_at; a version is
written once (ALREADY_EXISTS after); damaged rows are reported (DATA_LOSS), never served;
version files of the older directory format are imported; and the configuration picks the
store as docs/configuration.md says."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from propeller.v1 import model_registry_pb2, model_registry_pb2_grpc
from server.registry.app import RegistryApp, RegistryConfig
from server.registry.store import (
    REGISTRY_DB_FILE,
    DirectoryModelStore,
    InMemoryModelStore,
    SqliteModelStore,
    WriteAbandoned,
)
from server.streams import model_stream, read_model_stream
from server.tensors import Tensors, sha256_of
from tests.services.harness import RPC_TIMEOUT, served

Stub = Any  # generated gRPC stubs carry no type information


@asynccontextmanager
async def registry(
    state_dir: Path | None, data_dir: Path | None = None
) -> AsyncIterator[tuple[Stub, RegistryApp]]:
    config = RegistryConfig(addr="127.0.0.1:0", data_dir=data_dir, state_dir=state_dir)
    async with RegistryApp(config) as app, served(app.bindings) as ch:
        yield model_registry_pb2_grpc.ModelRegistryStub(ch), app


def model(w: list[float], b: float, dtype: str = "<f8") -> Tensors:
    return {"w": np.asarray(w, dtype=dtype), "b": np.asarray(b, dtype=dtype)}


async def put(stub: Stub, tensors: Tensors, version: int | None = None) -> Any:
    return await stub.PutModel(iter(model_stream(tensors, 0, version=version)), timeout=RPC_TIMEOUT)


async def get(stub: Stub, version: int) -> Tensors:
    call = stub.GetModel(model_registry_pb2.GetModelRequest(version=version), timeout=RPC_TIMEOUT)
    header, tensors = await read_model_stream(call)
    assert header.sha256 == sha256_of(tensors)
    return tensors


async def listed(stub: Stub) -> list[Any]:
    reply = await stub.ListModels(model_registry_pb2.ListModelsRequest(), timeout=RPC_TIMEOUT)
    return list(reply.models)


async def rpc_error(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await call
    return exc.value.code(), exc.value.details() or ""


def same(a: Tensors, b: Tensors) -> bool:
    return list(a) == list(b) and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and np.array_equal(a[k], b[k])
        for k in a
    )


async def test_versions_survive_a_restart_with_every_field(tmp_path: Path) -> None:
    state = tmp_path / "state"
    mixed: Tensors = {
        "w": np.arange(12, dtype="<f4").reshape(3, 4),
        "empty": np.zeros((0, 5), dtype="<f8"),
        "b": np.asarray(-1.5, dtype="<f8"),
    }
    async with registry(state) as (stub, app):
        assert isinstance(app.store, SqliteModelStore)
        v0 = await stub.InitModel(model_registry_pb2.InitModelRequest(dimension=3), timeout=10)
        v1 = await put(stub, mixed)
        before = await listed(stub)
    assert (state / REGISTRY_DB_FILE).is_file()
    async with registry(state) as (stub, _):
        assert await listed(stub) == before
        assert [m.version for m in before] == [0, 1]
        assert (before[0].sha256, before[1].sha256) == (v0.sha256, v1.sha256)
        assert before[1].created_at == v1.created_at > 0
        assert same(await get(stub, 1), mixed)
        assert same(await get(stub, 0), model([0.0, 0.0, 0.0], 0.0))
        assert (await put(stub, model([1.0], 1.0))).version == 2


async def test_a_version_is_written_once(tmp_path: Path) -> None:
    async with registry(tmp_path) as (stub, _):
        first = model([1.0, 2.0], 3.0)
        await put(stub, first, version=4)
        code, details = await rpc_error(put(stub, model([9.0, 9.0], 9.0), version=4))
        assert code == grpc.StatusCode.ALREADY_EXISTS and "4" in details
        init = model_registry_pb2.InitModelRequest(dimension=2)
        assert (await stub.InitModel(init, timeout=RPC_TIMEOUT)).version == 0
        code, _ = await rpc_error(stub.InitModel(init, timeout=RPC_TIMEOUT))
        assert code == grpc.StatusCode.ALREADY_EXISTS
        assert same(await get(stub, 4), first)
        # Auto-numbering continues above the highest stored version.
        assert (await put(stub, model([0.0], 0.0))).version == 5


async def test_two_stores_on_one_file_never_share_a_version(tmp_path: Path) -> None:
    """Two registry processes over one state file: the primary key settles who wins."""
    path = tmp_path / REGISTRY_DB_FILE
    a, b = SqliteModelStore(path), SqliteModelStore(path)
    try:
        first = model([1.0], 1.0)
        a.put(0, first, sha256_of(first))
        with pytest.raises(Exception, match="already exists"):
            b.put(0, model([2.0], 2.0), sha256_of(model([2.0], 2.0)))
        stored = b.get(0)
        assert stored is not None and same(dict(stored.tensors), first)
        assert b.versions() == [0]
    finally:
        a.close()
        b.close()


def test_an_abandoned_write_stores_nothing(tmp_path: Path) -> None:
    store = SqliteModelStore(tmp_path / REGISTRY_DB_FILE)
    try:
        tensors = model([1.0, 2.0], 3.0)
        gave_up = threading.Event()
        gave_up.set()
        with pytest.raises(WriteAbandoned):
            store.put(0, tensors, sha256_of(tensors), abandoned=gave_up)
        assert store.versions() == []
        store.put(0, tensors, sha256_of(tensors), abandoned=threading.Event())
        assert store.versions() == [0]
    finally:
        store.close()


async def test_damaged_rows_are_reported_not_served(tmp_path: Path) -> None:
    async with registry(tmp_path) as (stub, _):
        for i in range(3):
            await put(stub, model([float(i), 1.0], 2.0))
    conn = sqlite3.connect(tmp_path / REGISTRY_DB_FILE)
    try:
        # Bit rot in v1's bytes (same length), and v2's bytes cut short.
        data = bytearray(conn.execute("SELECT data FROM models WHERE version = 1").fetchone()[0])
        data[-3] ^= 0xFF
        conn.execute("UPDATE models SET data = ? WHERE version = 1", (bytes(data),))
        conn.execute("UPDATE models SET data = substr(data, 1, 10) WHERE version = 2")
        conn.commit()
    finally:
        conn.close()
    async with registry(tmp_path) as (stub, _):
        code, details = await rpc_error(get(stub, 1))
        assert code == grpc.StatusCode.DATA_LOSS and "sha256" in details
        code, details = await rpc_error(get(stub, 2))
        assert code == grpc.StatusCode.DATA_LOSS and "corrupted" in details
        code, _ = await rpc_error(
            stub.GetModelInfo(model_registry_pb2.GetModelRequest(version=2), timeout=10)
        )
        assert code == grpc.StatusCode.DATA_LOSS
        # v2 is left out of the listing (its size is visibly wrong); v1's damage shows on read.
        assert [m.version for m in await listed(stub)] == [0, 1]
        assert same(await get(stub, 0), model([0.0, 1.0], 2.0))
        # A damaged version keeps its number: never overwritten.
        assert (await put(stub, model([5.0, 5.0], 5.0))).version == 3
        code, _ = await rpc_error(put(stub, model([5.0, 5.0], 5.0), version=2))
        assert code == grpc.StatusCode.ALREADY_EXISTS


async def test_versions_in_the_directory_format_are_imported(tmp_path: Path) -> None:
    data_dir, state = tmp_path / "models", tmp_path / "state"
    async with registry(None, data_dir) as (stub, app):  # an older deployment
        assert isinstance(app.store, DirectoryModelStore)
        await put(stub, model([1.0, 2.0], 3.0))
        await put(stub, model([4.0, 5.0], 6.0), version=3)
        old = await listed(stub)
    # A damaged file is skipped (and logged), not imported.
    (data_dir / "v7.model").write_bytes(b'{"format": "nonsense"}\n')
    async with registry(state, data_dir) as (stub, app):
        assert isinstance(app.store, SqliteModelStore)
        assert await listed(stub) == old  # same versions, sha256, specs, created_at
        assert same(await get(stub, 3), model([4.0, 5.0], 6.0))
        assert (await put(stub, model([7.0, 8.0], 9.0))).version == 4
        after = await listed(stub)
    # The new version went to the database; the files are left as they were.
    assert sorted(p.name for p in data_dir.iterdir()) == ["v0.model", "v3.model", "v7.model"]
    async with registry(state, data_dir) as (stub, _):
        assert await listed(stub) == after  # imported once; nothing duplicated


def test_config_from_env_and_the_store_it_picks(tmp_path: Path) -> None:
    assert RegistryConfig.from_env({}) == RegistryConfig()
    env = {"PROPELLER_STATE_DIR": str(tmp_path / "s"), "PROPELLER_REGISTRY_DATA_DIR": ""}
    config = RegistryConfig.from_env(env)
    assert config == RegistryConfig(state_dir=tmp_path / "s")
    # serve: nothing configured -> the default state directory; a data directory alone keeps
    # the directory format it always had.
    assert RegistryConfig().for_serve().state_dir == Path("propeller-fl-state")
    assert RegistryConfig(data_dir=tmp_path).for_serve() == RegistryConfig(data_dir=tmp_path)
    assert config.for_serve() == config
    assert isinstance(RegistryApp(RegistryConfig()).store, InMemoryModelStore)
    assert isinstance(
        RegistryApp(RegistryConfig(data_dir=tmp_path / "d")).store, DirectoryModelStore
    )
    store = RegistryApp(RegistryConfig(data_dir=tmp_path / "d", state_dir=tmp_path / "s")).store
    assert isinstance(store, SqliteModelStore)
    store.close()
    assert store.path == tmp_path / "s" / REGISTRY_DB_FILE
