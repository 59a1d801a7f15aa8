"""The coordinator's stored records and their rows, shared by its stores: `Notice` (the
outbox's message) and `StrategyState` (an experiment's), and, for the two durable stores
(`store.SqliteRoundStore`, `pg_store.PostgresRoundStore`), the columns of a round and of an
update's header, a record's values in that order and the record read back, a strategy state's
row, and `StateCorrupted` for a row this code cannot have written. Each store keeps its own
SQL (two dialects); what a row holds is written here once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from server.coordinator.rounds import AuditOutcome, ParticipantFailure, Round, RoundState, Update
from server.errors import DataLoss
from server.round_spec import AuditSpec, Hyperparams
from server.tensors import (
    Spec,
    Tensors,
    specs_from_json,
    specs_of,
    specs_to_json,
    tensor_bytes,
    verified_tensors,
)


@dataclass(frozen=True)
class Notice:
    """A message the coordinator must publish about a round (its completion), kept in the
    store from the change it announces until it is marked sent."""

    round_id: str
    topic: str
    payload: bytes


@dataclass(frozen=True)
class StrategyState:
    """An experiment's strategy state as the aggregation of `round_id` answered it."""

    experiment_id: str
    round_id: str
    strategy_name: str
    tensors: Tensors


# Columns added to `rounds` since the first version, with their SQLite definition: a file
# written by an older coordinator gets them on open (`store._migrate`; PostgreSQL's first
# migration has them all but the fuel columns, which its second adds).
ADDED_ROUND_COLUMNS = {
    "min_k_of_n": "INTEGER NOT NULL DEFAULT 0",
    "failed": "TEXT NOT NULL DEFAULT '[]'",  # JSON list of [proplet_id, reason]
    "module_digest": "TEXT NOT NULL DEFAULT ''",
    "base_model_sha256": "TEXT NOT NULL DEFAULT ''",
    "strategy_name": "TEXT NOT NULL DEFAULT ''",
    "strategy_params_json": "TEXT NOT NULL DEFAULT ''",
    # The re-execution audit: its configuration (JSON object, with the seed in use) and its
    # outcomes (JSON list). PostgreSQL: migration 2.
    "audit": "TEXT NOT NULL DEFAULT '{}'",
    "audits": "TEXT NOT NULL DEFAULT '[]'",
    "fuel_budget": "INTEGER NOT NULL DEFAULT 0",
    "min_fuel_ratio": "REAL NOT NULL DEFAULT 0",
}
# The same for `updates`: an update's provenance (docs/security.md, "Provenance").
ADDED_UPDATE_COLUMNS = {
    "base_model_sha256": "TEXT NOT NULL DEFAULT ''",
    "module_digest": "TEXT NOT NULL DEFAULT ''",
    "signature": "BLOB NOT NULL DEFAULT x''",
    "certificate": "BLOB NOT NULL DEFAULT x''",  # the proplet's, PEM; empty over plaintext
    "distance": "REAL NOT NULL DEFAULT 0",
    "clip_scale": "REAL NOT NULL DEFAULT 1",
    "fuel_consumed": "INTEGER NOT NULL DEFAULT 0",  # as signed; 0: not metered
}

ROUND_COLUMNS = (
    "round_id",
    "experiment_id",
    "state",
    "participants",
    "k_of_n",
    "timeout_s",
    "model_ref",
    "requested_model_ref",
    "specs",
    "hyperparams",
    "task_wasm_image",
    "configured_at",
    "started_at",
    "deadline",
    "completed_at",
    "reported",
    "metrics",
    "new_model_version",
    "new_model_uri",
    "failure_reason",
    "closed_by",
    *ADDED_ROUND_COLUMNS,
)

UPDATE_HEADER_COLUMNS = (
    "proplet_id",
    "base_model_uri",
    "num_samples",
    "metrics",
    "specs",
    "received_at",
    "sha256",
    *ADDED_UPDATE_COLUMNS,
)


