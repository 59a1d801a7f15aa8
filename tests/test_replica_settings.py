"""A replica's settings (`server.coordinator.replicas.ReplicaSettings`), the coordinator's and
the manager's: a non-empty id, and every interval a positive number of seconds."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from server.coordinator.replicas import DEFAULT_LEASE_S
from server.coordinator.replicas import Replica as CoordinatorReplica
from server.manager.replicas import Replica as ManagerReplica


def test_defaults() -> None:
    assert CoordinatorReplica("c").lease_s == DEFAULT_LEASE_S
    assert ManagerReplica("m").lease_s == DEFAULT_LEASE_S
    assert CoordinatorReplica("c").watch_poll_s > 0 and ManagerReplica("m").refresh_s > 0


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: CoordinatorReplica(""), "replica_id: a coordinator replica needs a non-empty id"),
        (lambda: ManagerReplica(""), "replica_id: a manager replica needs a non-empty id"),
        (lambda: CoordinatorReplica("c", lease_s=0), "lease_s: 0 must be positive"),
        (lambda: ManagerReplica("m", lease_s=-1.0), "lease_s: -1.0 must be positive"),
        (lambda: CoordinatorReplica("c", lease_s=math.nan), "lease_s: nan must be positive"),
        (lambda: CoordinatorReplica("c", watch_poll_s=0.0), "watch_poll_s: 0.0 must be positive"),
        (lambda: ManagerReplica("m", refresh_s=0), "refresh_s: 0 must be positive"),
    ],
)
def test_a_bad_setting_is_named(make: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError) as excinfo:
        make()
    assert str(excinfo.value) == message
