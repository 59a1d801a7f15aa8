"""The arguments of the client commands (`server.cli.commands`) and how they become
request fields: the round's and an experiment's options, task states, environment pairs,
proplet ids, a CA file."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography import x509

from propeller.v1 import manager_pb2, tensor_pb2
from server.cli import hyperparams
from server.cli.client import DEFAULT_WATCH_S
from server.cli.render import (
    short_name,
)
from server.cli.runner import Arg, arg
from server.errors import InvalidArgument
from server.pki import PkiError, load_certificate


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


def dtype_of(text: str | None) -> int:
    return {
        None: tensor_pb2.DTYPE_UNSPECIFIED,
        "float32": tensor_pb2.DTYPE_FLOAT32,
        "float64": tensor_pb2.DTYPE_FLOAT64,
    }[text]


def round_fields(args: argparse.Namespace) -> dict[str, Any]:
    """What `experiment start` and `round configure` both send about the round."""
    return {
        "round_id": args.round_id,
        "experiment_id": args.experiment_id,
        "model_ref": args.model_ref,
        "participants": participants_of(args),
        "hyperparams": hyperparams.hyperparams(args.epochs, args.lr, args.batch_size),
        "k_of_n": args.k_of_n,
        "min_k_of_n": args.min_k_of_n,
        "fuel_budget": args.fuel_budget,
        "min_fuel_ratio": args.min_fuel_ratio,
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
            "--fuel-budget",
            type=int,
            default=0,
            metavar="FUEL",
            help="the most wasmtime fuel one participant's training run may consume (default "
            "0 = each proplet's own PROPLET_FUEL_LIMIT)",
        ),
        arg(
            "--min-fuel-ratio",
            type=float,
            default=0.0,
            metavar="R",
            help="refuse updates whose fuel per sample is below R times the median of the "
            "experiment's earlier updates (0 < R <= 1, e.g. 0.5; default 0 = off; "
            "docs/verifiability.md)",
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


SOURCES = {
    "evaluation": manager_pb2.METRIC_SOURCE_EVALUATION,
    "training": manager_pb2.METRIC_SOURCE_TRAINING,
}


GOALS = {
    "minimize": manager_pb2.METRIC_GOAL_MINIMIZE,
    "maximize": manager_pb2.METRIC_GOAL_MAXIMIZE,
}


def experiment_request(a: argparse.Namespace) -> manager_pb2.StartExperimentRequest:
    """`experiment run`'s request: the round's fields and those of many rounds."""
    stopping = manager_pb2.StoppingRule(
        metric=a.stop_metric,
        source=SOURCES[a.stop_source],
        goal=GOALS[a.stop_goal] if a.stop_goal else manager_pb2.METRIC_GOAL_UNSPECIFIED,
        patience_rounds=a.patience,
        min_delta=a.min_delta,
    )
    if a.target is not None:
        stopping.target = a.target
    return manager_pb2.StartExperimentRequest(
        **round_fields(a),
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
        audit=tensor_pb2.AuditConfig(
            fraction=a.audit_fraction, seed=a.audit_seed, policy=a.audit_policy
        ),
    )


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
        arg("--stop-source", choices=sorted(SOURCES), default="evaluation"),
        arg("--stop-goal", choices=sorted(GOALS), default=None),
        arg("--target", type=float, default=None, help="stop once the metric reaches this"),
        arg("--patience", type=int, default=0, help="stop after N rounds without improvement"),
        arg("--min-delta", type=float, default=0.0, help="what counts as an improvement"),
        arg(
            "--audit-fraction",
            type=float,
            default=0.0,
            help="share of each round's updates the coordinator re-runs and compares "
            "(docs/verifiability.md; default 0 = none)",
        ),
        arg(
            "--audit-seed",
            type=int,
            default=0,
            help="seed of the audit's choice (default 0: the coordinator draws one per round)",
        ),
        arg(
            "--audit-policy",
            choices=("reject", "flag"),
            default="",
            help="on a mismatch: leave the update out (reject, the default) or mark the round",
        ),
        arg("--watch", action="store_true", help="then print a line per round until it ends"),
        WATCH_LIMIT,
    )


def read_ca(path: Path) -> x509.Certificate:
    try:
        return load_certificate(path.read_bytes(), str(path))
    except OSError as exc:
        raise InvalidArgument(f"--ca: cannot read {path}: {exc.strerror or exc}") from None
    except PkiError as exc:
        raise InvalidArgument(f"--ca: {exc}") from None


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
