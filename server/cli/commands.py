"""The client commands of `propeller-fl` (`propeller-fl GROUP ACTION`), usable against any
deployment, as one table (`COMMANDS`): each row a `Command` (group, name, help, arguments and
an async function that calls the `Client` and returns a `Reply`: the JSON document `--json`
prints, the text people see, and a failure line when the command itself failed, e.g. a failed
round). Most rows are one call shown as it is (`one_call`); the others are the functions
below. What every command shares (addresses, client, output, exit status) is in
`server.cli.runner`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography import x509

from propeller.v1 import coordinator_pb2, manager_pb2, tensor_pb2
from server.cli import hyperparams, runner
from server.cli.client import DEFAULT_WATCH_S, Client
from server.cli.files import (
    dataset_file_type,
    model_file_type,
    read_dataset_file,
    read_model_file,
    read_wasm_file,
    write_dataset_file,
    write_model_file,
)
from server.cli.lineage import lineage_chain, lineage_dict, render_chain, render_lineage
from server.cli.progress import ExperimentView, is_live
from server.cli.render import (
    Output,
    dataset_arrays,
    dataset_json,
    end_text,
    event_line,
    experiment_event_line,
    experiment_state,
    fields,
    message_dict,
    model_json,
    render_dataset,
    render_dataset_info,
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
    short_name,
    specs_text,
    table,
    task_state,
)
from server.cli.report import write_experiment_plot
from server.cli.runner import Arg, Command, OneOf, Reply, arg, one_call, shown
from server.cli.verify import verify_chain
from server.datastore import catalog
from server.datastore.partition import (
    DEFAULT_MIN_SAMPLES,
    dataset_of,
    label_histogram,
    partition,
)
from server.errors import InvalidArgument, Unavailable
from server.models import model_uri, parse_model_uri
from server.oci import ImageRef, OciClient, is_loopback
from server.pki import PkiError, load_certificate
from server.tensors import model_to_json

FINAL_ROUND_STATES = (coordinator_pb2.ROUND_STATE_COMPLETED, coordinator_pb2.ROUND_STATE_FAILED)
FINAL_EVENTS = (
    coordinator_pb2.ROUND_EVENT_TYPE_COMPLETED,
    coordinator_pb2.ROUND_EVENT_TYPE_FAILED,
)


# ---------------------------------------------------------------------------- arguments


def participants_of(args: argparse.Namespace) -> list[str]:
    out: list[str] = list(args.participant or [])
    for group in args.participants or []:
        out.extend(p.strip() for p in group.split(",") if p.strip())
    return out


def parse_task_state(text: str) -> int:
    """`running`, `RUNNING` or `TASK_STATE_RUNNING` -> the enum value."""
    name = text.strip().upper().replace("-", "_")
    if not name.startswith("TASK_STATE_"):
        name = "TASK_STATE_" + name
    names = [n for n in manager_pb2.TaskState.keys() if n != "TASK_STATE_UNSPECIFIED"]  # noqa: SIM118
    if name not in names:
        choices = ", ".join(short_name(n, "TASK_STATE_").lower() for n in names)
        raise InvalidArgument(f"--state: {text!r} is not one of {choices}")
    return manager_pb2.TaskState.Value(name)


def parse_env_pairs(pairs: Sequence[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in pairs:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidArgument(f"--env: {item!r} is not KEY=VALUE")
        env[key] = value
    return env


def _dtype(text: str | None) -> int:
    return {
        None: tensor_pb2.DTYPE_UNSPECIFIED,
        "float32": tensor_pb2.DTYPE_FLOAT32,
        "float64": tensor_pb2.DTYPE_FLOAT64,
    }[text]


def _round(args: argparse.Namespace) -> dict[str, Any]:
    """What `experiment start` and `round configure` both send about the round."""
    return {
        "round_id": args.round_id,
        "experiment_id": args.experiment_id,
        "model_ref": args.model_ref,
        "participants": participants_of(args),
        "hyperparams": hyperparams.hyperparams(args.epochs, args.lr, args.batch_size),
        "k_of_n": args.k_of_n,
        "min_k_of_n": args.min_k_of_n,
        "timeout_s": args.timeout_s,
        "task_wasm_image": args.image or os.environ.get("TASK_WASM_IMAGE", ""),
    }


def round_args(*, model_required: bool, round_required: bool = True) -> tuple[Arg, ...]:
    d = hyperparams.CLIENT
    return (
        arg(
            "--round-id",
            required=round_required,
            default="",
            help="round id (1-64 of A-Z a-z 0-9 . _ -)"
            + ("" if round_required else "; the first round's (default: EXPERIMENT_ID-r1)"),
        ),
        arg(
            "--experiment-id",
            default="",
            help="experiment id (default: exp-ROUND_ID for experiments)",
        ),
        arg(
            "--model-ref",
            required=model_required,
            default="",
            help="base model, e.g. fl/models/global_model_v0"
            + ("" if model_required else " (default: the latest stored version)"),
        ),
        arg(
            "--participant",
            action="append",
            metavar="PROPLET_ID",
            help="a participating proplet id (repeatable)",
        ),
        arg(
            "--participants",
            action="append",
            metavar="ID,ID,...",
            help="comma-separated proplet ids",
        ),
        arg("--epochs", type=int, default=d.epochs, help=f"local epochs (default {d.epochs})"),
        arg("--lr", type=float, default=d.lr, help=f"learning rate (default {d.lr:g})"),
        arg(
            "--batch-size",
            type=int,
            default=d.batch_size,
            help=f"mini-batch size (default {d.batch_size})",
        ),
        arg(
            "--k-of-n",
            type=int,
            default=0,
            help="updates that close the round (default 0 = every participant)",
        ),
        arg(
            "--min-k-of-n",
            type=int,
            default=0,
            help="the fewest participants the round may run with when others are not alive "
            "or fail (default 0 = k_of_n: none may be missing)",
        ),
        arg(
            "--timeout-s",
            type=float,
            default=d.timeout_s,
            help=f"round deadline in seconds (default {d.timeout_s:g})",
        ),
        arg(
            "--image",
            default="",
            metavar="IMAGE",
            help="the training module's OCI reference (env TASK_WASM_IMAGE)",
        ),
    )


WATCH_LIMIT = arg(
    "--max-wait",
    type=float,
    default=DEFAULT_WATCH_S,
    metavar="SECONDS",
    help=f"give up watching after this long (default {DEFAULT_WATCH_S:g})",
)


# ------------------------------------------------------------------------------ commands


async def follow_round(client: Client, round_id: str, args: argparse.Namespace) -> Reply:
    """Print the round's events live until it closes; a failure if it FAILED."""
    out = Output()
    final: coordinator_pb2.RoundStatus | None = None
    async with contextlib.aclosing(client.watch_round(round_id, args.max_wait)) as events:
        async for ev in events:
            out.json_line(message_dict(ev)) if args.json else out.text(event_line(ev))
            if ev.type in FINAL_EVENTS or (
                ev.type == coordinator_pb2.ROUND_EVENT_TYPE_SNAPSHOT
                and ev.status.state in FINAL_ROUND_STATES
            ):
                final = ev.status
                break
    if final is None:
        raise Unavailable(f"coordinator: the watch of round {round_id} ended before it closed")
    if final.state == coordinator_pb2.ROUND_STATE_FAILED:
        reason = final.failure_reason or "no reason given"
        return Reply(printed=True, failure=f"round {round_id} FAILED: {reason}")
    return Reply(printed=True)


