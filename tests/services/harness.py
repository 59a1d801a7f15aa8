"""Serving a service's bindings on a real grpc.aio server on a free loopback port."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import grpc
import pytest

from server.config import TlsConfig
from server.grpc_server import ServiceBinding, channel, serving
from tests.support.security import operator_tls, service_tls

# Every RPC a test makes is bounded; generous so a slow CI machine does not flake.
RPC_TIMEOUT = 60.0


@asynccontextmanager
async def served(
    bindings: Sequence[ServiceBinding], caller: TlsConfig | None = None
) -> AsyncIterator[grpc.aio.Channel]:
    """A client channel to `bindings` served on 127.0.0.1:0 (mutual TLS from the suite's CA)
    for the duration of the block, calling as `caller` (default: the suite's operator)."""
    server = service_tls("test-server")
    async with (
        serving("127.0.0.1:0", bindings, server) as port,
        channel(f"127.0.0.1:{port}", caller or operator_tls()) as ch,
    ):
        yield ch


def rpc_error(excinfo: pytest.ExceptionInfo[grpc.aio.AioRpcError]) -> tuple[grpc.StatusCode, str]:
    err = excinfo.value
    return err.code(), err.details() or ""
