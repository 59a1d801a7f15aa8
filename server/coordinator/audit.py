"""The re-execution audit (docs/verifiability.md, "Re-execution audit"): the coordinator
re-runs a seeded sample of each round's updates in a sandbox of its own and compares what it
gets with what the proplet sent, byte for byte.

Which updates: `chosen(seed, round_id, proplet_id, fraction)`, a hash of the three below the
fraction, so the choice is reproducible from the round's record and unknown to a proplet that
does not know the seed (the coordinator draws one per round when the configuration says 0).

The re-run is the proplet's own (`proplet.federated`, `proplet.task_output`,
`proplet.runner.WasmRuntime`): the module the round pinned (fetched by its digest: from the
OCI registry, or the `file://` module the round names, checked against the digest), the
round's base model from the registry, the proplet's dataset as the data store holds it (the
whole dataset, as a round task asks for it), and the task's environment as the manager builds
it (ROUND_ID, MODEL_URI, HYPERPARAMS, PROPLET_ID: the trainer contract's inputs, which also
seed the trainer's shuffle). The update it prints is hashed the way the signed header's
`update_sha256` is (`server.provenance`), and its num_samples and metrics compared too.

Outcomes (`rounds.AuditOutcome`): "match", "mismatch" (what differed, with both sha256s),
or "error" when the auditor could not re-run it (module not available, the re-run failed,
...): an error is recorded as such and marks the round, never taken for a match; the update
is kept (nothing shows its proplet lied).

An update is audited in the background as soon as it is accepted, so the round's close waits
only for what is still running; `outcomes` at aggregation awaits those and starts the ones a
restart lost.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import struct
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from proplet.errors import TaskError
from proplet.federated import FlInputs, FlTask
from proplet.runner import Invocation, Limits, WasmRuntime
from proplet.task_output import parse_update
from server import metrics
from server.coordinator import rounds as R
from server.coordinator.rounds import AuditOutcome, Round, Update
from server.coordinator.store import RoundUpdates, each_update, update_headers
from server.errors import FailedPrecondition, InvalidArgument, PropellerError
from server.manager.experiments import round_task_name
from server.oci import MAX_MODULE_BYTES, ImageRef, OciClient, is_loopback
from server.tensors import Array, Tensors, nbytes_of, offload_if_big, sha256_of

log = logging.getLogger(__name__)

# An audit's detail is kept with the round and its lineage: cut to this many characters.
MAX_DETAIL_CHARS = 1024
# The choice's hash: its first 8 bytes as an unsigned integer, compared with fraction * 2**64.
_SCALE = float(2**64)


def draw_seed() -> int:
    """A seed for a round whose configuration gives none (0): from the OS, never 0."""
    return secrets.randbits(63) or 1


def chosen(seed: int, round_id: str, proplet_id: str, fraction: float) -> bool:
    """Whether the update of `proplet_id` in `round_id` is audited: sha256(u64 seed, round_id,
    proplet_id) read as a number in [0, 1) is below `fraction` (0: never; 1: always)."""
    if fraction <= 0:
        return False
    if fraction >= 1:
        return True
    h = hashlib.sha256(
        struct.pack(">Q", seed) + round_id.encode("utf-8") + b"\x00" + proplet_id.encode("utf-8")
    ).digest()
    value: int = struct.unpack(">Q", h[:8])[0]
    return value / _SCALE < fraction


class AuditSources(Protocol):
    """Where the auditor takes the re-run's inputs from (the registry's base model comes
    through the coordinator's `ModelBackend`)."""

    async def module(self, image: str, digest: str) -> bytes:
        """The bytes of the module `digest` ("sha256:<hex>") that round image `image` names,
        checked against the digest; raises PropellerError otherwise."""
        ...

    async def dataset(self, proplet_id: str) -> tuple[Array, Array, str]:
        """The proplet's whole dataset in the data store: features, labels, schema."""
        ...


class BaseModels(Protocol):
    async def base_tensors(self, model_uri: str) -> Tensors: ...


