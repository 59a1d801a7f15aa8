"""`propeller-fl demo`: a short federated training in one process, with nothing installed but
this package.

The stack runner (`server.stack.Stack`) starts an embedded MQTT broker, the five services and N
proplets sharing one wasmtime engine; the proplets get the Zig trainer (`wasm-client/build.py`,
built on first use) as image "file://<path>". The demo then runs R federated rounds (each a
`Manager.StartExperiment` from the previous round's model) through the CLI's RPC client, shows
live progress from `Coordinator.WatchRound`, evaluates every global model on all proplets'
data with numpy, prints one row per round, writes a convergence plot (PNG) and a JSON record
of the run (`server.cli.report`), and stops everything.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from propeller.v1 import coordinator_pb2, manager_pb2
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
from server.cli.report import Record, RoundRow, Table, evaluate, write_plot
from server.cli.runner import add_command
from server.datastore.datasets import SCHEMA
from server.errors import PropellerError
from server.models import model_uri
from server.stack import Stack, StackConfig
from server.tensors import Array

# Demo defaults: on the seeded synthetic data these make the global log-loss fall clearly
# over 5 rounds (see docs/demo.md for a measured run).
DEFAULT_ROUNDS = 5
DEFAULT_PLOT = "propeller-fl-demo.png"
DEFAULT_RECORD = "propeller-fl-demo.json"
# The RPC timeout of the demo's calls; a round's watch gets the round deadline plus this.
RPC_TIMEOUT_S = 30.0
# Task results reach the manager over MQTT shortly after the round closes.
TASK_RESULTS_TIMEOUT_S = 5.0


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
        default=d.epochs,
        help=f"local epochs per round ({d.epochs})",
    )
    demo.add_argument("--lr", type=_positive_float, default=d.lr, help=f"learning rate ({d.lr:g})")
    demo.add_argument(
        "--batch-size",
        type=_positive_int,
        default=d.batch_size,
        help="mini-batch size (1 = per-example SGD)",
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
        metavar="FILE",
        help=(
            "train on this CSV or .npy instead of synthetic data: one row per sample, features "
            "then a 0/1 label in the last column; split in row order into one shard per proplet"
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


def load_dataset(path: Path) -> tuple[Array, Array]:
    """`--dataset FILE` by the rules every dataset file follows (`server.cli.files`)."""
    try:
        return read_dataset_file(path)
    except FileProblem as exc:
        raise CommandFailed(f"--dataset: {exc}") from None


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
    # Fixed ids and round ids: the demo is the same run every time it is run.
    proplet_ids = [f"proplet-{i + 1}" for i in range(n)]
    shards: list[Shard] | None = None
    if args.dataset is not None:
        x_all, y_all = await asyncio.to_thread(load_dataset, args.dataset)
        shards = split_shards(x_all, y_all, proplet_ids)
        features = int(x_all.shape[1])
    stdout, stderr = sys.stdout, sys.stderr
    line = StatusLine(stderr, is_live(stdout, stderr))

    if args.wasm is None:
        line.show("building the trainer module (wasm-client)...")
    trainer = await locate_trainer(args.wasm)
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
                await _train(c, args, record, shards, line, t_built, k_of_n)
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
    stdout.write(
        f"\nlog-loss {first['loss']:.4f} -> {last['loss']:.4f}, "
        f"accuracy {first['accuracy']:.4f} -> {last['accuracy']:.4f} "
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
    line: StatusLine,
    t_built: float,
    k_of_n: int,
) -> None:
    """The data, v0, then one round after the other, each row printed as it completes."""
    proplet_ids: list[str] = record.doc["proplet_ids"]
    for s in shards or ():
        await c.put_dataset(s.proplet_id, s.features, s.labels, schema=SCHEMA)
    x, y, sizes = await _all_data(c, proplet_ids)
    record.doc["data"] = {
        "source": "file" if shards is not None else "synthetic",
        "generator": None if shards is not None else "server.datastore.datasets.synthetic_dataset",
        "num_features": int(x.shape[1]),
        "total_samples": int(y.shape[0]),
        "samples_per_proplet": sizes,
        "positive_fraction": float(np.mean(y)),
    }
    await c.init_model(int(x.shape[1]))
    header, model = await c.get_model(0)
    loss0, acc0 = await asyncio.to_thread(evaluate, model, x, y)
    record.add_model(0, model_uri(0), header.sha256, model)
    record.doc["initial"] = {
        "model_version": 0,
        "model_uri": model_uri(0),
        "sha256": header.sha256,
        "loss": loss0,
        "accuracy": acc0,
    }
    record.plot_rows.append({"round": 0, "loss": loss0, "accuracy": acc0})
    t_ready = record.lap("startup_s", t_built)

    round_ids = [f"demo-r{r}" for r in range(1, args.rounds + 1)]
    table = Table(sys.stdout, max(len(rid) for rid in round_ids))
    table.header()
    table.row("initial", 0, "-", loss0, acc0, "-")
    image: str = record.doc["trainer"]["image"]
    version = 0
    for index, round_id in enumerate(round_ids, start=1):
        row = await _run_round(c, args, index, round_id, version, proplet_ids, k_of_n, image, line)
        record.rows.append(row)
        header, model = await c.get_model(row.model_version)
        row.loss, row.accuracy = await asyncio.to_thread(evaluate, model, x, y)
        row.sha256 = header.sha256
        record.add_model(row.model_version, row.model_uri, row.sha256, model)
        record.plot_rows.append(
            {
                "round": index,
                "loss": row.loss,
                "accuracy": row.accuracy,
                "local_loss": row.round_metrics.get("loss"),
            }
        )
        line.clear()
        table.row(
            round_id,
            row.model_version,
            f"{len(row.reported)}/{row.k_of_n}",
            row.loss,
            row.accuracy,
            f"{row.wall_time_s:.2f}s",
        )
        version = row.model_version
    record.lap("rounds_s", t_ready)
    record.doc["final_model"] = record.models[-1]


async def _run_round(
    c: Client,
    args: argparse.Namespace,
    index: int,
    round_id: str,
    base_version: int,
    participants: list[str],
    k_of_n: int,
    image: str,
    line: StatusLine,
) -> RoundRow:
    experiment_id = f"exp-{round_id}"
    base = model_uri(base_version)
    progress = RoundProgress(line, index, args.rounds, round_id, len(participants))
    t0 = time.perf_counter()
    try:
        started = await c.start_experiment(
            manager_pb2.StartExperimentRequest(
                experiment_id=experiment_id,
                round_id=round_id,
                model_ref=base,
                participants=participants,
                hyperparams=hyperparams.hyperparams(args.epochs, args.lr, args.batch_size),
                k_of_n=k_of_n,
                timeout_s=args.timeout_s,
                task_wasm_image=image,
            )
        )
    except PropellerError as exc:
        raise CommandFailed(
            f"round {index} ({round_id}) could not start: {describe_error(exc)}"
        ) from None
    skipped = {s.proplet_id: s.reason for s in started.skipped}
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
        experiment_id=experiment_id,
        base_model_uri=base,
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
