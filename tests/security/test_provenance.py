"""Provenance and poisoning bounds (issue 9, items 5, 6 and the provenance attacks of item 8),
against the real services over mutual TLS: an update from another module, one changed after
it was signed or signed by another proplet's key, an inflated num_samples and an update far
from its base model are each refused with a status naming the field, and count for nothing;
a clipped update is aggregated as clipped; `propeller-fl models verify` checks the chain a
version was made by, and names the first broken link when a stored version or lineage is
tampered with."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import struct
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from propeller.v1 import (
    coordinator_pb2,
    datastore_pb2,
    datastore_pb2_grpc,
    model_registry_pb2,
    model_registry_pb2_grpc,
)
from server.config import MqttConfig
from server.coordinator.rounds import Update
from server.grpc_server import channel
from server.models import model_uri
from server.pki import load_certificate, load_private_key
from server.provenance import Claim, module_digest, sign, signature_verifies
from server.streams import UpdateMeta, model_stream, read_model_stream, update_stream
from server.tensors import Tensors, sha256_of
from tests.cli.helpers import Cli, flags, table_rows
from tests.security.test_attacks import refused
from tests.support.clients import RPC_S, V0, Clients, clients
from tests.support.cluster import Cluster, cluster, round_services
from tests.support.security import operator_tls, proplet_tls, service_tls

C = grpc.StatusCode
PINNED = module_digest(b"the module the round pinned")
OTHER = module_digest(b"another module")


@pytest.fixture
async def world(mqtt: MqttConfig, tmp_path: Path) -> AsyncIterator[Cluster]:
    """The five services over mutual TLS, datasets of 64 samples for a, b and c, v0 (zeros);
    no proplet runs: the tests submit as the proplets, with their certificates and keys."""
    async with cluster(mqtt, tmp_path, stack={"seed_proplet_ids": ("a", "b", "c")}) as c:
        yield c


def update(proplet_id: str, *, n: int = 10, w: float = 0.5, module: str = PINNED) -> Update:
    tensors: Tensors = {"w": np.full(3, w, np.float64), "b": np.array(w / 2, np.float64)}
    return Update(proplet_id, V0, n, {"loss": 0.5}, tensors, module_digest=module)


async def send(world: Clients, meta: UpdateMeta, tensors: Tensors, as_proplet: str) -> Any:
    stub = world.coordinator_as(as_proplet)
    return await stub.SubmitUpdate(update_stream(meta, tensors), timeout=RPC_S)


async def refused_from_a(
    world: Clients,
    meta: UpdateMeta,
    details: str,
    tensors: Tensors | None = None,
    code: grpc.StatusCode = C.INVALID_ARGUMENT,
) -> None:
    """An update sent as proplet a with `meta` (and a's tensors, or `tensors`) is refused
    with `code` and details naming `details`."""
    tensors = update("a").tensors if tensors is None else tensors
    await refused(send(world, meta, tensors, "a"), code, details)


async def nothing_counted(world: Clients, round_id: str = "r1") -> None:
    status = await world.status(round_id)
    assert status.num_updates == 0 and list(status.reported) == []


async def still_accepted(world: Clients, proplet_id: str, round_id: str = "r1") -> None:
    """The participant's real update after a refused one: accepted, not a duplicate."""
    answer = await world.submit(round_id, update(proplet_id))
    assert answer.accepted and not answer.duplicate


# ---- module digests --------------------------------------------------------------------------


async def test_an_update_from_another_module_than_the_rounds_is_refused(world: Cluster) -> None:
    status = await world.configure("r1", participants=["a", "b"], module_digest=PINNED)
    assert status.module_digest == PINNED
    await refused(
        world.submit("r1", update("a", module=OTHER)),
        C.FAILED_PRECONDITION,
        f"header.module_digest: the update comes from module {OTHER}, but round 'r1' runs "
        f"{PINNED}; update not counted",
    )
    await nothing_counted(world)
    await still_accepted(world, "a")


async def test_an_update_must_name_its_module(world: Cluster) -> None:
    await world.configure("r1", participants=["a", "b"])
    meta = replace(await world.signed_meta("r1", update("a")), module_digest="")
    await refused_from_a(world, meta, "header.module_digest: 'empty' is not a module digest")
    await nothing_counted(world)


# ---- signatures ------------------------------------------------------------------------------


async def test_bytes_changed_after_signing_are_refused(world: Cluster) -> None:
    await world.configure("r1", participants=["a", "b"])
    signed = await world.signed_meta("r1", update("a"))
    tampered = update("a", w=0.75).tensors
    await refused_from_a(
        world, signed, "header.signature: does not verify with proplet 'a''s certificate", tampered
    )
    await nothing_counted(world)
    await still_accepted(world, "a")


@pytest.mark.parametrize(
    "change",
    [{"num_samples": 11}, {"metrics": {"loss": 0.25}}, {"module_digest": OTHER}],
    ids=["num_samples", "metrics", "module_digest"],
)
async def test_a_header_changed_after_signing_is_refused(
    world: Cluster, change: dict[str, Any]
) -> None:
    # An unpinned round: any module may report, but only what its proplet signed.
    await world.configure("r1", participants=["a", "b"])
    signed = await world.signed_meta("r1", update("a"))
    tampered = replace(signed, **change)
    await refused_from_a(world, tampered, "header.signature: does not verify")
    await nothing_counted(world)
    await still_accepted(world, "a")


async def test_a_fuel_receipt_changed_after_signing_is_refused(world: Cluster) -> None:
    await world.configure("r1", participants=["a", "b"])
    signed = await world.signed_meta("r1", replace(update("a"), fuel_consumed=1_000_000))
    # More fuel (to pass a plausibility rule), less, or none at all (the v1 form): each
    # breaks the signature, which covers the figure the proplet signed.
    for fuel in (10_000_000, 999_999, 0):
        await refused(
            send(world, replace(signed, fuel_consumed=fuel), update("a").tensors, "a"),
            C.INVALID_ARGUMENT,
            "header.signature: does not verify",
        )
    await nothing_counted(world)
    answer = await send(world, signed, update("a").tensors, "a")
    assert answer.accepted and not answer.duplicate
    assert (await world.status("r1")).fuel_consumed == 1_000_000


async def test_an_update_trained_from_another_base_model_is_refused(world: Cluster) -> None:
    # Signed over another base model's sha256 while naming the round's model: the header's
    # base_model_sha256 is optional, but the coordinator checks the signature over the
    # round's base, so the claim fails.
    await world.configure("r1", participants=["a", "b"])
    tensors = update("a").tensors
    claim = Claim("r1", "a", "0" * 64, PINNED, sha256_of(tensors), 10, {"loss": 0.5})
    signature = sign(await asyncio.to_thread(load_private_key, proplet_tls("a").key), claim)
    meta = UpdateMeta("r1", "a", V0, 10, {"loss": 0.5}, module_digest=PINNED, signature=signature)
    await refused_from_a(world, meta, "header.signature:", tensors)
    # Naming that other base in the header is refused before any signature is looked at.
    named = replace(meta, base_model_sha256="0" * 64)
    await refused_from_a(
        world,
        named,
        f"header.base_model_sha256: '{'0' * 64}', but round 'r1' trains {V0} with sha256 ",
        tensors,
        C.FAILED_PRECONDITION,
    )
    await nothing_counted(world)
    await still_accepted(world, "a")


async def test_a_signature_by_another_proplets_key_is_refused(world: Cluster) -> None:
    await world.configure("r1", participants=["a", "b"])
    # b signs a's update (say b holds a's update and a's channel): a's certificate says no.
    signed_by_b = await world.signed_meta("r1", update("a"), key_of="b")
    await refused_from_a(
        world, signed_by_b, "header.signature: does not verify with proplet 'a''s certificate"
    )
    unsigned = replace(signed_by_b, signature=b"")
    await refused_from_a(world, unsigned, "header.signature: missing")
    await nothing_counted(world)
    await still_accepted(world, "a")


# ---- poisoning bounds ------------------------------------------------------------------------


async def test_num_samples_above_the_proplets_dataset_is_refused(world: Cluster) -> None:
    await world.configure("r1", participants=["a", "b", "d"])
    await refused(
        world.submit("r1", update("a", n=1_000_000)),
        C.INVALID_ARGUMENT,
        "num_samples: 1000000 exceeds the 64 samples proplet 'a' holds in the data store "
        "(num_samples_cap=dataset); update not counted",
    )
    # d has no dataset: there is nothing it could have trained on, nothing to cap it by.
    await refused(
        world.submit("r1", update("d", n=1)),
        C.FAILED_PRECONDITION,
        "num_samples: proplet 'd' has no dataset in the data store",
    )
    await nothing_counted(world)
    answer = await world.submit("r1", update("a", n=64))
    assert answer.accepted and answer.num_updates == 1


async def test_an_update_far_from_the_base_model_is_refused(world: Cluster) -> None:
    await world.configure("r1", participants=["a", "b"])
    far = update("a", w=1e5)  # |w - 0| over 3 values and b: about 1.8e5, bound 1e4
    await refused(
        world.submit("r1", far),
        C.INVALID_ARGUMENT,
        "tensors: the update is 180278 from the base model (L2 norm of the difference over "
        "all tensors), beyond the coordinator's bound 10000 (max_update_distance)",
    )
    await nothing_counted(world)
    await still_accepted(world, "a")


async def test_the_lineage_is_the_coordinators_to_write_and_a_dataset_size_its_owners(
    world: Cluster,
) -> None:
    header = model_registry_pb2.LineageChunk(header=model_registry_pb2.Lineage(version=0))
    for tls in (operator_tls(), proplet_tls("a"), service_tls("manager")):
        async with channel(world.endpoints.registry, tls) as ch:
            stub = model_registry_pb2_grpc.ModelRegistryStub(ch)
            await refused(
                stub.PutLineage(iter([header]), timeout=RPC_S),
                C.PERMISSION_DENIED,
                "PutLineage:",
                "allowed: service coordinator",
            )
    async with channel(world.endpoints.datastore, proplet_tls("a")) as ch:
        stub = datastore_pb2_grpc.DataStoreStub(ch)
        mine = await stub.GetDatasetInfo(datastore_pb2.GetDatasetRequest(proplet_id="a"))
        assert mine.size == 64
        await refused(
            stub.GetDatasetInfo(datastore_pb2.GetDatasetRequest(proplet_id="b"), timeout=RPC_S),
            C.PERMISSION_DENIED,
            "proplet 'a' may only read a dataset as itself",
        )


# ---- clipping --------------------------------------------------------------------------------


async def test_a_clipped_update_is_aggregated_as_clipped_and_verifies(
    mqtt: MqttConfig, cli: Cli
) -> None:
    async with (
        round_services(mqtt, max_update_distance=1.0, update_distance_action="clip") as services,
        clients(services) as c,
    ):
        await c.configure("r1", participants=["a", "b"])
        near = update("a", w=0.2)  # 0.36 from v0 (zeros): as sent
        far = update("b", w=4.0)  # 7.2 from v0: its difference scaled down to 1
        dist = float(np.sqrt(sum(float(np.sum(t**2)) for t in far.tensors.values())))
        await c.submit("r1", near)
        answer = await c.submit("r1", far)
        assert answer.accepted and answer.num_updates == 2
        done = await c.wait_state("r1", coordinator_pb2.ROUND_STATE_COMPLETED)
        v1 = await c.model(1)
        scale = 1.0 / dist
        for name in ("w", "b"):
            clipped = far.tensors[name] * scale
            expected = (near.tensors[name] * 10 + clipped * 10) / 20
            np.testing.assert_allclose(v1[name], expected, rtol=1e-12)
        assert done.new_model_version == 1
        lineage = await lineage_of(c, 1)
        assert [x.clip_scale for x in lineage.contributions] == [1.0, pytest.approx(scale)]
        # verify recomputes the clip from the stored update and the base, bit for bit.
        result = await cli("models", "verify", "1", "--json", *flags(services))
        assert result.ok().json()["ok"] is True


# ---- models verify ---------------------------------------------------------------------------


async def lineage_of(c: Clients, version: int) -> model_registry_pb2.Lineage:
    call = c.registry.GetLineage(model_registry_pb2.GetModelRequest(version=version))
    async for chunk in call:
        assert chunk.WhichOneof("part") == "header"
        call.cancel()
        header: model_registry_pb2.Lineage = chunk.header
        return header
    raise AssertionError("no header")


def tamper_model(state: Path, version: int) -> str:
    """Change the stored version's first value and its sha256 to match: the registry serves
    it as sound. Its new sha256."""
    with sqlite3.connect(state / "registry.sqlite") as conn:
        (data,) = conn.execute("SELECT data FROM models WHERE version = ?", (version,)).fetchone()
        changed = bytearray(data)
        (first,) = struct.unpack("<d", changed[:8])
        changed[:8] = struct.pack("<d", first + 0.5)
        sha = hashlib.sha256(changed).hexdigest()
        conn.execute(
            "UPDATE models SET data = ?, sha256 = ? WHERE version = ?",
            (bytes(changed), sha, version),
        )
    return sha


def tamper_lineage(state: Path, version: int, change: Callable[[Any], None]) -> Any:
    """`change` the stored lineage of `version` (a Lineage message); the changed lineage."""
    with sqlite3.connect(state / "lineage.sqlite") as conn:
        (blob,) = conn.execute(
            "SELECT header FROM lineages WHERE version = ?", (version,)
        ).fetchone()
        lineage = model_registry_pb2.Lineage.FromString(blob)
        change(lineage)
        conn.execute(
            "UPDATE lineages SET header = ? WHERE version = ?",
            (lineage.SerializeToString(), version),
        )
    return lineage


def more_samples(lineage: Any) -> None:
    lineage.contributions[0].header.num_samples += 1


async def run_round(c: Cluster, base: str) -> coordinator_pb2.RoundStatus:
    rid = f"r-{uuid.uuid4().hex[:8]}"
    await c.start_experiment(rid, c.proplet_ids, c.image, k_of_n=3, model_ref=base)
    status = await c.wait_state(rid, timeout=60)
    assert status.state == coordinator_pb2.ROUND_STATE_COMPLETED, status.failure_reason
    return status


async def test_models_verify_checks_the_chain_and_names_the_first_broken_link(
    mqtt: MqttConfig, tmp_path: Path, trainer_wasm: Path, cli: Cli
) -> None:
    state = tmp_path / "state"
    image = f"file://{trainer_wasm}"
    stack = {"state_dir": state}
    async with cluster(mqtt, tmp_path / "run", proplets=3, stack=stack, image=image) as c:
        first = await run_round(c, V0)
        second = await run_round(c, model_uri(1))
        assert (first.new_model_version, second.new_model_version) == (1, 2)
        # The lineage: every update as its proplet signed it, with its certificate.
        lineage = await lineage_of(c, 2)
        trainer = module_digest(await asyncio.to_thread(trainer_wasm.read_bytes))
        assert (lineage.round_id, lineage.module_digest) == (second.round_id, trainer)
        assert lineage.base_model_sha256 == (await c.registry.GetModelInfo(
            model_registry_pb2.GetModelRequest(version=1)
        )).sha256  # fmt: skip
        assert sorted(x.header.proplet_id for x in lineage.contributions) == sorted(c.proplet_ids)
        for x in lineage.contributions:
            cert = load_certificate(x.certificate)
            claim = Claim(
                lineage.round_id,
                x.header.proplet_id,
                lineage.base_model_sha256,
                x.header.module_digest,
                x.sha256,
                x.header.num_samples,
                dict(x.header.metrics),
                x.header.fuel_consumed,
            )
            assert x.header.fuel_consumed > 0  # the proplets' fuel receipts, signed
            assert signature_verifies(cert, x.header.signature, claim)
        f = flags(c.endpoints)
        ok = (await cli("models", "verify", "2", *f)).ok()
        header, rows = table_rows(ok.out)
        assert header == ["VERSION", "BASE", "ROUND", "UPDATES", "SHA256", "CHECK"]
        assert [(r[0], r[1], r[3], r[5]) for r in rows] == [
            ("v0", "-", "-", "ok"),
            ("v1", "v0", "3", "ok"),
            ("v2", "v1", "3", "ok"),
        ]
        # A version an operator stored has no lineage: not made by a round.
        _, v2 = await read_model_stream(
            c.registry.GetModel(model_registry_pb2.GetModelRequest(version=2))
        )
        await c.registry.PutModel(model_stream(v2, 1 << 20), timeout=RPC_S)
        result = await cli("models", "verify", "3", *f)
        result.failed_with("v3 (fl/models/global_model_v3): no lineage: not produced by a round")

    # A lineage row changed on disk: the update it lists no longer carries its signature.
    changed = tamper_lineage(state, 2, more_samples)
    proplet = changed.contributions[0].header.proplet_id
    async with cluster(mqtt, tmp_path / "again", dimension=None, stack=stack) as c:
        result = await cli("models", "verify", "2", "--json", *flags(c.endpoints))
        line = result.failed_with("v2 (fl/models/global_model_v2): update 1 of 3 ")
        assert f"(proplet {proplet!r}): its signature does not verify" in line
        doc = result.json()
        assert doc["ok"] is False
        assert [(x["version"], x["ok"]) for x in doc["chain"]] == [(0, True), (1, True), (2, False)]

    # A stored version changed (with a sha256 to match): its lineage names other bytes; v2,
    # trained from what v1 was, no longer has its base either. The first broken link is v1.
    sha = tamper_model(state, 1)
    async with cluster(mqtt, tmp_path / "third", dimension=None, stack=stack) as c:
        result = await cli("models", "verify", "2", "--json", *flags(c.endpoints))
        result.failed_with("v1 (fl/models/global_model_v1): its lineage names sha256 ")
        chain = result.json()["chain"]
        assert [x["ok"] for x in chain] == [True, False, False]
        assert chain[2]["problem"].startswith("trained from base v1 with sha256 ")

    # ... and with the lineage changed to name the new bytes: the version is not what its
    # updates aggregate to.
    tamper_lineage(state, 1, lambda lineage: setattr(lineage, "model_sha256", sha))
    async with cluster(mqtt, tmp_path / "fourth", dimension=None, stack=stack) as c:
        result = await cli("models", "verify", "1", *flags(c.endpoints))
        result.failed_with(
            "v1 (fl/models/global_model_v1): the stored version is not the FedAvg of its 3 "
            f"updates (stored sha256 {sha}, recomputed "
        )
