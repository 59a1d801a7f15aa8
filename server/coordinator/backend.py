"""What the coordinator needs from the registry and the aggregator (`ModelBackend`, the values
it passes them), and how it retries them (`RetryPolicy`, `with_retry`).

`server.coordinator.clients.GrpcModelBackend` is the backend over gRPC; tests may use an
in-process one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from server.aggregator.client import Aggregated
from server.coordinator.rounds import AuditOutcome, Round
from server.coordinator.store import RoundUpdates
from server.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PropellerError,
)
from server.tensors import Spec, Tensors

log = logging.getLogger(__name__)

T = TypeVar("T")

# Downstream errors that another attempt cannot fix.
PERMANENT: tuple[type[PropellerError], ...] = (
    InvalidArgument,
    NotFound,
    AlreadyExists,
    FailedPrecondition,
)


@dataclass(frozen=True)
class BaseModel:
    """A stored version a round trains from: its uri, tensor specs and sha256."""

    uri: str
    specs: list[Spec]
    sha256: str


@dataclass(frozen=True)
class StrategyRun:
    """How one round's updates are combined: the strategy by name with its parameters
    (docs/strategies.md), the round's base model when the strategy needs it, and the
    experiment's strategy state from its previous round (None: none yet)."""

    name: str = ""
    params_json: str = ""
    base: Tensors | None = None
    state: Tensors | None = None


FEDAVG = StrategyRun()


@dataclass(frozen=True)
class StateLineage:
    """What a stateful strategy's round started from and left, as its lineage records it: the
    state it started from and the version whose round left that state (None: zeros, no
    version), and the sha256 of the state it left."""

    start: Tensors | None
    from_version: int | None
    result_sha256: str


@dataclass(frozen=True)
class Lineage:
    """How a version was made, as the registry keeps it beside the version: the round, its
    base model and module, its strategy, and its updates (with their provenance) in
    aggregation order with each one's weight in the aggregate (empty: not known)."""

    version: int
    model_sha256: str
    round: Round
    updates: RoundUpdates
    weights: Sequence[float] = ()
    state: StateLineage | None = None
    # The round's audited updates (`audit`), the rejected ones included (they are not among
    # `updates`).
    audits: Sequence[AuditOutcome] = ()


class ModelBackend(Protocol):
    """What the coordinator needs from the registry and the aggregator."""

    async def resolve(self, model_ref: str) -> BaseModel:
        """The stored model `model_ref` names ("" = the latest); NotFound if there is
        none."""
        ...

    async def base_tensors(self, model_uri: str) -> Tensors:
        """A stored version's tensors (the distance bound measures updates against them)."""
        ...

    async def aggregate(
        self, round_id: str, updates: RoundUpdates, run: StrategyRun = FEDAVG
    ) -> Aggregated:
        """Combine the updates into one model by `run`'s strategy; returns it with the sha256
        of its bytes (in the returned order), which the backend has verified, and the
        strategy's new state (None for a stateless strategy)."""
        ...

    async def put(self, tensors: Tensors, sha256: str) -> tuple[int, str]:
        """Store a model as the registry's next version; returns (version, uri)."""
        ...

    async def find(self, sha256: str, after_version: int) -> tuple[int, str] | None:
        """A stored version newer than `after_version` with exactly these bytes, if any (so a
        retried write whose first attempt did land is not stored twice)."""
        ...

    async def put_lineage(self, lineage: Lineage) -> None:
        """Store the version's lineage with its updates' bytes (idempotent: the same lineage
        again is fine)."""
        ...


@dataclass(frozen=True)
class RetryPolicy:
    """Aggregation and the registry write are each tried up to `attempts` times; the wait
    before attempt n+1 is `initial_backoff_s * factor**(n-1)`, capped at `max_backoff_s`. So
    the time spent waiting is bounded by `total_backoff_s()` (plus each attempt's RPC
    timeout); after the last attempt the round fails with the last error as its reason."""

    attempts: int = 5
    initial_backoff_s: float = 0.2
    factor: float = 2.0
    max_backoff_s: float = 5.0

    def backoff_s(self, attempt: int) -> float:
        """The wait after failed attempt `attempt` (1-based)."""
        return min(self.initial_backoff_s * self.factor ** (attempt - 1), self.max_backoff_s)

    def total_backoff_s(self) -> float:
        return sum(self.backoff_s(n) for n in range(1, max(1, self.attempts)))


async def with_retry(
    policy: RetryPolicy, what: str, round_id: str, attempt_fn: Callable[[int], Awaitable[T]]
) -> T:
    """`attempt_fn(n)` for n = 1, 2, ... under `policy`: a `PERMANENT` error is raised at
    once; after the last attempt the last error, its message naming `what` and the count."""
    attempts = max(1, policy.attempts)
    for attempt in range(1, attempts + 1):
        try:
            return await attempt_fn(attempt)
        except PERMANENT:
            raise
        except PropellerError as exc:
            if attempt == attempts:
                raise type(exc)(f"{what}: {attempts} attempts, last: {exc}") from exc
            delay = policy.backoff_s(attempt)
            log.warning(
                "[Coordinator.aggregate] round_id=%s %s attempt %d/%d failed: %s; "
                "retrying in %.2fs",
                round_id,
                what,
                attempt,
                attempts,
                exc,
                delay,
            )
        await asyncio.sleep(delay)
    raise AssertionError("unreachable")
