"""Fetching modules: from the real OCI registry with oras (tags honoured, digests verified),
from a registry that serves tampered content, from files, and the on-disk cache."""

from __future__ import annotations

import hashlib
import os
import urllib.request
import uuid
from contextlib import closing
from pathlib import Path

import pytest

from proplet import Proplet, PropletConfig, TaskFailed
from proplet.artifacts import ArtifactStore, parse_image
from server.messages import COMPLETED, FAILED, TaskStart
from server.oci import ImageRef
from tests.proplet import wat
from tests.proplet.conftest import ManagerProbe, with_changes
from tests.proplet.fake_oci import digest_of, lying_registry, wasm_manifest
from tests.support.infra import OciRegistry, push_wasm
from tests.support.ports import free_port


def push(registry: OciRegistry, tmp_path: Path, wasm: bytes, repo: str, tag: str) -> str:
    path = tmp_path / f"{uuid.uuid4().hex[:8]}.wasm"
    path.write_bytes(wasm)
    return push_wasm(registry, path, repo=repo, tag=tag)


def manifest_digest(registry: OciRegistry, repo: str, tag: str) -> str:
    req = urllib.request.Request(
        f"http://{registry.host}/v2/{repo}/manifests/{tag}",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
    )
    with urllib.request.urlopen(req, timeout=5) as resp:
        return digest_of(resp.read())


def task(image_url: str) -> TaskStart:
    return TaskStart(id=f"t-{uuid.uuid4().hex[:6]}", name="t", image_url=image_url)


def repo_name() -> str:
    return f"proplet-test/{uuid.uuid4().hex[:8]}"


async def refusal(config: PropletConfig, image_url: str) -> str:
    """The reason a fresh store gives for refusing to fetch `image_url`."""
    with closing(ArtifactStore(config)) as store, pytest.raises(TaskFailed) as info:
        await store.fetch(task(image_url))
    return info.value.reason


# ------------------------------------------------------------------ references


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("127.0.0.1:5000/fl-client-wasm:latest", ImageRef("127.0.0.1:5000", "fl-client-wasm")),
        ("local-registry:5000/a/b:v2", ImageRef("local-registry:5000", "a/b", "v2")),
        ("registry.example.com/x", ImageRef("registry.example.com", "x", "latest")),
        (
            "oci://localhost/x@sha256:" + "a" * 64,
            ImageRef("localhost", "x", "latest", "sha256:" + "a" * 64),
        ),
    ],
)
def test_image_references_parse(url: str, expected: ImageRef) -> None:
    assert ImageRef.parse(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "fl-client-wasm:latest",
        "host:5000/Bad:tag",
        "host:5000/x@sha256:short",
        "host:5000/x@md5:ab",
    ],
)
def test_bad_image_references_are_refused(url: str) -> None:
    with pytest.raises(TaskFailed, match="image_url"):
        parse_image(url)


# ------------------------------------------------------------------ real registry


async def test_pulls_the_tag_it_names_not_latest(
    registry: OciRegistry, proplet_config: PropletConfig, tmp_path: Path
) -> None:
    repo = repo_name()
    v1 = push(registry, tmp_path, wat.printing(b"v1"), repo, "v1")
    push(registry, tmp_path, wat.printing(b"latest"), repo, "latest")
    with closing(ArtifactStore(proplet_config)) as store:
        artifact = await store.fetch(task(v1))
    assert artifact.data == wat.printing(b"v1")
    assert artifact.sha256 == hashlib.sha256(wat.printing(b"v1")).hexdigest()
    assert artifact.source == "registry"


async def test_pull_by_digest_verifies_and_needs_no_network_when_warm(
    registry: OciRegistry, proplet_config: PropletConfig, tmp_path: Path
) -> None:
    repo = repo_name()
    module = wat.printing(b"pinned")
    push(registry, tmp_path, module, repo, "v1")
    pinned = f"{registry.host}/{repo}@{manifest_digest(registry, repo, 'v1')}"
    with closing(ArtifactStore(proplet_config)) as store:
        first = await store.fetch(task(pinned))
        assert first.data == module
        # A warm start: the manifest is pinned and the module compiled, so nothing is read.
        warm = await store.fetch(task(pinned), have=lambda sha: sha == first.sha256)
        assert (warm.sha256, warm.data, warm.source) == (first.sha256, None, "memory")


