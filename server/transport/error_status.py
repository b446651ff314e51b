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


# grpc's C-core clients (grpcio, and so enrollment-client; C++, Ruby, PHP) refuse a
# call's trailers past 8 KiB (grpc.max_metadata_size's soft limit; always past 16 KiB)
# and answer RESOURCE_EXHAUSTED with nothing of the status. A status names its field
# violations twice, in its message (grpc-message, percent-encoded) and in BadRequest
# (grpc-status-details-bin, base64): in the trailers both lists stop within these
# bounds, in order, and the message says how many there were in all. A batch item's
# status travels in the response message and keeps every violation (status_of).
MESSAGE_BUDGET = 1536  # bytes of grpc-message as sent
DETAILS_BUDGET = 4096  # bytes of grpc-status-details-bin as sent (it holds the message too)


def to_status(error: EnrollmentError) -> grpc.Status:
    """A grpc.Status carrying ErrorInfo, and BadRequest for INVALID_ARGUMENT, within
    the size a C-core client accepts in trailers."""
    return rpc_status.to_status(_within_budget(status_of(error), len(error.violations)))


def _within_budget(status: status_pb2.Status, violations: int) -> status_pb2.Status:
    if (
        _sent_length(status.message) <= MESSAGE_BUDGET
        and _base64_length(status.ByteSize()) <= DETAILS_BUDGET
    ):
        return status
    suffix = " …"
    if violations:
        suffix += f" ({violations} field violation{'s' if violations > 1 else ''} in all)"
    message = status.message
    room = MESSAGE_BUDGET - _sent_length(suffix)
    if _sent_length(message) > room:
        end = _prefix_within(message, room)
        # Whole violations ("field: description; ...") where the message lists them.
        boundary = message.rfind("; ", 0, end)
        message = message[: boundary if boundary > 0 else end] + suffix
    elif violations:
        message += suffix
    bad = error_details_pb2.BadRequest()
    others = [d for d in status.details if not d.Unpack(bad)]
    # The Status in grpc-status-details-bin holds the message, ErrorInfo and BadRequest.
    room = DETAILS_BUDGET * 3 // 4 - 16 - len(message.encode())
    room -= sum(d.ByteSize() + 4 for d in others)
    details = [*others, _pack(_listed(bad, room))] if bad.field_violations else others
    return status_pb2.Status(code=status.code, message=message, details=details)


def _listed(bad: error_details_pb2.BadRequest, room: int) -> error_details_pb2.BadRequest:
    """bad's first violations whose encoding fits in room bytes (at least one)."""
    kept = error_details_pb2.BadRequest()
    used = 0
    for violation in bad.field_violations:
        size = violation.ByteSize() + 4  # its tag and length
        if used + size > room:
            if kept.field_violations:
                break
            # One violation alone too long (a caller's long value quoted): cut its text.
            violation = error_details_pb2.BadRequest.FieldViolation(
                field=violation.field[: room // 8], description=violation.description[: room // 8]
            )
            size = violation.ByteSize() + 4
        kept.field_violations.append(violation)
        used += size
    return kept


def _prefix_within(text: str, room: int) -> int:
    """The length of text's longest prefix whose grpc-message form fits in room bytes."""
    used = 0
    for index, char in enumerate(text):
        used += _sent_length(char)
        if used > room:
            return index
    return len(text)


_PRINTABLE = bytes(b for b in range(0x20, 0x7F) if b != 0x25)  # sent as they are


def _sent_length(text: str) -> int:
    """text's length in grpc-message: printable ASCII as is, other bytes as %XX."""
    raw = text.encode()
    return len(raw) + 2 * len(raw.translate(None, _PRINTABLE))


def _base64_length(size: int) -> int:
    return (size + 2) // 3 * 4


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
