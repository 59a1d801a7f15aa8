"""`propeller-fl demo`: a short federated training in one process, with nothing installed but
this package.

The stack runner (`server.stack.Stack`) starts an embedded MQTT broker, the five services and N
proplets sharing one wasmtime engine; the proplets get the Zig trainer (`wasm-client/build.py`,
built on first use) as image "file://<path>". The demo then runs one experiment of R federated
rounds (`Manager.StartExperiment` with `rounds`: the manager starts each round from the
version the one before stored) through the CLI's RPC client, follows it with
`Manager.WatchExperiment`, shows each round's live progress from `Coordinator.WatchRound`,
evaluates every global model on all proplets' data with numpy, prints one row per round, writes
a convergence plot (PNG) and a JSON record of the run (`server.cli.report`), and stops
everything.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from propeller.v1 import coordinator_pb2, manager_pb2
from server import mlp
from server.cli import hyperparams
from server.cli.client import Client
from server.cli.files import FileProblem, read_dataset_file
from server.cli.one_process import (
    DEFAULT_FEATURES,
    DEFAULT_SAMPLES,
    CommandFailed,
    _non_negative_int,
    _positive_float,
    _positive_int,
    add_stack_flags,
    locate_trainer,
    one_line_failure,
)
from server.cli.progress import RoundProgress, StatusLine, is_live
from server.cli.render import dataset_arrays, describe_error
from server.cli.report import Record, RoundRow, Table, write_plot
from server.cli.report import evaluate as evaluate_logistic
from server.cli.runner import add_command
from server.datastore import catalog
from server.datastore.datasets import CLASSES_SCHEMA, SCHEMA
from server.datastore.partition import partition
from server.errors import PropellerError
from server.manager.plan import round_id_for
from server.models import model_uri
from server.stack import Stack, StackConfig
from server.tensors import Array

# Demo defaults: on the seeded synthetic data these make the global log-loss fall clearly
# over 5 rounds (see docs/demo.md for a measured run).
DEFAULT_ROUNDS = 5
DEFAULT_PLOT = "propeller-fl-demo.png"
DEFAULT_RECORD = "propeller-fl-demo.json"
# The demo's experiment; its rounds are demo-r1, demo-r2, ... (`server.manager.plan`).
EXPERIMENT_ID = "demo"
# The RPC timeout of the demo's calls; a round's watch gets the round deadline plus this.
RPC_TIMEOUT_S = 30.0
# Task results reach the manager over MQTT shortly after the round closes.
TASK_RESULTS_TIMEOUT_S = 5.0
# `--dataset digits`: the MLP trainer on scikit-learn's digits. The model: 64 pixels -> 32
# hidden ReLUs -> 10 classes from a fixed seed; the train split dealt out IID (stratified) from
# a fixed seed, so the run is the same every time. Two local epochs of mini-batches of 16 at
# lr 0.1 reach ~92 % on the held-out test split in 5 rounds over 3 proplets (docs/demo.md).
DIGITS_HIDDEN = 32
DIGITS_SEED = 0
DIGITS = hyperparams.Defaults(2, 0.1, 16, hyperparams.DEMO.timeout_s)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    d = hyperparams.DEMO
    demo = add_command(
        sub, "demo", cmd_demo, "run a short federated training in one process and show it converge"
    )
    demo.add_argument(
        "--rounds", type=_positive_int, default=DEFAULT_ROUNDS, metavar="R", help="rounds (5)"
    )
    demo.add_argument(
        "--k-of-n",
        type=_non_negative_int,
        default=0,
        metavar="K",
        help="updates that close a round (default: all proplets)",
    )
    demo.add_argument(
        "--epochs",
        type=_positive_int,
        default=None,
        help=f"local epochs per round ({d.epochs}; digits: {DIGITS.epochs})",
    )
    demo.add_argument(
        "--lr",
        type=_positive_float,
        default=None,
        help=f"learning rate ({d.lr:g}; digits: {DIGITS.lr:g})",
    )
    demo.add_argument(
        "--batch-size",
        type=_positive_int,
        default=None,
        help=(
            f"mini-batch size (1 = per-example SGD; {d.batch_size}; digits: {DIGITS.batch_size})"
        ),
    )
    demo.add_argument(
        "--timeout-s",
        type=_positive_float,
        default=d.timeout_s,
        metavar="S",
        help=f"round deadline in seconds ({d.timeout_s:g})",
    )
    demo.add_argument(
        "--samples",
        type=_positive_int,
        default=None,
        metavar="N",
        help=f"synthetic samples per proplet ({DEFAULT_SAMPLES})",
    )
    demo.add_argument(
        "--features",
        type=_positive_int,
        default=None,
        metavar="D",
        help=f"synthetic feature count ({DEFAULT_FEATURES})",
    )
    demo.add_argument(
        "--dataset",
        type=Path,
        default=None,
        metavar="FILE|digits",
        help=(
            "train on this CSV or .npy instead of synthetic data: one row per sample, features "
            "then a 0/1 label in the last column; split in row order into one shard per "
            "proplet. 'digits': scikit-learn's handwritten digits (10 classes) with the MLP "
            "trainer, scored on the held-out test split too"
        ),
    )
    for flag, default, what in (
        ("--plot", DEFAULT_PLOT, "convergence plot"),
        ("--record", DEFAULT_RECORD, "JSON record of the run"),
    ):
        demo.add_argument(
            flag,
            type=Path,
            default=Path(default),
            metavar="FILE",
            help=f"{what} to write ({default})",
        )
    add_stack_flags(demo, insecure_help="plaintext gRPC (default: mutual TLS from a throwaway CA)")


# ---------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Shard:
    proplet_id: str
    features: Array
    labels: Array
    schema: str = SCHEMA
    num_classes: int = 0


def shipped_corpus(dataset: Path | None) -> str | None:
    """The shipped dataset `--dataset` names (e.g. "digits"), or None for a file or none. A
    bare name is never a dataset file: those need a .csv, .txt or .npy suffix."""
    if dataset is None or dataset.suffix or str(dataset) not in catalog.CORPORA:
        return None
    return str(dataset)


def digits_shards(corpus: catalog.Corpus, proplet_ids: Sequence[str]) -> list[Shard]:
    """The corpus's train split dealt out IID over the proplets
    (`propeller-fl datasets partition --iid --seed 0`)."""
    try:
        parts = partition(corpus, proplet_ids, alpha=None, seed=DIGITS_SEED)
    except PropellerError as exc:
        raise CommandFailed(str(exc)) from None
    return [Shard(p.proplet_id, p.features, p.labels, CLASSES_SCHEMA, p.num_classes) for p in parts]


def load_dataset(path: Path) -> tuple[Array, Array]:
    """`--dataset FILE` by the rules every dataset file follows (`server.cli.files`)."""
    try:
        return read_dataset_file(path)
    except FileProblem as exc:
        shipped = ""
        if not path.suffix and not path.exists():
            shipped = f" (or a shipped dataset: {', '.join(sorted(catalog.CORPORA))})"
        raise CommandFailed(f"--dataset: {exc}{shipped}") from None


def split_shards(features: Array, labels: Array, proplet_ids: Sequence[str]) -> list[Shard]:
    """Consecutive row ranges of equal size (the first ones one row longer when the rows do
    not divide evenly), one per proplet, in row order."""
    n = int(features.shape[0])
    if n < len(proplet_ids):
        raise CommandFailed(f"--dataset: {n} rows cannot make {len(proplet_ids)} non-empty shards")
    parts = np.array_split(np.arange(n), len(proplet_ids))
    return [
        Shard(pid, np.ascontiguousarray(features[idx]), np.ascontiguousarray(labels[idx]))
        for pid, idx in zip(proplet_ids, parts, strict=True)
    ]


async def _all_data(c: Client, ids: Sequence[str]) -> tuple[Array, Array, dict[str, int]]:
    """Every proplet's dataset, concatenated in proplet order, and each one's size."""
    xs, ys, sizes = [], [], {}
    for pid in ids:
        x, y = dataset_arrays(await c.get_dataset(pid))
        xs.append(x)
        ys.append(y)
        sizes[pid] = int(y.shape[0])
    return np.concatenate(xs, axis=0), np.concatenate(ys, axis=0), sizes


# ---------------------------------------------------------------------------- the run


@one_line_failure("demo")
async def cmd_demo(args: argparse.Namespace) -> int:
    """Start an embedded MQTT broker, the five services and N proplets in this process, run R
    federated rounds of the Zig/WASM trainer from a zero model, and print one row per round with
    the new global model's log-loss and accuracy on all proplets' data. Writes a convergence
    plot (PNG) and a JSON record of the run. No broker, registry or database needs to be
    installed; services listen on free ports.
    """
    t_start = time.perf_counter()
    n = args.proplets
    k_of_n = args.k_of_n or n
    if k_of_n > n:
        raise CommandFailed(f"--k-of-n: {k_of_n} is more than --proplets {n}")
    if args.dataset is not None and (args.samples is not None or args.features is not None):
        raise CommandFailed("--samples and --features describe synthetic data; not with --dataset")
    samples = args.samples or DEFAULT_SAMPLES
    features = args.features or DEFAULT_FEATURES
    corpus_name = shipped_corpus(args.dataset)
    defaults = DIGITS if corpus_name else hyperparams.DEMO
    args.epochs = args.epochs or defaults.epochs
    args.lr = args.lr or defaults.lr
    args.batch_size = args.batch_size or defaults.batch_size
    # Fixed ids and round ids: the demo is the same run every time it is run.
    proplet_ids = [f"proplet-{i + 1}" for i in range(n)]
    shards: list[Shard] | None = None
    corpus: catalog.Corpus | None = None
    if corpus_name is not None:
        corpus = await asyncio.to_thread(catalog.load, corpus_name)
        shards = digits_shards(corpus, proplet_ids)
        features = corpus.num_features
    elif args.dataset is not None:
        x_all, y_all = await asyncio.to_thread(load_dataset, args.dataset)
        shards = split_shards(x_all, y_all, proplet_ids)
        features = int(x_all.shape[1])
    stdout, stderr = sys.stdout, sys.stderr
    line = StatusLine(stderr, is_live(stdout, stderr))

    if args.wasm is None:
        line.show("building the trainer module (wasm-client)...")
    trainer = await locate_trainer(args.wasm, mlp=corpus is not None)
    line.clear()
    record = Record(
        {
            "rounds": args.rounds,
            "proplets": n,
            "k_of_n": k_of_n,
            "epochs": args.epochs,
            "lr": args.lr,
            "batch_size": args.batch_size,
            "timeout_s": args.timeout_s,
            "dataset": str(args.dataset) if args.dataset is not None else None,
            "samples_per_proplet": None if shards is not None else samples,
            "features": features,
        },
        t_start,
    )
    t_built = record.lap("trainer_s", t_start)
    record.doc["trainer"] = {
        "path": str(trainer),
        "image": f"file://{trainer}",
        "sha256": await asyncio.to_thread(lambda: hashlib.sha256(trainer.read_bytes()).hexdigest()),
    }
    record.doc["proplet_ids"] = proplet_ids

    with tempfile.TemporaryDirectory(prefix="propeller-fl-demo-") as work:
        stack_config = StackConfig(
            broker_port=0,
            seed_proplet_ids=tuple(proplet_ids) if shards is None else (),
            num_samples=samples,
            num_features=features,
            proplet_ids=tuple(proplet_ids),
            proplet_work_dir=Path(work),
            proplet_task_timeout_s=args.timeout_s,
            # A throwaway CA: every hop is mutual TLS, as in a deployment.
            ca_dir=None if args.insecure else Path(work) / "certs",
        )
        line.show(f"starting broker, services and {n} proplets...")
        try:
            async with (
                Stack(stack_config) as stack,
                Client(stack.endpoints, tls=stack.operator_tls, timeout=RPC_TIMEOUT_S) as c,
            ):
                line.clear()
                await _train(c, args, record, shards, corpus, line, t_built, k_of_n)
                line.show("stopping...")
                t_stop = time.perf_counter()
            line.clear()
            record.lap("shutdown_s", t_stop)
        except (CommandFailed, PropellerError) as exc:
            line.clear()
            reason = str(exc) if isinstance(exc, CommandFailed) else describe_error(exc)
            record.finish("failed", reason)
            with contextlib.suppress(OSError):
                await asyncio.to_thread(record.write, args.record)
            raise CommandFailed(reason) from None

    title = (
        f"propeller-fl demo: {n} proplets, {args.rounds} rounds, epochs {args.epochs}, "
        f"lr {args.lr:g}, batch {args.batch_size}"
    )
    t_plot = time.perf_counter()
    await asyncio.to_thread(write_plot, args.plot, record.plot_rows, title)
    record.lap("plot_s", t_plot)
    record.finish("completed")
    await asyncio.to_thread(record.write, args.record)
    first, last = record.plot_rows[0], record.plot_rows[-1]
    held_out = (
        f"test accuracy {first['test_accuracy']:.4f} -> {last['test_accuracy']:.4f}, "
        if corpus is not None
        else ""
    )
    stdout.write(
        f"\nlog-loss {first['loss']:.4f} -> {last['loss']:.4f}, "
        f"accuracy {first['accuracy']:.4f} -> {last['accuracy']:.4f}, {held_out}"
        f"over {args.rounds} rounds ({n} proplets, {record.doc['data']['total_samples']} "
        f"samples)\nplot    {args.plot}\nrecord  {args.record}\n"
        f"time    {record.timings['total_s']:.2f}s\n"
    )
    stdout.flush()
    return 0


async def _train(
    c: Client,
    args: argparse.Namespace,
    record: Record,
    shards: list[Shard] | None,
    corpus: catalog.Corpus | None,
    line: StatusLine,
    t_built: float,
    k_of_n: int,
) -> None:
    """The data, v0, then one round after the other, each row printed as it completes. With
    a shipped corpus (`corpus`): the MLP, also scored on the corpus's held-out test split."""
    proplet_ids: list[str] = record.doc["proplet_ids"]
    for s in shards or ():
        await c.put_dataset(
            s.proplet_id, s.features, s.labels, schema=s.schema, num_classes=s.num_classes
        )
    x, y, sizes = await _all_data(c, proplet_ids)
    data: dict[str, Any] = {
        "source": corpus.name if corpus else "file" if shards is not None else "synthetic",
        "generator": None if shards is not None else "server.datastore.datasets.synthetic_dataset",
        "num_features": int(x.shape[1]),
        "total_samples": int(y.shape[0]),
        "samples_per_proplet": sizes,
    }
    if corpus is None:
        evaluate = evaluate_logistic
        data["positive_fraction"] = float(np.mean(y))
        await c.init_model(int(x.shape[1]))
    else:
        evaluate = mlp.evaluate
        data["num_classes"] = corpus.num_classes
        data["partition"] = {"mode": "iid", "seed": DIGITS_SEED}
        data["test_samples"] = corpus.test.size
        sizes_ = (corpus.num_features, DIGITS_HIDDEN, corpus.num_classes)
        record.doc["model"] = {"layers": list(sizes_), "init_seed": DIGITS_SEED}
        await c.put_model(mlp.initial_model(sizes_, DIGITS_SEED))
    record.doc["data"] = data

    async def scores(model: Any) -> dict[str, float]:
        found: dict[str, float] = {}
        found["loss"], found["accuracy"] = await asyncio.to_thread(evaluate, model, x, y)
        if corpus is not None:
            found["test_loss"], found["test_accuracy"] = await asyncio.to_thread(
                evaluate, model, corpus.test.features, corpus.test.labels
            )
        return found

    header, model = await c.get_model(0)
    score0 = await scores(model)
    record.add_model(0, model_uri(0), header.sha256, model)
    record.doc["initial"] = {
        "model_version": 0,
        "model_uri": model_uri(0),
        "sha256": header.sha256,
        **score0,
    }
    record.plot_rows.append({"round": 0, **score0})
    t_ready = record.lap("startup_s", t_built)

    round_ids = [round_id_for(EXPERIMENT_ID, r) for r in range(1, args.rounds + 1)]
    table = Table(sys.stdout, max(len(rid) for rid in round_ids), held_out=corpus is not None)
    table.header()
    table.row(
        "initial", 0, "-", score0["loss"], score0["accuracy"], "-", score0.get("test_accuracy")
    )
    image: str = record.doc["trainer"]["image"]
    async for row in _run_experiment(c, args, proplet_ids, k_of_n, image, line):
        record.rows.append(row)
        header, model = await c.get_model(row.model_version)
        score = await scores(model)
        row.loss, row.accuracy = score["loss"], score["accuracy"]
        row.test_loss = score.get("test_loss", math.nan)
        row.test_accuracy = score.get("test_accuracy", math.nan)
        row.sha256 = header.sha256
        record.add_model(row.model_version, row.model_uri, row.sha256, model)
        record.plot_rows.append(
            {"round": row.index, **score, "local_loss": row.round_metrics.get("loss")}
        )
        line.clear()
        table.row(
            row.round_id,
            row.model_version,
            f"{len(row.reported)}/{row.k_of_n}",
            row.loss,
            row.accuracy,
            f"{row.wall_time_s:.2f}s",
            score.get("test_accuracy"),
        )
    record.lap("rounds_s", t_ready)
    record.doc["final_model"] = record.models[-1]


