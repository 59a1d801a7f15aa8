"""The console's HTTP server, on the stdlib's asyncio streams: GET only, five paths, no
framework (a read-only page of three files, a JSON document and one event stream do not need
one, and the project keeps its dependencies few).

- `/`, `/console.js`, `/console.css`: the page, served from `static/` (nothing from a CDN:
  the page works on a machine without a network).
- `/state.json`: the `Board`'s snapshot.
- `/events`: server-sent events: `snapshot` (the board), then one event per change (`proplets`,
  `experiment`, `round`, `problem`), a comment every `KEEPALIVE_S` so a dead page is noticed.

Every request is bounded as it arrives (a request line and headers of at most `MAX_HEAD`
bytes, read within `READ_S`), and its Host header must name this server (`Host` checks:
another web site's script resolved to 127.0.0.1 by DNS rebinding cannot read the fleet).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import resources
from typing import Any

from server.console.board import Board, Change

log = logging.getLogger(__name__)

MAX_HEAD = 16 * 1024
MAX_HEADERS = 64
READ_S = 10.0
KEEPALIVE_S = 15.0
STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/console.js": ("console.js", "text/javascript; charset=utf-8"),
    "/console.css": ("console.css", "text/css; charset=utf-8"),
}
# The page runs only its own script and style and connects only back here.
SECURITY_HEADERS = (
    ("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
)
WILDCARDS = ("0.0.0.0", "::", "")
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    421: "Misdirected Request",
    431: "Request Header Fields Too Large",
}


class BadRequest(Exception):
    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]


def static_file(name: str) -> bytes:
    return resources.files("server.console").joinpath("static", name).read_bytes()


async def read_request(reader: asyncio.StreamReader) -> Request:
    """The request line and headers, bounded in size and time; the body is never read (GET)."""
    try:
        async with asyncio.timeout(READ_S):
            head = await reader.readuntil(b"\r\n\r\n")
    except TimeoutError:
        raise BadRequest(408, "the request did not arrive in time") from None
    except asyncio.LimitOverrunError:
        raise BadRequest(431, f"request head over {MAX_HEAD} bytes") from None
    except asyncio.IncompleteReadError:
        raise BadRequest(400, "connection closed before the request ended") from None
    lines = head.decode("latin-1").split("\r\n")[:-2]
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest(400, "malformed request line")
    if len(lines) - 1 > MAX_HEADERS:
        raise BadRequest(431, f"more than {MAX_HEADERS} headers")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise BadRequest(400, "malformed header line")
        headers[name.strip().lower()] = value.strip()
    return Request(parts[0], parts[1].split("?", 1)[0], headers)


def _head(status: int, content_type: str, length: int | None = None) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS[status]}", f"Content-Type: {content_type}"]
    lines += [f"{name}: {value}" for name, value in SECURITY_HEADERS]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def sse(event: str, data: Any) -> bytes:
    """One server-sent event; JSON has no raw newlines, so `data` is one line."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class WebServer:
    """The page's server over `board`, on `host:port` (port 0: a free one; `port` is the bound
    one once entered)."""

    def __init__(self, board: Board, host: str, port: int) -> None:
        self._board = board
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None
        self._streams: set[asyncio.Task[Any]] = set()
        self._closing = False

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    async def __aenter__(self) -> WebServer:
        self._server = await asyncio.start_server(self._serve, self.host, self.port, limit=MAX_HEAD)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._closing = True
            self._server.close()
            # Event streams never end by themselves: end them, then wait for the server.
            for task in list(self._streams):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*self._streams, return_exceptions=True)
            await self._server.wait_closed()

    def _host_allowed(self, host: str) -> bool:
        """The Host a browser sends: this server's address (or localhost's, on this port).
        Served on every interface (0.0.0.0, ::), any name with this port: whoever reaches it
        already sees it, and the console warned of that when it started."""
        if self.host in WILDCARDS:
            return host.rpartition(":")[2] == str(self.port)
        names = {self.host, f"[{self.host}]", "localhost", "127.0.0.1", "[::1]"}
        return host in {f"{name}:{self.port}" for name in names}

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._streams.add(task)
        try:
            await self._answer(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the page went away
        except asyncio.CancelledError:
            # Ours, at exit (an event stream never ends by itself): the answer ends here. The
            # task asyncio.start_server made must not end cancelled: it logs that as an error.
            if not self._closing:
                raise
        finally:
            self._streams.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await read_request(reader)
            if request.method not in ("GET", "HEAD"):
                raise BadRequest(405, f"{request.method}: the console is read-only (GET)")
            if not self._host_allowed(request.headers.get("host", "")):
                raise BadRequest(421, "Host: not this console's address")
        except BadRequest as exc:
            body = f"{exc}\n".encode()
            writer.write(_head(exc.status, "text/plain; charset=utf-8", len(body)) + body)
            await writer.drain()
            return
        body_too = request.method == "GET"
        if request.path in STATIC:
            name, content_type = STATIC[request.path]
            body = static_file(name)
            writer.write(_head(200, content_type, len(body)) + (body if body_too else b""))
        elif request.path == "/state.json":
            body = json.dumps(self._board.snapshot()).encode()
            writer.write(_head(200, "application/json", len(body)) + (body if body_too else b""))
        elif request.path == "/events" and body_too:
            await self._events(writer)
        else:
            body = f"{request.path}: no such page\n".encode()
            writer.write(_head(404, "text/plain; charset=utf-8", len(body)) + body)
        await writer.drain()

    async def _events(self, writer: asyncio.StreamWriter) -> None:
        writer.write(_head(200, "text/event-stream"))
        async with self._board.page() as (snapshot, changes):
            writer.write(sse("snapshot", snapshot))
            await writer.drain()
            async for change in _changes(changes):
                writer.write(
                    b": keepalive\n\n" if change is None else sse(change.kind, change.data)
                )
                await writer.drain()


async def _changes(queue: asyncio.Queue[Change | None]) -> AsyncIterator[Change | None]:
    """The page's changes, None every KEEPALIVE_S without one; ends when the board drops it."""
    while True:
        try:
            async with asyncio.timeout(KEEPALIVE_S):
                change = await queue.get()
        except TimeoutError:
            yield None
            continue
        if change is None:
            return
        yield change
