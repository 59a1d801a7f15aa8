"""The client commands of `propeller-fl` (`propeller-fl GROUP ACTION`), usable against any
deployment, as one table (`COMMANDS`): each row a `Command` (group, name, help, arguments and
an async function that calls the `Client` and returns a `Reply`: the JSON document `--json`
prints, the text people see, and a failure line when the command itself failed, e.g. a failed
round). Most rows are one call shown as it is (`one_call`); the others are the functions
below, `server.cli.datasets`' and, for `--watch`, `server.cli.follow`'s. Arguments shared by
rows and how they become request fields are in `server.cli.arguments`; what every command
shares (addresses, client, output, exit status) is in `server.cli.runner`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from propeller.v1 import coordinator_pb2, manager_pb2
from server.cli import runner
from server.cli.arguments import (
    WATCH_LIMIT,
    dtype_of,
    experiment_request,
    experiment_run_args,
    parse_env_pairs,
    parse_task_state,
    read_ca,
    round_args,
    round_fields,
)
from server.cli.client import Client
from server.cli.datasets import datasets_get, datasets_partition, datasets_put
from server.cli.files import (
    model_file_type,
    read_model_file,
    read_wasm_file,
    write_model_file,
)
from server.cli.follow import follow_experiment, follow_round
from server.cli.lineage import (
    lineage_chain,
    lineage_dict,
    render_chain,
    render_lineage,
    round_fuels,
)
from server.cli.render import (
    Output,
    fields,
    message_dict,
    model_json,
    render_datasets,
    render_experiment,
    render_experiment_response,
    render_experiment_rounds,
    render_experiments,
    render_model_version,
    render_models,
    render_proplets,
    render_push,
    render_round,
    render_rounds,
    render_task,
    render_tasks,
    specs_text,
    table,
    task_state,
)
from server.cli.report import write_experiment_plot
from server.cli.runner import Command, OneOf, Reply, arg, one_call, shown
from server.cli.verify import verify_chain
from server.datastore import catalog
from server.datastore.partition import (
    DEFAULT_MIN_SAMPLES,
)
from server.errors import InvalidArgument
from server.models import model_uri, parse_model_uri
from server.oci import ImageRef, OciClient, is_loopback
from server.tensors import model_to_json

# ------------------------------------------------------------------------------ commands


async def started(
    resp: manager_pb2.StartExperimentResponse,
    a: argparse.Namespace,
    follow: Callable[[], Awaitable[Reply]],
) -> Reply:
    """A started experiment's answer; with --watch, shown at once and then `follow()`ed."""
    if not a.watch:
        return shown(resp, render_experiment_response(resp))
    out = Output()
    if a.json:
        out.json_line(message_dict(resp))
    else:
        out.text(render_experiment_response(resp))
        out.text("")
    return await follow()


async def experiment_start(c: Client, a: argparse.Namespace) -> Reply:
    resp = await c.start_experiment(manager_pb2.StartExperimentRequest(**round_fields(a)))
    return await started(resp, a, lambda: follow_round(c, resp.round_id, a))


async def experiment_run(c: Client, a: argparse.Namespace) -> Reply:
    resp = await c.start_experiment(experiment_request(a))
    return await started(resp, a, lambda: follow_experiment(c, resp.experiment_id, a))


async def experiment_history(c: Client, a: argparse.Namespace) -> Reply:
    rounds = await c.experiment_rounds(a.experiment_id)
    fuel: dict[int, int] = {}
    if not a.json:  # the table's FUEL column: each round's from its lineage (the registry)
        versions = [r.new_model_version for r in rounds.rounds if r.new_model_version]
        fuel = await round_fuels(c, versions)
    return shown(rounds, render_experiment_rounds(rounds.rounds, fuel))


async def experiment_plot(c: Client, a: argparse.Namespace) -> Reply:
    output = Path(a.output)
    if output.suffix.lower() != ".png":
        raise InvalidArgument(f"--output: {output} must end in .png")
    rounds = (await c.experiment_rounds(a.experiment_id)).rounds
    points = [(r.index, dict(r.train_metrics), dict(r.eval_metrics)) for r in rounds]
    await asyncio.to_thread(write_experiment_plot, output, points, f"experiment {a.experiment_id}")
    doc = {"experiment_id": a.experiment_id, "rounds": len(rounds), "plot": str(output)}
    return Reply(doc, f"wrote {output} ({len(rounds)} rounds)")