def blob_of(tensors: Tensors) -> tuple[bytearray, str]:
    """Tensors as one BLOB in the wire's layout, and its sha256."""
    blob = tensor_bytes(tensors)
    return blob, hashlib.sha256(blob).hexdigest()


class StateCorrupted(DataLoss):
    """The state file holds something that cannot be a record this code wrote."""


def update_values(update: Update, blob: bytes | bytearray) -> tuple[object, ...]:
    """An update's `UPDATE_HEADER_COLUMNS` as both backends store them (`blob`: its
    tensors' bytes)."""
    return (
        update.proplet_id,
        update.base_model_uri,
        update.num_samples,
        json.dumps(dict(update.metrics)),
        specs_to_json(specs_of(update.tensors)),
        update.received_at,
        # The same bytes the coordinator's checks hashed (when they did).
        update.sha256 or hashlib.sha256(blob).hexdigest(),
        update.base_model_sha256,
        update.module_digest,
        update.signature,
        update.certificate,
        update.distance,
        update.clip_scale,
        update.fuel_consumed,
    )


def round_values(rnd: Round) -> tuple[Any, ...]:
    return (
        rnd.round_id,
        rnd.experiment_id,
        rnd.state.value,
        json.dumps(list(rnd.participants)),
        rnd.k_of_n,
        rnd.timeout_s,
        rnd.model_ref,
        rnd.requested_model_ref,
        specs_to_json(rnd.specs),
        rnd.hyperparams.to_json(),
        rnd.task_wasm_image,
        rnd.configured_at,
        rnd.started_at,
        rnd.deadline,
        rnd.completed_at,
        json.dumps(list(rnd.reported)),
        json.dumps(dict(rnd.metrics)),
        rnd.new_model_version,
        rnd.new_model_uri,
        rnd.failure_reason,
        rnd.closed_by,
        rnd.min_k_of_n,
        json.dumps([[f.proplet_id, f.reason] for f in rnd.failed]),
        rnd.module_digest,
        rnd.base_model_sha256,
        rnd.strategy_name,
        rnd.strategy_params_json,
        json.dumps({**rnd.audit.to_dict(), "seed_in_use": rnd.audit_seed}),
        json.dumps([a.to_dict() for a in rnd.audits]),
        rnd.fuel_budget,
        rnd.min_fuel_ratio,
    )


def round_from_row(row: Sequence[Any]) -> Round:
    v = dict(zip(ROUND_COLUMNS, row, strict=True))
    audit = json.loads(v["audit"])
    return Round(
        round_id=v["round_id"],
        experiment_id=v["experiment_id"],
        participants=tuple(json.loads(v["participants"])),
        k_of_n=int(v["k_of_n"]),
        timeout_s=float(v["timeout_s"]),
        model_ref=v["model_ref"],
        specs=specs_from_json(v["specs"]),
        hyperparams=Hyperparams.from_dict(json.loads(v["hyperparams"])),
        task_wasm_image=v["task_wasm_image"],
        requested_model_ref=v["requested_model_ref"],
        state=RoundState(v["state"]),
        configured_at=float(v["configured_at"]),
        started_at=float(v["started_at"]),
        deadline=float(v["deadline"]),
        completed_at=float(v["completed_at"]),
        reported=tuple(json.loads(v["reported"])),
        metrics={str(k): float(x) for k, x in json.loads(v["metrics"]).items()},
        new_model_version=v["new_model_version"],
        new_model_uri=v["new_model_uri"],
        failure_reason=v["failure_reason"],
        closed_by=v["closed_by"],
        min_k_of_n=int(v["min_k_of_n"]),
        failed=tuple(ParticipantFailure(str(p), str(r)) for p, r in json.loads(v["failed"])),
        module_digest=str(v["module_digest"]),
        base_model_sha256=str(v["base_model_sha256"]),
        strategy_name=str(v["strategy_name"]),
        strategy_params_json=str(v["strategy_params_json"]),
        audit=AuditSpec.from_dict(audit),
        audit_seed=int(audit.get("seed_in_use", 0)),
        audits=tuple(AuditOutcome.from_dict(a) for a in json.loads(v["audits"])),
        fuel_budget=int(v["fuel_budget"]),
        min_fuel_ratio=float(v["min_fuel_ratio"]),
    )


