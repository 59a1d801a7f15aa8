"""The project's error types and their one mapping onto gRPC status codes.

Domain code raises these anywhere; servicers wrap their bodies in `grpc_errors(context)`,
which turns them into `context.abort(code, message)`. Anything else escaping a servicer is a
bug and surfaces as INTERNAL with the exception logged.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc

log = logging.getLogger(__name__)


class PropellerError(Exception):
    """Root of the project's errors. `code` is the gRPC status the error maps to."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(PropellerError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(PropellerError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(PropellerError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(PropellerError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(PropellerError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(PropellerError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class ResourceExhausted(PropellerError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


_FROM_GRPC: dict[grpc.StatusCode, type[PropellerError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
}


def from_rpc_error(err: grpc.aio.AioRpcError, what: str) -> PropellerError:
    """Translate a failed downstream call into our own error, keeping its code."""
    cls = _FROM_GRPC.get(err.code(), Unavailable)
    return cls(f"{what}: {err.code().name}: {err.details()}")


@asynccontextmanager
async def grpc_errors(
    context: grpc.aio.ServicerContext[Any, Any], method: str
) -> AsyncIterator[None]:
    """Map domain errors raised inside a servicer method to a gRPC status."""
    try:
        yield
    except PropellerError as exc:
        log.info("[%s] %s: %s", method, exc.code.name, exc)
        await context.abort(exc.code, str(exc))
    except grpc.aio.AbortError:
        raise
    except Exception:
        log.exception("[%s] unexpected error", method)
        await context.abort(grpc.StatusCode.INTERNAL, f"{method}: internal error")
