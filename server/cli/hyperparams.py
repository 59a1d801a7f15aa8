"""The CLI's round hyperparameters in one place: the defaults of the client commands
(`experiment start`, `round configure`) and of the demo, and how flags become the wire message.

The two sets differ on purpose for now: the demo's were chosen so the seeded synthetic data
converges visibly in five rounds (docs/demo.md). When the round spec has one home
(server/round_spec.py), these point at it.
"""

from __future__ import annotations

from dataclasses import dataclass

from propeller.v1 import coordinator_pb2


@dataclass(frozen=True)
class Defaults:
    epochs: int
    lr: float
    batch_size: int
    timeout_s: float  # the round's deadline, from its start


CLIENT = Defaults(epochs=1, lr=0.01, batch_size=16, timeout_s=60.0)
DEMO = Defaults(epochs=1, lr=0.1, batch_size=1, timeout_s=60.0)


def hyperparams(epochs: int, lr: float, batch_size: int) -> coordinator_pb2.Hyperparams:
    """The flags' values as the manager and the coordinator take them."""
    return coordinator_pb2.Hyperparams(epochs=epochs, lr=lr, batch_size=batch_size)
