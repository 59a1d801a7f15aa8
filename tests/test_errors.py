"""The error types' statuses (`server.errors`): each class's own, inherited by a subclass, and
the way back from a downstream status to the same class."""

from __future__ import annotations

import grpc
import pytest

from server import errors
from server.coordinator.records import StateCorrupted
from server.registry.lineage import LineageCorrupted
from server.registry.store import ModelCorrupted

STATUS_OF = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.DataLoss: grpc.StatusCode.DATA_LOSS,
}


def failed_call(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), "it broke", None)


def test_the_root_is_internal() -> None:
    assert errors.PropellerError("x").code is grpc.StatusCode.INTERNAL


@pytest.mark.parametrize(
    ("cls", "code"), STATUS_OF.items(), ids=lambda v: getattr(v, "__name__", "")
)
def test_each_class_has_its_status_both_ways(
    cls: type[errors.PropellerError], code: grpc.StatusCode
) -> None:
    assert cls.code is code
    assert cls("x").code is code
    back = errors.from_rpc_error(failed_call(code), "Svc.Call")
    assert type(back) is cls
    assert str(back) == f"Svc.Call: {code.name}: it broke"


def test_every_status_class_is_listed() -> None:
    assert set(errors.PropellerError.__subclasses__()) - {errors.RemoteError} == set(STATUS_OF)


@pytest.mark.parametrize("cls", [StateCorrupted, LineageCorrupted, ModelCorrupted])
def test_a_subclass_keeps_its_parents_status(cls: type[errors.PropellerError]) -> None:
    assert issubclass(cls, errors.DataLoss)
    assert cls.code is grpc.StatusCode.DATA_LOSS


def test_a_status_without_a_class_is_unavailable_and_remote_keeps_any() -> None:
    back = errors.from_rpc_error(failed_call(grpc.StatusCode.INTERNAL), "Svc.Call")
    assert type(back) is errors.Unavailable
    remote = errors.as_remote_error(failed_call(grpc.StatusCode.INTERNAL), "Svc.Call")
    assert remote.code is grpc.StatusCode.INTERNAL
    assert str(remote) == "it broke"
    assert errors.DataLoss.code is grpc.StatusCode.DATA_LOSS  # a RemoteError sets its own only
