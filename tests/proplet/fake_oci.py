"""A registry that lies: serves whatever manifests and blobs a test hands it, so tests can
show that a proplet refuses content that does not match its digests. (A real registry
verifies digests on push, so tampering can only be shown with a server that does not.)"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class LyingRegistry:
    manifests: dict[str, bytes] = field(default_factory=dict)  # "repo/ref" -> bytes
    blobs: dict[str, bytes] = field(default_factory=dict)  # "sha256:..." -> bytes
    port: int = 0

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def wasm_manifest(layer_digest: str, size: int) -> bytes:
    empty = b"{}"
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.unknown.config.v1+json",
                "digest": digest_of(empty),
                "size": len(empty),
            },
            "layers": [{"mediaType": "application/wasm", "digest": layer_digest, "size": size}],
        }
    ).encode()


@contextmanager
def lying_registry() -> Iterator[LyingRegistry]:
    reg = LyingRegistry()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            parts = self.path.split("/")  # "", "v2", repo..., kind, ref
            body: bytes | None = None
            if len(parts) >= 5 and parts[1] == "v2":
                kind, ref = parts[-2], parts[-1]
                repo = "/".join(parts[2:-2])
                if kind == "manifests":
                    body = reg.manifests.get(f"{repo}/{ref}")
                elif kind == "blobs":
                    body = reg.blobs.get(ref)
            if body is None:
                self.send_response(404)
                self.send_header("Content-Type", "application/json")
                payload = b'{"errors": [{"code": "NAME_UNKNOWN", "message": "not here"}]}'
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    reg.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield reg
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
