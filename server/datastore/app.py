"""DataStore service: configuration, seeding, lifecycle and entry point."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

from server.config import TlsConfig, env_int, env_list, env_str
from server.datastore.datasets import DEFAULT_NUM_FEATURES, DEFAULT_NUM_SAMPLES, seeded_dataset
from server.datastore.service import binding
from server.datastore.store import (
    DATASTORE_DB_FILE,
    DatasetStore,
    InMemoryDatasetStore,
    SqliteDatasetStore,
)
from server.grpc_server import ServiceBinding
from server.lifecycle import ServiceApp, for_serve, run_service, state_dir_from_env

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataStoreConfig:
    """`seed_proplet_ids` get a synthetic dataset of `num_samples` x `num_features` at start,
    unless the store already holds a dataset for them. `state_dir` set: datasets live in
    `<state_dir>/datastore.sqlite` and survive restarts; None: in memory."""

    addr: str = "127.0.0.1:8083"
    seed_proplet_ids: tuple[str, ...] = ()
    num_samples: int = DEFAULT_NUM_SAMPLES
    num_features: int = DEFAULT_NUM_FEATURES
    state_dir: Path | None = None
    # Mutual TLS (None: plaintext); see TlsConfig.
    tls: TlsConfig | None = field(kw_only=True)

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
        d = cls(tls=None)
        ids = env_list(env, "PROPELLER_DATASTORE_SEED_IDS") or env_list(env, "PROPLET_IDS")
        return cls(
            addr=env_str(env, "PROPELLER_DATASTORE_LISTEN", d.addr),
            seed_proplet_ids=tuple(dict.fromkeys(ids)),
            num_samples=env_int(env, "PROPELLER_DATASTORE_SAMPLES", d.num_samples),
            num_features=env_int(env, "PROPELLER_DATASTORE_FEATURES", d.num_features),
            state_dir=state_dir_from_env(env),
            tls=TlsConfig.from_env(env),
        )


class DataStoreApp(ServiceApp):
    """Owns the dataset store (opened and seeded on entry; closed on exit, or when the seeding
    fails) and the servicer."""

    def __init__(self, config: DataStoreConfig, store: DatasetStore | None = None) -> None:
        self.config = config
        self._given = store
        self._store: DatasetStore | None = None
        self._bindings = [binding(lambda: self.store)]

    @property
    def store(self) -> DatasetStore:
        return self._entered(self._store)

    @property
    def bindings(self) -> list[ServiceBinding]:
        return self._bindings

    async def _open(self, stack: AsyncExitStack) -> None:
        if self._given is not None:
            store: DatasetStore = self._given
        elif self.config.state_dir is not None:
            sqlite = SqliteDatasetStore(self.config.state_dir / DATASTORE_DB_FILE)
            await sqlite.open()
            stack.push_async_callback(sqlite.close)
            store = sqlite
        else:
            store = InMemoryDatasetStore()
        await self._seed(store)
        self._store = store

    async def _seed(self, store: DatasetStore) -> None:
        """Give each seed id without a dataset a synthetic one; stored datasets (seeded by an
        earlier start or imported with PutDataset) are kept as they are."""
        cfg = self.config
        if not cfg.seed_proplet_ids:
            return
        present = {s.proplet_id for s in await store.list()}
        missing = [p for p in cfg.seed_proplet_ids if p not in present]
        for proplet_id in missing:
            dataset = await asyncio.to_thread(
                seeded_dataset, proplet_id, cfg.num_samples, cfg.num_features
            )
            await store.put(dataset, replace=False)
        log.info(
            "[DataStore.seed] proplets=%d seeded=%d kept=%d samples=%d features=%d",
            len(cfg.seed_proplet_ids),
            len(missing),
            len(cfg.seed_proplet_ids) - len(missing),
            cfg.num_samples,
            cfg.num_features,
        )


async def main() -> None:
    config = for_serve(DataStoreConfig.from_env(), "DataStore")
    await run_service(DataStoreApp(config), config.addr, config.tls)


if __name__ == "__main__":
    asyncio.run(main())