async def test_unknown_digest_and_tag_fail_with_the_registry_reason(
    registry: OciRegistry, proplet_config: PropletConfig, tmp_path: Path
) -> None:
    repo = repo_name()
    push(registry, tmp_path, wat.hello(), repo, "v1")
    wrong = await refusal(proplet_config, f"{registry.host}/{repo}@sha256:{'0' * 64}")
    assert "manifest not found: HTTP 404" in wrong
    missing = await refusal(proplet_config, f"{registry.host}/{repo}:nope")
    assert "manifest not found: HTTP 404" in missing
    assert "MANIFEST_UNKNOWN" in missing


async def test_mirrors_map_image_hosts_to_reachable_registries(
    registry: OciRegistry, proplet_config: PropletConfig, tmp_path: Path
) -> None:
    repo = repo_name()
    push(registry, tmp_path, wat.printing(b"mirrored"), repo, "v1")
    config = with_changes(proplet_config, registry_mirrors={"local-registry:5000": registry.host})
    with closing(ArtifactStore(config)) as store:
        artifact = await store.fetch(task(f"local-registry:5000/{repo}:v1"))
    assert artifact.data == wat.printing(b"mirrored")


async def test_unreachable_registry_fails_promptly(proplet_config: PropletConfig) -> None:
    assert "unreachable" in await refusal(proplet_config, f"127.0.0.1:{free_port()}/x:v1")


async def test_disk_cache_is_used_and_corruption_is_repaired(
    registry: OciRegistry, proplet_config: PropletConfig, tmp_path: Path
) -> None:
    repo = repo_name()
    module = wat.printing(b"cached")
    url = push(registry, tmp_path, module, repo, "v1")
    sha = hashlib.sha256(module).hexdigest()
    with closing(ArtifactStore(proplet_config)) as store:
        await store.fetch(task(url))
        cached = proplet_config.work_dir / "modules" / f"{sha}.wasm"
        assert cached.read_bytes() == module
        assert (await store.fetch(task(url))).source == "disk"
        cached.write_bytes(b"tampered on disk")
        again = await store.fetch(task(url))
        assert (again.source, again.data) == ("registry", module)
        assert cached.read_bytes() == module


async def test_proplet_runs_images_by_tag_and_digest(
    registry: OciRegistry, proplet: Proplet, probe: ManagerProbe, tmp_path: Path
) -> None:
    repo = repo_name()
    url = push(registry, tmp_path, wat.hello(), repo, "v1")
    by_tag = await probe.run(image_url=url)
    assert (by_tag.state, by_tag.results) == (COMPLETED, "hello from wasm\n")
    pinned = f"{registry.host}/{repo}@{manifest_digest(registry, repo, 'v1')}"
    by_digest = await probe.run(image_url=pinned)
    assert (by_digest.state, by_digest.results) == (COMPLETED, "hello from wasm\n")
    wrong = await probe.run(image_url=f"{registry.host}/{repo}@sha256:{'ab' * 32}")
    assert wrong.state == FAILED
    assert "manifest not found" in wrong.error


# ------------------------------------------------------------------ tampered content


async def test_tampered_blob_is_refused(proplet_config: PropletConfig) -> None:
    module = wat.printing(uuid.uuid4().hex.encode())
    with lying_registry() as reg:
        reg.manifests["evil/v1"] = wasm_manifest(digest_of(module), len(module))
        reg.blobs[digest_of(module)] = module[:-1] + bytes(
            [module[-1] ^ 1]
        )  # same size, other content
        reason = await refusal(proplet_config, f"{reg.host}/evil:v1")
    assert "blob digest mismatch" in reason
    assert digest_of(module) in reason
    assert not (proplet_config.work_dir / "modules").exists() or not any(
        (proplet_config.work_dir / "modules").iterdir()
    )


async def test_manifest_not_matching_its_pinned_digest_is_refused(
    proplet_config: PropletConfig,
) -> None:
    module = wat.hello()
    manifest = wasm_manifest(digest_of(module), len(module))
    pinned = digest_of(manifest)
    with lying_registry() as reg:
        # The registry answers the pinned digest with a different (swapped) manifest.
        other = wat.printing(b"swapped")
        reg.manifests[f"evil/{pinned}"] = wasm_manifest(digest_of(other), len(other))
        reg.blobs[digest_of(other)] = other
        reason = await refusal(proplet_config, f"{reg.host}/evil@{pinned}")
    assert "manifest digest mismatch" in reason


