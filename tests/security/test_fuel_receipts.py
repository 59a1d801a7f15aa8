"""Fuel receipts (issue 15, item 1) with real proplets running the real trainer over mutual
TLS: every update carries the fuel its training consumed, signed; the coordinator records it;
the lineage (`propeller-fl models lineage`) and the round's status show it per proplet and
per round; and the fuel plausibility rule (`min_fuel_ratio`) refuses a proplet that claims
ten times the samples it trained on, with the reason recorded among the round's failed
participants, while honest proplets with different dataset sizes pass.

The liar is built test-side like the poisoners of test_robustness: a real proplet (real
certificate, the pinned module, honest training) whose round client multiplies num_samples by
ten before the product signs and sends the update, from its second round on. The coordinator
caps no num_samples here (`num_samples_cap=none`: data that lives on the device, which no
data store can count), so the fuel is the only witness."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from propeller.v1 import coordinator_pb2, datastore_pb2, manager_pb2, model_registry_pb2
from proplet.app import Proplet
from proplet.config import PropletConfig
from proplet.federated import FederatedClient, FlTask, Update
from server.config import MqttConfig
from server.datastore.datasets import synthetic_dataset
from server.tensors import tensor_to_proto
from tests.cli.helpers import Cli, flags, table_rows
from tests.security.test_provenance import tamper_lineage
from tests.support.clients import HYPER, V0
from tests.support.cluster import Cluster, cluster

# Honest proplets with datasets of different sizes, and a liar holding 64 samples.
SAMPLES = {"fuel-small": 24, "fuel-mid": 64, "fuel-big": 160, "fuel-liar": 64}
LIAR = "fuel-liar"
RATIO = 0.5


class InflatingClient(FederatedClient):
    """Claims ten times its samples from its second update on; signing and sending stay the
    product's (so the fuel it reports is what its run really consumed)."""

    def __init__(self, inner: FederatedClient) -> None:
        super().__init__(
            inner.proplet_id, inner.rpc_timeout_s, backoff=inner.backoff, tls=inner.tls
        )
        self.sent = 0

    async def submit(
        self, fl: FlTask, update: Update, deadline: float | None = None
    ) -> coordinator_pb2.SubmitUpdateResponse:
        self.sent += 1
        if self.sent > 1:
            inflated = replace(update.meta, num_samples=update.meta.num_samples * 10)
            update = Update(inflated, update.tensors)
        return await super().submit(fl, update, deadline)


class InflatingProplet(Proplet):
    def __init__(self, config: PropletConfig) -> None:
        super().__init__(config)
        self.federated = InflatingClient(self.federated)


@pytest.fixture
async def world(mqtt: MqttConfig, tmp_path: Path, trainer_wasm: Path) -> AsyncIterator[Cluster]:
    ids = list(SAMPLES)
    async with cluster(
        mqtt,
        tmp_path,
        proplets=ids,
        image=f"file://{trainer_wasm}",
        stack={"seed_proplet_ids": tuple(ids), "num_samples_cap": "none"},
        built={LIAR: InflatingProplet},
    ) as c:
        for pid, n in SAMPLES.items():
            x, y = synthetic_dataset(pid, n)
            dataset = datastore_pb2.Dataset(
                proplet_id=pid, features=tensor_to_proto(x), labels=tensor_to_proto(y)
            )
            await c.datastore.PutDataset(datastore_pb2.PutDatasetRequest(dataset=dataset))
        yield c


def fuel_by_proplet(x: model_registry_pb2.Lineage) -> dict[str, tuple[int, int]]:
    return {
        c.header.proplet_id: (c.header.fuel_consumed, c.header.num_samples) for c in x.contributions
    }