async def _run_experiment(
    c: Client,
    args: argparse.Namespace,
    participants: list[str],
    k_of_n: int,
    image: str,
    line: StatusLine,
) -> AsyncIterator[RoundRow]:
    """The demo as one experiment of `args.rounds` rounds from v0 (the manager starts each
    round from the version the one before stored): each round's row as it completes, followed
    live from its WatchRound while the experiment's WatchExperiment says which round runs."""
    first = round_id_for(EXPERIMENT_ID, 1)
    t0 = time.perf_counter()
    try:
        started = await c.start_experiment(
            manager_pb2.StartExperimentRequest(
                experiment_id=EXPERIMENT_ID,
                round_id=first,
                model_ref=model_uri(0),
                participants=participants,
                hyperparams=hyperparams.hyperparams(args.epochs, args.lr, args.batch_size),
                k_of_n=k_of_n,
                timeout_s=args.timeout_s,
                task_wasm_image=image,
                rounds=args.rounds,
            )
        )
    except PropellerError as exc:
        raise CommandFailed(f"round 1 ({first}) could not start: {describe_error(exc)}") from None
    skipped = {1: {s.proplet_id: s.reason for s in started.skipped}}
    following = 1  # the next round to follow
    running = 0  # the latest round the manager has started
    # Each round may take its whole deadline plus aggregation.
    bound = args.rounds * (args.timeout_s + RPC_TIMEOUT_S)
    events = c.watch_experiment(
        EXPERIMENT_ID, bound, f"--rounds x (--timeout-s + {RPC_TIMEOUT_S:g}s)"
    )
    async with contextlib.aclosing(events):
        async for ev in events:
            e = ev.experiment
            if ev.type == manager_pb2.EXPERIMENT_EVENT_TYPE_SNAPSHOT:
                running = e.current_round
            elif ev.type == manager_pb2.EXPERIMENT_EVENT_TYPE_ROUND_STARTED:
                running = ev.round.index
                skipped[running] = {s.proplet_id: s.reason for s in e.skipped}
            while following <= min(running, args.rounds):
                row = await _follow_round(
                    c, args, following, participants, line, skipped.get(following, {}), t0
                )
                yield row
                following += 1
                t0 = time.perf_counter()
            if e.state != manager_pb2.EXPERIMENT_STATE_RUNNING:
                if e.state != manager_pb2.EXPERIMENT_STATE_COMPLETED:
                    raise CommandFailed(f"experiment {EXPERIMENT_ID}: {e.end.detail}")
                if following > args.rounds or e.end.round < following:
                    return


