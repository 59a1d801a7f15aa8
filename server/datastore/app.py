"""DataStore service: configuration, seeding, lifecycle and entry point."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType

from server.config import env_int, env_list, env_str
from server.datastore.datasets import DEFAULT_NUM_FEATURES, DEFAULT_NUM_SAMPLES, seeded_dataset
from server.datastore.service import binding
from server.datastore.store import (
    DATASTORE_DB_FILE,
    DatasetStore,
    InMemoryDatasetStore,
    SqliteDatasetStore,
)
from server.grpc_server import ServiceBinding, serve_until_signal

log = logging.getLogger(__name__)

# Where `propeller-fl serve` keeps state when PROPELLER_STATE_DIR is unset (relative to the
# working directory); see docs/configuration.md.
DEFAULT_STATE_DIR = Path("propeller-fl-state")


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
        state_dir = env_str(env, "PROPELLER_STATE_DIR", "")
        return cls(
            addr=env_str(env, "PROPELLER_DATASTORE_LISTEN", d.addr),
            seed_proplet_ids=tuple(dict.fromkeys(ids)),
            num_samples=env_int(env, "PROPELLER_DATASTORE_SAMPLES", d.num_samples),
            num_features=env_int(env, "PROPELLER_DATASTORE_FEATURES", d.num_features),
            state_dir=Path(state_dir) if state_dir else None,
        )


class DataStoreApp:
    """Owns the dataset store (opened and seeded on entry) and the servicer."""

    def __init__(self, config: DataStoreConfig, store: DatasetStore | None = None) -> None:
        self.config = config
        self._given = store
        self._store: DatasetStore | None = None
        self._sqlite: SqliteDatasetStore | None = None
        self.bindings: list[ServiceBinding] = [binding(lambda: self.store)]

    @property
    def store(self) -> DatasetStore:
        if self._store is None:
            raise RuntimeError("DataStoreApp: use it inside `async with`")
        return self._store

    async def __aenter__(self) -> DataStoreApp:
        if self._given is not None:
            store: DatasetStore = self._given
        elif self.config.state_dir is not None:
            sqlite = SqliteDatasetStore(self.config.state_dir / DATASTORE_DB_FILE)
            await sqlite.open()
            store = self._sqlite = sqlite
        else:
            store = InMemoryDatasetStore()
        try:
            await self._seed(store)
        except BaseException:
            await self._close()
            raise
        self._store = store
        return self

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

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._store = None
        await self._close()

    async def _close(self) -> None:
        sqlite, self._sqlite = self._sqlite, None
        if sqlite is not None:
            await sqlite.close()


async def main() -> None:
    config = DataStoreConfig.from_env()
    state_dir = config.state_dir or DEFAULT_STATE_DIR
    config = replace(config, state_dir=state_dir)
    log.info("[DataStore] state_dir=%s", state_dir.resolve())
    async with DataStoreApp(config) as app:
        await serve_until_signal(config.addr, app.bindings)


if __name__ == "__main__":
    asyncio.run(main())
