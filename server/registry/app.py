"""ModelRegistry service: configuration, lifecycle and entry point."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from server.config import env_str
from server.grpc_server import ServiceBinding, serve_until_signal
from server.registry.registry import ModelRegistry
from server.registry.service import binding
from server.registry.store import DirectoryModelStore, InMemoryModelStore, ModelStore


@dataclass(frozen=True)
class RegistryConfig:
    """`data_dir` None keeps models in memory; a directory keeps them across restarts."""

    addr: str = "127.0.0.1:8084"
    data_dir: Path | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RegistryConfig:
        env = os.environ if env is None else env
        d = cls()
        data_dir = env_str(env, "PROPELLER_REGISTRY_DATA_DIR", "")
        return cls(
            addr=env_str(env, "PROPELLER_REGISTRY_LISTEN", d.addr),
            data_dir=Path(data_dir) if data_dir else None,
        )


class RegistryApp:
    """Owns the model store and the servicer; `bindings` go on any gRPC server."""

    def __init__(self, config: RegistryConfig, store: ModelStore | None = None) -> None:
        self.config = config
        if store is None:
            store = (
                InMemoryModelStore()
                if config.data_dir is None
                else DirectoryModelStore(config.data_dir)
            )
        self.store = store
        self.registry = ModelRegistry(store)
        self.bindings: list[ServiceBinding] = [binding(self.registry)]

    async def __aenter__(self) -> RegistryApp:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None


async def main() -> None:
    config = RegistryConfig.from_env()
    async with RegistryApp(config) as app:
        await serve_until_signal(config.addr, app.bindings)


if __name__ == "__main__":
    asyncio.run(main())
