"""The project's error types and their one mapping onto gRPC status codes.

Domain code raises these anywhere; servicers wrap their bodies in `grpc_errors(context)`,
which turns them into `context.abort(code, message)`. Anything else escaping a servicer is a
bug and surfaces as INTERNAL with the exception logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import grpc

log = logging.getLogger(__name__)


class PropellerError(Exception):
    """Root of the project's errors. `code` is the gRPC status the error maps to, declared on
    each subclass's line (`class NotFound(PropellerError, code=...)`); a subclass without one
    keeps its parent's."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init_subclass__(cls, code: grpc.StatusCode | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if code is not None:
            cls.code = code


# One class per status, so callers catch by type (and mypy sees each).
class InvalidArgument(PropellerError, code=grpc.StatusCode.INVALID_ARGUMENT): ...


class NotFound(PropellerError, code=grpc.StatusCode.NOT_FOUND): ...


class AlreadyExists(PropellerError, code=grpc.StatusCode.ALREADY_EXISTS): ...


class FailedPrecondition(PropellerError, code=grpc.StatusCode.FAILED_PRECONDITION): ...


class Unavailable(PropellerError, code=grpc.StatusCode.UNAVAILABLE): ...


class DeadlineExceeded(PropellerError, code=grpc.StatusCode.DEADLINE_EXCEEDED): ...


class ResourceExhausted(PropellerError, code=grpc.StatusCode.RESOURCE_EXHAUSTED): ...


class PermissionDenied(PropellerError, code=grpc.StatusCode.PERMISSION_DENIED): ...


class Unauthenticated(PropellerError, code=grpc.StatusCode.UNAUTHENTICATED):
    """The caller's certificate names no usable identity (or is revoked)."""


class DataLoss(PropellerError, code=grpc.StatusCode.DATA_LOSS):
    """Stored data failed its integrity check."""


# A downstream status back to our error: every class above, by its own `code`, so the two
# directions cannot disagree and a new class maps both ways. (`RemoteError`, defined below,
# is not one of them: it keeps whatever status came.)
_FROM_GRPC: dict[grpc.StatusCode, type[PropellerError]] = {
    cls.code: cls for cls in PropellerError.__subclasses__()
}


# Status details travel in an HTTP/2 trailer, percent-encoded (up to 3 bytes per byte); a
# client drops trailers over 8 KiB (at random) or 16 KiB (always) and reports RESOURCE_EXHAUSTED
# instead of our status. Messages that echo a huge field back are cut to this many bytes.
MAX_DETAILS_BYTES = 1024


def short_details(message: str, limit: int = MAX_DETAILS_BYTES) -> str:
    """`message`, cut to at most `limit` UTF-8 bytes (plus a note saying so)."""
    data = message.encode("utf-8", "replace")
    if len(data) <= limit:
        return message
    head = data[:limit].decode("utf-8", "ignore")
    return f"{head}... [{len(data)} bytes, truncated]"


def from_rpc_error(err: grpc.aio.AioRpcError, what: str) -> PropellerError:
    """Translate a failed downstream call into our own error, keeping its code."""
    cls = _FROM_GRPC.get(err.code(), Unavailable)
    return cls(f"{what}: {err.code().name}: {err.details()}")


class RemoteError(PropellerError):
    """A downstream call's own status, code (any code) and details as they came, for clients
    that show or classify the server's answer rather than word it anew (the CLI prints
    "NOT_FOUND: <details>"; the proplet retries UNAVAILABLE but never INTERNAL)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code


def as_remote_error(err: grpc.aio.AioRpcError, what: str) -> PropellerError:
    """A `translate` for `rpc_errors` that keeps the status as it came (`RemoteError`)."""
    return RemoteError(err.code(), err.details() or "")


@contextlib.contextmanager
def rpc_errors(
    what: str,
    translate: Callable[[grpc.aio.AioRpcError, str], PropellerError] = from_rpc_error,
) -> Iterator[None]:
    """`with rpc_errors("Coordinator.StartRound"): await stub.StartRound(...)` -- the client
    side of `grpc_errors`: a failed call inside leaves as our own error (`from_rpc_error`, its
    status code kept, or what `translate` makes of it), so callers handle one family of
    exceptions, never `AioRpcError`."""
    try:
        yield
    except grpc.aio.AioRpcError as err:
        raise translate(err, what) from None


class grpc_errors:
    """`async with grpc_errors(context, "Service.Method"):` maps domain errors raised inside a
    servicer method to a gRPC status. It never swallows an exception (`context.abort` raises),
    which `__aexit__` returning None tells the type checker."""

    def __init__(self, context: grpc.aio.ServicerContext[Any, Any], method: str) -> None:
        self.context = context
        self.method = method

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if exc is None or isinstance(exc, grpc.aio.AbortError | asyncio.CancelledError):
            return
        if isinstance(exc, PropellerError):
            details = short_details(str(exc))
            log.info("[%s] %s: %s", self.method, exc.code.name, details)
            await self.context.abort(exc.code, details)
        if isinstance(exc, Exception):
            log.error("[%s] unexpected error", self.method, exc_info=exc)
            await self.context.abort(grpc.StatusCode.INTERNAL, f"{self.method}: internal error")
