"""The registry's durable store, on both backends (`registry.sqlite` in the state directory,
and the `registry` schema of PostgreSQL; tests.support.state), through a real gRPC server:
versions survive a restart with their bytes, sha256, specs and created_at; a version is
written once (ALREADY_EXISTS after, also from a second store over the same state); an
abandoned write stores nothing; damaged rows are reported (DATA_LOSS), never served; and the
configuration picks the store as docs/configuration.md says. That a killed registry never
keeps a torn version is test_registry_crash.py."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from propeller.v1 import model_registry_pb2, model_registry_pb2_grpc
from server.errors import AlreadyExists
from server.lifecycle import for_serve
from server.registry.app import RegistryApp, RegistryConfig
from server.registry.pg_store import PostgresModelStore
from server.registry.store import (
    REGISTRY_DB_FILE,
    InMemoryModelStore,
    ModelInfo,
    SqliteModelStore,
    WriteAbandoned,
)
from server.streams import Payload, model_stream, read_model_stream
from server.tensors import Tensors, sha256_of, specs_of
from tests.services.harness import RPC_TIMEOUT, served
from tests.support.security import service_tls
from tests.support.state import StateBackend

Stub = Any  # generated gRPC stubs carry no type information


@asynccontextmanager
async def registry(state: StateBackend) -> AsyncIterator[tuple[Stub, RegistryApp]]:
    config = RegistryConfig(
        addr="127.0.0.1:0",
        state_dir=state.state_dir,
        database_url=state.url,
        tls=service_tls("registry"),
    )
    async with RegistryApp(config) as app, served(app.bindings) as ch:
        yield model_registry_pb2_grpc.ModelRegistryStub(ch), app


def model(w: list[float], b: float, dtype: str = "<f8") -> Tensors:
    return {"w": np.asarray(w, dtype=dtype), "b": np.asarray(b, dtype=dtype)}


def info(version: int, tensors: Tensors) -> ModelInfo:
    return ModelInfo(version, sha256_of(tensors), tuple(specs_of(tensors)), time.time())


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


async def test_versions_survive_a_restart_with_every_field(state_backend: StateBackend) -> None:
    state = state_backend
    mixed: Tensors = {
        "w": np.arange(12, dtype="<f4").reshape(3, 4),
        "empty": np.zeros((0, 5), dtype="<f8"),
        "b": np.asarray(-1.5, dtype="<f8"),
    }
    async with registry(state) as (stub, app):
        kind = {"sqlite": SqliteModelStore, "postgres": PostgresModelStore}[state.kind]
        assert isinstance(app.store, kind)
        v0 = await stub.InitModel(model_registry_pb2.InitModelRequest(dimension=3), timeout=10)
        v1 = await put(stub, mixed)
        before = await listed(stub)
    assert (state.state_dir / REGISTRY_DB_FILE).is_file() == (state.kind == "sqlite")
    async with registry(state) as (stub, _):
        assert await listed(stub) == before
        assert [m.version for m in before] == [0, 1]
        assert (before[0].sha256, before[1].sha256) == (v0.sha256, v1.sha256)
        assert before[1].created_at == v1.created_at > 0
        assert same(await get(stub, 1), mixed)
        assert same(await get(stub, 0), model([0.0, 0.0, 0.0], 0.0))
        assert (await put(stub, model([1.0], 1.0))).version == 2


async def test_a_version_is_written_once(state_backend: StateBackend) -> None:
    async with registry(state_backend) as (stub, _):
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


async def test_two_stores_on_one_state_never_share_a_version(state_backend: StateBackend) -> None:
    """Two registry processes (replicas) over one state: the primary key settles who wins."""
    a, b = state_backend.model_store(), state_backend.model_store()
    await a.open()
    await b.open()
    try:
        first = model([1.0], 1.0)
        await a.put(info(0, first), Payload.of(first), threading.Event())
        with pytest.raises(AlreadyExists, match="already exists"):
            await b.put(
                info(0, model([2.0], 2.0)), Payload.of(model([2.0], 2.0)), threading.Event()
            )
        stored = await b.get(0)
        assert stored is not None and same(dict(stored.tensors), first)
        assert await b.versions() == [0]
    finally:
        await a.close()
        await b.close()


async def test_an_abandoned_write_stores_nothing(state_backend: StateBackend) -> None:
    store = state_backend.model_store()
    await store.open()
    try:
        tensors = model([1.0, 2.0], 3.0)
        gave_up = threading.Event()
        gave_up.set()
        with pytest.raises(WriteAbandoned):
            await store.put(info(0, tensors), Payload.of(tensors), gave_up)
        assert await store.versions() == []
        await store.put(info(0, tensors), Payload.of(tensors), threading.Event())
        assert await store.versions() == [0]
    finally:
        await store.close()


async def test_damaged_rows_are_reported_not_served(state_backend: StateBackend) -> None:
    state = state_backend
    async with registry(state) as (stub, _):
        for i in range(3):
            await put(stub, model([float(i), 1.0], 2.0))
    # Bit rot in v1's bytes (same length), and v2's bytes cut short.
    if state.kind == "sqlite":
        [(blob,)] = state.raw("registry", "SELECT data FROM models WHERE version = 1")
        data = bytearray(blob)
        data[-3] ^= 0xFF
        state.execute("registry", "UPDATE models SET data = ? WHERE version = 1", bytes(data))
        state.execute("registry", "UPDATE models SET data = substr(data, 1, 10) WHERE version = 2")
    else:
        last = "seq = (SELECT max(seq) FROM model_pieces WHERE version = 1)"
        [(piece,)] = state.raw(
            "registry", f"SELECT data FROM model_pieces WHERE version = 1 AND {last}"
        )
        data = bytearray(piece)
        data[-3] ^= 0xFF
        state.execute(
            "registry",
            f"UPDATE model_pieces SET data = ? WHERE version = 1 AND {last}",
            bytes(data),
        )
        state.execute(
            "registry",
            "UPDATE model_pieces SET data = substring(data from 1 for 10) "
            "WHERE version = 2 AND seq = 0",
        )
    async with registry(state) as (stub, _):
        code, details = await rpc_error(get(stub, 1))
        assert code == grpc.StatusCode.DATA_LOSS and "sha256" in details
        assert "version: 1" in details and "corrupted" in details
        code, details = await rpc_error(get(stub, 2))
        assert code == grpc.StatusCode.DATA_LOSS and "corrupted" in details
        assert "version: 2" in details
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


async def test_config_from_env_and_the_store_it_picks(tmp_path: Path) -> None:
    plain = {"PROPELLER_INSECURE": "1"}
    assert RegistryConfig.from_env(plain) == RegistryConfig(tls=None)
    env = {**plain, "PROPELLER_STATE_DIR": str(tmp_path / "s")}
    config = RegistryConfig.from_env(env)
    assert config == RegistryConfig(state_dir=tmp_path / "s", tls=None)
    # serve: nothing configured -> the default state directory.
    default = RegistryConfig(tls=None)
    assert for_serve(default, "ModelRegistry").state_dir == Path("propeller-fl-state")
    assert for_serve(config, "ModelRegistry") == config
    assert isinstance(RegistryApp(default).store, InMemoryModelStore)
    async with RegistryApp(RegistryConfig(state_dir=tmp_path / "s", tls=None)) as app:
        store = app.store
        assert isinstance(store, SqliteModelStore)
        assert await store.versions() == []
    assert store.path == tmp_path / "s" / REGISTRY_DB_FILE
    assert store.path.is_file()


async def test_a_database_url_puts_the_versions_on_postgresql(
    tmp_path: Path, database_url: str
) -> None:
    env = {"PROPELLER_INSECURE": "1", "PROPELLER_DATABASE_URL": database_url}
    config = RegistryConfig.from_env(env)
    assert config == RegistryConfig(database_url=database_url, tls=None)
    async with RegistryApp(config) as app:
        assert isinstance(app.store, PostgresModelStore)
        assert await app.store.versions() == []
