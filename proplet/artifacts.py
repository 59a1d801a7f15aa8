"""Getting a task's wasm module: inline bytes, a local file, or an OCI artifact pulled and
verified by `server.oci.OciClient` (tags honoured, pinned digests and layer digests checked).

Modules are cached on disk by content sha256 under `work_dir/modules/` (re-verified on read),
and a digest-pinned manifest's layer is remembered in memory, so a warm start of a pinned image
needs no network at all and a tag needs one manifest request. A local file's digest is
remembered with the file's identity and change times (`FileVersion`): while they are the same,
a module the caller holds compiled is neither read nor hashed again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import tempfile
import time
from collections import OrderedDict
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


# How many local files' digests a store remembers (the most recently used).
MAX_KNOWN_FILES = 64
# A file changed less than this long before it was read is not remembered: file times have
# a coarse granularity (a clock tick), so a second write of the same size in the same tick
# would leave its version as it was ("racily clean", as git calls it). Such a file is read
# again next time, until it is older.
RACY_S = 1.0


@dataclass(frozen=True)
class FileVersion:
    """What says a file is unchanged: the same file (device, inode), size, modification and
    status-change times. Writing a file's bytes changes its ctime, which no one can set back
    (utime sets the mtime only), so equal versions mean equal contents."""

    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileVersion:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class ArtifactStore:
    """Resolves a TaskStart to module bytes, caching by content digest."""

    def __init__(self, config: PropletConfig, *, racy_s: float = RACY_S) -> None:
        self.config = config
        self.racy_s = racy_s
        self.cache_dir = config.work_dir / "modules"
        # "address/repo@sha256:..." -> its wasm layer
        self._pinned_layers: dict[str, Layer] = {}
        self._clients = OciClients(config.is_insecure, config.rpc_timeout_s)
        # Local file -> its version when last read and the sha256 of what was read then.
        self._files: OrderedDict[Path, tuple[FileVersion, str]] = OrderedDict()

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
            return await self._local_file(Path(url.removeprefix("file://")), have)
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

    async def _local_file(self, path: Path, have: Callable[[str], bool]) -> Artifact:
        known = self._files.get(path)
        if known is not None:
            version, sha256 = known
            try:
                # On the loop: one stat of a local file costs less than the hop to a thread.
                unchanged = FileVersion.of(os.stat(path)) == version
            except OSError:
                unchanged = False  # read below, which says why it cannot be
            if unchanged and have(sha256):
                self._files.move_to_end(path)
                return Artifact(sha256, None, "memory")
        read_at_ns = time.time_ns()
        artifact, version = await asyncio.to_thread(self._read_file, path)
        if version.ctime_ns <= read_at_ns - int(self.racy_s * 1e9):
            self._files[path] = (version, artifact.sha256)
            self._files.move_to_end(path)
            while len(self._files) > MAX_KNOWN_FILES:
                self._files.popitem(last=False)
        else:
            self._files.pop(path, None)
        return artifact

    @staticmethod
    def _read_file(path: Path) -> tuple[Artifact, FileVersion]:
        """The file's module and its version before it was read (a change while reading
        makes the next stat differ, so the file is read again then)."""
        try:
            with path.open("rb") as f:
                version = FileVersion.of(os.fstat(f.fileno()))
                data = f.read()
        except OSError as exc:
            raise TaskFailed(f"image_url: cannot read {path}: {exc.strerror or exc}") from None
        return Artifact(sha256_hex(data), data, "file"), version

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
