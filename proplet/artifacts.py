"""Getting a task's wasm module: inline bytes, a local file, or an OCI artifact pulled with oras.

OCI pulls honour the tag or digest the image reference names (the original always pulled
`latest` and never checked a digest) and verify what arrives:
- a reference pinned `@sha256:<hex>` must resolve to a manifest whose bytes hash to that digest;
- the wasm layer's bytes must hash to the layer digest the manifest declares, and match its size.

Modules are cached on disk by content sha256 under `work_dir/modules/` (re-verified on read),
and a digest-pinned manifest is remembered in memory, so a warm start of a pinned image needs
no network at all and a tag needs one manifest request.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import oras.auth
import oras.client

from proplet.config import PropletConfig
from proplet.errors import TaskFailed
from server.errors import InvalidArgument
from server.messages import TaskStart
from server.oci import DIGEST, ImageRef

log = logging.getLogger(__name__)

WASM_MEDIA_TYPES = ("application/wasm", "application/vnd.wasm.content.layer.v1+wasm")
MANIFEST_ACCEPT = ", ".join(
    [
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.oci.image.index.v1+json",
    ]
)
INDEX_MEDIA_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
# No sane task module is bigger; a guard against a hostile or broken registry.
MAX_MODULE_BYTES = 256 << 20
MAX_MANIFEST_BYTES = 4 << 20


def parse_image(url: str) -> ImageRef:
    """The task's image reference; a bad one fails the task with the parser's reason."""
    try:
        return ImageRef.parse(url)
    except InvalidArgument as exc:
        raise TaskFailed(str(exc)) from None


@dataclass(frozen=True)
class Artifact:
    """A module's content digest and, unless the caller already holds it compiled, its bytes."""

    sha256: str
    data: bytes | None
    source: str


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _RegistryClient(oras.client.OrasClient):  # type: ignore[misc]  # oras is untyped
    """oras with one bounded attempt per request.

    oras' own `do_request` retries failed connections five times, sleeping up to 83 s between
    attempts; a proplet wants a prompt, explained failure instead (the task can be retried).
    """

    def __init__(self, hostname: str, insecure: bool, timeout: float) -> None:
        super().__init__(hostname=hostname, insecure=insecure)
        self._timeout = timeout

    def do_request(
        self,
        url: str,
        method: str = "GET",
        data: Any = None,
        headers: dict[str, str] | None = None,
        json: Any = None,
        stream: bool = False,
    ) -> Any:
        headers = dict(headers or {})
        if isinstance(self.auth, oras.auth.TokenAuth) and self.auth.token is not None:
            headers.update(self.auth.get_auth_header())

        def send() -> Any:
            return self.session.request(
                method,
                url,
                data=data,
                json=json,
                headers=headers,
                stream=stream,
                verify=self._tls_verify,
                timeout=self._timeout,
            )

        response = send()
        if response.status_code in (401, 403):
            headers, changed = self.auth.authenticate_request(response, headers)
            if changed:
                response = send()
        return response


def _registry_error(response: Any) -> str:
    """`HTTP 404 (MANIFEST_UNKNOWN: manifest unknown)` from an OCI error response."""
    detail = ""
    try:
        errors = response.json().get("errors") or []
        detail = "; ".join(f"{e.get('code', '')}: {e.get('message', '')}" for e in errors)
    except Exception:
        detail = ""
    return f"HTTP {response.status_code}" + (f" ({detail})" if detail else "")


def _pick_wasm_layer(manifest: dict[str, Any], ref: ImageRef) -> dict[str, Any]:
    media = manifest.get("mediaType", "")
    if media in INDEX_MEDIA_TYPES or "manifests" in manifest:
        raise TaskFailed(f"image {ref}: is an image index, not a single wasm artifact")
    layers = manifest.get("layers")
    if not isinstance(layers, list) or not layers:
        raise TaskFailed(f"image {ref}: manifest lists no layers")
    wasm = [x for x in layers if isinstance(x, dict) and x.get("mediaType") in WASM_MEDIA_TYPES]
    if len(wasm) == 1:
        return wasm[0]
    if not wasm and len(layers) == 1 and isinstance(layers[0], dict):
        return layers[0]
    kinds = [x.get("mediaType") for x in layers if isinstance(x, dict)]
    raise TaskFailed(f"image {ref}: expected one application/wasm layer, found {kinds}")


