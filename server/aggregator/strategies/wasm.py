"""Aggregation by a WASM module: strategy "wasm", whose rule is a module pinned by digest in
the round's parameters (`{"module": "host:port/repo@sha256:<hex>"}`) and run in the
proplet's sandbox (`proplet.runner.WasmRuntime`: the same engine, limits and host side as a
trainer's run). The module speaks strategy contract v1 (wasm-client/README.md, "Strategy
contract"): one safetensors container in on stdin (the updates' sample counts as `weights`,
the base model as `base/<name>`, every update as `update/<i>/<name>`, in that order), the new
model out on stdout with the base model's names and shapes in the updates' dtype, and each
update's weight in the aggregate in its `__metadata__.weights`.

Everything the module does is checked, nothing trusted: a module that is not pinned, cannot
be pulled or does not verify, does not declare the contract, traps, exits non-zero, runs past
its time, grows past its memory or writes more than the model's size, or answers anything
but finite tensors of the right names, dtypes and shapes fails the aggregation with
FAILED_PRECONDITION naming the module and the reason; the round then fails with it and no
model version is stored (docs/verifiability.md, "Strategies as sandboxed modules").
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from proplet import safetensors
from proplet.errors import TaskError
from proplet.runner import CompiledModule, Invocation, Limits, WasmRuntime
from server.aggregator.fedavg import all_finite
from server.aggregator.strategies.base import (
    PARAMS_FIELD,
    Bound,
    StrategyParams,
    bad,
    bounded,
)
from server.aggregator.strategies.robust import _HeldStrategy
from server.errors import FailedPrecondition, InvalidArgument, PropellerError, RemoteError
from server.oci import ImageRef, OciClient, is_loopback
from server.tensors import Array, Spec, Tensors

# The export by which a module declares strategy contract v1, and the contract's version as
# the input's metadata says it.
STRATEGY_EXPORT = "propeller_strategy_v1"
STRATEGY_CONTRACT = "1"
# What a module's stdout may hold beyond the model's bytes: its header (names, shapes,
# offsets) and the weights list, a few dozen bytes an update.
OUTPUT_HEADER_BYTES = 64 << 10
OUTPUT_BYTES_PER_UPDATE = 64
# One registry request's time when pulling a module.
PULL_TIMEOUT_S = 30.0
MAX_TIMEOUT_S = 3600.0
MAX_MEMORY_MIB = 4096

# A pinned reference's manifest never changes: its wasm layer's sha256, remembered so a warm
# round finds the compiled module in the runtime without asking the registry again.
_LAYERS: dict[str, str] = {}
_LAYERS_LOCK = threading.Lock()
_MAX_LAYERS = 64


@dataclass(frozen=True)
class WasmParams(StrategyParams):
    # The module, an OCI reference pinned by digest (the manifest's).
    module: str = ""
    # Its run's limits: the trainer's defaults (proplet.runner.Limits).
    timeout_s: float = bounded(
        Limits.timeout_s, Bound(f"in (0, {MAX_TIMEOUT_S:g}]", lambda v: 0 < v <= MAX_TIMEOUT_S)
    )
    memory_mib: int = bounded(
        Limits.memory_bytes >> 20,
        Bound(f"in [1, {MAX_MEMORY_MIB}]", lambda v: 1 <= v <= MAX_MEMORY_MIB),
    )

    def check(self) -> None:
        if not self.module:
            raise bad("module", "required: the strategy module's OCI reference, pinned by digest")
        ref = ImageRef.parse(self.module, f"{PARAMS_FIELD}.module")
        if not ref.digest:
            raise bad("module", f"{self.module!r} is not pinned: name it by digest (@sha256:...)")

    @property
    def ref(self) -> ImageRef:
        return ImageRef.parse(self.module, f"{PARAMS_FIELD}.module")

    def limits(self, model_bytes: int, updates: int) -> Limits:
        """The run's limits: the parameters', and stdout bounded by what a right answer
        takes."""
        return Limits(
            timeout_s=self.timeout_s,
            memory_bytes=self.memory_mib << 20,
            output_bytes=model_bytes + OUTPUT_HEADER_BYTES + OUTPUT_BYTES_PER_UPDATE * updates,
        )


def encode_input(
    base: Mapping[str, Array], updates: Sequence[Mapping[str, Array]], samples: Sequence[int]
) -> bytes:
    """The module's stdin: `weights`, then `base/<name>` in the base's order, then every
    update's `update/<i>/<name>` (each reshaped to the base's shape)."""
    names = list(base)
    tensors: dict[str, Array] = {"weights": np.asarray(samples, np.float64)}
    tensors.update((f"base/{n}", base[n]) for n in names)
    for i, update in enumerate(updates):
        tensors.update((f"update/{i}/{n}", update[n].reshape(base[n].shape)) for n in names)
    metadata = {
        "strategy_contract": STRATEGY_CONTRACT,
        "updates": str(len(updates)),
        "tensors": json.dumps(names),
    }
    return safetensors.encode(tensors, metadata)


def decode_output(
    stdout: bytes, specs: Sequence[Spec], updates: int
) -> tuple[Tensors, list[float]]:
    """The module's answer checked against the model (`specs`: names, dtypes, shapes) and
    each update's weight; FailedPrecondition saying what is wrong."""
    try:
        container = safetensors.decode(stdout, "output")
    except safetensors.MalformedContainer as exc:
        raise FailedPrecondition(f"{exc}") from None
    if container.size != len(stdout):
        raise FailedPrecondition(
            f"output: {len(stdout) - container.size} bytes after the container"
        )
    want = [s.name for s in specs]
    if list(container.tensors) != want:
        raise FailedPrecondition(f"output: tensors {list(container.tensors)}, the model has {want}")
    model: Tensors = {}
    for spec in specs:
        arr = container.tensors[spec.name]
        if arr.dtype != spec.dtype or tuple(arr.shape) != tuple(spec.shape):
            raise FailedPrecondition(
                f"output: tensor {spec.name} is {arr.dtype} {list(arr.shape)}, the model's is "
                f"{spec.dtype} {list(spec.shape)}"
            )
        if not all_finite(arr.reshape(-1)):
            raise FailedPrecondition(f"output: tensor {spec.name} holds NaN or Inf")
        model[spec.name] = arr
    return model, _weights(container.metadata.get("weights"), updates)


