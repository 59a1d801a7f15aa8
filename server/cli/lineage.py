"""`propeller-fl models lineage N`: how a version was made, as the registry keeps it (the
experiment and round, the parent version, the strategy with its parameters and state, and
every contributing proplet with its weight in the aggregate, the fuel its training consumed
(its signed fuel receipt) and its update's digest; the round's fuel in all); with
`--chain` the same for its parent, the parent's parent, ... down to the first version without
a lineage (v0, or one an operator stored). It reads only the lineage headers, never the
updates' bytes; `models verify` checks what they say."""

from __future__ import annotations

import json
from typing import Any

import grpc

from propeller.v1 import model_registry_pb2
from server.cli.client import Client
from server.cli.render import fields, table
from server.errors import NotFound, PropellerError, RemoteError
from server.models import model_uri


async def lineage_header(client: Client, version: int) -> model_registry_pb2.Lineage | None:
    """The version's lineage header (its updates' bytes are not read); None when the version
    has none. Any other failure (an unknown version, an unreachable registry) is raised."""
    stream = client.lineage(version)
    try:
        first = await anext(stream, None)
    except PropellerError as exc:
        if not _no_lineage(exc):
            raise
        await client.model_info(version)  # an unknown version: NOT_FOUND naming it
        return None
    finally:
        await stream.aclose()
    if first is None or first.WhichOneof("part") != "header":
        return None
    return first.header


def _no_lineage(exc: PropellerError) -> bool:
    return isinstance(exc, NotFound) or (
        isinstance(exc, RemoteError) and exc.code == grpc.StatusCode.NOT_FOUND
    )


Link = tuple[int, model_registry_pb2.Lineage | None]


async def lineage_chain(client: Client, version: int, *, chain: bool) -> list[Link]:
    """(version, its lineage or None) from `version` down its parents (only `version` unless
    `chain`), newest first; the walk ends at a version without a lineage."""
    out: list[Link] = []
    current: int | None = version
    while current is not None:
        lineage = await lineage_header(client, current)
        out.append((current, lineage))
        if not chain or lineage is None or not 0 <= lineage.parent_version < current:
            break
        current = lineage.parent_version
    return out


def lineage_dict(version: int, lineage: model_registry_pb2.Lineage | None) -> dict[str, Any]:
    """One version's lineage as JSON (`lineage` None: it has none)."""
    doc: dict[str, Any] = {"version": version, "model_uri": model_uri(version)}
    if lineage is None:
        return {**doc, "lineage": None}
    state: dict[str, Any] | None = None
    if lineage.HasField("state"):
        s = lineage.state
        state = {
            "from_version": s.from_version if s.HasField("from_version") else None,
            "sha256": s.sha256,
            "result_sha256": s.result_sha256,
        }
    params = json.loads(lineage.strategy_params_json) if lineage.strategy_params_json else {}
    return {
        **doc,
        "lineage": {
            "model_sha256": lineage.model_sha256,
            "experiment_id": lineage.experiment_id,
            "round_id": lineage.round_id,
            "parent_version": lineage.parent_version,
            "base_model_uri": lineage.base_model_uri,
            "base_model_sha256": lineage.base_model_sha256,
            "module_digest": lineage.module_digest,
            "strategy": lineage.strategy,
            "strategy_params": params,
            "state": state,
            "fuel_consumed": round_fuel(lineage),
            "contributions": [
                {
                    "proplet_id": c.header.proplet_id,
                    "num_samples": c.header.num_samples,
                    "fuel_consumed": c.header.fuel_consumed,
                    "weight": c.weight,
                    "clip_scale": c.clip_scale,
                    "update_sha256": c.sha256,
                    "module_digest": c.header.module_digest,
                    "signed": bool(c.header.signature),
                    "metrics": dict(c.header.metrics),
                    "received_at": c.received_at,
                }
                for c in lineage.contributions
            ],
            # The re-execution audit's outcomes (docs/verifiability.md): a rejected update is
            # here and not among the contributions.
            "audits": [
                {
                    "proplet_id": a.proplet_id,
                    "outcome": a.outcome,
                    "claimed_sha256": a.claimed_sha256,
                    "reexecuted_sha256": a.reexecuted_sha256,
                    "rejected": a.rejected,
                    "detail": a.detail,
                }
                for a in lineage.audits
            ],
        },
    }