async def experiment_start(c: Client, a: argparse.Namespace) -> Reply:
    resp = await c.start_experiment(manager_pb2.StartExperimentRequest(**_round(a)))
    if not a.watch:
        return shown(resp, render_experiment_response(resp))
    out = Output()
    if a.json:
        out.json_line(message_dict(resp))
    else:
        out.text(render_experiment_response(resp))
        out.text("")
    return await follow_round(c, resp.round_id, a)


_SOURCES = {
    "evaluation": manager_pb2.METRIC_SOURCE_EVALUATION,
    "training": manager_pb2.METRIC_SOURCE_TRAINING,
}
_GOALS = {
    "minimize": manager_pb2.METRIC_GOAL_MINIMIZE,
    "maximize": manager_pb2.METRIC_GOAL_MAXIMIZE,
}


def _experiment(a: argparse.Namespace) -> manager_pb2.StartExperimentRequest:
    """`experiment run`'s request: the round's fields and those of many rounds."""
    stopping = manager_pb2.StoppingRule(
        metric=a.stop_metric,
        source=_SOURCES[a.stop_source],
        goal=_GOALS[a.stop_goal] if a.stop_goal else manager_pb2.METRIC_GOAL_UNSPECIFIED,
        patience_rounds=a.patience,
        min_delta=a.min_delta,
    )
    if a.target is not None:
        stopping.target = a.target
    return manager_pb2.StartExperimentRequest(
        **_round(a),
        rounds=a.rounds,
        strategy_name=a.strategy,
        strategy_params_json=a.strategy_params,
        all_alive=a.all_alive,
        sampling=manager_pb2.Sampling(
            fraction=a.sample_fraction,
            count=a.sample_count,
            min_available=a.min_available,
            seed=a.seed,
        ),
        k_fraction=a.k_fraction,
        evaluation=manager_pb2.EvaluationPlan(
            every_rounds=a.eval_every, fraction=a.eval_fraction, timeout_s=a.eval_timeout_s
        ),
        stopping=stopping,
    )