def _weights(text: str | None, updates: int) -> list[float]:
    if text is None:
        raise FailedPrecondition("output: __metadata__.weights missing")
    try:
        raw = json.loads(text)
    except ValueError:
        raise FailedPrecondition("output: __metadata__.weights is not JSON") from None
    if (
        not isinstance(raw, list)
        or len(raw) != updates
        or not all(
            isinstance(w, int | float) and not isinstance(w, bool) and math.isfinite(w) and w >= 0
            for w in raw
        )
    ):
        raise FailedPrecondition(
            f"output: __metadata__.weights must list {updates} finite numbers >= 0"
        )
    return [float(w) for w in raw]


def compiled_strategy(runtime: WasmRuntime, wasm: bytes, sha256: str) -> CompiledModule:
    """`wasm` compiled in `runtime`, checked to declare the strategy contract (blocking)."""
    try:
        compiled = runtime.compile(wasm, sha256)
    except TaskError as exc:
        raise FailedPrecondition(exc.reason) from None
    if not any(e.name == STRATEGY_EXPORT for e in compiled.module.exports):
        raise FailedPrecondition(
            f"the module does not declare the strategy contract (no export {STRATEGY_EXPORT})"
        )
    return compiled


async def run_strategy(
    runtime: WasmRuntime,
    compiled: CompiledModule,
    base: Mapping[str, Array],
    updates: Sequence[Mapping[str, Array]],
    samples: Sequence[int],
    specs: Sequence[Spec],
    limits: Limits,
) -> tuple[Tensors, list[float]]:
    """Run the strategy module on one round's inputs (encoded and decoded in a thread, run in
    the runtime's thread): the new model and each update's weight."""
    stdin = await asyncio.to_thread(encode_input, base, updates, samples)
    try:
        out = await runtime.run(compiled, Invocation(["strategy"], {}, limits, stdin))
    except TaskError as exc:
        raise FailedPrecondition(exc.reason) from None
    finally:
        del stdin
    return await asyncio.to_thread(decode_output, out.stdout, specs, len(updates))


def _pull(ref: ImageRef) -> tuple[bytes, str]:
    """The module's bytes and sha256 from its registry (digests verified by the client)."""
    client = OciClient(ref.host, insecure=is_loopback(ref.host), timeout=PULL_TIMEOUT_S)
    try:
        layer = client.wasm_layer(ref)
        return client.fetch_layer(ref, layer), layer.sha256
    finally:
        client.close()


async def load_strategy(runtime: WasmRuntime, ref: ImageRef) -> CompiledModule:
    """The pinned module compiled in `runtime`: from its cache when this reference was
    pulled before, else pulled (verified) and compiled in a thread."""
    key = str(ref)
    with _LAYERS_LOCK:
        known = _LAYERS.get(key)
    if known is not None and (hit := runtime.cached(known)) is not None:
        return hit
    wasm, sha = await asyncio.to_thread(_pull, ref)
    compiled = await asyncio.to_thread(compiled_strategy, runtime, wasm, sha)
    with _LAYERS_LOCK:
        _LAYERS[key] = sha
        while len(_LAYERS) > _MAX_LAYERS:
            _LAYERS.pop(next(iter(_LAYERS)))
    return compiled


def _about(exc: PropellerError, ref: ImageRef) -> PropellerError:
    """`exc` (same class and status) with a message that names the module."""
    message = f"strategy wasm: module {ref}: {exc}"
    if isinstance(exc, RemoteError):
        return RemoteError(exc.code, message)
    return type(exc)(message)


class WasmStrategy(_HeldStrategy):
    """Holds every update (bounded by the aggregator's held-bytes limit, like the order
    statistics), then `prepare` runs the module once on all of them."""

    name = "wasm"
    params_type = WasmParams
    needs_base = True

    def __init__(self, params: StrategyParams) -> None:
        super().__init__(params)
        self._samples: list[int] = []
        self._result: Tensors | None = None
        self._weights: list[float] | None = None
        self.runtime = WasmRuntime.shared()

    def add(self, tensors: Mapping[str, Array], num_samples: int) -> None:
        super().add(tensors, num_samples)
        self._samples.append(int(num_samples))

    async def prepare(self, base: Tensors | None, state: Tensors | None) -> None:
        specs = self._checked_specs()
        if base is None:
            raise InvalidArgument(f"base: strategy {self.name} needs the round's base model")
        p = self.params
        assert isinstance(p, WasmParams)
        ref = p.ref
        try:
            compiled = await load_strategy(self.runtime, ref)
            limits = p.limits(sum(s.nbytes for s in specs), self.count)
            self._result, self._weights = await run_strategy(
                self.runtime, compiled, base, self._updates, self._samples, specs, limits
            )
        except PropellerError as exc:
            raise _about(exc, ref) from None

    def result(self, base: Tensors | None, state: Tensors | None) -> tuple[Tensors, Tensors | None]:
        if self._result is None:
            raise FailedPrecondition("strategy wasm: the module has not run (prepare first)")
        return self._result, None

    def weights(self) -> list[float]:
        return list(self._weights or [])
