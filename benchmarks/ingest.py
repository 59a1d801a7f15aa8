"""Ingestion: `Coordinator.SubmitUpdate` throughput against a bare grpc.aio stream of the same
bytes, on the same machine, in the same run.

Subject: a Coordinator (memory round store, the one-process deployments' store) in a child
process with open rounds; every update is a real participant's first update, so it is
parsed, validated (shapes, finiteness), counted and stored. Baseline: a bare grpc.aio server
(`bench.Bare/Sink`) in another child that reads the same messages as raw bytes and answers
once. The client sends pre-serialized messages to both (the same bytes, client cost equal),
alternating subject and baseline, and the ratio of the medians is reported.

- small updates (the demo model: w[3] + b, float64; 2 messages per call): updates per second
  with 1, 4, 16 and 64 concurrent senders;
- big updates (one float32 tensor of 10 MB and of 100 MB, 1 MiB chunks): MB/s of one sender.

Two extra rows (no target) repeat the small case at 16 senders against the SQLite store
(`propeller-fl serve`'s store: every accepted update is committed to disk before the answer)
and against the PostgreSQL store (PROPELLER_DATABASE_URL; a server of the benchmark's own on
loopback, fsync on).

Transport: the same coordinator twice in one run, over mutual TLS (each of 3 or 30 senders a
proplet with its own certificate and channel, as deployed) and over plaintext; small updates,
every sender submitting one update per round, alternating the two; the ratio of the rates is
mTLS's cost (target: plaintext at most 1.2x mTLS's rate). Over mutual TLS every update is
signed by its proplet (signed before the clock starts, as a proplet signs before it sends) and
the coordinator checks the signature, so the ratio includes that check.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np

from benchmarks.common import Child, Recorder, median
from propeller.v1 import coordinator_pb2, tensor_pb2
from server.config import TlsConfig
from server.grpc_server import channel
from server.pki import CertificateAuthority, Identity, Kind, load_private_key
from server.provenance import Claim, module_digest, sign
from server.stack import identity_tls
from server.streams import UpdateMeta, update_header
from server.tensors import (
    DEFAULT_CHUNK_SIZE,
    GRPC_OPTIONS,
    Spec,
    Tensors,
    iter_chunks,
    sha256_of,
    specs_of,
)
from tests.support.postgres import postgres

NAME = "ingest"
TARGET_RATIO = 0.5
TLS_SENDERS = (3, 30)
TARGET_TLS_RATIO = 1.2
SUBMIT = "/propeller.v1.Coordinator/SubmitUpdate"
SINK = "/bench.Bare/Sink"
SMALL_URI = "fl/models/global_model_v1"
BIG_URIS = {10: "fl/models/global_model_v2", 100: "fl/models/global_model_v3"}

Messages = list[bytes]
Send = Callable[[Messages], Awaitable[bytes]]


def small_model() -> Tensors:
    return {"w": np.array([0.1, -0.2, 0.3]), "b": np.array(0.05)}


def big_model(mb: int) -> Tensors:
    n = mb * 1_000_000 // 4
    return {"w": np.random.default_rng(mb).standard_normal(n, dtype=np.float32)}


def _spec_args(tensors: Tensors) -> list[list[object]]:
    return [[name, arr.dtype.str, list(arr.shape)] for name, arr in tensors.items()]


# The module every benchmark update claims (the rounds pin none).
MODULE = module_digest(b"benchmark module")


def messages(
    round_id: str,
    proplet: str,
    uri: str,
    specs: list[Spec],
    data: Messages,
    signer: Signer | None = None,
) -> Messages:
    """One update as serialized UpdateChunks: its own header, then the (shared) data chunks;
    signed by `signer` (over mutual TLS every update is, as a proplet signs it)."""
    meta = UpdateMeta(round_id, proplet, uri, 64, {"loss": 0.5}, module_digest=MODULE)
    if signer is not None:
        meta = signer.sign(meta)
    header = tensor_pb2.UpdateChunk(header=update_header(meta, specs))
    return [header.SerializeToString(), *data]


class Signer:
    """Signs an update's header with a proplet's key, as the proplet does: over the base
    model the benchmark coordinator serves (zeros of the specs) and the update's sha256."""

    def __init__(self, tls: TlsConfig, base: Tensors, update: Tensors) -> None:
        self.key = load_private_key(tls.key)
        self.base_sha = sha256_of(base)
        self.update_sha = sha256_of(update)

    def sign(self, meta: UpdateMeta) -> UpdateMeta:
        claim = Claim.of(
            meta,
            round_id=meta.round_id,
            base_model_sha256=self.base_sha,
            update_sha256=self.update_sha,
        )
        return replace(meta, base_model_sha256=self.base_sha, signature=sign(self.key, claim))