async def test_fuel_is_signed_recorded_shown_and_a_10x_sample_claim_is_refused(
    world: Cluster, cli: Cli
) -> None:
    c = world
    request = manager_pb2.StartExperimentRequest(
        experiment_id="exp-fuel",
        model_ref=V0,
        participants=list(SAMPLES),
        hyperparams=HYPER,
        timeout_s=60,
        task_wasm_image=c.image,
        rounds=2,
        # Every participant, unless one cannot report (its update refused): then the others.
        min_k_of_n=3,
        min_fuel_ratio=RATIO,
    )
    await c.manager.StartExperiment(request, timeout=60)
    e = await c.experiment_ended("exp-fuel")
    assert e.state == manager_pb2.EXPERIMENT_STATE_COMPLETED, e.end
    first, second = e.rounds

    # Round 1: everyone honest, datasets of 24 to 160 samples: every update counted.
    assert sorted(first.reported) == sorted(SAMPLES)
    one = fuel_by_proplet(await c.lineage(first.new_model_version))
    assert {pid: n for pid, (_, n) in one.items()} == SAMPLES
    per_sample = {pid: fuel / n for pid, (fuel, n) in one.items()}
    assert all(fuel > 0 for fuel, _ in one.values())
    # The same work per sample within a factor of two whatever the dataset size.
    assert max(per_sample.values()) < 2 * min(per_sample.values()), per_sample
    status = await c.status(first.round_id)
    assert status.min_fuel_ratio == RATIO
    assert status.fuel_consumed == sum(fuel for fuel, _ in one.values())

    # Round 2: the liar claims 640 samples for the fuel of 64: refused, naming the fuel, and
    # recorded with the round's failed participants; the honest three are counted.
    assert sorted(second.reported) == sorted(p for p in SAMPLES if p != LIAR)
    status = await c.status(second.round_id)
    [failure] = status.failed
    assert failure.proplet_id == LIAR
    assert "header.fuel_consumed: " in failure.reason, failure.reason
    assert "samples is " in failure.reason and f"below min_fuel_ratio={RATIO:g}" in failure.reason
    two = fuel_by_proplet(await c.lineage(second.new_model_version))
    assert LIAR not in two and all(fuel > 0 for fuel, _ in two.values())
    # The same module, data and hyperparameters on another base: about the same fuel.
    for pid, (fuel, _) in two.items():
        assert 0.9 < fuel / one[pid][0] < 1.1, (pid, fuel, one[pid])

    # The history as users read it: each proplet's fuel and fuel per sample, each round's total.
    f = flags(c.endpoints)
    shown = (await cli("models", "lineage", str(second.new_model_version), *f)).ok().out
    header, rows = table_rows(shown.split("\n\n", 1)[1])
    assert header[:4] == ["PROPLET", "SAMPLES", "FUEL", "FUEL/SAMPLE"]
    assert {r[0]: int(r[2].replace(",", "")) for r in rows} == {p: v[0] for p, v in two.items()}
    doc = (await cli("models", "lineage", str(second.new_model_version), "--json", *f)).ok().json()
    assert doc["lineage"]["fuel_consumed"] == sum(fuel for fuel, _ in two.values())
    assert {x["proplet_id"]: x["fuel_consumed"] for x in doc["lineage"]["contributions"]} == {
        p: v[0] for p, v in two.items()
    }
    chain = (await cli("models", "lineage", str(second.new_model_version), "--chain", *f)).ok()
    header, rows = table_rows(chain.out)
    fuel_column = header.index("FUEL")
    totals = {r[0]: r[fuel_column] for r in rows}
    assert totals["v1"] == f"{sum(fuel for fuel, _ in one.values()):,}"
    assert totals["v2"] == f"{sum(fuel for fuel, _ in two.values()):,}"
    # `experiment history`: each round's fuel beside its other figures.
    header, rows = table_rows((await cli("experiment", "history", "exp-fuel", *f)).ok().out)
    assert header[-1] == "FUEL"
    assert [r[-1] for r in rows] == [totals["v1"], totals["v2"]]
    # ... and `models verify` checks every fuel receipt's signature on the way.
    verified = (await cli("models", "verify", str(second.new_model_version), *f)).ok()
    assert [r[-1] for r in table_rows(verified.out)[1]] == ["ok", "ok", "ok"]


