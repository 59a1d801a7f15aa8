"""`propeller-fl proplets / tasks / wasm ...` with a real proplet and the real OCI registry:
an ordinary WASM task whose stdout becomes the result, inline and pulled from the registry."""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from pathlib import Path

import oras.client

from server.config import MqttConfig
from server.stack import Stack, proplets
from tests.cli.helpers import (
    Cli,
    flags,
    hello_wasm,
    spin_wasm,
    table_rows,
)
from tests.support.infra import OciRegistry
from tests.support.ports import free_port
from tests.support.waits import eventually


def pull(
    registry: OciRegistry, image: str, outdir: Path
) -> tuple[list[tuple[str, str]], list[str]]:
    """The manifest's (media type, digest) layers and the sha256 of each pulled file."""
    client = oras.client.OrasClient(hostname=registry.host, insecure=True)
    manifest = client.get_manifest(image)
    files = client.pull(target=image, outdir=str(outdir))
    return (
        [(x["mediaType"], x["digest"]) for x in manifest["layers"]],
        [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in files],
    )


async def test_wasm_push_then_pull_digest(cli: Cli, registry: OciRegistry, tmp_path: Path) -> None:
    module = hello_wasm(tmp_path / "hello.wasm")
    digest = "sha256:" + hashlib.sha256(module.read_bytes()).hexdigest()
    image = f"{registry.host}/cli-hello:v1"
    pushed = (await cli("wasm", "push", str(module), "--image", image, "--json")).ok().json()
    assert pushed["image"] == image and pushed["digest"] == digest
    assert pushed["media_type"] == "application/wasm"
    assert pushed["size"] == module.stat().st_size
    assert pushed["manifest_digest"].startswith("sha256:")
    assert pushed["pinned"] == f"{registry.host}/cli-hello@{pushed['manifest_digest']}"

    # What a puller sees: one application/wasm layer with that digest and the same bytes.
    layers, pulled = await asyncio.to_thread(pull, registry, image, tmp_path / "pulled")
    assert layers == [("application/wasm", digest)]
    assert pulled == [digest.removeprefix("sha256:")]

    human = (await cli("wasm", "push", str(module), "--image", f"{registry.host}/cli-hello")).ok()
    assert f"image:       {registry.host}/cli-hello:latest" in human.out
    assert f"digest:      {digest}" in human.out


async def test_wasm_push_errors(cli: Cli, registry: OciRegistry, tmp_path: Path) -> None:
    module = hello_wasm(tmp_path / "hello.wasm")
    not_wasm = tmp_path / "notes.wasm"
    not_wasm.write_text("hello")
    (await cli("wasm", "push", str(not_wasm), "--image", f"{registry.host}/x:1")).failed_with(
        "propeller-fl wasm push: ", "notes.wasm: not a WebAssembly module"
    )
    (await cli("wasm", "push", str(module), "--image", "no-host-repo")).failed_with(
        "INVALID_ARGUMENT", "--image"
    )
    # A plain-HTTP registry spoken to over HTTPS, and a closed port: one line each.
    (
        await cli("wasm", "push", str(module), "--image", f"{registry.host}/x:1", "--no-plain-http")
    ).failed_with("UNAVAILABLE: cannot reach OCI registry", "--plain-http")
    closed = f"127.0.0.1:{free_port()}"
    (await cli("wasm", "push", str(module), "--image", f"{closed}/x:1")).failed_with(
        f"propeller-fl wasm push: UNAVAILABLE: cannot reach OCI registry at {closed}"
    )