class ModuleFetcher:
    """Round modules by digest: a `file://` module read (at most MAX_MODULE_BYTES), an OCI
    image's wasm layer pulled from `registry` ("" = the host the image names; plain HTTP for
    loopback unless `insecure` says otherwise), either one checked against the digest. Keeps
    the last few modules fetched, by digest."""

    KEPT = 4

    def __init__(
        self, *, registry: str = "", insecure: bool | None = None, timeout_s: float = 30.0
    ) -> None:
        self.registry = registry
        self.insecure = insecure
        self.timeout_s = timeout_s
        self._clients: dict[tuple[str, bool], OciClient] = {}
        self._kept: dict[str, bytes] = {}

    def close(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close()

    async def module(self, image: str, digest: str) -> bytes:
        data = self._kept.get(digest)
        if data is not None:
            return data
        async with asyncio.timeout(self.timeout_s):
            data = await asyncio.to_thread(self._fetch, image, digest)
        self._kept[digest] = data
        while len(self._kept) > self.KEPT:
            self._kept.pop(next(iter(self._kept)))
        return data

    def _fetch(self, image: str, digest: str) -> bytes:
        if not image:
            raise PropellerError(f"module {digest}: the round names no image to fetch it from")
        if image.startswith("file://"):
            path = Path(image.removeprefix("file://"))
            try:
                with path.open("rb") as f:
                    data = f.read(MAX_MODULE_BYTES + 1)
            except OSError as exc:
                raise PropellerError(
                    f"module {digest}: cannot read {path}: {exc.strerror or exc}"
                ) from None
            if len(data) > MAX_MODULE_BYTES:
                raise PropellerError(f"module {digest}: {path} exceeds {MAX_MODULE_BYTES} bytes")
        else:
            ref = ImageRef.parse(image, "task_wasm_image")
            address = self.registry or ref.host
            insecure = is_loopback(address) if self.insecure is None else self.insecure
            client = self._clients.get((address, insecure))
            if client is None:
                client = OciClient(address, insecure=insecure, timeout=self.timeout_s)
                self._clients[(address, insecure)] = client
            _, layer = client.pin(ref)
            if f"sha256:{layer.sha256}" != digest:
                raise PropellerError(
                    f"module {digest}: image {ref} now holds module sha256:{layer.sha256}"
                )
            data = client.fetch_layer(ref, layer)
        got = f"sha256:{hashlib.sha256(data).hexdigest()}"
        if got != digest:
            raise PropellerError(f"module {digest}: {image} holds module {got}")
        return data


class DataStoreDatasets(Protocol):
    async def dataset(self, proplet_id: str) -> tuple[Array, Array, str]: ...


@dataclass
class Sources:
    """`AuditSources` from a module fetcher and the data store client."""

    modules: ModuleFetcher
    datasets: DataStoreDatasets

    async def module(self, image: str, digest: str) -> bytes:
        return await self.modules.module(image, digest)

    async def dataset(self, proplet_id: str) -> tuple[Array, Array, str]:
        return await self.datasets.dataset(proplet_id)


class Auditor:
    """Re-runs updates with `sources`' inputs in `runtime` (a WasmRuntime of the auditor's own
    by default: the proplet's engine configuration, its own store per run) under `limits`;
    at most `parallel` re-runs at a time."""

    def __init__(
        self,
        sources: AuditSources,
        backend: BaseModels,
        *,
        runtime: WasmRuntime | None = None,
        limits: Limits | None = None,
        parallel: int = 1,
    ) -> None:
        self.sources = sources
        self.backend = backend
        self._runtime = runtime
        self.limits = limits or Limits()
        self._slots = asyncio.Semaphore(max(1, parallel))
        # (round_id, proplet_id) -> the audit running or done, until the round takes it.
        self._running: dict[tuple[str, str], asyncio.Task[AuditOutcome]] = {}

    @property
    def runtime(self) -> WasmRuntime:
        """Made at the first audit: a coordinator whose rounds ask for none runs no engine."""
        if self._runtime is None:
            self._runtime = WasmRuntime()
        return self._runtime

    def sampled(self, rnd: Round, proplet_id: str) -> bool:
        return chosen(rnd.audit_seed, rnd.round_id, proplet_id, rnd.audit.fraction)

    def begin(self, rnd: Round, update: Update) -> None:
        """Start auditing `update` in the background if the round's sample takes it."""
        if not self.sampled(rnd, update.proplet_id):
            return
        key = (rnd.round_id, update.proplet_id)
        if key not in self._running:
            # Its header is all the comparison needs (the sha256 of the bytes it sent): an
            # audit waiting for its turn does not hold the update's tensors.
            header = replace(update, tensors={})
            self._running[key] = asyncio.create_task(
                self.audit(rnd, header), name=f"audit-{rnd.round_id}-{update.proplet_id}"
            )

    async def outcomes(self, rnd: Round, updates: RoundUpdates) -> tuple[AuditOutcome, ...]:
        """The outcome of every sampled update of `rnd`, in arrival order: those begun on
        arrival awaited, the others (a restart lost them) run now."""
        sampled = [u for u in update_headers(updates) if self.sampled(rnd, u.proplet_id)]
        wanted = [u.proplet_id for u in sampled]
        for u in sampled:
            self.begin(rnd, u)  # those a restart lost (the others are running or done)
        try:
            return tuple([await self._running[(rnd.round_id, p)] for p in wanted])
        finally:
            for p in wanted:
                self._running.pop((rnd.round_id, p), None)

    def forget(self, round_id: str) -> None:
        """The round failed before its aggregation: its audits are of no use any more."""
        for key in [k for k in self._running if k[0] == round_id]:
            self._running.pop(key).cancel()

    async def aclose(self) -> None:
        tasks, self._running = list(self._running.values()), {}
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    async def audit(self, rnd: Round, update: Update) -> AuditOutcome:
        """Re-run `update`'s training and compare; every failure of the auditor's own is an
        "error" outcome (never raised)."""
        claimed = update.sha256
        async with self._slots:
            try:
                again = await self._rerun(rnd, update)
            except (PropellerError, TaskError, OSError, TimeoutError, ValueError) as exc:
                outcome = AuditOutcome(
                    update.proplet_id, R.AUDIT_ERROR, claimed, "", _cut(f"audit error: {exc}")
                )
            else:
                outcome = _compare(update, again)
        metrics.audited(outcome.outcome)
        log.log(
            logging.INFO if outcome.outcome == R.AUDIT_MATCH else logging.WARNING,
            "[Coordinator.audit] round_id=%s proplet_id=%s outcome=%s claimed=%s reexecuted=%s %s",
            rnd.round_id,
            update.proplet_id,
            outcome.outcome,
            claimed[:12],
            outcome.reexecuted_sha256[:12],
            outcome.detail,
        )
        return outcome

    async def _rerun(self, rnd: Round, update: Update) -> _Rerun:
        digest = rnd.module_digest or update.module_digest
        wasm, base, (features, labels, schema) = await asyncio.gather(
            self.sources.module(rnd.task_wasm_image, digest),
            self.backend.base_tensors(rnd.model_ref),
            self.sources.dataset(update.proplet_id),
        )
        sha_hex = digest.removeprefix("sha256:")
        compiled = await asyncio.to_thread(self.runtime.compile, wasm, sha_hex)
        hyperparams = rnd.hyperparams.filled().to_json()
        fl = FlTask(
            round_id=rnd.round_id,
            model_uri=rnd.model_ref,
            hyperparams=hyperparams,
            coordinator="",
            registry="",
            datastore="",
            module_digest=digest,
        )
        inputs = FlInputs(base, features, labels, schema, rnd.base_model_sha256)
        # The task's environment as the manager builds it (`round_task_env`), less the
        # service addresses and deadline: the trainer contract reads none of them.
        task_env = {
            "ROUND_ID": rnd.round_id,
            "MODEL_URI": rnd.model_ref,
            "HYPERPARAMS": hyperparams,
            "PROPLET_ID": update.proplet_id,
        }
        env, stdin = await inputs.invocation_inputs(compiled.contract, task_env, update.proplet_id)
        argv = [round_task_name(rnd.round_id, update.proplet_id)]
        out = await self.runtime.run(compiled, Invocation(argv, env, self.limits, stdin))
        again = await offload_if_big(
            len(out.stdout),
            parse_update,
            out.stdout,
            fl,
            update.proplet_id,
            base,
            inputs.dataset_size,
            base_sha256=rnd.base_model_sha256,
            module_digest=digest,
            contract=compiled.contract,
        )
        ordered = {s.name: again.tensors[s.name] for s in rnd.specs}
        sha = await offload_if_big(nbytes_of(ordered), sha256_of, ordered)
        return _Rerun(sha, again.meta.num_samples, dict(again.meta.metrics))


@dataclass(frozen=True)
class _Rerun:
    sha256: str
    num_samples: int
    metrics: dict[str, float]


def _cut(text: str) -> str:
    return text[:MAX_DETAIL_CHARS]


def _compare(update: Update, again: _Rerun) -> AuditOutcome:
    differs = []
    if again.sha256 != update.sha256:
        differs.append(
            f"update bytes (sha256 {update.sha256[:12]}... sent, re-run gives "
            f"{again.sha256[:12]}...)"
        )
    if again.num_samples != update.num_samples:
        differs.append(f"num_samples ({update.num_samples} sent, re-run gives {again.num_samples})")
    if not _same_metrics(update.metrics, again.metrics):
        differs.append("metrics")
    outcome = R.AUDIT_MISMATCH if differs else R.AUDIT_MATCH
    detail = _cut("differs: " + "; ".join(differs)) if differs else ""
    return AuditOutcome(update.proplet_id, outcome, update.sha256, again.sha256, detail)


def _same_metrics(sent: Mapping[str, float], again: Mapping[str, float]) -> bool:
    """The same keys and, bit for bit, the same values: the same module on the same inputs
    prints the same numbers (NaN cannot occur: an update's metrics are finite)."""
    return dict(sent) == dict(again)


def check_auditable(auditor: Auditor | None, *, root: bool) -> None:
    """A round may ask for an audit only where its updates can be re-run: a coordinator
    with an auditor whose participants are proplets (not a root's sites)."""
    if auditor is None:
        raise FailedPrecondition(
            "audit.fraction: this coordinator has no auditor to re-run updates with"
        )
    if root:
        raise InvalidArgument(
            "audit.fraction: a root coordinator's updates are its sites' partials, which "
            "cannot be re-run; configure the audit on the sites' rounds"
        )


def unaudited(rnd: Round, updates: RoundUpdates, reason: str) -> tuple[AuditOutcome, ...]:
    """An "error" outcome, saying `reason`, for each update of `rnd` its sample takes."""
    return tuple(
        AuditOutcome(u.proplet_id, R.AUDIT_ERROR, u.sha256, "", reason)
        for u in update_headers(updates)
        if chosen(rnd.audit_seed, rnd.round_id, u.proplet_id, rnd.audit.fraction)
    )


@dataclass(frozen=True)
class Verdict:
    """What the audit leaves for the aggregation: the round with its outcomes recorded (the
    rejected ones marked), the updates to aggregate, and the failure reason when too few
    remain ("" otherwise)."""

    round: Round
    updates: RoundUpdates
    failure: str = ""


def apply_policy(rnd: Round, outcomes: Sequence[AuditOutcome], updates: RoundUpdates) -> Verdict:
    """The round's policy applied to its outcomes. "reject": each mismatched update is left
    out, and the round fails when fewer updates remain than its floor (min_k_of_n, else
    k_of_n: the same floor participant failures are held to) or none; "flag": every update
    is aggregated. An "error" outcome never rejects an update."""
    reject = rnd.audit.rejects
    marked = tuple(replace(o, rejected=reject and o.outcome == R.AUDIT_MISMATCH) for o in outcomes)
    rnd = replace(rnd, audits=marked)
    out = {o.proplet_id for o in marked if o.rejected}
    if not out:
        return Verdict(rnd, updates)
    kept = WithoutUpdates(updates, out)
    remaining = len(kept.headers)
    floor = min(rnd.floor, rnd.num_updates)
    if remaining == 0 or remaining < floor:
        who = ", ".join(sorted(out))
        need = f"min_k_of_n {rnd.min_k_of_n}" if rnd.min_k_of_n else f"k_of_n {rnd.k_of_n}"
        return Verdict(
            rnd,
            kept,
            f"audit mismatch: the re-execution audit rejected the updates of {who}; "
            f"{remaining} of {rnd.num_updates} remain, {need} needs {max(floor, 1)}",
        )
    return Verdict(rnd, kept)


class WithoutUpdates:
    """A round's updates less those of `out` (the audit rejected them), in arrival order."""

    def __init__(self, updates: RoundUpdates, out: set[str]) -> None:
        self.updates = updates
        self.out = out
        self._headers = tuple(u for u in update_headers(updates) if u.proplet_id not in out)

    @property
    def headers(self) -> Sequence[Update]:
        return self._headers

    async def __aiter__(self) -> AsyncIterator[Update]:
        async for u in each_update(self.updates):
            if u.proplet_id not in self.out:
                yield u
            del u