async def follow_experiment(client: Client, experiment_id: str, a: argparse.Namespace) -> Reply:
    """Print the experiment's events live, a line each, until it ends; a failure unless it
    COMPLETED or was STOPPED."""
    out = Output()
    final: manager_pb2.Experiment | None = None
    # On a terminal: the rounds' table and the round in flight's bar, redrawn in place.
    view = ExperimentView(out.stream, 1) if not a.json and is_live(out.stream, sys.stderr) else None
    round_watch: asyncio.Task[None] | None = None

    async def follow_round(round_id: str) -> None:
        assert view is not None
        events = client.watch_round(round_id, a.max_wait)
        async with contextlib.aclosing(events):
            async for ev in events:
                view.on_round_event(round_id, ev)

    events = client.watch_experiment(experiment_id, a.max_wait)
    try:
        async with contextlib.aclosing(events):
            async for ev in events:
                if a.json:
                    out.json_line(message_dict(ev))
                elif view is None:
                    out.text(experiment_event_line(ev))
                else:
                    watched = view.round_in_flight
                    view.on_experiment_event(ev)
                    if view.round_in_flight and view.round_in_flight != watched:
                        if round_watch is not None:
                            round_watch.cancel()
                        round_watch = asyncio.create_task(follow_round(view.round_in_flight))
                ended = ev.experiment.state != manager_pb2.EXPERIMENT_STATE_RUNNING
                if ev.type == manager_pb2.EXPERIMENT_EVENT_TYPE_ENDED or ended:
                    final = ev.experiment
                    break
    finally:
        if round_watch is not None:
            round_watch.cancel()
            # The bar is only a view: its watch failing or being cut short changes nothing.
            await asyncio.gather(round_watch, return_exceptions=True)
    if view is not None and final is not None:
        out.text(f"{experiment_state(final.state)}  {end_text(final.end)}")
    if final is None:
        raise Unavailable(f"manager: the watch of experiment {experiment_id} ended before it did")
    if final.state == manager_pb2.EXPERIMENT_STATE_FAILED:
        return Reply(
            printed=True, failure=f"experiment {experiment_id} FAILED: {end_text(final.end)}"
        )
    return Reply(printed=True)


