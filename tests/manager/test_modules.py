"""Pinning a round's module (`server.manager.modules`) against the real OCI registry: a tag is
resolved to its manifest's digest and the module to its bytes' digest; the pinned reference
keeps naming the same module after the tag moves; a file is hashed; what cannot be pinned is
refused naming task_wasm_image."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.errors import FailedPrecondition, InvalidArgument, NotFound
from server.manager.modules import ModuleResolver
from server.oci import ImageRef, OciClient
from server.provenance import module_digest
from tests.cli.helpers import hello_wasm
from tests.support.infra import OciRegistry, push_wasm


@pytest.fixture
def resolver() -> Iterator[ModuleResolver]:
    modules = ModuleResolver(timeout_s=10.0)
    yield modules
    modules.close()


async def test_a_tag_is_pinned_to_its_manifest_and_its_module(
    resolver: ModuleResolver, registry: OciRegistry, trainer_wasm: Path, tmp_path: Path
) -> None:
    image = await asyncio.to_thread(push_wasm, registry, trainer_wasm, "pin-test", "v1")
    trainer = await asyncio.to_thread(trainer_wasm.read_bytes)
    pinned = await resolver.pin(image)
    assert pinned.digest == module_digest(trainer)
    ref = ImageRef.parse(pinned.image)
    assert pinned.image == f"{image}@{ref.digest}" and ref.digest.startswith("sha256:")

    # The tag moves to another module; the pinned reference still names the first one.
    other = hello_wasm(tmp_path / "hello.wasm")
    await asyncio.to_thread(push_wasm, registry, other, "pin-test", "v1")
    moved = await resolver.pin(image)
    assert moved.digest == module_digest(await asyncio.to_thread(other.read_bytes))
    assert moved.image != pinned.image
    client = OciClient(registry.host, insecure=True, timeout=10.0)
    try:
        layer = await asyncio.to_thread(client.wasm_layer, ref)
    finally:
        client.close()
    assert f"sha256:{layer.sha256}" == pinned.digest


async def test_an_image_is_resolved_where_the_manager_is_told(
    registry: OciRegistry, seed_image_registry: str, trainer_wasm: Path
) -> None:
    # Compose's name for the registry, reached at the test registry's address.
    modules = ModuleResolver(registry=seed_image_registry, timeout_s=10.0)
    try:
        pinned = await modules.pin("local-registry:5000/fl-client-wasm:latest")
    finally:
        modules.close()
    assert pinned.image.startswith("local-registry:5000/fl-client-wasm:latest@sha256:")
    assert pinned.digest == module_digest(await asyncio.to_thread(trainer_wasm.read_bytes))


async def test_what_cannot_be_pinned_is_refused_naming_the_field(
    resolver: ModuleResolver, registry: OciRegistry, trainer_wasm: Path, tmp_path: Path
) -> None:
    with pytest.raises(NotFound) as missing:
        await resolver.pin(f"{registry.host}/not-pushed:latest")
    assert str(missing.value).startswith(
        f"task_wasm_image: image {registry.host}/not-pushed:latest: manifest not found"
    )
    with pytest.raises(FailedPrecondition) as unreadable:
        await resolver.pin(f"file://{tmp_path / 'gone.wasm'}")
    assert str(unreadable.value).startswith(
        f"task_wasm_image: cannot read {tmp_path / 'gone.wasm'}: "
    )
    assert str(unreadable.value).endswith("(the manager reads the file to pin the module's digest)")
    with pytest.raises(InvalidArgument, match=r"^task_wasm_image: 'x' is not an OCI reference"):
        await resolver.pin("x")
    # A file the manager reads is pinned by its bytes; the tasks keep the URL.
    pinned = await resolver.pin(f"file://{trainer_wasm}")
    assert pinned.image == f"file://{trainer_wasm}"
    assert pinned.digest == module_digest(await asyncio.to_thread(trainer_wasm.read_bytes))
