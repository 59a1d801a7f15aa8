"""`python -m proplet`: run one proplet configured from the environment (PROPLET_ID, ...)."""

from __future__ import annotations

import asyncio
import logging
import os

from proplet.app import main
from server import tracing
from server.log_format import LogConfig, configure_logging
from server.metrics import MetricsConfig, serving_metrics

if __name__ == "__main__":
    configure_logging(
        logging.getLevelNamesMapping()[os.environ.get("LOG_LEVEL", "INFO").upper()],
        LogConfig.from_env(),
    )
    tracing.configure(os.environ, "proplet")
    with serving_metrics(MetricsConfig.from_env()):
        asyncio.run(main())