async def experiment_run(c: Client, a: argparse.Namespace) -> Reply:
    resp = await c.start_experiment(_experiment(a))
    if not a.watch:
        return shown(resp, render_experiment_response(resp))
    out = Output()
    if a.json:
        out.json_line(message_dict(resp))
    else:
        out.text(render_experiment_response(resp))
        out.text("")
    return await follow_experiment(c, resp.experiment_id, a)


async def experiment_history(c: Client, a: argparse.Namespace) -> Reply:
    rounds = await c.experiment_rounds(a.experiment_id)
    return shown(rounds, render_experiment_rounds(rounds.rounds))


async def experiment_plot(c: Client, a: argparse.Namespace) -> Reply:
    output = Path(a.output)
    if output.suffix.lower() != ".png":
        raise InvalidArgument(f"--output: {output} must end in .png")
    rounds = (await c.experiment_rounds(a.experiment_id)).rounds
    points = [(r.index, dict(r.train_metrics), dict(r.eval_metrics)) for r in rounds]
    await asyncio.to_thread(write_experiment_plot, output, points, f"experiment {a.experiment_id}")
    doc = {"experiment_id": a.experiment_id, "rounds": len(rounds), "plot": str(output)}
    return Reply(doc, f"wrote {output} ({len(rounds)} rounds)")


def experiment_run_args() -> tuple[Arg, ...]:
    return (
        *round_args(model_required=True, round_required=False),
        arg("--rounds", type=int, default=1, help="the most rounds it runs (default 1)"),
        arg("--strategy", default="", metavar="NAME", help="aggregation strategy (default fedavg)"),
        arg(
            "--strategy-params",
            default="",
            metavar="JSON",
            help="the strategy's parameters, a JSON object, e.g. '{\"momentum\": 0.9}'",
        ),
        arg(
            "--all-alive",
            action="store_true",
            help="every alive proplet is a candidate (instead of --participant)",
        ),
        arg(
            "--sample-fraction", type=float, default=0.0, help="share of alive candidates per round"
        ),
        arg("--sample-count", type=int, default=0, help="candidates per round (at least)"),
        arg("--min-available", type=int, default=0, help="alive candidates a round waits for"),
        arg("--seed", type=int, default=0, help="the sampling seed (default 0)"),
        arg("--k-fraction", type=float, default=0.0, help="k_of_n as a share of the sample"),
        arg("--eval-every", type=int, default=0, help="evaluate after every N-th round"),
        arg("--eval-fraction", type=float, default=0.0, help="share of candidates evaluating"),
        arg("--eval-timeout-s", type=float, default=0.0, help="evaluation deadline in seconds"),
        arg("--stop-metric", default="", metavar="NAME", help="metric of the stopping rule"),
        arg("--stop-source", choices=sorted(_SOURCES), default="evaluation"),
        arg("--stop-goal", choices=sorted(_GOALS), default=None),
        arg("--target", type=float, default=None, help="stop once the metric reaches this"),
        arg("--patience", type=int, default=0, help="stop after N rounds without improvement"),
        arg("--min-delta", type=float, default=0.0, help="what counts as an improvement"),
        arg("--watch", action="store_true", help="then print a line per round until it ends"),
        WATCH_LIMIT,
    )


async def round_configure(c: Client, a: argparse.Namespace) -> Reply:
    request = coordinator_pb2.ConfigureRoundRequest(**_round(a), start=a.start)
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


def read_ca(path: Path) -> x509.Certificate:
    try:
        return load_certificate(path.read_bytes(), str(path))
    except OSError as exc:
        raise InvalidArgument(f"--ca: cannot read {path}: {exc.strerror or exc}") from None
    except PkiError as exc:
        raise InvalidArgument(f"--ca: {exc}") from None


