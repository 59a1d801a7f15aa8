"""The authorization table: the one in code (`server.authz.RULES`) and the one in
docs/security.md are the same, and every RPC of every service we serve has a row (issue 9,
item 3)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from propeller.v1 import (
    aggregator_pb2,
    coordinator_pb2,
    datastore_pb2,
    manager_pb2,
    model_registry_pb2,
)
from server.authz import ANY_SERVICE, RULES, Rule, authorize
from server.errors import PermissionDenied
from server.pki import Identity, Kind

DOC = Path(__file__).resolve().parents[2] / "docs" / "security.md"
ROW = re.compile(r"^\| `([\w.]+/\w+)` \| ([^|]+) \| ([^|]+) \| ([^|]+) \|$")


def cells(rule: Rule) -> tuple[str, str, str]:
    """A rule as the doc writes it."""
    operator = "yes" if rule.operator else "—"
    named = ", ".join(sorted(rule.services)) or "—"
    services = "any" if ANY_SERVICE in rule.services else named
    proplet = "—"
    if rule.proplet:
        proplet = f"as itself (`{rule.as_itself}`)" if rule.as_itself else "yes"
    return operator, services, proplet


def doc_table() -> dict[str, tuple[str, str, str]]:
    text = DOC.read_text(encoding="utf-8").split("<!-- authz-table -->", 1)[1]
    rows: dict[str, tuple[str, str, str]] = {}
    lines = text.strip().splitlines()
    assert lines[:2] == ["| RPC | operator | service | proplet |", "|---|---|---|---|"], lines[:2]
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        m = ROW.match(line)
        assert m, f"docs/security.md: not a table row: {line!r}"
        assert m[1] not in rows, f"{m[1]} has two rows"
        rows[m[1]] = (m[2].strip(), m[3].strip(), m[4].strip())
    return rows


def served_methods() -> set[str]:
    """Every RPC of every service a propeller-fl gRPC server serves."""
    methods = set()
    for module, service in (
        (manager_pb2, "Manager"),
        (coordinator_pb2, "Coordinator"),
        (aggregator_pb2, "Aggregator"),
        (model_registry_pb2, "ModelRegistry"),
        (datastore_pb2, "DataStore"),
        (health_pb2, "Health"),
        (reflection_pb2, "ServerReflection"),
    ):
        descriptor = module.DESCRIPTOR.services_by_name[service]
        methods |= {f"/{descriptor.full_name}/{m.name}" for m in descriptor.methods}
    return methods


def test_the_doc_table_is_the_code_table() -> None:
    in_code = {method.lstrip("/"): cells(rule) for method, rule in RULES.items()}
    assert doc_table() == in_code


def test_every_rpc_has_a_rule() -> None:
    assert served_methods() == set(RULES)


@pytest.mark.parametrize(
    ("identity", "method", "allowed"),
    [
        (Identity(Kind.OPERATOR, "o"), "/propeller.v1.Manager/StartExperiment", True),
        (Identity(Kind.PROPLET, "p"), "/propeller.v1.Manager/StartExperiment", False),
        (Identity(Kind.SERVICE, "manager"), "/propeller.v1.Coordinator/ConfigureRound", True),
        (Identity(Kind.SERVICE, "registry"), "/propeller.v1.Coordinator/ConfigureRound", False),
        (Identity(Kind.SERVICE, "coordinator"), "/propeller.v1.Aggregator/Aggregate", True),
        (Identity(Kind.OPERATOR, "o"), "/propeller.v1.Aggregator/Aggregate", False),
        (Identity(Kind.PROPLET, "p"), "/propeller.v1.ModelRegistry/GetModel", True),
        (Identity(Kind.PROPLET, "p"), "/propeller.v1.ModelRegistry/PutModel", False),
        (Identity(Kind.OPERATOR, "o"), "/propeller.v1.Manager/NotARealMethod", False),
        # A manager replica (service `manager-{replica_id}`) calls as the manager...
        (Identity(Kind.SERVICE, "manager-0"), "/propeller.v1.Coordinator/ConfigureRound", True),
        (Identity(Kind.SERVICE, "manager-b"), "/propeller.v1.Coordinator/WatchRound", True),
        (
            Identity(Kind.SERVICE, "manager-b"),
            "/propeller.v1.Coordinator/ReportParticipantFailure",
            True,
        ),
        # ...and no more: not what only operators or proplets (or other services) may.
        (Identity(Kind.SERVICE, "manager-0"), "/propeller.v1.Manager/StartExperiment", False),
        (Identity(Kind.SERVICE, "manager-0"), "/propeller.v1.Coordinator/ListRounds", False),
        (Identity(Kind.SERVICE, "manager-0"), "/propeller.v1.Coordinator/SubmitUpdate", False),
        (Identity(Kind.SERVICE, "manager-0"), "/propeller.v1.DataStore/GetDataset", False),
        (Identity(Kind.SERVICE, "manager-0"), "/propeller.v1.ModelRegistry/PutModel", False),
        # Only the service of that shape: not "manager-" alone, "managerX" or another kind.
        (Identity(Kind.SERVICE, "manager-"), "/propeller.v1.Coordinator/ConfigureRound", False),
        (Identity(Kind.SERVICE, "managerx"), "/propeller.v1.Coordinator/ConfigureRound", False),
        (Identity(Kind.PROPLET, "manager-0"), "/propeller.v1.Coordinator/ConfigureRound", False),
        # A coordinator replica (service `coordinator-{replica_id}`) calls as the coordinator:
        # the aggregator, the registry's writes, the data store's reads...
        (Identity(Kind.SERVICE, "coordinator-0"), "/propeller.v1.Aggregator/Aggregate", True),
        (Identity(Kind.SERVICE, "coordinator-b"), "/propeller.v1.ModelRegistry/PutModel", True),
        (Identity(Kind.SERVICE, "coordinator-b"), "/propeller.v1.ModelRegistry/PutLineage", True),
        (Identity(Kind.SERVICE, "coordinator-0"), "/propeller.v1.DataStore/GetDataset", True),
        (Identity(Kind.SERVICE, "coordinator-0"), "/propeller.v1.DataStore/GetDatasetInfo", True),
        # ...and no more: not the manager's, an operator's or a proplet's.
        (
            Identity(Kind.SERVICE, "coordinator-0"),
            "/propeller.v1.Coordinator/ConfigureRound",
            False,
        ),
        (Identity(Kind.SERVICE, "coordinator-0"), "/propeller.v1.Coordinator/SubmitUpdate", False),
        (Identity(Kind.SERVICE, "coordinator-0"), "/propeller.v1.ModelRegistry/InitModel", False),
        (Identity(Kind.SERVICE, "coordinator-0"), "/propeller.v1.DataStore/PutDataset", False),
        (Identity(Kind.SERVICE, "coordinator-0"), "/propeller.v1.Manager/StartExperiment", False),
        (Identity(Kind.SERVICE, "coordinator-"), "/propeller.v1.Aggregator/Aggregate", False),
        (Identity(Kind.SERVICE, "coordinatorx"), "/propeller.v1.Aggregator/Aggregate", False),
        (Identity(Kind.OPERATOR, "coordinator-0"), "/propeller.v1.Aggregator/Aggregate", False),
        (Identity(Kind.PROPLET, "coordinator-0"), "/propeller.v1.ModelRegistry/PutModel", False),
        # One replicated service's replica is not the other's.
        (Identity(Kind.SERVICE, "manager-0"), "/propeller.v1.Aggregator/Aggregate", False),
        (Identity(Kind.SERVICE, "coordinator-0"), "/propeller.v1.Coordinator/WatchRound", False),
    ],
)
def test_authorize(identity: Identity, method: str, allowed: bool) -> None:
    if allowed:
        assert authorize(identity, method) is RULES[method]
    else:
        with pytest.raises(PermissionDenied, match=method.rpartition("/")[2]):
            authorize(identity, method)
