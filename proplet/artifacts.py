"""Getting a task's wasm module: inline bytes, a local file, or an OCI artifact pulled and
verified by `server.oci.OciClient` (tags honoured, pinned digests and layer digests checked).

Modules are cached on disk by content sha256 under `work_dir/modules/` (re-verified on read),
and a digest-pinned manifest's layer is remembered in memory, so a warm start of a pinned image
needs no network at all and a tag needs one manifest request.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from proplet.config import PropletConfig
from proplet.errors import TaskFailed
from server.errors import PropellerError
from server.messages import TaskStart
from server.oci import ImageRef, Layer, OciClients

log = logging.getLogger(__name__)


def parse_image(url: str) -> ImageRef:
    """The task's image reference; a bad one fails the task with the parser's reason."""
    try:
        return ImageRef.parse(url)
    except PropellerError as exc:
        raise TaskFailed(str(exc)) from None


@dataclass(frozen=True)
class Artifact:
    """A module's content digest and, unless the caller already holds it compiled, its bytes."""

    sha256: str
    data: bytes | None
    source: str


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ArtifactStore:
    """Resolves a TaskStart to module bytes, caching by content digest."""

    def __init__(self, config: PropletConfig) -> None:
        self.config = config
        self.cache_dir = config.work_dir / "modules"
        # "address/repo@sha256:..." -> its wasm layer
        self._pinned_layers: dict[str, Layer] = {}
        self._clients = OciClients(config.is_insecure, config.rpc_timeout_s)

    def close(self) -> None:
        """Close the HTTP sessions of the registry clients."""
        self._clients.close()

    async def fetch(
        self, task: TaskStart, have: Callable[[str], bool] = lambda _sha: False
    ) -> Artifact:
        """The task's module. `have(sha256)` says the caller already holds that module
        compiled, in which case no bytes are read or downloaded (`data` is None)."""
        if task.file:
            return Artifact(sha256_hex(task.file), task.file, "inline")
        url = task.image_url.strip()
        if not url:
            raise TaskFailed("task names no module: image_url and file are both empty")
        if url.startswith("file://"):
            return await asyncio.to_thread(self._read_file, url)
        ref = parse_image(url)
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation.
            async with asyncio.timeout(self.config.rpc_timeout_s):
                return await asyncio.to_thread(self._pull, ref, have)
        except TimeoutError:
            raise TaskFailed(
                f"image {ref}: pull did not finish within {self.config.rpc_timeout_s:g}s"
            ) from None

    # ------------------------------------------------------------------ local files

    def _read_file(self, url: str) -> Artifact:
        path = Path(url.removeprefix("file://"))
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise TaskFailed(f"image_url: cannot read {path}: {exc.strerror or exc}") from None
        return Artifact(sha256_hex(data), data, "file")

    # ------------------------------------------------------------------ OCI

    def _pull(self, ref: ImageRef, have: Callable[[str], bool]) -> Artifact:
        address = self.config.registry_address(ref.host)
        client = self._clients.client(address)
        try:
            pin_key = f"{address}/{ref.repository}@{ref.digest}" if ref.digest else ""
            layer = self._pinned_layers.get(pin_key) if pin_key else None
            if layer is None:
                layer = client.wasm_layer(ref)
                if pin_key:
                    # A digest-pinned manifest never changes: skip fetching it next time.
                    self._pinned_layers[pin_key] = layer
            if have(layer.sha256):
                return Artifact(layer.sha256, None, "memory")
            cached = self._read_cache(layer.sha256)
            if cached is not None:
                return Artifact(layer.sha256, cached, "disk")
            data = client.fetch_layer(ref, layer)
        except PropellerError as exc:
            raise TaskFailed(str(exc)) from None
        self._write_cache(layer.sha256, data)
        return Artifact(layer.sha256, data, "registry")

    # ------------------------------------------------------------------ disk cache

    def _cache_path(self, sha256: str) -> Path:
        return self.cache_dir / f"{sha256}.wasm"

    def _read_cache(self, sha256: str) -> bytes | None:
        path = self._cache_path(sha256)
        try:
            data = path.read_bytes()
        except OSError:
            return None
        if sha256_hex(data) != sha256:
            log.warning("[proplet.artifacts] cached %s is corrupt; dropping it", path)
            path.unlink(missing_ok=True)
            return None
        return data

    def _write_cache(self, sha256: str, data: bytes) -> None:
        # Write-then-rename so a concurrent reader (another proplet) never sees half a module.
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.cache_dir, suffix=".part")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, self._cache_path(sha256))
            except OSError:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:  # a full or read-only disk costs a re-download, nothing more
            log.warning("[proplet.artifacts] cannot cache sha256=%s: %s", sha256[:12], exc)