async def test_proplets_and_ordinary_tasks(
    cli: Cli, stack: Stack, mqtt: MqttConfig, registry: OciRegistry, tmp_path: Path
) -> None:
    f = flags(stack.endpoints)
    pid = f"p-{uuid.uuid4().hex[:8]}"
    module = hello_wasm(tmp_path / "hello.wasm")
    async with proplets(
        stack.endpoints, mqtt, [pid], tmp_path, ca=stack.ca, task_timeout_s=30, heartbeat_s=0.5
    ):
        listed = await eventually(
            lambda: cli("proplets", "list", "--json", *f),
            lambda r: any(p["id"] == pid and p["alive"] for p in r.json()["proplets"]),
        )
        (entry,) = listed.json()["proplets"]
        assert entry["name"] == "proplet-1" and entry["task_count"] == 0
        assert time.time() - entry["last_seen"] < 30
        header, rows = table_rows((await cli("proplets", "list", *f)).ok().out)
        assert header == ["ID", "NAME", "ALIVE", "LAST SEEN", "TASKS"]
        assert rows[0][:3] == [pid, "proplet-1", "yes"] and rows[0][3].endswith("s ago")
        assert rows[0][4] == "0"

        # Inline module: create (PENDING), start and wait; stdout is the result.
        created = (
            await cli(
                "tasks", "create", "--name", "hello-inline", "--file", str(module),
                "--proplet", pid, "--env", "GREETING=hi", "--arg", "one", "--json", *f,
            )
        ).ok().json()  # fmt: skip
        assert created["state"] == "TASK_STATE_PENDING" and created["proplet_id"] == pid
        assert created["env"] == {"GREETING": "hi"} and created["cli_args"] == ["one"]
        task_id = created["id"]
        done = (await cli("tasks", "start", task_id, "--wait", *f)).ok().out
        assert "state:     COMPLETED" in done
        assert done.endswith("results:\nhello from wasm\n")
        got = (await cli("tasks", "get", task_id, "--json", *f)).ok().json()
        assert got["state"] == "TASK_STATE_COMPLETED" and got["results"] == "hello from wasm\n"

        # From the registry: push with the CLI, create by image, start, poll with tasks get.
        image = f"{registry.host}/cli-tasks-hello:latest"
        (await cli("wasm", "push", str(module), "--image", image)).ok()
        by_image = (
            (await cli("tasks", "create", "--name", "hello-oci", "--image", image, "--json", *f))
            .ok()
            .json()
        )
        assert by_image["image_url"] == image and by_image["proplet_id"] == ""
        started = (await cli("tasks", "start", by_image["id"], "--json", *f)).ok().json()
        assert started["state"] in ("TASK_STATE_SCHEDULED", "TASK_STATE_RUNNING")
        final = await eventually(
            lambda: cli("tasks", "get", by_image["id"], "--json", *f),
            lambda r: r.json()["state"] in ("TASK_STATE_COMPLETED", "TASK_STATE_FAILED"),
        )
        assert final.json()["state"] == "TASK_STATE_COMPLETED", final.json()["error"]
        assert final.json()["results"] == "hello from wasm\n"

        # Listing and its filters.
        header, rows = table_rows((await cli("tasks", "list", *f)).ok().out)
        assert header == ["ID", "NAME", "STATE", "PROPLET", "UPDATED"]
        assert sorted(r[1] for r in rows) == ["hello-inline", "hello-oci"]
        assert {r[2] for r in rows} == {"COMPLETED"}
        by_prefix = (await cli("tasks", "list", "--name-prefix", "hello-o", "--json", *f)).ok()
        assert [t["name"] for t in by_prefix.json()["tasks"]] == ["hello-oci"]
        by_proplet = (await cli("tasks", "list", "--proplet", pid, "--json", *f)).ok()
        # The broadcast task is recorded on the proplet that ran it.
        assert sorted(t["name"] for t in by_proplet.json()["tasks"]) == [
            "hello-inline",
            "hello-oci",
        ]
        elsewhere = (await cli("tasks", "list", "--proplet", "other", "--json", *f)).ok()
        assert elsewhere.json()["tasks"] == []
        completed = (await cli("tasks", "list", "--state", "completed", "--json", *f)).ok()
        assert len(completed.json()["tasks"]) == 2
        pending = (await cli("tasks", "list", "--state", "TASK_STATE_PENDING", "--json", *f)).ok()
        assert pending.json()["tasks"] == []
        (await cli("tasks", "list", "--state", "sleeping", *f)).failed_with(
            "INVALID_ARGUMENT: --state: 'sleeping' is not one of pending, scheduled"
        )

        # Stop: a pending task cannot be stopped; a running one ends INTERRUPTED.
        spin = spin_wasm(tmp_path / "spin.wasm")
        busy = (
            (await cli("tasks", "create", "--name", "spin", "--file", str(spin), "--json", *f))
            .ok()
            .json()
        )
        (await cli("tasks", "stop", busy["id"], *f)).failed_with(
            "propeller-fl tasks stop: FAILED_PRECONDITION"
        )
        (await cli("tasks", "start", busy["id"], *f)).ok()
        await eventually(
            lambda: cli("tasks", "get", busy["id"], "--json", *f),
            lambda r: r.json()["state"] == "TASK_STATE_RUNNING",
        )
        stopped = (await cli("tasks", "stop", busy["id"], *f)).ok().out
        assert "state:     INTERRUPTED" in stopped
        running = (await cli("tasks", "list", "--state", "running", "--json", *f)).ok().json()
        assert running["tasks"] == []

        (await cli("tasks", "get", "no-such-task", *f)).failed_with(
            "propeller-fl tasks get: NOT_FOUND"
        )
        (await cli("tasks", "start", "no-such-task", *f)).failed_with("NOT_FOUND")
        (
            await cli("tasks", "create", "--name", "x", "--image", image, "--env", "NOEQ", *f)
        ).failed_with("--env: 'NOEQ' is not KEY=VALUE")
        (
            await cli("tasks", "create", "--name", "x", "--file", str(tmp_path / "none.wasm"), *f)
        ).failed_with("none.wasm: no such file")
