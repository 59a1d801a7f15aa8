"""The re-execution audit shown (issue 15, item 2; docs/verifiability.md): real proplets
running the real trainer from the test OCI registry, the whole stack in process, and the
coordinator's auditor re-running the sampled updates with the pinned module, the round's base
model and each proplet's dataset from the data store.

The fleet: three honest proplets, one that runs a module of its own while claiming the pinned
digest (`TamperedModuleProplet`: the C trainer of wasm-client/examples), one that trains the
pinned module on labels it flipped (`LyingDataProplet`), and one whose data is not in the data
store at all (`GhostDataProplet`: the audit cannot re-run it). All of them sign what they send
with their own certificates, so only the audit tells them apart (tests/support/auditing.py).
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from benchmarks import quality
from propeller.v1 import coordinator_pb2, manager_pb2, tensor_pb2
from proplet.config import PropletConfig
from server.config import MqttConfig
from server.coordinator.audit import chosen
from server.datastore import catalog
from server.mlp import initial_model
from tests.cli.helpers import Cli, flags
from tests.conftest import load_wasm_build
from tests.support.auditing import GhostDataProplet, LyingDataProplet, TamperedModuleProplet
from tests.support.clients import HYPER, V0
from tests.support.cluster import Cluster, cluster
from tests.support.infra import OciRegistry, push_wasm

HONEST = ("honest-1", "honest-2", "honest-3")
TAMPERED = "tampered"
LIAR = "liar"
GHOST = "ghost"
TIMEOUT = 120.0


@pytest.fixture
async def fleet(
    mqtt: MqttConfig,
    registry: OciRegistry,
    trainer_wasm: Path,
    tmp_path: Path,
    other_module: bytes,
) -> AsyncIterator[Cluster]:
    image = push_wasm(registry, trainer_wasm, repo="fl-audit", tag=uuid.uuid4().hex[:8])
    other = other_module

    def tampered(config: PropletConfig) -> TamperedModuleProplet:
        return TamperedModuleProplet(config, other)

    built = {TAMPERED: tampered, LIAR: LyingDataProplet, GHOST: GhostDataProplet}
    ids = [*HONEST, TAMPERED, LIAR, GHOST]
    async with cluster(
        mqtt,
        tmp_path,
        proplets=ids,
        image=image,
        # The ghost's data is not in the data store; with the default cap ("dataset") its
        # update would be refused before any audit, for want of a size to cap it by.
        stack={"seed_proplet_ids": tuple(ids[:-1]), "num_samples_cap": "none"},
        built=built,
    ) as c:
        yield c


@pytest.fixture(scope="session")
def other_module() -> bytes:
    """Another trainer honouring the same contract (wasm-client/examples/minimal.c)."""
    return Path(load_wasm_build().build_minimal()).read_bytes()


def audit(fraction: float, policy: str = "", seed: int = 0) -> tensor_pb2.AuditConfig:
    return tensor_pb2.AuditConfig(fraction=fraction, policy=policy, seed=seed)


async def run(
    c: Cluster,
    experiment_id: str,
    participants: Sequence[str],
    config: tensor_pb2.AuditConfig,
    **fields: Any,
) -> manager_pb2.Experiment:
    """Run an experiment on `participants` with the audit `config`, to its end (the
    cluster's image from v0, HYPER's hyperparameters, unless `fields` say otherwise)."""
    request: dict[str, Any] = {
        "model_ref": V0,
        "hyperparams": HYPER,
        "timeout_s": 60,
        "task_wasm_image": c.image,
        **fields,
    }
    if "image" in request:
        request["task_wasm_image"] = request.pop("image")
    await c.manager.StartExperiment(
        manager_pb2.StartExperimentRequest(
            experiment_id=experiment_id, participants=participants, audit=config, **request
        ),
        timeout=60,
    )

    return await c.experiment_ended(experiment_id, TIMEOUT)


def audits_counted(outcome: str) -> float:
    return REGISTRY.get_sample_value("propeller_audits_total", {"outcome": outcome}) or 0.0


def by_proplet(records: Sequence[tensor_pb2.AuditRecord]) -> dict[str, tensor_pb2.AuditRecord]:
    return {r.proplet_id: r for r in records}


async def test_honest_proplets_always_match_over_ten_rounds(fleet: Cluster) -> None:
    c = fleet
    matched = audits_counted("match")
    e = await run(c, "exp-honest", HONEST, audit(1.0), rounds=10)
    assert e.state == manager_pb2.EXPERIMENT_STATE_COMPLETED, e.end.detail
    assert len(e.rounds) == 10
    for r in e.rounds:
        status = await c.status(r.round_id)
        assert status.state == coordinator_pb2.ROUND_STATE_COMPLETED
        audits = by_proplet(status.audits)
        assert sorted(audits) == sorted(HONEST), r.round_id
        for record in audits.values():
            assert record.outcome == "match", (r.round_id, record)
            assert record.claimed_sha256 == record.reexecuted_sha256 != ""
            assert not record.rejected and not record.detail
        # The lineage lists the same audits beside the contributions, digest for digest.
        kept = await c.lineage(r.new_model_version)
        assert {a.proplet_id: a.claimed_sha256 for a in kept.audits} == {
            x.header.proplet_id: x.sha256 for x in kept.contributions
        }
    assert audits_counted("match") == matched + 30


async def test_a_tampered_module_and_lying_data_are_caught_and_rejected(fleet: Cluster) -> None:
    c = fleet
    mismatched = audits_counted("mismatch")
    who = [*HONEST[:2], TAMPERED, LIAR]
    e = await run(c, "exp-reject", who, audit(1.0), k_of_n=4, min_k_of_n=2)
    assert e.state == manager_pb2.EXPERIMENT_STATE_COMPLETED, e.end.detail
    status = await c.status(e.rounds[0].round_id)
    audits = by_proplet(status.audits)
    assert sorted(audits) == sorted(who)
    for p in HONEST[:2]:
        assert audits[p].outcome == "match" and not audits[p].rejected
    for p in (TAMPERED, LIAR):
        record = audits[p]
        assert record.outcome == "mismatch" and record.rejected, record
        assert record.claimed_sha256 and record.reexecuted_sha256
        assert record.claimed_sha256 != record.reexecuted_sha256
        assert record.detail.startswith("differs: update bytes"), record.detail
    # The liar trained on the same number of samples: only its bytes (and metrics) differ.
    assert "num_samples" not in audits[LIAR].detail
    # Both were counted on arrival (signed, pinned digest claimed), and left out before
    # aggregation: the version is the honest pair's, and its lineage says why.
    assert sorted(status.reported) == sorted(who)
    # The round's sample count is the honest pair's (the data store's 64 samples each).
    assert status.num_samples == 2 * 64
    kept = await c.lineage(status.new_model_version)
    assert sorted(x.header.proplet_id for x in kept.contributions) == sorted(HONEST[:2])
    recorded = by_proplet(kept.audits)
    for p in (TAMPERED, LIAR):
        assert recorded[p].rejected
        assert (recorded[p].claimed_sha256, recorded[p].reexecuted_sha256) == (
            audits[p].claimed_sha256,
            audits[p].reexecuted_sha256,
        )
    assert audits_counted("mismatch") == mismatched + 2


async def test_flag_aggregates_every_update_and_marks_the_round(fleet: Cluster) -> None:
    c = fleet
    who = [HONEST[0], TAMPERED, LIAR]
    e = await run(c, "exp-flag", who, audit(1.0, "flag"))
    assert e.state == manager_pb2.EXPERIMENT_STATE_COMPLETED, e.end.detail
    status = await c.status(e.rounds[0].round_id)
    assert status.audit.policy == "flag"
    outcomes = {r.proplet_id: (r.outcome, r.rejected) for r in status.audits}
    assert outcomes == {
        HONEST[0]: ("match", False),
        TAMPERED: ("mismatch", False),
        LIAR: ("mismatch", False),
    }
    kept = await c.lineage(status.new_model_version)
    assert sorted(x.header.proplet_id for x in kept.contributions) == sorted(who)
    assert sorted(a.proplet_id for a in kept.audits if a.outcome == "mismatch") == [LIAR, TAMPERED]


async def test_rejections_that_leave_too_few_updates_fail_the_round(fleet: Cluster) -> None:
    c = fleet
    before = await c.versions()
    e = await run(c, "exp-too-few", [HONEST[0], LIAR], audit(1.0))
    assert e.state == manager_pb2.EXPERIMENT_STATE_FAILED
    status = await c.status(e.rounds[0].round_id)
    assert status.state == coordinator_pb2.ROUND_STATE_FAILED
    assert status.failure_reason == (
        "audit mismatch: the re-execution audit rejected the updates of liar; 1 of 2 remain, "
        "k_of_n 2 needs 2"
    )
    assert by_proplet(status.audits)[LIAR].rejected
    assert await c.versions() == before  # nothing stored


async def test_an_update_the_auditor_cannot_rerun_is_an_audit_error_never_a_pass(
    fleet: Cluster,
) -> None:
    c = fleet
    errors = audits_counted("error")
    e = await run(c, "exp-ghost", [HONEST[0], GHOST], audit(1.0))
    # Nothing shows the ghost lied: its update is kept, the round is marked.
    assert e.state == manager_pb2.EXPERIMENT_STATE_COMPLETED, e.end.detail
    status = await c.status(e.rounds[0].round_id)
    ghost = by_proplet(status.audits)[GHOST]
    assert (ghost.outcome, ghost.rejected, ghost.reexecuted_sha256) == ("error", False, "")
    assert ghost.detail.startswith("audit error: ") and "ghost" in ghost.detail, ghost.detail
    assert by_proplet(status.audits)[HONEST[0]].outcome == "match"
    assert audits_counted("error") == errors + 1


async def test_without_an_audit_nothing_is_rerun_and_a_seeded_sample_is_reproducible(
    fleet: Cluster,
) -> None:
    c = fleet
    who = [*HONEST, TAMPERED, LIAR]
    # The default: no audit. The liars' updates count like any other.
    e = await run(c, "exp-no-audit", who, audit(0.0))
    assert e.state == manager_pb2.EXPERIMENT_STATE_COMPLETED, e.end.detail
    status = await c.status(e.rounds[0].round_id)
    assert list(status.audits) == []
    kept = await c.lineage(status.new_model_version)
    assert len(kept.contributions) == 5 and list(kept.audits) == []
    # Half of the updates, seeded: exactly those the seed chooses, whoever sent them.
    e = await run(c, "exp-half", who, audit(0.5, "flag", seed=1234))
    assert e.state == manager_pb2.EXPERIMENT_STATE_COMPLETED, e.end.detail
    round_id = e.rounds[0].round_id
    status = await c.status(round_id)
    expected = [p for p in who if chosen(1234, round_id, p, 0.5)]
    assert 0 < len(expected) < len(who)  # this seed samples some, not all
    assert sorted(r.proplet_id for r in status.audits) == sorted(expected)
    assert status.audit.seed == 1234


async def test_the_cli_asks_for_an_audit_and_shows_its_outcomes(fleet: Cluster, cli: Cli) -> None:
    c = fleet
    f = flags(c.endpoints)
    run = await cli(
        "experiment", "run", "--experiment-id", "exp-cli", "--model-ref", V0,
        "--participants", f"{HONEST[0]},{LIAR}", "--image", c.image,
        "--audit-fraction", "1", "--audit-policy", "flag", "--watch", *f,
    )  # fmt: skip
    run.ok()
    shown = (await cli("round", "status", "exp-cli-r1", *f)).ok().out
    assert re.search(r"^audit:\s+fraction=1 policy=flag$", shown, re.M), shown
    assert re.search(rf"^audit {HONEST[0]}:\s+match \(\w{{12}} -> \w{{12}}\)$", shown, re.M)
    assert re.search(rf"^audit {LIAR}:\s+mismatch \(\w{{12}} -> \w{{12}}\): differs: ", shown, re.M)
    # The lineage lists the audits beside the contributions (flag: the liar's update kept).
    status = await c.status("exp-cli-r1")
    doc = (await cli("models", "lineage", str(status.new_model_version), "--json", *f)).ok().json()
    audited = {a["proplet_id"]: a for a in doc["lineage"]["audits"]}
    assert (audited[LIAR]["outcome"], audited[LIAR]["rejected"]) == ("mismatch", False)
    assert audited[LIAR]["claimed_sha256"] != audited[LIAR]["reexecuted_sha256"]
    table = (await cli("models", "lineage", str(status.new_model_version), *f)).ok().out
    assert re.search(rf"^{LIAR}\s+mismatch\s+\w{{12}}\s+\w{{12}}\s+no$", table, re.M), table
    bad = await cli(
        "experiment", "run", "--experiment-id", "exp-bad", "--model-ref", V0,
        "--participants", HONEST[0], "--image", c.image, "--audit-fraction", "2", *f,
    )  # fmt: skip
    bad.failed_with("audit.fraction")


async def test_a_contract_v2_trainer_is_audited_the_same_way(
    mqtt: MqttConfig, mlp_wasm: Path, tmp_path: Path
) -> None:
    """The MLP trainer (binary tensors on stdin and stdout) on the digits, partitioned over an
    honest proplet and a lying one (each label moved to the next class)."""
    corpus = await asyncio.to_thread(catalog.digits)
    setup = quality.Setup(proplets=2, alpha=None, rounds=1, epochs=1)
    async with cluster(
        mqtt, tmp_path, proplets=[HONEST[0], LIAR], dimension=None, built={LIAR: LyingDataProplet}
    ) as d:
        await quality.put_parts(d, corpus, setup)
        base = await quality.put_initial(d, initial_model((64, 32, 10), seed=0))
        e = await run(
            d,
            "exp-mlp",
            [HONEST[0], LIAR],
            audit(1.0),
            model_ref=base,
            image=f"file://{mlp_wasm}",
            min_k_of_n=1,
            hyperparams=coordinator_pb2.Hyperparams(epochs=1, lr=0.1, batch_size=16),
        )
        assert e.state == manager_pb2.EXPERIMENT_STATE_COMPLETED, e.end.detail
        status = await d.status(e.rounds[0].round_id)
        audits = by_proplet(status.audits)
        assert (audits[HONEST[0]].outcome, audits[LIAR].outcome) == ("match", "mismatch")
        assert audits[HONEST[0]].claimed_sha256 == audits[HONEST[0]].reexecuted_sha256
        assert audits[LIAR].rejected
        kept = await d.lineage(status.new_model_version)
        assert [x.header.proplet_id for x in kept.contributions] == [HONEST[0]]
