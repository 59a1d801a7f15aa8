"""Registry lineage by strategy (issue 11, item 8), through the real services with three real
proplets: each version an experiment's round stores records its experiment, round, parent
version, strategy with its canonical parameters, every contributing proplet with its weight
and update digest, and (fedadam) the state the round started from, linked to the version that
left it; `propeller-fl models lineage` shows it, `--chain` back to v0; `models verify`
recomputes a fedadam and a krum version with their recorded strategy, and names what is wrong
in a lineage forged for a copy of a version (the start state claimed as zeros, a state the
named version did not leave, the state the round left, a krum selection, the parent)."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from propeller.v1 import model_registry_pb2, model_registry_pb2_grpc
from server.config import MqttConfig
from server.grpc_server import channel
from server.streams import model_stream, read_model_stream
from tests.cli.helpers import Cli, flags, table_rows
from tests.support.clients import RPC_S, V0, header_and_data
from tests.support.cluster import Cluster, cluster
from tests.support.security import service_tls

MR = model_registry_pb2


@pytest.fixture
async def world(mqtt: MqttConfig, tmp_path: Path, trainer_wasm: Path) -> AsyncIterator[Cluster]:
    async with cluster(mqtt, tmp_path, proplets=3, image=f"file://{trainer_wasm}") as c:
        yield c


async def run_experiment(cli: Cli, c: Cluster, strategy: str, params: str) -> str:
    eid = f"exp-{strategy}-{uuid.uuid4().hex[:6]}"
    run = await cli(
        "experiment", "run", "--experiment-id", eid, "--model-ref", V0,
        "--participants", ",".join(c.proplet_ids), "--image", c.image, "--k-of-n", "3",
        "--rounds", "2", "--strategy", strategy, "--strategy-params", params, "--watch",
        *flags(c.endpoints),
    )  # fmt: skip
    run.ok()
    return eid


async def lineage(cli: Cli, c: Cluster, version: int) -> dict[str, Any]:
    doc: dict[str, Any] = (
        (await cli("models", "lineage", str(version), "--json", *flags(c.endpoints))).ok().json()
    )
    assert doc["version"] == version
    out: dict[str, Any] = doc["lineage"]
    return out


async def forged_copy(
    c: Cluster, version: int, change: Callable[[MR.Lineage], None], drop_state: bool = False
) -> int:
    """Store `version`'s bytes again (as an operator may) and send, as the coordinator, its
    lineage with `change` made for the copy: a lineage the registry takes (its digests hold)
    but whose content is wrong. The copy's version."""
    _, tensors = await read_model_stream(c.registry.GetModel(MR.GetModelRequest(version=version)))
    copy = await c.registry.PutModel(model_stream(tensors, 1 << 20), timeout=RPC_S)
    header, data = await header_and_data(
        c.registry.GetLineage(MR.GetModelRequest(version=version), timeout=RPC_S)
    )
    header.version = copy.version
    if drop_state:
        data = data[: len(data) - header.state.total_bytes]
        header.state.ClearField("from_version")
        del header.state.tensors[:]
        header.state.total_bytes = 0
        header.state.sha256 = ""
    change(header)
    async with channel(c.endpoints.registry, service_tls("coordinator")) as ch:
        stub = model_registry_pb2_grpc.ModelRegistryStub(ch)
        chunks = [MR.LineageChunk(header=header), MR.LineageChunk(data=data)]
        await stub.PutLineage(iter(chunks), timeout=RPC_S)
    return int(copy.version)