def data_chunks(tensors: Tensors) -> Messages:
    return [
        tensor_pb2.UpdateChunk(data=c).SerializeToString()
        for c in iter_chunks(tensors, DEFAULT_CHUNK_SIZE)
    ]


def _check_subject(answer: bytes) -> None:
    resp = coordinator_pb2.SubmitUpdateResponse.FromString(answer)
    if not resp.accepted or resp.duplicate:
        raise RuntimeError(f"update not accepted as new: {resp}")


def _check_sink(answer: bytes) -> None:
    struct.unpack("<QQ", answer)


async def blast(send: Send, batches: Sequence[Messages], concurrency: int) -> float:
    """Send every batch (one call each) with `concurrency` callers; returns seconds."""
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < len(batches):
            i = next_index
            next_index += 1
            await send(batches[i])

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started


def caller(channel: grpc.aio.Channel, method: str, check: Callable[[bytes], None]) -> Send:
    call = channel.stream_unary(method, None, None)  # no serializers: the messages are bytes

    async def send(batch: Messages) -> bytes:
        answer: bytes = await call(iter(batch), timeout=600)
        check(answer)
        return answer

    return send


def rounds_config(
    reps: int, per_run: int, concurrencies: Sequence[int], bigs: Sequence[int]
) -> list[dict[str, object]]:
    small = _spec_args(small_model())
    rounds: list[dict[str, object]] = [
        {"round_id": f"s{c}-{r}", "model_ref": SMALL_URI, "tensors": small, "participants": per_run}
        for c in (0, *concurrencies)
        for r in range(reps + 1)
    ]
    for mb in bigs:
        n = mb * 1_000_000 // 4
        rounds.append(
            {
                "round_id": f"big{mb}",
                "model_ref": BIG_URIS[mb],
                "tensors": [["w", "<f4", [n]]],
                "participants": reps + 2,
            }
        )
    return rounds


async def run(rec: Recorder, smoke: bool) -> None:
    concurrencies = [1, 4] if smoke else [1, 4, 16, 64]
    reps = 2 if smoke else 3
    per_run = 40 if smoke else 400
    bigs = [10] if smoke else [10, 100]
    config = rounds_config(reps, per_run, concurrencies, bigs)
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        workdir = Path(tmp)
        bare = Child("bare", {}, log_path=workdir / "bare.log")
        coord = Child("ingest", {"rounds": config}, log_path=workdir / "ingest.log")
        try:
            async with (
                grpc.aio.insecure_channel(coord.ready["addr"], options=GRPC_OPTIONS) as cch,
                grpc.aio.insecure_channel(bare.ready["addr"], options=GRPC_OPTIONS) as bch,
            ):
                subject = caller(cch, SUBMIT, _check_subject)
                baseline = caller(bch, SINK, _check_sink)
                await _small(rec, subject, baseline, concurrencies, reps, per_run)
                await _big(rec, subject, baseline, bigs, reps)
        finally:
            coord.stop()
        senders = concurrencies[-1] if smoke else 16
        sqlite = Child(
            "ingest",
            {
                "rounds": config[: reps + 1 + len(concurrencies) * (reps + 1)],
                "state_dir": str(workdir),
            },
            log_path=workdir / "ingest-sqlite.log",
        )
        try:
            async with (
                grpc.aio.insecure_channel(sqlite.ready["addr"], options=GRPC_OPTIONS) as sch,
                grpc.aio.insecure_channel(bare.ready["addr"], options=GRPC_OPTIONS) as bch,
            ):
                subject = caller(sch, SUBMIT, _check_subject)
                baseline = caller(bch, SINK, _check_sink)
                await _small(rec, subject, baseline, [senders], reps, per_run, store="sqlite")
        finally:
            sqlite.stop()
        try:
            await _on_postgres(
                rec,
                bare,
                config[: reps + 1 + len(concurrencies) * (reps + 1)],
                senders,
                reps,
                per_run,
                workdir,
            )
        finally:
            bare.stop()
        await _transport(rec, smoke, workdir)


