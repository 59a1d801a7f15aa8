"""A compromised proplet, built test-side: it holds a real certificate, runs the pinned module
like any proplet, and then sends not what it trained but a poisoned update, signed with its
own key (module pinning and signatures cannot stop that: docs/security.md, "What provenance
does not give"). Nothing in the product knows about it.

`PoisoningProplet` is a `Proplet` whose round client (`FederatedClient`) transforms the update
before `FederatedClient.submit` signs and sends it: update = base + scale * (trained - base),
by default scale = -10 (sign-flipped and scaled ten times). `poisoning` is a switch the test
flips, so one cluster can run a clean experiment and a poisoned one with the same proplets.
"""

from __future__ import annotations

from dataclasses import dataclass

from propeller.v1 import coordinator_pb2
from proplet.app import Proplet
from proplet.config import PropletConfig
from proplet.federated import FederatedClient, FlTask, Update

# base - 10 * (trained - base): the direction flipped, the step ten times as long.
SCALE = -10.0


@dataclass
class Poisoning:
    """Whether the compromised proplets poison now, and by what factor."""

    active: bool = False
    scale: float = SCALE


class PoisoningClient(FederatedClient):
    """Submits base + scale * (trained - base) instead of the trained model while
    `poisoning.active`; signing and sending stay the product's."""

    def __init__(self, inner: FederatedClient, poisoning: Poisoning) -> None:
        super().__init__(
            inner.proplet_id, inner.rpc_timeout_s, backoff=inner.backoff, tls=inner.tls
        )
        self.poisoning = poisoning

    async def submit(
        self, fl: FlTask, update: Update, deadline: float | None = None
    ) -> coordinator_pb2.SubmitUpdateResponse:
        if self.poisoning.active:
            base, _ = await self.fetch_model(fl, deadline)
            scale = self.poisoning.scale
            poisoned = {
                name: (base[name] + scale * (trained - base[name])).astype(trained.dtype)
                for name, trained in update.tensors.items()
            }
            update = Update(update.meta, poisoned)
        return await super().submit(fl, update, deadline)


class PoisoningProplet(Proplet):
    def __init__(self, config: PropletConfig, poisoning: Poisoning) -> None:
        super().__init__(config)
        self.federated = PoisoningClient(self.federated, poisoning)
