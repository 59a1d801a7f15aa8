"""ModelRegistry service: configuration, lifecycle and entry point."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

from server.config import TlsConfig, read_by, setting, settings_from_env
from server.grpc_server import ServiceBinding
from server.lifecycle import ServiceApp, for_serve, run_service, state_dir_from_env
from server.registry.lineage import (
    LINEAGE_DB_FILE,
    Lineages,
    LineageStore,
    MemoryLineageStore,
    SqliteLineageStore,
)
from server.registry.pg_store import PostgresModelStore
from server.registry.registry import ModelRegistry
from server.registry.service import binding
from server.registry.store import (
    REGISTRY_DB_FILE,
    InMemoryModelStore,
    ModelStore,
    SqliteModelStore,
)


@dataclass(frozen=True)
class RegistryConfig:
    """Where versions live: `<state_dir>/registry.sqlite` when `state_dir` is set, else in
    memory."""

    addr: str = setting("PROPELLER_REGISTRY_LISTEN", "127.0.0.1:8084")
    state_dir: Path | None = field(default=None, metadata=read_by(state_dir_from_env))
    # A PostgreSQL DSN: versions live there instead (`server.registry.pg_store`); lineage
    # records stay in `<state_dir>/lineage.sqlite`.
    database_url: str = setting("PROPELLER_DATABASE_URL", "", secret=True)
    # Mutual TLS (None: plaintext); see TlsConfig.
    tls: TlsConfig | None = field(kw_only=True, metadata=read_by(TlsConfig.from_env))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RegistryConfig:
        return cls(**settings_from_env(cls, env))


class RegistryApp(ServiceApp):
    """Owns the model store, the lineage store and the servicer; `bindings` go on any gRPC
    server. SQLite stores (`registry.sqlite`, `lineage.sqlite`) open on entry and close on
    exit."""

    def __init__(self, config: RegistryConfig, store: ModelStore | None = None) -> None:
        self.config = config
        self._sqlite: SqliteModelStore | PostgresModelStore | None = None
        self._lineage_sqlite: SqliteLineageStore | None = None
        if store is None:
            if config.database_url:
                store = self._sqlite = PostgresModelStore(config.database_url)
            elif config.state_dir is not None:
                store = self._sqlite = SqliteModelStore(config.state_dir / REGISTRY_DB_FILE)
            else:
                store = InMemoryModelStore()
        lineage_store: LineageStore
        if config.state_dir is not None:
            path = config.state_dir / LINEAGE_DB_FILE
            lineage_store = self._lineage_sqlite = SqliteLineageStore(path)
        else:
            lineage_store = MemoryLineageStore()
        self.store = store
        self.registry = ModelRegistry(store)
        self.lineages = Lineages(lineage_store, self.registry)
        self._bindings = [binding(self.registry, self.lineages)]

    @property
    def bindings(self) -> list[ServiceBinding]:
        return self._bindings

    async def _open(self, stack: AsyncExitStack) -> None:
        if self._sqlite is not None:
            await self._sqlite.open()
            stack.push_async_callback(self._sqlite.close)
        if self._lineage_sqlite is not None:
            await self._lineage_sqlite.open()
            stack.push_async_callback(self._lineage_sqlite.close)


async def main() -> None:
    config = for_serve(RegistryConfig.from_env(), "ModelRegistry")
    await run_service(RegistryApp(config), config.addr, config.tls)


if __name__ == "__main__":
    asyncio.run(main())