async def test_tampered_image_fails_the_task_and_the_proplet_carries_on(
    proplet: Proplet, probe: ManagerProbe
) -> None:
    module = wat.printing(uuid.uuid4().hex.encode())  # never seen before: must be downloaded
    with lying_registry() as reg:
        reg.manifests["evil/v1"] = wasm_manifest(digest_of(module), len(module))
        reg.blobs[digest_of(module)] = module[:-1] + bytes([module[-1] ^ 1])
        result = await probe.run(image_url=f"{reg.host}/evil:v1")
    assert result.state == FAILED
    assert "blob digest mismatch" in result.error
    assert (await probe.run(wat.hello())).state == COMPLETED


async def test_a_manifest_naming_a_module_already_held_runs_the_verified_copy(
    proplet: Proplet, probe: ManagerProbe
) -> None:
    module = wat.printing(b"verified copy")
    assert (await probe.run(module)).results == "verified copy"
    with lying_registry() as reg:
        # The blob is tampered, but its digest names content this proplet already verified.
        reg.manifests["evil/v1"] = wasm_manifest(digest_of(module), len(module))
        reg.blobs[digest_of(module)] = wat.trap()
        result = await probe.run(image_url=f"{reg.host}/evil:v1")
    assert (result.state, result.results) == (COMPLETED, "verified copy")


def test_plain_http_only_for_loopback_and_mirrors(proplet_config: PropletConfig) -> None:
    config = with_changes(proplet_config, registry_mirrors={"reg:5000": "10.0.0.5:5000"})
    assert config.is_insecure("127.0.0.1:5000")
    assert config.is_insecure("localhost:5000")
    assert config.is_insecure("10.0.0.5:5000")
    assert not config.is_insecure("ghcr.io")
    explicit = with_changes(config, insecure_registries=frozenset({"ghcr.io"}))
    assert explicit.is_insecure("ghcr.io")
    assert not explicit.is_insecure("127.0.0.1:5000")


# ------------------------------------------------------------------ local files


async def test_a_local_file_held_compiled_is_read_again_only_once_it_changed(
    proplet_config: PropletConfig, tmp_path: Path
) -> None:
    path = tmp_path / "m.wasm"
    first, second = wat.printing(b"one"), wat.printing(b"two")
    assert len(first) == len(second)  # a change of contents alone, not of size
    path.write_bytes(first)
    url = f"file://{path}"
    with closing(ArtifactStore(proplet_config, racy_s=0)) as store:
        read = await store.fetch(task(url))
        assert (read.source, read.data) == ("file", first)
        held = await store.fetch(task(url), have=lambda sha: sha == read.sha256)
        assert (held.source, held.data, held.sha256) == ("memory", None, read.sha256)
        # Not held compiled: the bytes are read.
        assert (await store.fetch(task(url))).data == first
        before = path.stat()
        path.write_bytes(second)
        # Two writes may fall in one tick of the file clock (racy_s covers that, below): the
        # second one dated a second later, as it would be in a deployment.
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
        changed = await store.fetch(task(url), have=lambda sha: sha == read.sha256)
        assert (changed.source, changed.data) == ("file", second)
        assert changed.sha256 == hashlib.sha256(second).hexdigest()
        path.unlink()
        with pytest.raises(TaskFailed, match="cannot read"):
            await store.fetch(task(url), have=lambda sha: True)


async def test_a_file_changed_just_before_it_was_read_is_read_every_time(
    proplet_config: PropletConfig, tmp_path: Path
) -> None:
    # Its change time may be as coarse as a clock tick: a second write in the same tick would
    # leave it as it was, so such a file is not taken as unchanged.
    path = tmp_path / "m.wasm"
    path.write_bytes(wat.printing(b"one"))
    with closing(ArtifactStore(proplet_config, racy_s=3600)) as store:
        read = await store.fetch(task(f"file://{path}"))
        again = await store.fetch(task(f"file://{path}"), have=lambda sha: sha == read.sha256)
        assert (again.source, again.data) == ("file", read.data)
