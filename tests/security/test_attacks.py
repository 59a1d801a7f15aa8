"""Each gRPC attack class of issue 9, against the real services over mutual TLS: refused with
the right status, and nothing stored or counted (issue 9, items 1, 2, 3 and 8).

The attacker holds a real certificate of the deployment (a proplet's, an operator's, another
service's), a revoked one, one from another CA, or none at all.
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from propeller.v1 import (
    aggregator_pb2_grpc,
    coordinator_pb2,
    coordinator_pb2_grpc,
    datastore_pb2,
    datastore_pb2_grpc,
    manager_pb2,
    manager_pb2_grpc,
    model_registry_pb2,
    model_registry_pb2_grpc,
)
from server.config import MqttConfig, TlsConfig
from server.coordinator.rounds import Update
from server.grpc_server import channel
from server.pki import CertificateAuthority, Identity, Kind
from server.streams import UpdateMeta, model_stream, update_stream
from server.tensors import tensor_to_proto
from tests.support.clients import RPC_S, V0
from tests.support.cluster import Cluster, cluster
from tests.support.security import operator_tls, proplet_tls, service_tls, session_ca

C = grpc.StatusCode
MODEL = {"w": np.zeros(3, dtype=np.float64), "b": np.zeros((), dtype=np.float64)}


@pytest.fixture
async def world(mqtt: MqttConfig, tmp_path: Path) -> AsyncIterator[Cluster]:
    """All five services over mutual TLS, datasets for proplets a and b, v0; no proplet runs
    (the attacker calls with the certificates directly)."""
    async with cluster(mqtt, tmp_path, stack={"seed_proplet_ids": ("a", "b")}) as c:
        yield c


@contextlib.asynccontextmanager
async def calling_as(addr: str, tls: TlsConfig | None) -> AsyncIterator[grpc.aio.Channel]:
    async with channel(addr, tls) as ch:
        yield ch


async def refused(call: Awaitable[Any], code: C, *needles: str) -> str:
    """`call` fails with `code` and details naming each of `needles`; the details."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    err = info.value
    assert err.code() == code, (err.code(), err.details())
    details = err.details() or ""
    for needle in needles:
        assert needle in details, details
    return details


def update(proplet_id: str) -> Any:
    meta = UpdateMeta("r1", proplet_id, V0, 10, {})
    return update_stream(meta, {"w": np.ones(3, np.float64), "b": np.ones((), np.float64)})


async def submit_refused(world: Cluster, tls: TlsConfig, proplet_id: str, *needles: str) -> None:
    """An update for round r1 as `proplet_id`, sent with `tls`, is PERMISSION_DENIED with
    details naming each of `needles`."""
    async with calling_as(world.endpoints.coordinator, tls) as ch:
        stub = coordinator_pb2_grpc.CoordinatorStub(ch)
        await refused(
            stub.SubmitUpdate(update(proplet_id), timeout=RPC_S), C.PERMISSION_DENIED, *needles
        )


async def test_a_proplet_cannot_submit_as_another(world: Cluster) -> None:
    await world.configure("r1", participants=["a", "b"], k_of_n=2)
    forged = "SubmitUpdate: proplet 'a' may only submit as itself, not as 'b'"
    await submit_refused(world, proplet_tls("a"), "b", forged)
    status = await world.status("r1")
    assert status.num_updates == 0 and list(status.reported) == []
    # The real b is not turned away as a "duplicate" of the forged update.
    real = Update("b", V0, 10, {}, {"w": np.ones(3, np.float64), "b": np.ones((), np.float64)})
    answer = await world.submit("r1", real)
    assert answer.accepted and not answer.duplicate and answer.num_updates == 1


async def test_a_proplet_cannot_submit_to_a_round_it_is_not_in(world: Cluster) -> None:
    await world.configure("r1", participants=["a", "b"], k_of_n=2)
    outsider = "proplet 'c' (header.proplet_id) is not a participant of round 'r1'"
    await submit_refused(world, proplet_tls("c"), "c", outsider)
    assert (await world.status("r1")).num_updates == 0


async def test_only_proplets_submit_updates(world: Cluster) -> None:
    await world.configure("r1", participants=["a", "b"], k_of_n=2)
    for tls in (operator_tls(), service_tls("manager")):
        await submit_refused(
            world, tls, "a", "SubmitUpdate:", "allowed: service site-*; proplets (as themselves)"
        )
    assert (await world.status("r1")).num_updates == 0