async def _follow_round(
    c: Client,
    args: argparse.Namespace,
    index: int,
    participants: list[str],
    line: StatusLine,
    skipped: dict[str, str],
    t0: float,
) -> RoundRow:
    """Round `index` of the demo's experiment, followed until it closes: its row."""
    round_id = round_id_for(EXPERIMENT_ID, index)
    progress = RoundProgress(line, index, args.rounds, round_id, len(participants))
    # The deadline counts from the start; allow for aggregation on top. A round whose tasks
    # fail so that k_of_n cannot be reached fails at once (the coordinator), with the reasons.
    status = await _watch_round(c, round_id, progress, args.timeout_s)
    wall = time.perf_counter() - t0
    if status.state != coordinator_pb2.ROUND_STATE_COMPLETED:
        reason = status.failure_reason or coordinator_pb2.RoundState.Name(status.state)
        raise CommandFailed(f"round {index} ({round_id}) failed: {reason}")
    return RoundRow(
        index=index,
        round_id=round_id,
        experiment_id=EXPERIMENT_ID,
        base_model_uri=status.model_ref,
        model_version=int(status.new_model_version),
        model_uri=status.new_model_uri,
        k_of_n=status.k_of_n,
        participants=list(status.participants),
        reported=list(status.reported),
        closed_by=status.closed_by,
        wall_time_s=wall,
        round_metrics=dict(status.metrics),
        proplet_metrics=await _proplet_metrics(c, round_id, list(status.reported)),
        skipped=skipped,
    )