async def test_each_version_records_its_strategy_and_verify_recomputes_it(
    world: Cluster, cli: Cli
) -> None:
    c, f = world, flags(world.endpoints)
    adam = await run_experiment(cli, c, "fedadam", '{"eta": 0.05}')
    krum = await run_experiment(cli, c, "krum", "{}")
    assert await c.versions() == [0, 1, 2, 3, 4]

    # fedadam: v1 <- v0, v2 <- v1; the parameters with every default filled in.
    v1, v2 = await lineage(cli, c, 1), await lineage(cli, c, 2)
    for index, (got, parent) in enumerate(((v1, 0), (v2, 1)), start=1):
        assert (got["experiment_id"], got["round_id"]) == (adam, f"{adam}-r{index}")
        assert (got["parent_version"], got["strategy"]) == (parent, "fedadam")
        assert got["strategy_params"] == {
            "eta": 0.05, "eta_l": 0.1, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-9,
        }  # fmt: skip
        contributions = got["contributions"]
        assert sorted(x["proplet_id"] for x in contributions) == sorted(c.proplet_ids)
        total = sum(x["num_samples"] for x in contributions)
        assert [x["weight"] for x in contributions] == [
            x["num_samples"] / total for x in contributions
        ]
        assert all(len(x["update_sha256"]) == 64 and x["signed"] for x in contributions)
    # The first round started from zeros; the second from the state the first left.
    assert v1["state"]["from_version"] is None and v1["state"]["sha256"] == ""
    assert v2["state"]["from_version"] == 1
    assert v2["state"]["sha256"] == v1["state"]["result_sha256"] != ""

    # krum (f = 0 of 3): one update selected, weight 1; the others 0. No state.
    v4 = await lineage(cli, c, 4)
    assert (v4["experiment_id"], v4["parent_version"], v4["strategy"]) == (krum, 3, "krum")
    assert v4["strategy_params"] == {"num_malicious": 0} and v4["state"] is None
    assert sorted(x["weight"] for x in v4["contributions"]) == [0.0, 0.0, 1.0]

    # The table, and the chain back to v0.
    shown = (await cli("models", "lineage", "2", *f)).ok().out
    assert f"experiment:  {adam}" in shown and "state:       from v1's state " in shown
    assert "strategy:    fedadam " in shown
    header, rows = table_rows((await cli("models", "lineage", "4", "--chain", *f)).ok().out)
    assert header[:6] == ["VERSION", "PARENT", "EXPERIMENT", "ROUND", "STRATEGY", "UPDATES"]
    assert [r[:6] for r in rows] == [
        ["v4", "v3", krum, f"{krum}-r2", "krum", "3"],
        ["v3", "v0", krum, f"{krum}-r1", "krum", "3"],
        ["v0", "-", "-", "-", "-", "-"],
    ]
    chain = (await cli("models", "lineage", "2", "--chain", "--json", *f)).ok().json()
    assert [(x["version"], x["lineage"] is None) for x in chain["chain"]] == [
        (2, False),
        (1, False),
        (0, True),
    ]

    (await cli("models", "lineage", "99", *f)).failed_with("99")  # no such version
    # verify recomputes each version with its recorded strategy, parameters and state.
    for version in (2, 4):
        doc = (await cli("models", "verify", str(version), "--json", *f)).ok().json()
        assert [x["ok"] for x in doc["chain"]] == [True, True, True]

    # Forged lineages for copies of v2 and v4: each is caught, naming what is wrong.
    def same(_: MR.Lineage) -> None:
        pass

    zeros = await forged_copy(c, 2, same, drop_state=True)
    (await cli("models", "verify", str(zeros), *f)).failed_with(
        f"v{zeros} (fl/models/global_model_v{zeros}): the stored version is not the fedadam of "
        "its 3 updates"
    )

    def from_krum(x: MR.Lineage) -> None:
        x.state.from_version = 3  # a krum version: it left no fedadam state

    other = await forged_copy(c, 2, from_krum)
    (await cli("models", "verify", str(other), *f)).failed_with(
        "it started from a fedadam state (sha256 ", "that v3's round did not leave"
    )

    def left(x: MR.Lineage) -> None:
        x.state.result_sha256 = "0" * 64

    wrong_left = await forged_copy(c, 2, left)
    (await cli("models", "verify", str(wrong_left), *f)).failed_with(
        f"its lineage says the round left fedadam state sha256 {'0' * 64}, recomputed "
    )

    def reselected(x: MR.Lineage) -> None:
        weights = [w.weight for w in x.contributions]
        for w, new in zip(x.contributions, weights[1:] + weights[:1], strict=True):
            w.weight = new

    selection = await forged_copy(c, 4, reselected)
    (await cli("models", "verify", str(selection), *f)).failed_with(
        "its lineage records the updates' weights [", "krum gives ["
    )

    def other_parent(x: MR.Lineage) -> None:
        x.parent_version = 1

    parent = await forged_copy(c, 4, other_parent)
    (await cli("models", "verify", str(parent), *f)).failed_with(
        "its lineage names parent v1, its base is v3"
    )
    # None of the forgeries changed what the honest versions say.
    assert json.dumps(await lineage(cli, c, 2)) == json.dumps(v2)
