"""The re-execution audit's cost (docs/verifiability.md): rounds with every update audited vs
the same rounds without an audit, side by side.

Real mosquitto, the five services and N real proplets in this process (`tests.support.cluster`:
the product's `Stack`), mutual TLS. Each case runs experiments of R rounds
(`Manager.StartExperiment`, the trainer from a `file://` module, every proplet a participant,
k_of_n = all), alternately with `audit.fraction` 0 and 1 (policy reject; every update honest, so
every audit matches). A round's time is the coordinator's own: from its `started_at` to its
`completed_at` (the proplets' training, the uploads, the audits still running when the last
update arrives, the aggregation and the store). The audit re-runs each update once, on the
coordinator, `PROPELLER_AUDIT_PARALLEL` (1) at a time, starting as each update arrives.

Reported: the median round time of each, their ratio, and each case's training size. No
target: the issue asks for the mechanism, not a bound on its price; the figure says what a
deployment pays for auditing every update (a fraction f pays about f of the difference).
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import Recorder, median
from benchmarks.wasm import trainer_wasm
from propeller.v1 import coordinator_pb2, manager_pb2, tensor_pb2
from server.config import MqttConfig
from server.topics import Topics
from tests.support.cluster import Cluster, cluster
from tests.support.infra import mosquitto
from tests.support.security import session_ca

NAME = "audit"
RPC_S = 60.0


@dataclass(frozen=True)
class Case:
    proplets: int
    samples: int
    epochs: int
    rounds: int
    repeats: int

    @property
    def label(self) -> str:
        return f"{self.proplets} proplets, {self.samples} samples x {self.epochs} epochs"


CASES = (
    Case(proplets=3, samples=64, epochs=1, rounds=6, repeats=3),
    Case(proplets=3, samples=4096, epochs=5, rounds=6, repeats=3),
)
SMOKE = (Case(proplets=2, samples=32, epochs=1, rounds=2, repeats=1),)


@contextlib.asynccontextmanager
async def deployment(case: Case, workdir: Path) -> AsyncIterator[Cluster]:
    with mosquitto(workdir / "mosquitto", ca=session_ca()) as broker:
        mqtt = MqttConfig(port=broker.port, topics=Topics(f"a{uuid.uuid4().hex[:8]}", "fl"))
        ids = [f"proplet-{i + 1}" for i in range(case.proplets)]
        async with cluster(mqtt, workdir, proplets=ids, stack={"num_samples": case.samples}) as d:
            yield d


async def round_times(d: Cluster, case: Case, image: str, fraction: float) -> list[float]:
    """One experiment of `case.rounds` rounds; each round's seconds, the coordinator's clock."""
    eid = f"bench-{'audit' if fraction else 'plain'}-{uuid.uuid4().hex[:8]}"
    await d.manager.StartExperiment(
        manager_pb2.StartExperimentRequest(
            experiment_id=eid,
            model_ref="fl/models/global_model_v0",
            participants=d.proplet_ids,
            hyperparams=coordinator_pb2.Hyperparams(epochs=case.epochs, lr=0.01, batch_size=16),
            timeout_s=RPC_S,
            task_wasm_image=image,
            rounds=case.rounds,
            audit=tensor_pb2.AuditConfig(fraction=fraction),
        ),
        timeout=RPC_S,
    )
    while True:
        e = await d.manager.GetExperiment(
            manager_pb2.GetExperimentRequest(experiment_id=eid), timeout=RPC_S
        )
        if e.state != manager_pb2.EXPERIMENT_STATE_RUNNING:
            break
        await asyncio.sleep(0.05)
    if e.state != manager_pb2.EXPERIMENT_STATE_COMPLETED:
        raise RuntimeError(f"experiment {eid} ended {e.state}: {e.end.detail}")
    times = []
    for r in e.rounds:
        status = await d.status(r.round_id)
        if fraction and not all(a.outcome == "match" for a in status.audits):
            raise RuntimeError(f"round {r.round_id}: an honest update did not match")
        times.append(status.completed_at - status.started_at)
    return times


async def measure(rec: Recorder, case: Case, smoke: bool, image: str) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-audit-") as tmp:
        async with deployment(case, Path(tmp)) as d:
            # Warm-up, not counted: the proplets' and the auditor's compilation of the
            # module, the connections.
            await round_times(d, case, image, 0.0)
            await round_times(d, case, image, 1.0)
            plain: list[float] = []
            audited: list[float] = []
            for _ in range(case.repeats):
                plain += await round_times(d, case, image, 0.0)
                audited += await round_times(d, case, image, 1.0)
    p, a = median(plain) * 1000, median(audited) * 1000
    rec.record(
        NAME,
        {"proplets": case.proplets, "samples": case.samples, "epochs": case.epochs},
        {
            "round_ms_no_audit": p,
            "round_ms_every_update_audited": a,
            "ratio": a / p,
            "rounds_each": len(plain),
        },
        summary=(
            f"{case.label}: round {p:.1f} ms without audit, {a:.1f} ms with every update "
            f"audited (x{a / p:.2f}; medians of {len(plain)} rounds each, interleaved)"
        ),
    )


async def run(rec: Recorder, smoke: bool) -> None:
    image = f"file://{await asyncio.to_thread(trainer_wasm)}"
    for case in SMOKE if smoke else CASES:
        await measure(rec, case, smoke, image)
