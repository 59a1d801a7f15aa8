"""The console as one long-lived thing: `async with Console(ConsoleConfig(...)) as console:`
opens the gRPC client (as an operator when `tls` is set), the board, its feeds and the web
server; `console.url` is the page."""

from __future__ import annotations

import logging
from contextlib import AsyncExitStack
from dataclasses import dataclass

from server.cli.client import Client
from server.config import Endpoints, TlsConfig
from server.console.board import Board
from server.console.feeds import DEFAULT_POLL_S, Feeds
from server.console.web import WebServer
from server.lifecycle import Lifecycle
from server.oci import is_loopback

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:8088"


def split_listen(listen: str) -> tuple[str, int]:
    """`HOST:PORT` (`[::1]:PORT` for IPv6) -> (host, port); ValueError naming --listen."""
    host, sep, port = listen.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"--listen: {listen!r} is not HOST:PORT")
    return host, int(port)


@dataclass(frozen=True)
class ConsoleConfig:
    """Where the page is served (`listen`, loopback by default), the services it reads
    (`endpoints`: the manager and the coordinator), the identity it reads them as (`tls`; None:
    plaintext), how often it lists proplets and experiments (`poll_s`) and each RPC's
    timeout."""

    endpoints: Endpoints
    tls: TlsConfig | None
    listen: str = DEFAULT_LISTEN
    poll_s: float = DEFAULT_POLL_S
    timeout_s: float = 10.0

    def __post_init__(self) -> None:
        split_listen(self.listen)
        if not self.poll_s > 0:
            raise ValueError(f"--poll: {self.poll_s} must be a positive number of seconds")


class Console(Lifecycle):
    """The console between entry and exit."""

    def __init__(self, config: ConsoleConfig) -> None:
        self.config = config
        self.board = Board()
        self._web: WebServer | None = None

    @property
    def url(self) -> str:
        return self._entered(self._web).url

    async def _open(self, stack: AsyncExitStack) -> None:
        host, port = split_listen(self.config.listen)
        if not is_loopback(host):
            # The page has no login of its own: whoever reaches it sees the fleet.
            log.warning("[console] serving on %s, not loopback: whoever reaches it sees it", host)
        client = await stack.enter_async_context(
            Client(self.config.endpoints, tls=self.config.tls, timeout=self.config.timeout_s)
        )
        await stack.enter_async_context(Feeds(client, self.board, self.config.poll_s))
        self._web = await stack.enter_async_context(WebServer(self.board, host, port))
