"""Dishonest proplets for the re-execution audit (docs/verifiability.md), built test-side:
each holds a real certificate, takes its round task like any proplet and signs what it sends
with its own key, so signatures and module pinning accept its update. Nothing in the product
knows about them.

- `TamperedModuleProplet` runs other wasm bytes than the round pinned (a module of its own
  choosing) and claims the pinned digest: the check the proplet makes before running
  (`FlTask.check_module`) is its own, and this one lies to it.
- `LyingDataProplet` trains the pinned module on other data than the data store's: its
  dataset's labels moved to the next class (the same samples, so the same num_samples).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib

from proplet.app import Proplet, _Running
from proplet.config import PropletConfig
from proplet.federated import FederatedClient, FlInputs, FlTask
from proplet.runner import CompiledModule
from server.datastore.datasets import synthetic_dataset


class TamperedModuleProplet(Proplet):
    """Runs `wasm` in place of every round's module, reporting the pinned module's digest."""

    def __init__(self, config: PropletConfig, wasm: bytes) -> None:
        super().__init__(config)
        self.wasm = wasm

    async def _load(self, running: _Running) -> CompiledModule:
        pinned = await super()._load(running)
        # Compiled under its own digest: the runtime's cache is shared by every proplet of the
        # process, and the honest ones must keep getting the pinned module.
        tampered = await asyncio.to_thread(
            self.runtime.compile, self.wasm, hashlib.sha256(self.wasm).hexdigest()
        )
        return dataclasses.replace(tampered, sha256=pinned.sha256)


class LyingDataClient(FederatedClient):
    """Hands the module the data store's dataset with every label moved to the next class
    (y -> (y + 1) mod k, k the classes its labels show: 0 <-> 1 for a binary dataset)."""

    def __init__(self, inner: FederatedClient) -> None:
        super().__init__(
            inner.proplet_id, inner.rpc_timeout_s, backoff=inner.backoff, tls=inner.tls
        )

    async def fetch_inputs(self, fl: FlTask, deadline: float | None = None) -> FlInputs:
        inputs = await super().fetch_inputs(fl, deadline)
        labels = inputs.labels
        k = int(labels.max()) + 1
        return dataclasses.replace(inputs, labels=((labels + 1) % k).astype(labels.dtype))


class LyingDataProplet(Proplet):
    def __init__(self, config: PropletConfig) -> None:
        super().__init__(config)
        self.federated = LyingDataClient(self.federated)


class GhostDataClient(FederatedClient):
    """Trains on data of its own making (the data store's generator, for this proplet's id)
    while the data store holds none for it."""

    def __init__(self, inner: FederatedClient, num_samples: int) -> None:
        super().__init__(
            inner.proplet_id, inner.rpc_timeout_s, backoff=inner.backoff, tls=inner.tls
        )
        self.num_samples = num_samples

    async def fetch_inputs(self, fl: FlTask, deadline: float | None = None) -> FlInputs:
        model, sha256 = await self.fetch_model(fl, deadline)
        features, labels = synthetic_dataset(self.proplet_id, self.num_samples)
        return FlInputs(model, features, labels, "", sha256)


class GhostDataProplet(Proplet):
    def __init__(self, config: PropletConfig, num_samples: int = 64) -> None:
        super().__init__(config)
        self.federated = GhostDataClient(self.federated, num_samples)