async def test_a_proplet_cannot_create_start_or_stop_tasks(world: Cluster) -> None:
    async with calling_as(world.endpoints.manager, proplet_tls("a")) as ch:
        stub = manager_pb2_grpc.ManagerStub(ch)
        create = manager_pb2.CreateTaskRequest(name="evil", image_url="file:///x.wasm")
        for method, request in (
            ("CreateTask", create),
            ("StartTask", manager_pb2.TaskRef(task_id="t")),
            ("StopTask", manager_pb2.TaskRef(task_id="t")),
        ):
            await refused(
                getattr(stub, method)(request, timeout=RPC_S),
                C.PERMISSION_DENIED,
                f"{method}: proplet 'a' may not call it; allowed: operators",
            )
        await refused(
            stub.StartExperiment(manager_pb2.StartExperimentRequest(), timeout=RPC_S),
            C.PERMISSION_DENIED,
            "StartExperiment",
        )
    listed = await world.manager.ListTasks(manager_pb2.ListTasksRequest(), timeout=RPC_S)
    assert list(listed.tasks) == []


async def test_a_proplet_reads_only_its_own_dataset_and_writes_none(world: Cluster) -> None:
    before = await world.datastore.GetDataset(
        datastore_pb2.GetDatasetRequest(proplet_id="b"), timeout=RPC_S
    )
    async with calling_as(world.endpoints.datastore, proplet_tls("a")) as ch:
        stub = datastore_pb2_grpc.DataStoreStub(ch)
        own = await stub.GetDataset(datastore_pb2.GetDatasetRequest(proplet_id="a"), timeout=RPC_S)
        assert own.proplet_id == "a"
        await refused(
            stub.GetDataset(datastore_pb2.GetDatasetRequest(proplet_id="b"), timeout=RPC_S),
            C.PERMISSION_DENIED,
            "GetDataset: proplet 'a' may only read a dataset as itself, not as 'b'",
        )
        await refused(
            stub.ListDatasets(datastore_pb2.ListDatasetsRequest(), timeout=RPC_S),
            C.PERMISSION_DENIED,
            "ListDatasets",
        )
        forged = datastore_pb2.Dataset(
            proplet_id="b",
            features=tensor_to_proto(np.zeros((2, 3), np.float64)),
            labels=tensor_to_proto(np.zeros(2, np.float64)),
        )
        for target in ("a", "b"):
            forged.proplet_id = target
            await refused(
                stub.PutDataset(datastore_pb2.PutDatasetRequest(dataset=forged), timeout=RPC_S),
                C.PERMISSION_DENIED,
                "PutDataset: proplet 'a' may not call it",
            )
    after = await world.datastore.GetDataset(
        datastore_pb2.GetDatasetRequest(proplet_id="b"), timeout=RPC_S
    )
    assert after == before


async def test_models_are_read_only_for_proplets_and_other_services(world: Cluster) -> None:
    for tls, who in (
        (proplet_tls("a"), "proplet 'a'"),
        (service_tls("aggregator"), "service 'aggregator'"),
    ):
        async with calling_as(world.endpoints.registry, tls) as ch:
            stub = model_registry_pb2_grpc.ModelRegistryStub(ch)
            await refused(
                stub.PutModel(model_stream(MODEL, 1 << 16), timeout=RPC_S),
                C.PERMISSION_DENIED,
                f"PutModel: {who} may not call it; allowed: operators; service coordinator",
            )
            await refused(
                stub.InitModel(model_registry_pb2.InitModelRequest(dimension=3), timeout=RPC_S),
                C.PERMISSION_DENIED,
                "InitModel",
            )
            info = await stub.GetModelInfo(
                model_registry_pb2.GetModelRequest(version=0), timeout=RPC_S
            )
            assert info.version == 0  # reading is allowed
    assert await world.versions() == [0]


async def test_only_the_coordinator_calls_the_aggregator(world: Cluster) -> None:
    async with calling_as(world.endpoints.aggregator, operator_tls()) as ch:
        stub = aggregator_pb2_grpc.AggregatorStub(ch)

        async def aggregate() -> None:
            async for _ in stub.Aggregate(iter(()), timeout=RPC_S):
                pass

        await refused(aggregate(), C.PERMISSION_DENIED, "Aggregate", "service coordinator")


