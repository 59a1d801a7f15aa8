"""What a federated task's module printed, checked: a training task's update and an
evaluation task's results, in the trainer contract the module speaks (v1: one JSON object on
stdout; v2: one safetensors container). Every failure is TaskFailed saying what is wrong."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

from proplet import safetensors
from proplet.errors import TaskFailed
from proplet.federated import CONTRACT_V1, CONTRACT_V2, FlTask, Update
from server.errors import InvalidArgument
from server.messages import json_object
from server.streams import UpdateMeta
from server.tensors import (
    Tensors,
    check_finite,
    model_from_json,
    specs_of,
)

log = logging.getLogger(__name__)


def _bad_update(message: str) -> TaskFailed:
    return TaskFailed(f"invalid update: {message}")


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def parse_update(
    stdout: bytes,
    fl: FlTask,
    proplet_id: str,
    base: Tensors,
    dataset_size: int,
    *,
    base_sha256: str = "",
    module_digest: str = "",
    contract: int = CONTRACT_V1,
    fuel_consumed: int = 0,
) -> Update:
    """Check the module's stdout (in the trainer contract it speaks) against the round and
    the base model; the update to submit (carrying `base_sha256`, `module_digest` and the
    fuel the run consumed, unsigned yet)."""
    if contract == CONTRACT_V2:
        fields, tensors = _update_v2(stdout, base)
    else:
        fields = _update_v1(stdout)
        if "update" not in fields:
            raise _bad_update("no 'update' object")
        try:
            tensors = model_from_json(fields["update"], specs_of(base), "update")
        except InvalidArgument as exc:
            raise _bad_update(str(exc)) from None
    try:
        check_finite(tensors, "update")
    except InvalidArgument as exc:
        raise _bad_update(str(exc)) from None
    if fields.get("round_id") != fl.round_id:
        raise _bad_update(f"round_id {fields.get('round_id')!r}, the task is for {fl.round_id!r}")
    for key, expected in (("proplet_id", proplet_id), ("base_model_uri", fl.model_uri)):
        got = fields.get(key, "")
        if got not in ("", expected):
            raise _bad_update(f"{key} {got!r}, expected {expected!r}")
    num_samples = fields.get("num_samples")
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples <= 0:
        raise _bad_update(f"num_samples {num_samples!r} is not a positive integer")
    if num_samples > dataset_size:
        raise _bad_update(
            f"num_samples {num_samples} exceeds the {dataset_size} samples it was given"
        )
    metrics = fields.get("metrics") or {}
    if not isinstance(metrics, dict) or not all(
        isinstance(k, str) and _is_number(v) and math.isfinite(v) for k, v in metrics.items()
    ):
        raise _bad_update(f"metrics {metrics!r} is not an object of finite numbers")
    meta = UpdateMeta(
        round_id=fl.round_id,
        proplet_id=proplet_id,
        base_model_uri=fl.model_uri,
        num_samples=num_samples,
        metrics={k: float(v) for k, v in metrics.items()},
        base_model_sha256=base_sha256,
        module_digest=module_digest,
        fuel_consumed=fuel_consumed,
    )
    return Update(meta, tensors)


def _update_v1(stdout: bytes) -> dict[str, Any]:
    """Contract v1: stdout is one JSON object."""
    try:
        text = stdout.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise _bad_update("stdout is not UTF-8") from None
    if not text:
        raise _bad_update("the module printed nothing on stdout")
    return json_object(
        text,
        lambda exc: _bad_update(f"stdout is not one JSON object ({exc}): {text[:80]!r}"),
        lambda kind: _bad_update(f"stdout is JSON {kind}, not an object"),
    )


def _container_v2(stdout: bytes, failure: Callable[[str], TaskFailed]) -> Any:
    """Contract v2: stdout is exactly one safetensors container."""
    if not stdout:
        raise failure("the module printed nothing on stdout")
    try:
        container = safetensors.decode(stdout, "stdout")
    except safetensors.MalformedContainer as exc:
        raise failure(f"{exc} (contract v2 wants one safetensors container)") from None
    if container.size != len(stdout):
        raise failure(
            f"stdout: {len(stdout) - container.size} bytes follow the safetensors container"
        )
    return container


def _metadata_fields(
    metadata: Mapping[str, str], failure: Callable[[str], TaskFailed]
) -> dict[str, Any]:
    """The v2 `__metadata__` strings as the values v1 prints: num_samples an integer (decimal
    digits), metrics the JSON object they hold."""
    fields: dict[str, Any] = dict(metadata)
    raw = metadata.get("num_samples")
    if raw is not None and raw.isascii() and raw.isdigit():
        fields["num_samples"] = int(raw)
    if "metrics" in metadata:
        try:
            fields["metrics"] = json.loads(metadata["metrics"])
        except ValueError as exc:
            raise failure(f"__metadata__.metrics is not JSON ({exc})") from None
    return fields


def _update_v2(stdout: bytes, base: Tensors) -> tuple[dict[str, Any], Tensors]:
    container = _container_v2(stdout, _bad_update)
    got = container.tensors
    missing = [name for name in base if name not in got]
    if missing:
        raise _bad_update(f"update: missing tensors {missing}")
    extra = sorted(set(got) - set(base))
    if extra:
        raise _bad_update(f"update: unexpected tensors {extra}")
    tensors: Tensors = {}
    for name, want in base.items():
        arr = got[name]
        if arr.dtype != want.dtype:
            raise _bad_update(
                f"update.{name}: dtype {safetensors.DTYPE_NAMES[arr.dtype]}, base model has "
                f"{safetensors.DTYPE_NAMES.get(want.dtype, str(want.dtype))}"
            )
        if arr.shape != want.shape:
            raise _bad_update(
                f"update.{name}: shape {list(arr.shape)}, base model has {list(want.shape)}"
            )
        tensors[name] = arr.copy()  # off the stdout buffer, writable
    return _metadata_fields(container.metadata, _bad_update), tensors


def _bad_evaluation(message: str) -> TaskFailed:
    return TaskFailed(f"invalid evaluation: {message}")


def parse_evaluation(stdout: bytes, dataset_size: int, contract: int = CONTRACT_V1) -> str:
    """The results of an evaluation task: the module's {"num_samples", "metrics"} (v2: its
    container's metadata) checked (a positive sample count no larger than the data it was
    given, finite metrics) and re-encoded with nothing else in it."""
    value: object
    if contract == CONTRACT_V2:
        container = _container_v2(stdout, _bad_evaluation)
        value = _metadata_fields(container.metadata, _bad_evaluation)
    else:
        try:
            value = json.loads(stdout.decode("utf-8").strip())
        except (UnicodeDecodeError, ValueError) as exc:
            raise _bad_evaluation(f"stdout is not one JSON object ({exc})") from None
    if not isinstance(value, dict):
        raise TaskFailed(
            f"invalid evaluation: stdout is JSON {type(value).__name__}, not an object"
        )
    num_samples = value.get("num_samples")
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples <= 0:
        raise TaskFailed(
            f"invalid evaluation: num_samples {num_samples!r} is not a positive integer"
        )
    if num_samples > dataset_size:
        raise TaskFailed(
            f"invalid evaluation: num_samples {num_samples} exceeds the {dataset_size} samples "
            "in DATASET_DATA"
        )
    metrics = value.get("metrics")
    if not isinstance(metrics, dict) or not all(
        isinstance(k, str) and _is_number(v) and math.isfinite(v) for k, v in metrics.items()
    ):
        raise TaskFailed(
            f"invalid evaluation: metrics {str(metrics)[:80]} is not an object of finite numbers"
        )
    return json.dumps(
        {"num_samples": num_samples, "metrics": {k: float(v) for k, v in metrics.items()}}
    )
