"""Aggregator service: configuration, lifecycle and entry point. The aggregator is stateless."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from server.aggregator.intake import DEFAULT_MAX_HELD_BYTES
from server.aggregator.service import binding
from server.config import TlsConfig, setting, settings_from_env
from server.grpc_server import ServiceBinding
from server.lifecycle import ServiceApp, run_service


@dataclass(frozen=True)
class AggregatorConfig:
    addr: str = setting("PROPELLER_AGGREGATOR_LISTEN", "127.0.0.1:8085")
    # What an order-statistic strategy (median, trimmed mean, Krum, Bulyan) may hold of one
    # round's updates; an update beyond it is refused (docs/strategies.md).
    max_held_bytes: int = setting("PROPELLER_AGGREGATOR_MAX_HELD_BYTES", DEFAULT_MAX_HELD_BYTES)
    # Mutual TLS (None: plaintext); see TlsConfig.
    tls: TlsConfig | None = field(kw_only=True)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> AggregatorConfig:
        env = os.environ if env is None else env
        return cls(**settings_from_env(cls, env), tls=TlsConfig.from_env(env))


class AggregatorApp(ServiceApp):
    """Nothing to open: the servicer holds no state between calls."""

    def __init__(self, config: AggregatorConfig) -> None:
        self.config = config
        self._bindings = [binding(config.max_held_bytes)]

    @property
    def bindings(self) -> list[ServiceBinding]:
        return self._bindings


async def main() -> None:
    config = AggregatorConfig.from_env()
    await run_service(AggregatorApp(config), config.addr, config.tls)


if __name__ == "__main__":
    asyncio.run(main())
