"""`python -m proplet`: run one proplet configured from the environment (PROPLET_ID, ...)."""

from __future__ import annotations

import asyncio
import logging
import os

from proplet.app import main
from server import tracing

if __name__ == "__main__":
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    tracing.configure(os.environ, "proplet")
    asyncio.run(main())
