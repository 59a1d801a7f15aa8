"""OCI image references, shared by the proplet (pulls) and the CLI (pushes)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from server.errors import InvalidArgument

DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
# host[:port]/path[:tag][@sha256:hex]; the host must look like one (has a '.' or ':' or is
# localhost), as in the docker reference grammar.
_REFERENCE = re.compile(
    r"^(?P<host>[^/@]+)/(?P<repo>[a-z0-9]+(?:[._/-][a-z0-9]+)*)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?(?:@(?P<digest>[^@]+))?$"
)
_LOOPBACK_HOSTS = ("localhost", "127.", "[::1]", "::1")


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

    @property
    def reference(self) -> str:
        """What to ask the registry's manifest endpoint for: the digest when pinned."""
        return self.digest or self.tag

    def __str__(self) -> str:
        pinned = f"@{self.digest}" if self.digest else ""
        return f"{self.host}/{self.repository}:{self.tag}{pinned}"
