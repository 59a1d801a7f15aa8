"""OCI images: references (`ImageRef`), and the one registry client (`OciClient`) the proplet
pulls task modules with and the CLI pushes them with.

Pulls honour the tag or digest the reference names (the original always pulled `latest` and
never checked a digest) and verify what arrives:
- a reference pinned `@sha256:<hex>` must resolve to a manifest whose bytes hash to that digest;
- the wasm layer's bytes must hash to the layer digest the manifest declares, and match its size.

Every request is one bounded attempt (oras itself retries failed connections for minutes), and
every failure leaves as one of our errors (`server.errors`) whose message names the image and
the problem. The client is blocking (requests underneath): call it via `asyncio.to_thread`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.errors import (
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PropellerError,
    ResourceExhausted,
    Unavailable,
)
from server.messages import json_object

log = logging.getLogger(__name__)

DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
# host[:port]/path[:tag][@sha256:hex]; the host must look like one (has a '.' or ':' or is
# localhost), as in the docker reference grammar.
_REFERENCE = re.compile(
    r"^(?P<host>[^/@]+)/(?P<repo>[a-z0-9]+(?:[._/-][a-z0-9]+)*)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?(?:@(?P<digest>[^@]+))?$"
)
_LOOPBACK_HOSTS = ("localhost", "127.", "[::1]", "::1")

WASM_MEDIA_TYPE = "application/wasm"
WASM_MEDIA_TYPES = (WASM_MEDIA_TYPE, "application/vnd.wasm.content.layer.v1+wasm")
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


def oci_insecure_from_env(env: Mapping[str, str]) -> bool | None:
    """PROPELLER_OCI_INSECURE (the manager's pinning, the coordinator's audit): 1/true/yes or
    0/false/no; unset: None (plain HTTP for loopback registries only)."""
    key = "PROPELLER_OCI_INSECURE"
    raw = env.get(key, "").strip().lower()
    if not raw:
        return None
    if raw in ("1", "true", "yes"):
        return True
    if raw in ("0", "false", "no"):
        return False
    raise ValueError(f"{key}: {raw!r} must be 1 or 0")


def is_loopback(host: str) -> bool:
    """True for localhost / 127.x / ::1, with or without a port."""
    return host.startswith(_LOOPBACK_HOSTS)


@dataclass(frozen=True)
class ImageRef:
    """A parsed OCI reference `host[:port]/repository[:tag][@sha256:hex]`."""

    host: str
    repository: str
    tag: str = "latest"
    digest: str = ""

    @classmethod
    def parse(cls, url: str, field: str = "image_url") -> ImageRef:
        """Parse `url`; InvalidArgument naming `field` when it is not a reference."""
        text = url.strip().removeprefix("oci://")
        m = _REFERENCE.match(text)
        if m is None:
            raise InvalidArgument(
                f"{field}: {url!r} is not an OCI reference like "
                "'registry:5000/repository:tag' or 'registry:5000/repository@sha256:<hex>'"
            )
        host = m.group("host")
        if not ("." in host or ":" in host or host == "localhost"):
            raise InvalidArgument(f"{field}: {url!r} names no registry host")
        digest = m.group("digest") or ""
        if digest and not DIGEST.match(digest):
            raise InvalidArgument(f"{field}: digest {digest!r} is not 'sha256:' + 64 hex digits")
        return cls(host, m.group("repo"), m.group("tag") or "latest", digest)

    @classmethod
    def push_target(cls, url: str, field: str = "--image") -> ImageRef:
        """A reference to push to: it names a tag (latest by default), never a digest, since
        a digest is what the registry gives back."""
        ref = cls.parse(url, field)
        if ref.digest:
            raise InvalidArgument(f"{field}: {url!r}: push to a tag, not a digest")
        return ref

    @property
    def reference(self) -> str:
        """What to ask the registry's manifest endpoint for: the digest when pinned."""
        return self.digest or self.tag

    def __str__(self) -> str:
        pinned = f"@{self.digest}" if self.digest else ""
        return f"{self.host}/{self.repository}:{self.tag}{pinned}"


@dataclass(frozen=True)
class Layer:
    """An image's wasm layer as its manifest declares it."""

    sha256: str  # hex, without the "sha256:" prefix
    size: int | None  # None: the manifest gives no (integer) size