async def round_configure(c: Client, a: argparse.Namespace) -> Reply:
    request = coordinator_pb2.ConfigureRoundRequest(**round_fields(a), start=a.start)
    st = await c.configure_round(request)
    return shown(st, render_round(st))


async def models_get(c: Client, a: argparse.Namespace) -> Reply:
    output = Path(a.output) if a.output else None
    if output is not None:
        model_file_type(output)  # before anything is fetched
    header, tensors = await c.get_model(a.ref)
    doc = model_json(header, tensors)
    head = [("version", header.version), ("uri", header.model_uri), ("sha256", header.sha256)]
    if output is None:
        model = json.dumps(model_to_json(tensors))
        return Reply(doc, fields([*head, ("tensors", specs_text(header.tensors))]) + "\n" + model)
    await asyncio.to_thread(write_model_file, output, tensors)
    doc.pop("model")
    return Reply({**doc, "output": str(output)}, fields([*head, ("wrote", str(output))]))


async def models_put(c: Client, a: argparse.Namespace) -> Reply:
    tensors = await asyncio.to_thread(read_model_file, Path(a.file), a.dtype)
    mv = await c.put_model(tensors, a.version)
    return shown(mv, render_model_version(mv))


async def version_of(c: Client, ref: str) -> int:
    """The version VERSION_OR_URI names (`latest`: the newest)."""
    request = await c.resolve_model_ref(ref)
    if request.WhichOneof("ref") == "version":
        return request.version
    return parse_model_uri(request.model_uri, "VERSION_OR_URI")


async def models_verify(c: Client, a: argparse.Namespace) -> Reply:
    version = await version_of(c, a.ref)
    ca_path = Path(a.ca) if a.ca else (c.tls.ca if c.tls is not None else None)
    ca = None if ca_path is None else await asyncio.to_thread(read_ca, ca_path)
    links = await verify_chain(c, version, ca, allow_unsigned=a.allow_unsigned)
    broken = next((link for link in links if link.problem), None)
    doc = {
        "version": version,
        "ok": broken is None,
        "chain": [link.to_dict() for link in links],
    }
    text = table(
        ["VERSION", "BASE", "ROUND", "UPDATES", "SHA256", "CHECK"],
        [
            [
                f"v{link.version}",
                "-" if link.base is None else f"v{link.base}",
                link.round_id or "-",
                "-" if link.base is None else link.updates,
                link.sha256[:12],
                link.problem or "ok",
            ]
            for link in links
        ],
    )
    failure = ""
    if broken is not None:
        failure = f"v{broken.version} ({model_uri(broken.version)}): {broken.problem}"
    return Reply(doc, text, failure=failure)


async def models_lineage(c: Client, a: argparse.Namespace) -> Reply:
    version = await version_of(c, a.ref)
    links = await lineage_chain(c, version, chain=a.chain)
    if a.chain:
        doc = {"version": version, "chain": [lineage_dict(v, x) for v, x in links]}
        return Reply(doc, render_chain(links))
    ((_, lineage),) = links
    return Reply(lineage_dict(version, lineage), render_lineage(version, lineage))


async def proplets_list(c: Client, a: argparse.Namespace) -> Reply:
    resp = await c.list_proplets()
    if a.ids:
        # For scripts: the alive proplets' ids, comma-separated, ready for --participants.
        return Reply(text=",".join(p.id for p in resp.proplets if p.alive))
    return shown(resp, render_proplets(resp.proplets))


async def tasks_list(c: Client, a: argparse.Namespace) -> Reply:
    state = parse_task_state(a.state) if a.state else 0
    resp = await c.list_tasks(a.name_prefix, a.proplet, state)
    return shown(resp, render_tasks(resp.tasks))


async def tasks_create(c: Client, a: argparse.Namespace) -> Reply:
    file = await asyncio.to_thread(read_wasm_file, Path(a.file)) if a.file else b""
    request = manager_pb2.CreateTaskRequest(
        name=a.name,
        image_url=a.image or "",
        file=file,
        env=parse_env_pairs(a.env or []),
        cli_args=list(a.arg or []),
        proplet_id=a.proplet,
    )
    task = await c.create_task(request)
    return shown(task, render_task(task))