async def test_a_rounds_fuel_budget_fails_its_tasks_with_the_reason_and_proplets_stay_up(
    world: Cluster,
) -> None:
    c = world
    request = manager_pb2.StartExperimentRequest(
        experiment_id="exp-budget",
        model_ref=V0,
        participants=["fuel-small", "fuel-mid"],
        hyperparams=HYPER,
        timeout_s=60,
        task_wasm_image=c.image,
        fuel_budget=100_000,  # far below what parsing 24 samples takes (~300k)
    )
    await c.manager.StartExperiment(request, timeout=60)
    e = await c.experiment_ended("exp-budget")
    assert e.state == manager_pb2.EXPERIMENT_STATE_FAILED
    status = await c.status(e.rounds[0].round_id)
    assert status.state == coordinator_pb2.ROUND_STATE_FAILED
    assert status.fuel_budget == 100_000
    reason = "fuel budget of 100000 exhausted (the module ran out)"
    assert {f.proplet_id: f.reason for f in status.failed} == {
        "fuel-small": reason,
        "fuel-mid": reason,
    }
    # The proplets are up and train the next round, without a budget, as before.
    assert await c.alive() >= set(SAMPLES)
    request.experiment_id, request.fuel_budget = "exp-after", 0
    await c.manager.StartExperiment(request, timeout=60)
    after = await c.experiment_ended("exp-after")
    assert after.state == manager_pb2.EXPERIMENT_STATE_COMPLETED, after.end


async def test_round_fuel_fields_from_the_command_line_and_checked_naming_the_field(
    world: Cluster, cli: Cli
) -> None:
    configured = await cli(
        "round", "configure", "--round-id", "r-cli", "--participant", "fuel-small",
        "--model-ref", V0, "--fuel-budget", "123456789", "--min-fuel-ratio", "0.25",
        "--json", *flags(world.endpoints),
    )  # fmt: skip
    st = configured.ok().json()
    assert (st["fuel_budget"], st["min_fuel_ratio"]) == (123456789, 0.25)
    status = await world.status("r-cli")
    assert (status.fuel_budget, status.min_fuel_ratio) == (123456789, 0.25)
    for fields, message in (
        ({"min_fuel_ratio": 1.5}, "min_fuel_ratio: 1.5 must be between 0 (off) and 1"),
        ({"min_fuel_ratio": -0.1}, "min_fuel_ratio: -0.1 must be between 0 (off) and 1"),
        ({"fuel_budget": 2**63}, f"fuel_budget: {2**63} must be between 0"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await world.configure("r-bad", participants=["fuel-small"], **fields)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (err.value.details() or "").startswith(message), err.value.details()


async def test_models_verify_refuses_a_fuel_receipt_changed_in_the_lineage(
    mqtt: MqttConfig, tmp_path: Path, trainer_wasm: Path, cli: Cli
) -> None:
    state = tmp_path / "state"
    ids = ["fuel-a", "fuel-b"]
    stack = {"state_dir": state, "seed_proplet_ids": tuple(ids)}
    image = f"file://{trainer_wasm}"
    async with cluster(mqtt, tmp_path / "run", proplets=ids, stack=stack, image=image) as c:
        await c.start_experiment("r-fuel", ids, image, k_of_n=2, model_ref=V0)
        status = await c.wait_state("r-fuel", timeout=60)
        assert status.state == coordinator_pb2.ROUND_STATE_COMPLETED, status.failure_reason
        (await cli("models", "verify", "1", *flags(c.endpoints))).ok()

    def more_fuel(x: model_registry_pb2.Lineage) -> None:
        x.contributions[0].header.fuel_consumed *= 10

    changed = tamper_lineage(state, 1, more_fuel)
    proplet = changed.contributions[0].header.proplet_id
    async with cluster(mqtt, tmp_path / "again", dimension=None, stack=stack) as c:
        result = await cli("models", "verify", "1", *flags(c.endpoints))
        line = result.failed_with("v1 (fl/models/global_model_v1): update 1 of 2 ")
        assert f"(proplet {proplet!r}): its signature does not verify" in line