@dataclass(frozen=True)
class PushResult:
    image: str
    digest: str
    size: int
    media_type: str
    manifest_digest: str

    @property
    def pinned(self) -> str:
        """The image pinned to the pushed manifest: `host/repo@sha256:...`."""
        if not self.manifest_digest:
            return ""
        return f"{self.image.rsplit(':', 1)[0]}@{self.manifest_digest}"

    def to_dict(self) -> dict[str, object]:
        """`wasm push --json`: the fields, then `pinned`."""
        return {**dataclasses.asdict(self), "pinned": self.pinned}


def registry_error(response: Any) -> str:
    """`HTTP 404 (MANIFEST_UNKNOWN: manifest unknown)` from an OCI error response."""
    detail = ""
    with contextlib.suppress(Exception):
        errors = response.json().get("errors") or []
        detail = "; ".join(f"{e.get('code', '')}: {e.get('message', '')}" for e in errors)
    return f"HTTP {response.status_code}" + (f" ({detail})" if detail else "")


class _Refused(Exception):
    """The registry answered an upload with an error status (the message says which)."""


def _oras_client(address: str, insecure: bool, timeout: float) -> Any:
    """oras with one bounded attempt per request, and a refused upload as `_Refused`.

    oras' own `do_request` retries failed connections five times, sleeping up to 83 s between
    attempts; a proplet or a CLI user wants a prompt, explained failure instead. (Imported
    here: oras pulls in requests and jsonschema, which most CLI commands never need.)"""
    import oras.auth
    import oras.client

    class Client(oras.client.OrasClient):  # type: ignore[misc]  # oras is untyped
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
                    timeout=timeout,
                )

            response = send()
            if response.status_code in (401, 403):
                headers, changed = self.auth.authenticate_request(response, headers)
                if changed:
                    response = send()
            return response

        def _check_200_response(self, response: Any) -> None:
            if response.status_code not in (200, 201, 202):
                raise _Refused(registry_error(response))

    return Client(hostname=address, insecure=insecure)