async def _on_postgres(
    rec: Recorder,
    bare: Child,
    config: list[dict[str, object]],
    senders: int,
    reps: int,
    per_run: int,
    workdir: Path,
) -> None:
    """The small case against the PostgreSQL store (PROPELLER_DATABASE_URL), on a server of
    the benchmark's own with fsync on: every accepted update is committed durably before the
    answer, as with SQLite's synchronous=FULL. Loopback, one machine: the commit's cost, not
    a network's."""
    with postgres(workdir / "postgres", durable=True) as server:
        url = server.create_database()
        pg = Child(
            "ingest", {"rounds": config, "database_url": url}, log_path=workdir / "ingest-pg.log"
        )
        try:
            async with (
                grpc.aio.insecure_channel(pg.ready["addr"], options=GRPC_OPTIONS) as pch,
                grpc.aio.insecure_channel(bare.ready["addr"], options=GRPC_OPTIONS) as bch,
            ):
                subject = caller(pch, SUBMIT, _check_subject)
                baseline = caller(bch, SINK, _check_sink)
                await _small(rec, subject, baseline, [senders], reps, per_run, store="postgres")
        finally:
            pg.stop()


def transport_rounds(n: int, reps: int, per_rep: int) -> list[dict[str, object]]:
    """Rounds for `n` senders that never close (n + 1 participants): one warm-up round and
    `per_rep` per repetition and transport."""
    small = _spec_args(small_model())
    ids = [f"t{n}-warm"] + [
        f"t{n}-{t}-{r}-{m}"
        for t in ("mtls", "plaintext")
        for r in range(reps)
        for m in range(per_rep)
    ]
    return [
        {"round_id": rid, "model_ref": SMALL_URI, "tensors": small, "participants": n + 1}
        for rid in ids
    ]


