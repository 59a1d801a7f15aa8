"""ModelRegistry service: configuration, lifecycle and entry point."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType

from server.config import env_str
from server.grpc_server import ServiceBinding, serve_until_signal
from server.registry.registry import ModelRegistry
from server.registry.service import binding
from server.registry.store import (
    REGISTRY_DB_FILE,
    InMemoryModelStore,
    ModelStore,
    SqliteModelStore,
)

log = logging.getLogger(__name__)

# Where `propeller-fl serve` keeps state when PROPELLER_STATE_DIR is unset (relative to the
# working directory); see docs/configuration.md.
DEFAULT_STATE_DIR = Path("propeller-fl-state")


@dataclass(frozen=True)
class RegistryConfig:
    """Where versions live: `<state_dir>/registry.sqlite` when `state_dir` is set, else in
    memory."""

    addr: str = "127.0.0.1:8084"
    state_dir: Path | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RegistryConfig:
        env = os.environ if env is None else env
        d = cls()
        state_dir = env_str(env, "PROPELLER_STATE_DIR", "")
        return cls(
            addr=env_str(env, "PROPELLER_REGISTRY_LISTEN", d.addr),
            state_dir=Path(state_dir) if state_dir else None,
        )

    def for_serve(self) -> RegistryConfig:
        """What `propeller-fl serve` runs: without a state directory, the default one."""
        if self.state_dir is None:
            return replace(self, state_dir=DEFAULT_STATE_DIR)
        return self


class RegistryApp:
    """Owns the model store and the servicer; `bindings` go on any gRPC server. A SQLite store
    opens on entry and closes on exit."""

    def __init__(self, config: RegistryConfig, store: ModelStore | None = None) -> None:
        self.config = config
        self._sqlite: SqliteModelStore | None = None
        if store is None:
            if config.state_dir is not None:
                store = self._sqlite = SqliteModelStore(config.state_dir / REGISTRY_DB_FILE)
            else:
                store = InMemoryModelStore()
        self.store = store
        self.registry = ModelRegistry(store)
        self.bindings: list[ServiceBinding] = [binding(self.registry)]

    async def __aenter__(self) -> RegistryApp:
        if self._sqlite is not None:
            await self._sqlite.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._sqlite is not None:
            await self._sqlite.close()


async def main() -> None:
    config = RegistryConfig.from_env().for_serve()
    log.info("[ModelRegistry] state_dir=%s", config.state_dir)
    async with RegistryApp(config) as app:
        await serve_until_signal(config.addr, app.bindings)


if __name__ == "__main__":
    asyncio.run(main())