class OciClient:
    """One registry at `address` (host:port, after any mirror), over plain HTTP when
    `insecure`. Blocking; `close()` ends its HTTP session."""

    def __init__(self, address: str, *, insecure: bool, timeout: float) -> None:
        self.address = address
        self.insecure = insecure
        self._oras = _oras_client(address, insecure, timeout)

    def close(self) -> None:
        self._oras.session.close()

    @contextlib.contextmanager
    def _pulling(self, ref: ImageRef) -> Iterator[None]:
        try:
            yield
        except PropellerError:
            raise
        except Exception as exc:  # requests/oras errors: connection refused, bad JSON...
            raise Unavailable(
                f"image {ref}: registry {self.address} unreachable or broken: {exc}"
            ) from None

    def _container(self, ref: ImageRef) -> Any:
        # The tag's container first: oras builds the digest's from the same name.
        container = self._oras.get_container(f"{self.address}/{ref.repository}:{ref.tag}")
        if ref.digest:
            container = self._oras.get_container(f"{self.address}/{ref.repository}@{ref.digest}")
        return container

    def wasm_layer(self, ref: ImageRef) -> Layer:
        """The image's one wasm layer, from a manifest checked against a pinned digest."""
        return self.pin(ref)[1]

    def pin(self, ref: ImageRef) -> tuple[ImageRef, Layer]:
        """`ref` pinned to the digest of the manifest it resolves to now (a tag may move
        later; the pinned reference never does), and that manifest's wasm layer."""
        with self._pulling(ref):
            url = f"{self._oras.prefix}://{self._container(ref).manifest_url()}"
            response = self._oras.do_request(url, "GET", headers={"Accept": MANIFEST_ACCEPT})
            if response.status_code != 200:
                raise NotFound(f"image {ref}: manifest not found: {registry_error(response)}")
            raw: bytes = response.content
            if len(raw) > MAX_MANIFEST_BYTES:
                raise ResourceExhausted(
                    f"image {ref}: manifest larger than {MAX_MANIFEST_BYTES} bytes"
                )
            got = "sha256:" + hashlib.sha256(raw).hexdigest()
            if ref.digest and got != ref.digest:
                raise DataLoss(
                    f"image {ref}: manifest digest mismatch: pinned {ref.digest}, "
                    f"registry served {got}"
                )
            manifest = json_object(
                raw,
                lambda exc: FailedPrecondition(f"image {ref}: manifest is not JSON: {exc}"),
                lambda _: FailedPrecondition(f"image {ref}: manifest is not a JSON object"),
            )
            layer = _pick_wasm_layer(manifest, ref)
            digest = str(layer.get("digest", ""))
            if not DIGEST.match(digest):
                raise FailedPrecondition(f"image {ref}: layer digest {digest!r} is not sha256")
            size = layer.get("size")
            declared = size if isinstance(size, int) and not isinstance(size, bool) else None
            pinned = dataclasses.replace(ref, digest=got)
            return pinned, Layer(digest.removeprefix("sha256:"), declared)

    def fetch_layer(self, ref: ImageRef, layer: Layer) -> bytes:
        """The layer's bytes, streamed up to its declared size and checked against its
        digest."""
        digest = f"sha256:{layer.sha256}"
        limit = MAX_MODULE_BYTES
        if layer.size is not None:
            if layer.size > MAX_MODULE_BYTES:
                raise ResourceExhausted(
                    f"image {ref}: layer of {layer.size} bytes exceeds {MAX_MODULE_BYTES}"
                )
            limit = layer.size
        with (
            self._pulling(ref),
            self._oras.get_blob(self._container(ref), digest, stream=True) as response,
        ):
            if response.status_code != 200:
                raise NotFound(f"image {ref}: blob {digest} not found: {registry_error(response)}")
            h = hashlib.sha256()
            buf = bytearray()
            for chunk in response.iter_content(chunk_size=1 << 16):
                buf += chunk
                h.update(chunk)
                if len(buf) > limit:
                    raise ResourceExhausted(
                        f"image {ref}: blob {digest} is larger than the {limit} bytes declared"
                    )
        got = h.hexdigest()
        if got != layer.sha256:
            raise DataLoss(
                f"image {ref}: blob digest mismatch: expected {digest}, got sha256:{got}"
            )
        if layer.size is not None and len(buf) != layer.size:
            raise DataLoss(
                f"image {ref}: blob {digest} has {len(buf)} bytes, manifest says {layer.size}"
            )
        log.info("[oci] pulled %s sha256=%s size=%d", ref, layer.sha256[:12], len(buf))
        return bytes(buf)

    def push(self, path: Path, ref: ImageRef, media_type: str = WASM_MEDIA_TYPE) -> PushResult:
        """Push one file as an OCI artifact with one layer of `media_type`, as the seed's
        `oras push IMAGE fl-client.wasm:application/wasm`."""
        data = path.read_bytes()
        target = f"{ref.host}/{ref.repository}:{ref.tag}"
        try:
            response = self._oras.push(
                target=target,
                files=[f"{path}:{media_type}"],
                disable_path_validation=True,
                quiet=True,
            )
        except _Refused as exc:
            raise FailedPrecondition(
                f"OCI registry at {self.address} refused the push: {exc}"
            ) from None
        except OSError as exc:  # requests' connection, TLS and timeout errors
            hint = ""
            if not self.insecure and "ssl" in str(exc).lower():
                hint = " (TLS failed: use --plain-http for a plain-HTTP registry)"
            scheme = "http" if self.insecure else "https"
            raise Unavailable(
                f"cannot reach OCI registry at {self.address} over {scheme}{hint}"
            ) from None
        return PushResult(
            image=target,
            digest="sha256:" + hashlib.sha256(data).hexdigest(),
            size=len(data),
            media_type=media_type,
            manifest_digest=str(response.headers.get("Docker-Content-Digest", "")),
        )


def _pick_wasm_layer(manifest: dict[str, Any], ref: ImageRef) -> dict[str, Any]:
    media = manifest.get("mediaType", "")
    if media in INDEX_MEDIA_TYPES or "manifests" in manifest:
        raise FailedPrecondition(f"image {ref}: is an image index, not a single wasm artifact")
    layers = manifest.get("layers")
    if not isinstance(layers, list) or not layers:
        raise FailedPrecondition(f"image {ref}: manifest lists no layers")
    wasm = [x for x in layers if isinstance(x, dict) and x.get("mediaType") in WASM_MEDIA_TYPES]
    if len(wasm) == 1:
        return wasm[0]
    if not wasm and len(layers) == 1 and isinstance(layers[0], dict):
        return layers[0]
    kinds = [x.get("mediaType") for x in layers if isinstance(x, dict)]
    raise FailedPrecondition(f"image {ref}: expected one application/wasm layer, found {kinds}")