class ArtifactStore:
    """Resolves a TaskStart to module bytes, caching by content digest."""

    def __init__(self, config: PropletConfig) -> None:
        self.config = config
        self.cache_dir = config.work_dir / "modules"
        # "address/repo@sha256:..." -> (layer sha256 hex, declared size)
        self._pinned_layers: dict[str, tuple[str, int | None]] = {}
        self._clients: dict[tuple[str, bool], _RegistryClient] = {}

    def close(self) -> None:
        """Close the HTTP sessions of the registry clients."""
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.session.close()

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

    def _client(self, address: str) -> _RegistryClient:
        insecure = self.config.is_insecure(address)
        key = (address, insecure)
        client = self._clients.get(key)
        if client is None:
            client = _RegistryClient(address, insecure, self.config.rpc_timeout_s)
            self._clients[key] = client
        return client

    def _pull(self, ref: ImageRef, have: Callable[[str], bool]) -> Artifact:
        address = self.config.registry_address(ref.host)
        client = self._client(address)
        try:
            container = client.get_container(f"{address}/{ref.repository}:{ref.tag}")
            if ref.digest:
                container = client.get_container(f"{address}/{ref.repository}@{ref.digest}")
            pin_key = f"{address}/{ref.repository}@{ref.digest}" if ref.digest else ""
            pinned = self._pinned_layers.get(pin_key) if pin_key else None
            if pinned is None:
                layer = self._layer(client, container, ref)
                digest = str(layer.get("digest", ""))
                if not DIGEST.match(digest):
                    raise TaskFailed(f"image {ref}: layer digest {digest!r} is not sha256")
                size = layer.get("size")
                pinned = (
                    digest.removeprefix("sha256:"),
                    size if isinstance(size, int) and not isinstance(size, bool) else None,
                )
                if pin_key:
                    # A digest-pinned manifest never changes: skip fetching it next time.
                    self._pinned_layers[pin_key] = pinned
            layer_hex, declared_size = pinned
            if have(layer_hex):
                return Artifact(layer_hex, None, "memory")
            cached = self._read_cache(layer_hex)
            if cached is not None:
                return Artifact(layer_hex, cached, "disk")
            data = self._download(client, container, ref, layer_hex, declared_size)
        except TaskFailed:
            raise
        except Exception as exc:  # requests/oras errors: connection refused, bad JSON...
            raise TaskFailed(
                f"image {ref}: registry {address} unreachable or broken: {exc}"
            ) from None
        self._write_cache(layer_hex, data)
        return Artifact(layer_hex, data, "registry")

    def _layer(self, client: _RegistryClient, container: Any, ref: ImageRef) -> dict[str, Any]:
        url = f"{client.prefix}://{container.manifest_url()}"
        response = client.do_request(url, "GET", headers={"Accept": MANIFEST_ACCEPT})
        if response.status_code != 200:
            raise TaskFailed(f"image {ref}: manifest not found: {_registry_error(response)}")
        raw: bytes = response.content
        if len(raw) > MAX_MANIFEST_BYTES:
            raise TaskFailed(f"image {ref}: manifest larger than {MAX_MANIFEST_BYTES} bytes")
        if ref.digest:
            got = "sha256:" + sha256_hex(raw)
            if got != ref.digest:
                raise TaskFailed(
                    f"image {ref}: manifest digest mismatch: pinned {ref.digest}, "
                    f"registry served {got}"
                )
        try:
            manifest = json.loads(raw)
        except ValueError as exc:
            raise TaskFailed(f"image {ref}: manifest is not JSON: {exc}") from None
        if not isinstance(manifest, dict):
            raise TaskFailed(f"image {ref}: manifest is not a JSON object")
        return _pick_wasm_layer(manifest, ref)

    def _download(
        self,
        client: _RegistryClient,
        container: Any,
        ref: ImageRef,
        layer_hex: str,
        declared_size: int | None,
    ) -> bytes:
        digest = f"sha256:{layer_hex}"
        limit = MAX_MODULE_BYTES
        if declared_size is not None:
            if declared_size > MAX_MODULE_BYTES:
                raise TaskFailed(
                    f"image {ref}: layer of {declared_size} bytes exceeds {MAX_MODULE_BYTES}"
                )
            limit = declared_size
        with client.get_blob(container, digest, stream=True) as response:
            if response.status_code != 200:
                raise TaskFailed(
                    f"image {ref}: blob {digest} not found: {_registry_error(response)}"
                )
            h = hashlib.sha256()
            buf = bytearray()
            for chunk in response.iter_content(chunk_size=1 << 16):
                buf += chunk
                h.update(chunk)
                if len(buf) > limit:
                    raise TaskFailed(
                        f"image {ref}: blob {digest} is larger than the {limit} bytes declared"
                    )
        got = h.hexdigest()
        if got != layer_hex:
            raise TaskFailed(
                f"image {ref}: blob digest mismatch: expected {digest}, got sha256:{got}"
            )
        if declared_size is not None and len(buf) != declared_size:
            raise TaskFailed(
                f"image {ref}: blob {digest} has {len(buf)} bytes, manifest says {declared_size}"
            )
        log.info("[proplet.artifacts] pulled %s sha256=%s size=%d", ref, layer_hex[:12], len(buf))
        return bytes(buf)

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
