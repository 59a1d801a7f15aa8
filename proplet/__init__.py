"""Proplet: the edge agent that runs WASM tasks (and federated-learning round tasks)."""

from proplet.app import Proplet, main
from proplet.config import PropletConfig
from proplet.errors import TaskError, TaskFailed, TaskInterrupted
from proplet.runner import CompiledModule, Invocation, Limits, RunControl, RunOutput, WasmRuntime

__all__ = [
    "CompiledModule",
    "Invocation",
    "Limits",
    "Proplet",
    "PropletConfig",
    "RunControl",
    "RunOutput",
    "TaskError",
    "TaskFailed",
    "TaskInterrupted",
    "WasmRuntime",
    "main",
]
