"""Aggregator service: configuration, lifecycle and entry point. The aggregator is stateless."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from server.aggregator.service import binding
from server.config import TlsConfig, env_str
from server.grpc_server import ServiceBinding
from server.lifecycle import ServiceApp, run_service


@dataclass(frozen=True)
class AggregatorConfig:
    addr: str = "127.0.0.1:8085"
    # Mutual TLS (None: plaintext); see TlsConfig.
    tls: TlsConfig | None = field(kw_only=True)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> AggregatorConfig:
        env = os.environ if env is None else env
        return cls(
            addr=env_str(env, "PROPELLER_AGGREGATOR_LISTEN", cls(tls=None).addr),
            tls=TlsConfig.from_env(env),
        )


class AggregatorApp(ServiceApp):
    """Nothing to open: the servicer holds no state."""

    def __init__(self, config: AggregatorConfig) -> None:
        self.config = config
        self._bindings = [binding()]

    @property
    def bindings(self) -> list[ServiceBinding]:
        return self._bindings


async def main() -> None:
    config = AggregatorConfig.from_env()
    await run_service(AggregatorApp(config), config.addr, config.tls)


if __name__ == "__main__":
    asyncio.run(main())
