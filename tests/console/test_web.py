"""The console's web server on a loopback port, spoken to as a browser would over raw
sockets: the page and its files (with a policy that lets it load nothing from elsewhere), the
board as JSON, the event stream (a snapshot, then each change), and what it refuses: another
host name (DNS rebinding), anything but GET, an unknown path, an oversized request."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from server.console import web as web_module
from server.console.board import Board
from server.console.web import MAX_HEAD, WebServer

pytestmark = pytest.mark.integration


@pytest.fixture
async def served() -> AsyncIterator[tuple[Board, WebServer]]:
    board = Board()
    async with WebServer(board, "127.0.0.1", 0) as web:
        yield board, web


async def request(
    web: WebServer, head: str, host: str | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", web.port)
    # None: this server's address; "": no Host header at all.
    host = f"127.0.0.1:{web.port}" if host is None else host
    host_line = f"Host: {host}\r\n" if host else ""
    writer.write(f"{head}\r\n{host_line}\r\n".encode())
    await writer.drain()
    return reader, writer


async def answer(web: WebServer, head: str, host: str | None = None) -> tuple[str, bytes]:
    """The status line and headers, and the body (the server closes after one answer)."""
    reader, writer = await request(web, head, host)
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    await writer.wait_closed()
    top, _, body = raw.partition(b"\r\n\r\n")
    return top.decode(), body


async def test_the_page_its_files_and_the_board(served: tuple[Board, WebServer]) -> None:
    board, web = served
    top, body = await answer(web, "GET / HTTP/1.1")
    assert top.startswith("HTTP/1.1 200") and b'<script src="/console.js"' in body
    assert "Content-Security-Policy: default-src 'self'" in top
    for path, kind in (("/console.js", "text/javascript"), ("/console.css", "text/css")):
        top, body = await answer(web, f"GET {path} HTTP/1.1")
        assert top.startswith("HTTP/1.1 200") and f"Content-Type: {kind}" in top and body
    # Nothing on the page comes from elsewhere (no CDN: the console works offline).
    for path in ("/", "/console.js", "/console.css"):
        _, body = await answer(web, f"GET {path} HTTP/1.1")
        assert b"http://" not in body.replace(b"http://www.w3.org/2000/svg", b"")
        assert b"https://" not in body
    board.proplets([{"id": "p1", "alive": True}])
    top, body = await answer(web, "GET /state.json HTTP/1.1")
    assert json.loads(body) == board.snapshot() and json.loads(body)["proplets"][0]["id"] == "p1"


async def read_event(reader: asyncio.StreamReader) -> tuple[str, Any]:
    block = (await asyncio.wait_for(reader.readuntil(b"\n\n"), 10)).decode()
    fields = dict(line.split(": ", 1) for line in block.strip().split("\n"))
    return fields["event"], json.loads(fields["data"])


async def test_events_are_a_snapshot_then_each_change(served: tuple[Board, WebServer]) -> None:
    board, web = served
    board.experiment("e1", {"state": "RUNNING"})
    reader, writer = await request(web, "GET /events HTTP/1.1")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert b"200 OK" in head and b"Content-Type: text/event-stream" in head
    assert await read_event(reader) == ("snapshot", board.snapshot())
    board.round("e1-r1", {"experiment_id": "e1", "state": "OPEN", "index": 1})
    board.round("e1-r1", {"state": "COMPLETED", "train": {"loss": 0.25}})
    board.problem("manager: cannot reach manager at 127.0.0.1:1")
    opened = {"round_id": "e1-r1", "experiment_id": "e1", "state": "OPEN", "index": 1}
    assert await read_event(reader) == ("round", opened)
    event, data = await read_event(reader)
    assert event == "round" and data == board.snapshot()["rounds"][0]
    assert data["state"] == "COMPLETED"
    assert await read_event(reader) == ("problem", "manager: cannot reach manager at 127.0.0.1:1")
    # Leaving the server ends the open stream (the page's browser reconnects elsewhere).
    await web.__aexit__(None, None, None)
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()
    await writer.wait_closed()


@pytest.mark.parametrize(
    ("head", "host", "status"),
    [
        ("GET / HTTP/1.1", "attacker.example:80", "421"),
        ("GET /state.json HTTP/1.1", "", "421"),
        ("POST /events HTTP/1.1", None, "405"),
        ("GET /admin HTTP/1.1", None, "404"),
        ("GET / SPDY/3", None, "400"),
    ],
)
async def test_refused(
    served: tuple[Board, WebServer], head: str, host: str | None, status: str
) -> None:
    _, web = served
    top, body = await answer(web, head, host)
    assert top.startswith(f"HTTP/1.1 {status}"), top
    assert body.strip()  # says why


async def test_an_oversized_request_is_refused_as_it_arrives(
    served: tuple[Board, WebServer],
) -> None:
    _, web = served
    top, _ = await answer(web, "GET / HTTP/1.1\r\nX-Filler: " + "a" * MAX_HEAD)
    assert top.startswith("HTTP/1.1 431"), top


async def test_a_request_that_does_not_arrive_in_time_is_refused(
    served: tuple[Board, WebServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, web = served
    monkeypatch.setattr(web_module, "READ_S", 0.2)
    reader, writer = await asyncio.open_connection("127.0.0.1", web.port)
    writer.write(b"GET / HTTP/1.1\r\n")  # and nothing more
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    await writer.wait_closed()
    assert raw.startswith(b"HTTP/1.1 408"), raw
