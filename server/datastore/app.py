"""DataStore service: configuration, seeding, lifecycle and entry point."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType

from server.config import env_int, env_list, env_str
from server.datastore.datasets import DEFAULT_NUM_FEATURES, DEFAULT_NUM_SAMPLES, seeded_dataset
from server.datastore.service import binding
from server.datastore.store import DatasetStore, InMemoryDatasetStore
from server.grpc_server import ServiceBinding, serve_until_signal

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataStoreConfig:
    """`seed_proplet_ids` get a synthetic dataset of `num_samples` x `num_features` at start."""

    addr: str = "127.0.0.1:8083"
    seed_proplet_ids: tuple[str, ...] = ()
    num_samples: int = DEFAULT_NUM_SAMPLES
    num_features: int = DEFAULT_NUM_FEATURES

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"num_samples: must be >= 1, got {self.num_samples}")
        if self.num_features < 1:
            raise ValueError(f"num_features: must be >= 1, got {self.num_features}")
        if any(not p for p in self.seed_proplet_ids):
            raise ValueError("seed_proplet_ids: an id is empty")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> DataStoreConfig:
        env = os.environ if env is None else env
        d = cls()
        ids = env_list(env, "PROPELLER_DATASTORE_SEED_IDS") or env_list(env, "PROPLET_IDS")
        return cls(
            addr=env_str(env, "PROPELLER_DATASTORE_LISTEN", d.addr),
            seed_proplet_ids=tuple(dict.fromkeys(ids)),
            num_samples=env_int(env, "PROPELLER_DATASTORE_SAMPLES", d.num_samples),
            num_features=env_int(env, "PROPELLER_DATASTORE_FEATURES", d.num_features),
        )


class DataStoreApp:
    """Owns the dataset store (seeded on construction) and the servicer."""

    def __init__(self, config: DataStoreConfig, store: DatasetStore | None = None) -> None:
        self.config = config
        self.store: DatasetStore = InMemoryDatasetStore() if store is None else store
        for proplet_id in config.seed_proplet_ids:
            self.store.put(seeded_dataset(proplet_id, config.num_samples, config.num_features))
        if config.seed_proplet_ids:
            log.info(
                "[DataStore.seed] proplets=%d samples=%d features=%d",
                len(config.seed_proplet_ids),
                config.num_samples,
                config.num_features,
            )
        self.bindings: list[ServiceBinding] = [binding(self.store)]

    async def __aenter__(self) -> DataStoreApp:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None


async def main() -> None:
    config = DataStoreConfig.from_env()
    async with DataStoreApp(config) as app:
        await serve_until_signal(config.addr, app.bindings)


if __name__ == "__main__":
    asyncio.run(main())