async def datasets_get(c: Client, a: argparse.Namespace) -> Reply:
    output = Path(a.output) if a.output else None
    if output is not None:
        dataset_file_type(output)  # before anything is fetched
    msg = await c.get_dataset(a.proplet_id)
    if output is None:
        return Reply(dataset_json(msg), render_dataset(msg))
    features, labels = dataset_arrays(msg)
    await asyncio.to_thread(write_dataset_file, output, features, labels)
    info = {
        "proplet_id": msg.proplet_id,
        "schema": msg.schema,
        "size": int(features.shape[0]),
        "num_features": int(features.shape[1]),
        "output": str(output),
    }
    text = fields(
        [
            ("proplet", msg.proplet_id),
            ("schema", msg.schema),
            ("size", info["size"]),
            ("features", info["num_features"]),
            ("wrote", str(output)),
        ]
    )
    return Reply(info, text)


async def datasets_put(c: Client, a: argparse.Namespace) -> Reply:
    if not a.proplet_id.strip():
        raise InvalidArgument("PROPLET_ID: must not be empty")
    features, labels = await asyncio.to_thread(read_dataset_file, Path(a.file))
    info = await c.put_dataset(a.proplet_id, features, labels)
    return shown(info, render_dataset_info(info))


def partition_ids(a: argparse.Namespace) -> list[str]:
    """--ids a,b,c as given, or --proplets N as proplet-1..proplet-N (the demo's names)."""
    if a.ids is not None:
        ids = [p.strip() for p in a.ids.split(",") if p.strip()]
        if not ids:
            raise InvalidArgument("--ids: no proplet id given")
        return ids
    if a.proplets < 1:
        raise InvalidArgument(f"--proplets: must be >= 1, got {a.proplets}")
    return [f"proplet-{i + 1}" for i in range(a.proplets)]


async def datasets_partition(c: Client, a: argparse.Namespace) -> Reply:
    """Spread a shipped dataset's train split over proplets and store each part (and the
    global test split, under its reserved id) in the data store."""
    ids = partition_ids(a)
    corpus = await asyncio.to_thread(catalog.load, a.dataset)
    alpha = None if a.iid else a.dirichlet
    parts = await asyncio.to_thread(
        partition, corpus, ids, alpha=alpha, seed=a.seed, min_samples=a.min_samples
    )
    held_out = catalog.held_out_id(corpus.name)
    rows: list[dict[str, Any]] = []
    for ds in [*parts, dataset_of(held_out, corpus, corpus.test)]:
        info = await c.put_dataset(
            ds.proplet_id,
            ds.features,
            ds.labels,
            schema=ds.schema,
            num_classes=ds.num_classes,
        )
        histogram = label_histogram(ds.labels, corpus.num_classes)
        rows.append(
            {"proplet_id": info.proplet_id, "size": info.size, "labels": histogram.tolist()}
        )
    doc = {
        "dataset": corpus.name,
        "schema": parts[0].schema,
        "num_classes": corpus.num_classes,
        "num_features": corpus.num_features,
        "partition": "iid" if alpha is None else "dirichlet",
        "alpha": alpha,
        "seed": a.seed,
        "min_samples": a.min_samples,
        "proplets": rows[:-1],
        "test": rows[-1],
    }
    how = "IID" if alpha is None else f"Dirichlet alpha={alpha:g}"
    head = fields(
        [
            (
                "dataset",
                f"{corpus.name} ({corpus.num_classes} classes, {corpus.num_features} features)",
            ),
            ("partition", f"{how}, seed {a.seed}, at least {a.min_samples} samples each"),
            ("test split", f"{held_out} ({rows[-1]['size']} samples)"),
        ]
    )
    text = table(
        ["PROPLET", "SIZE", *(str(k) for k in range(corpus.num_classes))],
        [[r["proplet_id"], r["size"], *r["labels"]] for r in rows],
    )
    return Reply(doc, head + "\n\n" + text)


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
        one_call(lambda c, a: c.init_model(a.dimension, _dtype(a.dtype)), render_model_version),
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