def header_from_row(row: Sequence[Any]) -> tuple[Update, tuple[Spec, ...]]:
    """An update's header fields (tensors left empty) and the specs of its BLOB."""
    v = dict(zip(UPDATE_HEADER_COLUMNS, row, strict=True))
    update = Update(
        proplet_id=v["proplet_id"],
        base_model_uri=v["base_model_uri"],
        num_samples=int(v["num_samples"]),
        metrics={str(k): float(x) for k, x in json.loads(v["metrics"]).items()},
        tensors={},
        received_at=float(v["received_at"]),
        sha256=str(v["sha256"]),
        base_model_sha256=str(v["base_model_sha256"]),
        module_digest=str(v["module_digest"]),
        signature=bytes(v["signature"]),
        certificate=bytes(v["certificate"]),
        distance=float(v["distance"]),
        clip_scale=float(v["clip_scale"]),
        fuel_consumed=int(v["fuel_consumed"]),
    )
    return update, specs_from_json(v["specs"])


def readable_round(row: Sequence[Any], where: str) -> Round:
    """`round_from_row`, a row it cannot read being `StateCorrupted` (`where`: the file or
    table)."""
    try:
        return round_from_row(row)
    except (ValueError, KeyError, TypeError) as exc:
        raise StateCorrupted(f"{where}: round {row[0]!r} is unreadable: {exc}") from exc


def check_update_count(rnd: Round, count: int) -> None:
    """Inside the transaction that accepted an update: the round's stored update rows must be
    as many as its record counts, else the transaction rolls back."""
    if count != rnd.num_updates:
        raise RuntimeError(
            f"round {rnd.round_id!r}: {count} stored updates, record counts {rnd.num_updates}"
        )


def upsert(table: str, columns: Sequence[str], mark: str) -> str:
    """INSERT a row of `columns` into `table`, or, when its first column (the key) is taken,
    replace the others; `mark` is the dialect's placeholder (`?` SQLite, `%s` psycopg)."""
    return (
        f"INSERT INTO {table} ({', '.join(columns)}) "
        f"VALUES ({', '.join(mark for _ in columns)}) "
        f"ON CONFLICT ({columns[0]}) DO UPDATE SET "
        + ", ".join(f"{c} = excluded.{c}" for c in columns[1:])
    )


# A strategy state's row after its `experiment_id`, in the order both stores read it.
STATE_COLUMNS = ("round_id", "strategy_name", "specs", "sha256", "tensors")


def state_values(state: StrategyState, digest: str, blob: bytes | bytearray) -> tuple[object, ...]:
    """`state`'s row: experiment_id, then `STATE_COLUMNS` (`blob`: its tensors' bytes)."""
    specs = specs_to_json(specs_of(state.tensors))
    return (state.experiment_id, state.round_id, state.strategy_name, specs, digest, blob)


def state_from_row(experiment_id: str, row: Sequence[Any]) -> StrategyState:
    """The experiment's strategy state from its `STATE_COLUMNS`, its bytes checked."""
    round_id, name, specs_text, sha, blob = row
    what = f"experiment {experiment_id!r} strategy state"
    tensors = verified_tensors(blob, specs_from_json(specs_text), sha, what, StateCorrupted)
    return StrategyState(experiment_id, str(round_id), str(name), tensors)


def stored_update(round_id: str, header: Update, row: Sequence[Any] | None) -> Update:
    """The update `header` describes with its tensors from `row` (specs, sha256, bytes):
    read-only arrays over the bytes (no copy), after checking their length and sha256."""
    if row is None:
        raise StateCorrupted(f"round {round_id!r}: the update of {header.proplet_id!r} is gone")
    specs_text, sha, blob = row
    what = f"round {round_id!r} update {header.proplet_id!r}"
    tensors = verified_tensors(blob, specs_from_json(specs_text), sha, what, StateCorrupted)
    return replace(header, tensors=tensors)