def round_fuel(lineage: model_registry_pb2.Lineage) -> int:
    """The fuel the round's contributing updates consumed, summed (their signed receipts)."""
    return sum(c.header.fuel_consumed for c in lineage.contributions)


async def round_fuels(client: Client, versions: list[int]) -> dict[int, int]:
    """The fuel each version's round consumed, from its lineage (the contributions' signed
    receipts summed); a version whose lineage cannot be read now is left out."""
    out: dict[int, int] = {}
    for version in versions:
        try:
            lineage = await lineage_header(client, version)
        except PropellerError:
            continue
        if lineage is not None:
            out[version] = round_fuel(lineage)
    return out


def fuel_text(fuel: int) -> str:
    """A fuel count for people ("-": none, an update or round from before fuel receipts)."""
    return f"{fuel:,}" if fuel else "-"


def per_sample(fuel: int, samples: int) -> str:
    return f"{fuel / samples:,.0f}" if fuel and samples > 0 else "-"


def render_lineage(version: int, lineage: model_registry_pb2.Lineage | None) -> str:
    """One version: its fields, then a row per contribution."""
    if lineage is None:
        return f"v{version}: no lineage (v0, or a version not produced by a round)"
    state = "-"
    if lineage.HasField("state"):
        s = lineage.state
        start = (
            f"v{s.from_version}'s state {s.sha256[:12]}" if s.HasField("from_version") else "zeros"
        )
        state = f"from {start}, left {s.result_sha256[:12]}"
    head = fields(
        [
            ("version", f"v{version} ({model_uri(version)})"),
            ("sha256", lineage.model_sha256),
            ("experiment", lineage.experiment_id or "-"),
            ("round", lineage.round_id),
            ("parent", f"v{lineage.parent_version} (sha256 {lineage.base_model_sha256[:12]})"),
            ("module", lineage.module_digest or "-"),
            ("strategy", f"{lineage.strategy} {lineage.strategy_params_json or '{}'}"),
            ("state", state),
            ("fuel", fuel_text(round_fuel(lineage))),
        ]
    )
    rows = table(
        ["PROPLET", "SAMPLES", "FUEL", "FUEL/SAMPLE", "WEIGHT", "CLIP", "UPDATE SHA256"],
        [
            [
                c.header.proplet_id,
                c.header.num_samples,
                fuel_text(c.header.fuel_consumed),
                per_sample(c.header.fuel_consumed, c.header.num_samples),
                f"{c.weight:.4f}",
                "-" if c.clip_scale == 1.0 else f"{c.clip_scale:.4g}",
                c.sha256[:12],
            ]
            for c in lineage.contributions
        ],
    )
    if not lineage.audits:
        return f"{head}\n\n{rows}"
    audits = table(
        ["AUDITED", "OUTCOME", "CLAIMED SHA256", "RE-EXECUTED SHA256", "REJECTED"],
        [
            [
                a.proplet_id,
                a.outcome,
                a.claimed_sha256[:12],
                a.reexecuted_sha256[:12] or "-",
                "yes" if a.rejected else "no",
            ]
            for a in lineage.audits
        ],
    )
    return f"{head}\n\n{rows}\n\n{audits}"


def render_chain(links: list[Link]) -> str:
    """A row per version, newest first."""
    return table(
        ["VERSION", "PARENT", "EXPERIMENT", "ROUND", "STRATEGY", "UPDATES", "FUEL", "SHA256"],
        [
            [f"v{v}", "-", "-", "-", "-", "-", "-", "no lineage"]
            if x is None
            else [
                f"v{v}",
                f"v{x.parent_version}",
                x.experiment_id or "-",
                x.round_id,
                x.strategy,
                len(x.contributions),
                fuel_text(round_fuel(x)),
                x.model_sha256[:12],
            ]
            for v, x in links
        ],
    )
