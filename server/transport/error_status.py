"""The one place where errors become gRPC statuses with google.rpc details."""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from enrollment.server.errors import EnrollmentError

DOMAIN = "enrollment.v1"


def _pack(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def to_status(error: EnrollmentError) -> grpc.Status:
    """A grpc.Status carrying ErrorInfo, and BadRequest for INVALID_ARGUMENT."""
    return rpc_status.to_status(status_of(error))


def status_of(error: EnrollmentError) -> status_pb2.Status:
    """The google.rpc.Status of an error (a batch item's result carries it as is)."""
    details = [
        _pack(
            error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=error.metadata)
        )
    ]
    if error.code == "INVALID_ARGUMENT":
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=v.field, description=v.description
                )
                for v in error.violations
            ]
        )
        details.append(_pack(bad_request))
    return status_pb2.Status(
        code=code_pb2.Code.Value(error.code), message=error.message, details=details
    )


# What an unexpected failure is answered with (its code and reason: INTERNAL).
INTERNAL_ERROR = EnrollmentError("internal error; the server log has the details")
INTERNAL = to_status(INTERNAL_ERROR)


def with_trailers(status: grpc.Status, extra: tuple[tuple[str, str], ...]) -> grpc.Status:
    """The same status with more trailing metadata (a request id, say)."""
    # rpc_status.to_status makes a namedtuple; grpc.Status declares only its fields.
    replace = status._replace  # type: ignore[attr-defined]
    replaced: grpc.Status = replace(trailing_metadata=tuple(status.trailing_metadata) + extra)
    return replaced


# rpc_status.GRPC_DETAILS_METADATA_KEY (not in its stubs).
_DETAILS_KEY = "grpc-status-details-bin"


def reason_of(trailing_metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The ErrorInfo reason a status's trailers carry (as to_status put it there); ""
    when they carry none."""
    for key, value in trailing_metadata or ():
        if key == _DETAILS_KEY and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            info = error_details_pb2.ErrorInfo()
            for detail in status.details:
                if detail.Unpack(info):  # fills it only when the detail is an ErrorInfo
                    return info.reason
    return ""