async def _transport(rec: Recorder, smoke: bool, workdir: Path) -> None:
    ca = await asyncio.to_thread(CertificateAuthority.create, workdir / "ca")
    reps = 1 if smoke else 3
    model = small_model()
    data, specs = data_chunks(model), specs_of(model)
    base = {s.name: np.zeros(s.shape, s.dtype) for s in specs}
    for n in TLS_SENDERS:
        per_rep = 5 if smoke else max(20, 300 // n)
        config = transport_rounds(n, reps, per_rep)
        ids = [f"p{i}" for i in range(n)]
        tls = await asyncio.to_thread(_bundles, ca, ids)
        children = {
            "mtls": Child(
                "ingest",
                {"rounds": config, "ca_dir": str(ca.dir)},
                log_path=workdir / f"tls-{n}.log",
            ),
            "plaintext": Child("ingest", {"rounds": config}, log_path=workdir / f"plain-{n}.log"),
        }
        rates: dict[str, list[float]] = {"mtls": [], "plaintext": []}
        signers: dict[str, list[Signer | None]] = {
            "mtls": [Signer(t, base, model) for pid in ids if (t := tls[pid]) is not None],
            "plaintext": [None] * n,
        }
        try:
            async with contextlib.AsyncExitStack() as stack:
                senders: dict[str, list[Send]] = {}
                for transport, child in children.items():
                    senders[transport] = []
                    for pid in ids:
                        creds = tls[pid] if transport == "mtls" else None
                        ch = await stack.enter_async_context(
                            channel(child.ready["addr"], creds, GRPC_OPTIONS)
                        )
                        senders[transport].append(caller(ch, SUBMIT, _check_subject))
                    await _one_per_sender(
                        senders[transport], [f"t{n}-warm"], ids, specs, data, signers[transport]
                    )
                for r in range(reps):
                    for transport in ("mtls", "plaintext"):
                        rounds = [f"t{n}-{transport}-{r}-{m}" for m in range(per_rep)]
                        seconds = await _one_per_sender(
                            senders[transport], rounds, ids, specs, data, signers[transport]
                        )
                        rates[transport].append(n * per_rep / seconds)
        finally:
            for child in children.values():
                child.stop()
        mtls, plain = median(rates["mtls"]), median(rates["plaintext"])
        ratio = plain / mtls
        for transport, rate in (("mtls", mtls), ("plaintext", plain)):
            rec.record(
                NAME,
                {"update": "w[3]+b f64", "senders": n, "transport": transport, "reps": reps},
                {"updates_per_s": round(rate)},
                summary=f"small updates, {n:>2} proplets ({transport}): {rate:8.0f}/s",
            )
        rec.record(
            NAME,
            {"update": "w[3]+b f64", "senders": n, "compare": "plaintext / mtls"},
            {"mtls_per_s": round(mtls), "plaintext_per_s": round(plain), "ratio": round(ratio, 3)},
            targets={f"<= {TARGET_TLS_RATIO:g}": ratio <= TARGET_TLS_RATIO},
            summary=f"small updates, {n:>2} proplets: plaintext / mTLS rate x{ratio:.2f}",
        )


def _bundles(ca: CertificateAuthority, ids: Sequence[str]) -> dict[str, TlsConfig | None]:
    return {pid: identity_tls(ca, Identity(Kind.PROPLET, pid)) for pid in ids}


async def _one_per_sender(
    senders: Sequence[Send],
    rounds: Sequence[str],
    ids: Sequence[str],
    specs: list[Spec],
    data: Messages,
    signers: Sequence[Signer | None],
) -> float:
    """Every sender submits its own update to each of `rounds` in turn, all senders at once;
    the seconds it took (the updates are made and signed before the clock starts)."""
    batches = [
        [messages(rid, pid, SMALL_URI, specs, data, signer) for rid in rounds]
        for pid, signer in zip(ids, signers, strict=True)
    ]

    async def sender(send: Send, mine: list[Messages]) -> None:
        for batch in mine:
            await send(batch)

    started = time.perf_counter()
    await asyncio.gather(*(sender(s, b) for s, b in zip(senders, batches, strict=True)))
    return time.perf_counter() - started


async def _small(
    rec: Recorder,
    subject: Send,
    baseline: Send,
    concurrencies: Sequence[int],
    reps: int,
    per_run: int,
    store: str = "memory",
) -> None:
    model = small_model()
    data = data_chunks(model)
    specs = specs_of(model)

    def batches(round_id: str) -> list[Messages]:
        return [messages(round_id, f"p{i}", SMALL_URI, specs, data) for i in range(per_run)]

    await blast(subject, batches("s0-0"), 8)  # warm-up: connections, code paths
    await blast(baseline, batches("s0-0"), 8)
    for c in concurrencies:
        subj: list[float] = []
        base: list[float] = []
        for r in range(reps):
            work = batches(f"s{c}-{r}")
            base.append(per_run / await blast(baseline, work, c))
            subj.append(per_run / await blast(subject, work, c))
        s, b = median(subj), median(base)
        ratio = s / b
        targets = (
            {f">= {TARGET_RATIO} of bare": ratio >= TARGET_RATIO} if store == "memory" else None
        )
        rec.record(
            NAME,
            {
                "update": "w[3]+b f64",
                "senders": c,
                "updates": per_run,
                "reps": reps,
                "store": store,
            },
            {"updates_per_s": round(s), "bare_per_s": round(b), "ratio": round(ratio, 3)},
            targets=targets,
            summary=(
                f"small updates, {c:>2} senders ({store}): {s:8.0f}/s, bare {b:8.0f}/s, "
                f"ratio {ratio:.2f}"
            ),
        )


async def _big(
    rec: Recorder, subject: Send, baseline: Send, sizes: Sequence[int], reps: int
) -> None:
    for mb in sizes:
        model = big_model(mb)
        data = data_chunks(model)
        specs = specs_of(model)
        total = sum(a.nbytes for a in model.values())
        del model
        subj: list[float] = []
        base: list[float] = []
        for r in range(reps + 1):
            batch = messages(f"big{mb}", f"p{r}", BIG_URIS[mb], specs, data)
            b_s = await blast(baseline, [batch], 1)
            s_s = await blast(subject, [batch], 1)
            if r:  # the first is a warm-up
                base.append(total / 1e6 / b_s)
                subj.append(total / 1e6 / s_s)
        s, b = median(subj), median(base)
        ratio = s / b
        rec.record(
            NAME,
            {
                "update_mb": mb,
                "senders": 1,
                "chunk": DEFAULT_CHUNK_SIZE,
                "reps": reps,
                "store": "memory",
            },
            {"mb_per_s": round(s, 1), "bare_mb_per_s": round(b, 1), "ratio": round(ratio, 3)},
            targets={f">= {TARGET_RATIO} of bare": ratio >= TARGET_RATIO},
            summary=f"{mb:>3} MB update: {s:8.1f} MB/s, bare {b:8.1f} MB/s, ratio {ratio:.2f}",
        )