async def test_a_revoked_certificate_is_refused_without_a_restart(world: Cluster) -> None:
    ca = session_ca()
    who = Identity(Kind.OPERATOR, f"leaving-{id(world):x}")
    bundle = ca.issue(who)
    tls = TlsConfig.bundle(bundle.dir)
    async with calling_as(world.endpoints.registry, tls) as ch:
        stub = model_registry_pb2_grpc.ModelRegistryStub(ch)
        listed = await stub.ListModels(model_registry_pb2.ListModelsRequest(), timeout=RPC_S)
        assert [m.version for m in listed.models] == [0]
        serial = bundle.certificate().serial_number
        assert ca.revoke({serial}) == {serial}
        # The same connection, the next call: refused.
        await refused(
            stub.ListModels(model_registry_pb2.ListModelsRequest(), timeout=RPC_S),
            C.UNAUTHENTICATED,
            f"operator {who.name!r}: certificate {serial:x} is revoked",
        )
        await refused(stub.PutModel(model_stream(MODEL, 1 << 16), timeout=RPC_S), C.UNAUTHENTICATED)
    assert await world.versions() == [0]  # others are unaffected


async def test_a_plaintext_client_gets_no_answer_from_a_tls_server(world: Cluster) -> None:
    async with calling_as(world.endpoints.registry, None) as ch:
        stub = model_registry_pb2_grpc.ModelRegistryStub(ch)
        await refused(stub.PutModel(model_stream(MODEL, 1 << 16), timeout=RPC_S), C.UNAVAILABLE)
        await refused(
            stub.InitModel(model_registry_pb2.InitModelRequest(dimension=5), timeout=RPC_S),
            C.UNAVAILABLE,
        )
    assert await world.versions() == [0]


async def test_a_client_without_a_certificate_is_refused_at_the_handshake(
    world: Cluster,
) -> None:
    creds = grpc.ssl_channel_credentials(root_certificates=operator_tls().ca.read_bytes())
    async with grpc.aio.secure_channel(world.endpoints.coordinator, creds) as ch:
        stub = coordinator_pb2_grpc.CoordinatorStub(ch)
        await refused(stub.SubmitUpdate(update("a"), timeout=RPC_S), C.UNAVAILABLE)
    assert await world.versions() == [0]


async def test_a_certificate_from_another_ca_is_refused(world: Cluster, tmp_path: Path) -> None:
    other = CertificateAuthority.create(tmp_path / "other-ca")
    # The attacker trusts our CA (the server's certificate is public) but signs its own.
    bundle = other.issue(Identity(Kind.OPERATOR, "tester"))
    tls = TlsConfig(operator_tls().ca, bundle.cert, bundle.key)
    async with calling_as(world.endpoints.registry, tls) as ch:
        stub = model_registry_pb2_grpc.ModelRegistryStub(ch)
        await refused(stub.PutModel(model_stream(MODEL, 1 << 16), timeout=RPC_S), C.UNAVAILABLE)
    # And a client of the other CA does not trust our servers either.
    async with calling_as(world.endpoints.registry, TlsConfig.bundle(bundle.dir)) as ch:
        stub = model_registry_pb2_grpc.ModelRegistryStub(ch)
        await refused(
            stub.ListModels(model_registry_pb2.ListModelsRequest(), timeout=RPC_S), C.UNAVAILABLE
        )
    assert await world.versions() == [0]


def _certificate_without_identity(ca: CertificateAuthority, out: Path) -> TlsConfig:
    """A client certificate our CA signed that names no propeller identity (as a careless
    `openssl` issue would)."""
    ca_key = serialization.load_pem_private_key(ca.key_path.read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "somebody")]))
        .issuer_name(ca.certificate().subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(ca_key, hashes.SHA256())
    )
    out.mkdir()
    (out / "tls.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (out / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return TlsConfig(ca.cert_path, out / "tls.crt", out / "tls.key")


async def test_a_certificate_without_an_identity_is_unauthenticated(
    world: Cluster, tmp_path: Path
) -> None:
    tls = _certificate_without_identity(session_ca(), tmp_path / "anonymous")
    async with calling_as(world.endpoints.manager, tls) as ch:
        stub = manager_pb2_grpc.ManagerStub(ch)
        await refused(
            stub.ListProplets(manager_pb2.ListPropletsRequest(), timeout=RPC_S),
            C.UNAUTHENTICATED,
            "client certificate",
        )


async def test_health_and_reflection_answer_any_identity(world: Cluster) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    for tls in (proplet_tls("a"), operator_tls(), service_tls("registry")):
        async with calling_as(world.endpoints.coordinator, tls) as ch:
            resp = await health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(), timeout=RPC_S
            )
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
    # The round status a proplet may not read; the coordinator's status is health's business.
    async with calling_as(world.endpoints.coordinator, proplet_tls("a")) as ch:
        await refused(
            coordinator_pb2_grpc.CoordinatorStub(ch).ListRounds(
                coordinator_pb2.ListRoundsRequest(), timeout=RPC_S
            ),
            C.PERMISSION_DENIED,
            "ListRounds",
        )
