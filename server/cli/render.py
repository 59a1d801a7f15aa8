"""Output of the client commands: aligned tables and key/value blocks for people, JSON for
programs; then how each kind of message looks (`render_round`, `event_line`, ...).

JSON shape: protobuf messages go through `json_format.MessageToDict` with the proto field names,
every field present (zeros, empty lists and maps included) and int64 values as JSON numbers;
enums are their names ("ROUND_STATE_COMPLETED"). Commands whose output is not one message
document their own object in the command's help.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TextIO

from google.protobuf import json_format
from google.protobuf.message import Message

from propeller.v1 import (
    coordinator_pb2,
    datastore_pb2,
    manager_pb2,
    model_registry_pb2,
    tensor_pb2,
)
from server.errors import PropellerError
from server.oci import PushResult
from server.tensors import Array, Tensors, model_to_json, tensor_from_proto

Cell = object


def message_dict(msg: Message) -> dict[str, Any]:
    """A protobuf message as the CLI's JSON object (see the module docstring)."""
    return json_format.MessageToDict(
        msg,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
        unquote_int64_if_possible=True,
    )


def cell_text(value: Cell) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    text = str(value)
    return text if text else "-"


def table(headers: Sequence[str], rows: Iterable[Sequence[Cell]]) -> str:
    """Columns separated by two spaces, each as wide as its widest cell; the last column is
    not padded. Empty values show as "-". No rows -> the header line only."""
    cells = [[cell_text(c) for c in row] for row in rows]
    for row in cells:
        if len(row) != len(headers):
            raise ValueError(f"table row has {len(row)} cells, headers {len(headers)}")
    widths = [len(h) for h in headers]
    for row in cells:
        for i, text in enumerate(row):
            widths[i] = max(widths[i], len(text))
    lines = []
    for row in [list(headers), *cells]:
        parts = [text.ljust(widths[i]) for i, text in enumerate(row)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def fields(pairs: Iterable[tuple[str, Cell]]) -> str:
    """`key:  value` lines with the values aligned."""
    items = [(k, cell_text(v)) for k, v in pairs]
    if not items:
        return ""
    width = max(len(k) for k, _ in items) + 1
    return "\n".join(f"{(k + ':').ljust(width)}  {v}" for k, v in items)


def timestamp(ts: float) -> str:
    """Unix seconds as local ISO time to the second; "-" for 0 (not set)."""
    if not ts or not math.isfinite(ts):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def ago(ts: float, now: float | None = None) -> str:
    """How long ago `ts` was: "0.4s ago", "12s ago", "3m ago", "2h ago", "5d ago"; "never"
    for 0."""
    if not ts or not math.isfinite(ts):
        return "never"
    now = time.time() if now is None else now
    age = max(0.0, now - ts)
    if age < 10:
        return f"{age:.1f}s ago"
    if age < 120:
        return f"{age:.0f}s ago"
    if age < 7200:
        return f"{age / 60:.0f}m ago"
    if age < 172800:
        return f"{age / 3600:.0f}h ago"
    return f"{age / 86400:.0f}d ago"


def describe_error(exc: BaseException) -> str:
    """The one line an error becomes: "CODE: message" for ours, the message otherwise."""
    if isinstance(exc, PropellerError):
        return f"{exc.code.name}: {exc}"
    return str(exc) or type(exc).__name__


def short_name(enum_name: str, prefix: str) -> str:
    """ "ROUND_STATE_OPEN" -> "OPEN"."""
    return enum_name.removeprefix(prefix)


class Output:
    """Where a command writes: text blocks, one JSON document, or JSON lines. Flushed at once so
    a live stream (round watch) shows each line as it happens."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream

    @property
    def stream(self) -> TextIO:
        # Resolved per write: tests and callers may swap sys.stdout.
        return self._stream if self._stream is not None else sys.stdout

    def text(self, block: str) -> None:
        self.stream.write(block if block.endswith("\n") else block + "\n")
        self.stream.flush()

    def json(self, value: object) -> None:
        """One JSON document, indented."""
        self.text(json.dumps(value, indent=2, sort_keys=False))

    def json_line(self, value: object) -> None:
        """One JSON object on one line (for streams)."""
        self.text(json.dumps(value, separators=(",", ":")))


# ------------------------------------------------------------------------------- messages


def dataset_arrays(msg: datastore_pb2.Dataset) -> tuple[Array, Array]:
    """Features [n, d] and labels [n] of a Dataset message."""
    return (
        tensor_from_proto(msg.features, "dataset.features"),
        tensor_from_proto(msg.labels, "dataset.labels"),
    )


def round_state(value: int) -> str:
    return short_name(coordinator_pb2.RoundState.Name(value), "ROUND_STATE_")


def task_state(value: int) -> str:
    return short_name(manager_pb2.TaskState.Name(value), "TASK_STATE_")


def specs_text(specs: Sequence[tensor_pb2.TensorSpec]) -> str:
    parts = []
    for s in specs:
        dtype = short_name(tensor_pb2.DType.Name(s.dtype), "DTYPE_").lower()
        parts.append(f"{s.name}:{dtype}{list(s.shape)}")
    return " ".join(parts)


def render_round(st: coordinator_pb2.RoundStatus) -> str:
    hp = st.hyperparams
    pairs: list[tuple[str, object]] = [
        ("round", st.round_id),
        ("experiment", st.experiment_id),
        ("state", round_state(st.state)),
        ("completed", st.completed),
        ("updates", f"{st.num_updates}/{st.k_of_n}"),
        ("participants", ", ".join(st.participants)),
        ("reported", ", ".join(st.reported)),
        ("model", st.model_ref),
        ("hyperparams", f"epochs={hp.epochs} lr={hp.lr:g} batch_size={hp.batch_size}"),
        ("image", st.task_wasm_image),
        ("timeout", f"{st.timeout_s:g}s"),
        ("started", timestamp(st.started_at)),
        ("deadline", timestamp(st.deadline)),
        ("completed at", timestamp(st.completed_at)),
        ("closed by", st.closed_by),
        ("new model", st.new_model_uri),
    ]
    if st.failure_reason:
        pairs.append(("reason", st.failure_reason))
    if st.fuel_budget:
        pairs.append(("fuel budget", f"{st.fuel_budget:,} a run"))
    if st.min_fuel_ratio:
        pairs.append(("min fuel ratio", f"{st.min_fuel_ratio:g}"))
    if st.fuel_consumed:
        pairs.append(("fuel", f"{st.fuel_consumed:,} (the accepted updates', summed)"))
    for name in sorted(st.metrics):
        pairs.append((f"metric {name}", f"{st.metrics[name]:.6g}"))
    if st.audit.fraction:
        policy = st.audit.policy or "reject"
        pairs.append(("audit", f"fraction={st.audit.fraction:g} policy={policy}"))
    for a in st.audits:
        # proplet: outcome (claimed sha256 -> re-executed sha256), and what became of it
        digests = f"{a.claimed_sha256[:12]} -> {a.reexecuted_sha256[:12] or '-'}"
        note = " rejected" if a.rejected else ""
        detail = f": {a.detail}" if a.detail else ""
        pairs.append((f"audit {a.proplet_id}", f"{a.outcome}{note} ({digests}){detail}"))
    return fields(pairs)


def render_rounds(rounds: Sequence[coordinator_pb2.RoundStatus]) -> str:
    return table(
        ["ROUND", "EXPERIMENT", "STATE", "UPDATES", "PARTICIPANTS", "MODEL", "NEW MODEL", "CLOSED"],
        [
            [
                r.round_id,
                r.experiment_id,
                round_state(r.state),
                f"{r.num_updates}/{r.k_of_n}",
                len(r.participants),
                r.model_ref,
                r.new_model_uri,
                r.closed_by,
            ]
            for r in rounds
        ],
    )


def event_line(ev: coordinator_pb2.RoundEvent) -> str:
    """One live line of a round watch: time, event, updates/k_of_n, state, proplet, outcome."""
    when = time.strftime("%H:%M:%S", time.localtime(ev.timestamp or time.time()))
    kind = short_name(coordinator_pb2.RoundEventType.Name(ev.type), "ROUND_EVENT_TYPE_")
    st = ev.status
    parts = [
        when,
        kind.ljust(15),
        f"{st.num_updates}/{st.k_of_n}".ljust(5),
        round_state(st.state).ljust(11),
    ]
    if ev.proplet_id:
        parts.append(f"proplet={ev.proplet_id}")
    if st.state == coordinator_pb2.ROUND_STATE_COMPLETED:
        parts.append(f"model={st.new_model_uri} closed_by={st.closed_by}")
    if st.state == coordinator_pb2.ROUND_STATE_FAILED:
        parts.append(f"reason={st.failure_reason}")
    return "  ".join(parts).rstrip()


def render_experiment_response(resp: manager_pb2.StartExperimentResponse) -> str:
    st = resp.round
    head = fields(
        [
            ("experiment", resp.experiment_id),
            ("round", resp.round_id),
            ("state", round_state(st.state)),
            ("k_of_n", st.k_of_n),
            ("timeout", f"{st.timeout_s:g}s"),
            ("deadline", timestamp(st.deadline)),
        ]
    )
    scheduled = table(
        ["PROPLET", "TASK ID", "TASK NAME"],
        [[s.proplet_id, s.task_id, s.task_name] for s in resp.scheduled],
    )
    blocks = [head, "", f"scheduled ({len(resp.scheduled)}):", scheduled]
    if resp.skipped:
        blocks += [
            "",
            f"skipped ({len(resp.skipped)}):",
            table(["PROPLET", "REASON"], [[s.proplet_id, s.reason] for s in resp.skipped]),
        ]
    else:
        blocks += ["", "skipped: none"]
    return "\n".join(blocks)


def render_experiments(exps: Sequence[manager_pb2.Experiment]) -> str:
    return table(
        ["EXPERIMENT", "ROUND", "MODEL", "SCHEDULED", "SKIPPED", "CREATED"],
        [
            [
                e.experiment_id,
                e.config.round_id,
                e.config.model_ref,
                len(e.scheduled),
                len(e.skipped),
                timestamp(e.created_at),
            ]
            for e in exps
        ],
    )


def experiment_state(value: int) -> str:
    return short_name(manager_pb2.ExperimentState.Name(value), "EXPERIMENT_STATE_")


def end_text(end: manager_pb2.ExperimentEnd) -> str:
    """ "MAX_ROUNDS after round 3 (exp-r3): 3 round(s) run"; "" when not ended."""
    if not end.reason:
        return ""
    reason = short_name(manager_pb2.EndReason.Name(end.reason), "END_REASON_")
    return f"{reason} after round {end.round} ({end.round_id}): {end.detail}"


def render_experiment(e: manager_pb2.Experiment) -> str:
    c = e.config
    pairs: list[tuple[str, Cell]] = [
        ("experiment", e.experiment_id),
        ("round", c.round_id),
        ("model", c.model_ref),
        ("participants", ", ".join(c.participants) or ("all alive" if c.all_alive else "")),
        ("k_of_n", c.k_of_n),
        ("timeout", f"{c.timeout_s:g}s"),
        ("image", c.task_wasm_image),
        ("created", timestamp(e.created_at)),
        ("state", experiment_state(e.state)),
        ("rounds", f"{e.current_round} of {c.rounds or 1}"),
    ]
    if c.strategy_name:
        pairs.append(("strategy", f"{c.strategy_name} {c.strategy_params_json}".strip()))
    if e.end.reason:
        pairs.append(("ended", end_text(e.end)))
    rows = [[s.proplet_id, "scheduled", s.task_name] for s in e.scheduled]
    rows += [[s.proplet_id, "skipped", s.reason] for s in e.skipped]
    return fields(pairs) + "\n\n" + table(["PROPLET", "OUTCOME", "TASK / REASON"], rows)


def metrics_text(metrics: Mapping[str, float]) -> str:
    """ "accuracy=0.91 loss=0.25" (sorted by name)."""
    return " ".join(f"{k}={metrics[k]:.4g}" for k in sorted(metrics))


# `experiment history`'s columns.
_HISTORY_COLUMNS = [
    "ROUND",
    "ROUND ID",
    "STATE",
    "MODEL",
    "SAMPLED",
    "REPORTED",
    "CLOSED",
    "TRAIN",
    "EVAL",
    "FUEL",
]


def render_experiment_rounds(
    rounds: Sequence[manager_pb2.ExperimentRound], fuel: Mapping[int, int] | None = None
) -> str:
    """`experiment history`: one row per round; FUEL is the round's fuel by the version it
    stored (`fuel`: from the versions' lineages; "-" when not known)."""
    fuel = fuel or {}
    return table(
        _HISTORY_COLUMNS,
        [
            [
                r.index,
                r.round_id,
                round_state(r.state),
                f"v{r.new_model_version}" if r.new_model_version else "",
                len(r.sampled),
                len(r.reported),
                r.closed_by or r.failure_reason,
                metrics_text(r.train_metrics),
                metrics_text(r.eval_metrics),
                f"{fuel[r.new_model_version]:,}" if fuel.get(r.new_model_version) else "-",
            ]
            for r in rounds
        ],
    )


def experiment_event_line(ev: manager_pb2.ExperimentEvent) -> str:
    """One live line of an experiment watch: time, event, round, what it says."""
    when = time.strftime("%H:%M:%S", time.localtime(ev.timestamp or time.time()))
    kind = short_name(manager_pb2.ExperimentEventType.Name(ev.type), "EXPERIMENT_EVENT_TYPE_")
    e, r = ev.experiment, ev.round
    total = e.config.rounds or 1
    parts = [when, kind.ljust(15)]
    if ev.type == manager_pb2.EXPERIMENT_EVENT_TYPE_SNAPSHOT:
        parts += [f"round {e.current_round}/{total}", experiment_state(e.state)]
    elif ev.type == manager_pb2.EXPERIMENT_EVENT_TYPE_ENDED:
        parts += [experiment_state(e.state), end_text(e.end)]
    else:
        parts += [f"round {r.index}/{total}", r.round_id]
        if ev.type == manager_pb2.EXPERIMENT_EVENT_TYPE_ROUND_STARTED:
            parts.append(f"sampled={len(r.sampled)} model={r.model_ref}")
        elif ev.type == manager_pb2.EXPERIMENT_EVENT_TYPE_ROUND_FINISHED:
            parts.append(round_state(r.state))
            if r.new_model_uri:
                parts.append(f"model={r.new_model_uri} reported={len(r.reported)}")
            if r.failure_reason:
                parts.append(f"reason={r.failure_reason}")
            parts.append(metrics_text(r.train_metrics))
        else:
            parts.append(f"evaluated={len(r.evaluated)} {metrics_text(r.eval_metrics)}")
    return "  ".join(p for p in parts if p)


def render_proplets(proplets: Sequence[manager_pb2.Proplet], now: float | None = None) -> str:
    return table(
        ["ID", "NAME", "ALIVE", "LAST SEEN", "TASKS"],
        [[p.id, p.name, p.alive, ago(p.last_seen, now), p.task_count] for p in proplets],
    )


def render_tasks(tasks: Sequence[manager_pb2.Task]) -> str:
    return table(
        ["ID", "NAME", "STATE", "PROPLET", "UPDATED"],
        [
            [t.id, t.name, task_state(t.state), t.proplet_id or "(any)", timestamp(t.updated_at)]
            for t in tasks
        ],
    )


def render_task(t: manager_pb2.Task) -> str:
    module = t.image_url if t.image_url else f"(inline module, {len(t.file)} bytes)"
    pairs: list[tuple[str, object]] = [
        ("id", t.id),
        ("name", t.name),
        ("state", task_state(t.state)),
        ("proplet", t.proplet_id or "(any)"),
        ("module", module),
    ]
    pairs += [("env", f"{k}={v}") for k, v in sorted(t.env.items())]
    if t.cli_args:
        pairs.append(("args", " ".join(t.cli_args)))
    pairs += [
        ("created", timestamp(t.created_at)),
        ("started", timestamp(t.started_at)),
        ("finished", timestamp(t.finished_at)),
    ]
    if t.error:
        pairs.append(("error", t.error))
    text = fields(pairs)
    if t.results:
        text += "\nresults:\n" + t.results.rstrip("\n")
    return text


def render_models(models: Sequence[model_registry_pb2.ModelVersion]) -> str:
    return table(
        ["VERSION", "URI", "SHA256", "TENSORS", "BYTES", "CREATED"],
        [
            [
                m.version,
                m.model_uri,
                m.sha256[:12],
                specs_text(m.tensors),
                m.total_bytes,
                timestamp(m.created_at),
            ]
            for m in models
        ],
    )


def render_model_version(m: model_registry_pb2.ModelVersion) -> str:
    return fields(
        [
            ("version", m.version),
            ("uri", m.model_uri),
            ("sha256", m.sha256),
            ("tensors", specs_text(m.tensors)),
            ("bytes", m.total_bytes),
            ("created", timestamp(m.created_at)),
        ]
    )


def model_json(header: tensor_pb2.ModelHeader, tensors: Tensors) -> dict[str, object]:
    """`models get --json`: {"version", "model_uri", "sha256", "tensors": [specs],
    "model": {"w": [...], "b": x}} (the seed's model JSON under "model")."""
    return {
        "version": header.version,
        "model_uri": header.model_uri,
        "sha256": header.sha256,
        "tensors": [message_dict(s) for s in header.tensors],
        "model": model_to_json(tensors),
    }


def dataset_json(msg: datastore_pb2.Dataset) -> dict[str, object]:
    """`datasets get --json`: {"proplet_id", "schema", "size", "num_features",
    "features": [[...], ...], "labels": [...]}."""
    features, labels = dataset_arrays(msg)
    return {
        "proplet_id": msg.proplet_id,
        "schema": msg.schema,
        "size": int(features.shape[0]),
        "num_features": int(features.shape[1]),
        "features": features.tolist(),
        "labels": labels.tolist(),
    }


def render_datasets(infos: Sequence[datastore_pb2.DatasetInfo]) -> str:
    return table(
        ["PROPLET", "SCHEMA", "SIZE", "FEATURES"],
        [[d.proplet_id, d.schema, d.size, d.num_features] for d in infos],
    )


def render_dataset_info(d: datastore_pb2.DatasetInfo) -> str:
    return fields(
        [
            ("proplet", d.proplet_id),
            ("schema", d.schema),
            ("size", d.size),
            ("features", d.num_features),
        ]
    )


def render_dataset(msg: datastore_pb2.Dataset) -> str:
    features, labels = dataset_arrays(msg)
    head = fields(
        [
            ("proplet", msg.proplet_id),
            ("schema", msg.schema),
            ("size", features.shape[0]),
            ("features", features.shape[1]),
        ]
    )
    headers = [f"x{i}" for i in range(features.shape[1])] + ["LABEL"]
    rows = [
        [f"{v:.6g}" for v in row] + [int(lab)]
        for row, lab in zip(features.tolist(), labels.tolist(), strict=True)
    ]
    return head + "\n\n" + table(headers, rows)


def render_push(r: PushResult) -> str:
    return fields(
        [
            ("image", r.image),
            ("digest", r.digest),
            ("media type", r.media_type),
            ("size", r.size),
            ("manifest", r.manifest_digest),
            ("pinned", r.pinned),
        ]
    )