async def _watch_round(
    c: Client, round_id: str, progress: RoundProgress, deadline_s: float
) -> coordinator_pb2.RoundStatus:
    """Follow the round's events until it completes or fails; its final status."""
    final = (coordinator_pb2.ROUND_STATE_COMPLETED, coordinator_pb2.ROUND_STATE_FAILED)
    ticker: asyncio.Task[None] | None = None
    if progress.line.live:

        async def tick() -> None:
            while True:
                progress.render()
                await asyncio.sleep(0.1)

        ticker = asyncio.create_task(tick())
    last: coordinator_pb2.RoundStatus | None = None
    try:
        events = c.watch_round(
            round_id, deadline_s + RPC_TIMEOUT_S, f"--timeout-s plus {RPC_TIMEOUT_S:g}s"
        )
        async with contextlib.aclosing(events):
            async for event in events:
                progress.on_event(event)
                last = event.status
                if last.state in final:
                    break
    finally:
        if ticker is not None:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
    if last is None or last.state not in final:
        last = await c.round_status(round_id)
    return last


def _round_tasks(round_id: str, proplet_ids: Sequence[str]) -> dict[str, str]:
    """The round's task names (as the manager names them) -> proplet id."""
    return {f"fl-round-{round_id}-{pid}": pid for pid in proplet_ids}


async def _proplet_metrics(
    c: Client, round_id: str, reported: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Each reporting proplet's own numbers (samples, local loss/accuracy before and after),
    from its round task's result; waits briefly for the results to arrive over MQTT."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TASK_RESULTS_TIMEOUT_S
    names = _round_tasks(round_id, reported)
    found: dict[str, dict[str, Any]] = {}
    while True:
        listed = await c.list_tasks(name_prefix=f"fl-round-{round_id}-")
        for task in listed.tasks:
            pid = names.get(task.name)
            if pid is None or task.state != manager_pb2.TASK_STATE_COMPLETED:
                continue
            try:
                result = json.loads(task.results)
            except ValueError:
                continue
            found[pid] = {
                "task_id": task.id,
                "num_samples": result.get("num_samples"),
                "metrics": result.get("metrics", {}),
            }
        if len(found) == len(names) or loop.time() >= deadline:
            return {pid: found[pid] for pid in reported if pid in found}
        await asyncio.sleep(0.05)
