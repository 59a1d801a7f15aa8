"""Aggregator service: configuration, lifecycle and entry point. The aggregator is stateless."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType

from server.aggregator.service import binding
from server.config import env_str
from server.grpc_server import ServiceBinding, serve_until_signal


@dataclass(frozen=True)
class AggregatorConfig:
    addr: str = "127.0.0.1:8085"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> AggregatorConfig:
        env = os.environ if env is None else env
        return cls(addr=env_str(env, "PROPELLER_AGGREGATOR_LISTEN", cls().addr))


class AggregatorApp:
    def __init__(self, config: AggregatorConfig) -> None:
        self.config = config
        self.bindings: list[ServiceBinding] = [binding()]

    async def __aenter__(self) -> AggregatorApp:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None


async def main() -> None:
    config = AggregatorConfig.from_env()
    async with AggregatorApp(config) as app:
        await serve_until_signal(config.addr, app.bindings)


if __name__ == "__main__":
    asyncio.run(main())