async def tasks_start(c: Client, a: argparse.Namespace) -> Reply:
    task = await c.start_task(a.task_id)
    if not a.wait:
        return shown(task, render_task(task))
    task = await c.wait_task(a.task_id, a.max_wait)
    failure = ""
    if task.state != manager_pb2.TASK_STATE_COMPLETED:
        failure = f"task {task.id} {task_state(task.state)}: {task.error or 'no reason given'}"
    return dataclasses.replace(shown(task, render_task(task)), failure=failure)


async def wasm_push(c: Client, a: argparse.Namespace) -> Reply:
    await asyncio.to_thread(read_wasm_file, Path(a.file))  # a clear line for a wrong file
    ref = ImageRef.push_target(a.image, "--image")
    insecure = is_loopback(ref.host) if a.plain_http is None else a.plain_http

    def push() -> Any:
        client = OciClient(ref.host, insecure=insecure, timeout=c.timeout)
        try:
            return client.push(Path(a.file), ref)
        finally:
            client.close()

    result = await asyncio.to_thread(push)
    return Reply(result.to_dict(), render_push(result))


COMMANDS: tuple[Command, ...] = (
    Command(
        "experiment",
        "start",
        "start a round: the manager schedules one training task per alive participant. "
        "With --json: the StartExperimentResponse; with --watch --json, JSON lines: the "
        "response, then one RoundEvent per line.",
        experiment_start,
        (
            *round_args(model_required=True),
            arg("--watch", action="store_true", help="then follow the round like `round watch`"),
            WATCH_LIMIT,
        ),
    ),
    Command(
        "experiment",
        "run",
        "run an experiment of many rounds: round r + 1 starts from the version round r stored, "
        "until --rounds, a --target or a plateau (--patience). With --watch a line per round "
        "until it ends (exit 1 if it FAILED); with --watch --json, JSON lines: the response, "
        "then one ExperimentEvent per line.",
        experiment_run,
        experiment_run_args(),
    ),
    Command(
        "experiment",
        "history",
        "every round of an experiment: state, version, sampled and reported, train and "
        "evaluation metrics (--json: the ExperimentRound messages)",
        experiment_history,
        (arg("experiment_id", metavar="EXPERIMENT_ID"),),
    ),
    Command(
        "experiment",
        "plot",
        "a PNG of an experiment's loss and accuracy per round: training (the updates') and "
        "evaluation (held-out splits)",
        experiment_plot,
        (
            arg("experiment_id", metavar="EXPERIMENT_ID"),
            arg("--output", "-o", required=True, metavar="FILE.png", help="where to write it"),
        ),
    ),
    Command(
        "experiment",
        "watch",
        "print an experiment's events live until it ends (exit 1 if it FAILED)",
        lambda c, a: follow_experiment(c, a.experiment_id, a),
        (arg("experiment_id", metavar="EXPERIMENT_ID"), WATCH_LIMIT),
    ),
    Command(
        "experiment",
        "stop",
        "stop an experiment: no further round starts, its running tasks are stopped",
        one_call(lambda c, a: c.stop_experiment(a.experiment_id), render_experiment),
        (arg("experiment_id", metavar="EXPERIMENT_ID"),),
    ),
    Command(
        "experiment",
        "get",
        "one experiment",
        one_call(lambda c, a: c.get_experiment(a.experiment_id), render_experiment),
        (arg("experiment_id", metavar="EXPERIMENT_ID"),),
    ),
    Command(
        "experiment",
        "list",
        "all experiments",
        one_call(lambda c, a: c.list_experiments(), lambda r: render_experiments(r.experiments)),
    ),
    Command(
        "round",
        "status",
        "a round's status (via the manager)",
        one_call(lambda c, a: c.round_status(a.round_id), render_round),
        (arg("round_id", metavar="ROUND_ID"),),
    ),
    Command(
        "round",
        "watch",
        "print the round's events live until it completes (exit 0) or fails (exit 1); "
        "with --json one RoundEvent object per line",
        lambda c, a: follow_round(c, a.round_id, a),
        (arg("round_id", metavar="ROUND_ID"), WATCH_LIMIT),
    ),
    Command(
        "round",
        "list",
        "rounds the coordinator knows",
        one_call(lambda c, a: c.list_rounds(a.experiment_id), lambda r: render_rounds(r.rounds)),
        (arg("--experiment-id", default="", help="only this experiment's rounds"),),
    ),
    Command(
        "round",
        "configure",
        "configure a round directly on the coordinator (for manual federated tasks)",
        round_configure,
        (
            *round_args(model_required=False),
            arg(
                "--start",
                action="store_true",
                help="open the round now (its deadline counts from now)",
            ),
        ),
    ),
    Command(
        "models",
        "list",
        "stored versions, oldest first",
        one_call(lambda c, a: c.list_models(), lambda r: render_models(r.models)),
    ),
    Command(
        "models",
        "get",
        'one version: the model as JSON {"w": [...], "b": x} with version and sha256; '
        '--json: {"version", "model_uri", "sha256", "tensors", "model"}',
        models_get,
        (
            arg("ref", metavar="VERSION_OR_URI", help="3, v3, latest or fl/models/global_model_v3"),
            arg("--output", "-o", metavar="FILE", help="write the model to FILE.json or FILE.npz"),
        ),
    ),
    Command(
        "models",
        "init",
        "create version 0 as zeros",
        one_call(lambda c, a: c.init_model(a.dimension, dtype_of(a.dtype)), render_model_version),
        (
            arg("--dimension", type=int, default=3, help="length of w (default 3)"),
            arg("--dtype", choices=["float32", "float64"], help="default float64"),
        ),
    ),
    Command(
        "models",
        "put",
        "store a model from FILE.json or FILE.npz as a version",
        models_put,
        (
            arg("file", metavar="FILE", help='.json {"w": [...], "b": x} or .npz'),
            arg("--version", type=int, default=None, help="this version (default: the next one)"),
            arg("--dtype", choices=["float32", "float64"], help="convert the tensors"),
        ),
    ),
    Command(
        "models",
        "lineage",
        "how a version was made: its experiment, round, parent version, strategy with its "
        "parameters and state, and each contributing proplet with its weight and update digest",
        models_lineage,
        (
            arg("ref", metavar="VERSION_OR_URI", help="3, v3, latest or fl/models/global_model_v3"),
            arg(
                "--chain",
                action="store_true",
                help="follow the parents back to v0 (or the first version without a lineage)",
            ),
        ),
    ),
    Command(
        "models",
        "verify",
        "check the chain that made a version, from v0 up: every base, every update's "
        "signature and certificate, its module, and the version as the FedAvg of its updates",
        models_verify,
        (
            arg("ref", metavar="VERSION_OR_URI", help="3, v3, latest or fl/models/global_model_v3"),
            arg(
                "--ca",
                default="",
                metavar="FILE",
                help="the deployment CA certificate the proplets' certificates must come from "
                "(default: the ca.crt of the TLS bundle)",
            ),
            arg(
                "--allow-unsigned",
                action="store_true",
                help="accept updates taken over plaintext (no certificate, no signature)",
            ),
        ),
    ),
    Command(
        "datasets",
        "list",
        "datasets held",
        one_call(lambda c, a: c.list_datasets(), lambda r: render_datasets(r.datasets)),
    ),
    Command(
        "datasets",
        "get",
        'one proplet\'s dataset; --json: {"proplet_id", "schema", "size", "num_features", '
        '"features", "labels"}',
        datasets_get,
        (
            arg("proplet_id", metavar="PROPLET_ID"),
            arg(
                "--output",
                "-o",
                metavar="FILE",
                help="write FILE.csv (header x0..,label) or FILE.npy ([n, d+1], label last)",
            ),
        ),
    ),
    Command(
        "datasets",
        "put",
        "store a proplet's dataset from FILE.csv (optional header; last column the 0/1 label) "
        "or FILE.npy (2-D, last column the label)",
        datasets_put,
        (arg("proplet_id", metavar="PROPLET_ID"), arg("file", metavar="FILE")),
    ),
    Command(
        "datasets",
        "partition",
        "spread a shipped dataset's train split over proplets, IID or non-IID (Dirichlet over "
        "labels), and store each proplet's part and the global test split (as DATASET.test) "
        'in the data store; --json: {"dataset", "partition", "alpha", "seed", "proplets": '
        '[{"proplet_id", "size", "labels"}], "test", ...}',
        datasets_partition,
        (
            arg("--dataset", default="digits", choices=sorted(catalog.CORPORA)),
            OneOf(
                (
                    arg("--proplets", type=int, metavar="N", help="proplet-1 .. proplet-N"),
                    arg("--ids", metavar="ID,ID,...", help="these proplets, comma-separated"),
                )
            ),
            OneOf(
                (
                    arg("--iid", action="store_true", help="equal shares of every class"),
                    arg(
                        "--dirichlet",
                        type=float,
                        metavar="ALPHA",
                        help="label skew: class shares per proplet ~ Dirichlet(ALPHA); "
                        "0.1 = few classes each, 100 = close to IID",
                    ),
                )
            ),
            arg("--seed", type=int, default=0, help="the partition's seed (default 0)"),
            arg(
                "--min-samples",
                type=int,
                default=DEFAULT_MIN_SAMPLES,
                metavar="M",
                help=f"every proplet gets at least M samples (default {DEFAULT_MIN_SAMPLES})",
            ),
        ),
    ),
    Command(
        "proplets",
        "list",
        "proplets, alive or not",
        proplets_list,
        (
            arg(
                "--ids",
                action="store_true",
                help="print only the alive proplets' ids, comma-separated",
            ),
        ),
    ),
    Command(
        "tasks",
        "list",
        "tasks, optionally filtered",
        tasks_list,
        (
            arg("--name-prefix", default="", metavar="P", help="names starting with P"),
            arg("--proplet", default="", metavar="ID", help="tasks for this proplet"),
            arg("--state", default="", help="pending, scheduled, running, completed, ..."),
        ),
    ),
    Command(
        "tasks",
        "get",
        "one task, with its results",
        one_call(lambda c, a: c.get_task(a.task_id), render_task),
        (arg("task_id", metavar="ID"),),
    ),
    Command(
        "tasks",
        "create",
        "create a task (state PENDING)",
        tasks_create,
        (
            arg("--name", required=True),
            OneOf(
                (
                    arg("--image", metavar="URL", help="OCI reference host:port/repo:tag"),
                    arg("--file", metavar="PATH", help="a local .wasm module sent inline"),
                )
            ),
            arg("--proplet", default="", metavar="ID", help="run on this proplet (default any)"),
            arg("--env", action="append", metavar="K=V", help="environment variable (repeatable)"),
            arg("--arg", action="append", metavar="A", help="module argument (repeatable)"),
        ),
    ),
    Command(
        "tasks",
        "start",
        "start a task",
        tasks_start,
        (
            arg("task_id", metavar="ID"),
            arg(
                "--wait",
                action="store_true",
                help="wait until it finishes; exit 1 unless it completed",
            ),
            WATCH_LIMIT,
        ),
    ),
    Command(
        "tasks",
        "stop",
        "stop a task",
        one_call(lambda c, a: c.stop_task(a.task_id), render_task),
        (arg("task_id", metavar="ID"),),
    ),
    Command(
        "wasm",
        "push",
        "push a module with oras (layer media type application/wasm); prints the image and "
        'the layer digest; --json: {"image", "digest", "size", "media_type", '
        '"manifest_digest", "pinned"}',
        wasm_push,
        (
            arg("file", metavar="FILE", help="the .wasm module"),
            arg("--image", required=True, metavar="HOST:PORT/REPO:TAG"),
            arg(
                "--plain-http",
                "--insecure",
                dest="plain_http",
                action=argparse.BooleanOptionalAction,
                default=None,
                help="plain HTTP instead of HTTPS (default: on for localhost / 127.x / ::1 only)",
            ),
        ),
        grpc=False,
    ),
)

GROUPS = {
    "experiment": "federated-learning experiments (one round, or many with `experiment run`)",
    "round": "rounds on the coordinator",
    "models": "global model versions in the model registry",
    "datasets": "per-proplet training datasets in the data store",
    "proplets": "edge agents known to the manager",
    "tasks": "WASM tasks on the manager",
    "wasm": "WASM modules in an OCI registry",
}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the client command groups to the `propeller-fl` parser."""
    runner.register(sub, GROUPS, COMMANDS)
