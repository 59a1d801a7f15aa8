"""Pinning a round's module at StartExperiment: `task_wasm_image` resolved once to the digest
of the module bytes it names now, so the round (its coordinator configuration) and its tasks
run exactly that module however the tag moves later (docs/security.md, "Provenance").

- An OCI reference (`host/repo:tag`) is resolved in the registry: the reference the tasks get
  is pinned to the manifest's digest (`host/repo:tag@sha256:...`, which the proplet checks on
  pull), and the module digest is the wasm layer's ("sha256:<hex>" of the module bytes,
  which the proplet checks again before running it and puts in every update it signs).
- A `file://` module is read and hashed by the manager (it must see the same file the
  proplets do: one machine, or a shared volume); the tasks keep the URL and the proplet
  refuses a file whose digest is not the pinned one.

Blocking I/O (the registry client, the file) runs in a thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from server.errors import FailedPrecondition, PropellerError, Unavailable
from server.oci import MAX_MODULE_BYTES, ImageRef, OciClient, is_loopback
from server.round_spec import RoundSpec

log = logging.getLogger(__name__)

FIELD = "task_wasm_image"


@dataclass(frozen=True)
class PinnedModule:
    """What a round runs: the image reference its tasks get, and the module's digest."""

    image: str
    digest: str


class Modules(Protocol):
    async def pin(self, image: str) -> PinnedModule:
        """Resolve `image` now; errors name task_wasm_image."""
        ...


async def pin_module(modules: Modules, config: RoundSpec) -> PinnedModule:
    """The module the experiment `config` runs; FAILED_PRECONDITION when the request names a
    digest (`module_digest`) the image does not resolve to."""
    module = await modules.pin(config.task_wasm_image)
    if config.module_digest and module.digest != config.module_digest:
        raise FailedPrecondition(
            f"module_digest: {config.task_wasm_image} resolves to module {module.digest}, "
            f"not {config.module_digest}"
        )
    return module


class ModuleResolver:
    """`Modules` over OCI registries and local files. `registry`: the address every image's
    registry is reached at (e.g. compose's "local-registry:5000" as 127.0.0.1:5000 from
    outside; "" = the host the image names); `insecure`: plain HTTP (None: for loopback
    addresses only)."""

    def __init__(
        self, *, registry: str = "", insecure: bool | None = None, timeout_s: float = 30.0
    ) -> None:
        self.registry = registry
        self.insecure = insecure
        self.timeout_s = timeout_s
        self._clients: dict[tuple[str, bool], OciClient] = {}

    def close(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close()

    async def pin(self, image: str) -> PinnedModule:
        if image.startswith("file://"):
            return await asyncio.to_thread(_pin_file, image)
        ref = ImageRef.parse(image, FIELD)
        try:
            async with asyncio.timeout(self.timeout_s):
                pinned, digest = await asyncio.to_thread(self._pin_oci, ref)
        except TimeoutError:
            raise Unavailable(
                f"{FIELD}: image {ref}: the registry did not answer within {self.timeout_s:g}s"
            ) from None
        log.info("[Manager.StartExperiment] %s pinned to %s, module %s", image, pinned, digest)
        return PinnedModule(pinned, digest)

    def _client(self, address: str) -> OciClient:
        insecure = is_loopback(address) if self.insecure is None else self.insecure
        client = self._clients.get((address, insecure))
        if client is None:
            client = OciClient(address, insecure=insecure, timeout=self.timeout_s)
            self._clients[(address, insecure)] = client
        return client

    def _pin_oci(self, ref: ImageRef) -> tuple[str, str]:
        client = self._client(self.registry or ref.host)
        try:
            pinned, layer = client.pin(ref)
        except PropellerError as exc:
            raise type(exc)(f"{FIELD}: {exc}") from None
        return str(pinned), f"sha256:{layer.sha256}"


def _pin_file(image: str) -> PinnedModule:
    path = Path(image.removeprefix("file://"))
    try:
        with path.open("rb") as f:
            data = f.read(MAX_MODULE_BYTES + 1)
    except OSError as exc:
        raise FailedPrecondition(
            f"{FIELD}: the manager cannot read {path} to pin the module's digest: "
            f"{exc.strerror or exc}"
        ) from None
    if len(data) > MAX_MODULE_BYTES:
        raise FailedPrecondition(f"{FIELD}: {path} is larger than {MAX_MODULE_BYTES} bytes")
    return PinnedModule(image, f"sha256:{hashlib.sha256(data).hexdigest()}")
