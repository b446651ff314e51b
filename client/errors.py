"""ClientError (a failed call, as both clients raise it) and BatchResult (one batch item)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from enrollment.v1 import enrollment_pb2 as pb

# google.rpc.Code numbers to grpc.StatusCode values.
_CODES = {code.value[0]: code for code in grpc.StatusCode}


class ClientError(Exception):
    """A failed call: the gRPC status code name, the ErrorInfo reason and the BadRequest fields."""

    def __init__(
        self,
        code: str,
        message: str,
        reason: str = "",
        fields: list[str] | None = None,
        metadata: dict[str, str] | None = None,
        hint: str = "",
    ) -> None:
        super().__init__(code, message, reason)
        self.code = code
        self.message = message
        self.reason = reason
        self.fields = list(fields or [])
        self.metadata = dict(metadata or {})
        # What the failure suggests about this client's settings (see connection_hint).
        self.hint = hint

    def __str__(self) -> str:
        head = f"{self.code} {self.reason}" if self.reason else self.code
        return f"{head}: {self.explained}"

    @property
    def explained(self) -> str:
        """The message, and the hint in brackets when there is one."""
        return f"{self.message} ({self.hint})" if self.hint else self.message

    @classmethod
    def from_status(cls, status: status_pb2.Status) -> ClientError:
        """A batch item's google.rpc.Status as an error."""
        code = _CODES[status.code].name if status.code in _CODES else "UNKNOWN"
        return cls._with_details(code, status.message, status)

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> ClientError:
        # Every RpcError a unary call raises is also a grpc.Call; getattr guards the
        # odd one that is not (a bare RpcError from an interceptor, say).
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        message = (error.details() if hasattr(error, "details") else None) or ""
        try:
            # grpc.aio's errors are not grpc.Call, but have the same code/details/trailers.
            status = rpc_status.from_call(cast(grpc.Call, error))
        except (ValueError, AttributeError):
            # Details that contradict the status line are not trusted; code and message stand.
            status = None
        return cls._with_details(code.name, message, status)

    @classmethod
    def _with_details(
        cls, code: str, message: str, status: status_pb2.Status | None
    ) -> ClientError:
        info = error_details_pb2.ErrorInfo()
        bad = error_details_pb2.BadRequest()
        for detail in status.details if status is not None else ():
            # Unpack fills the message only when the detail is of its type.
            detail.Unpack(info) or detail.Unpack(bad)
        return cls(
            code=code,
            message=message,
            reason=info.reason,
            fields=[v.field for v in bad.field_violations],
            metadata=dict(info.metadata),
        )


def call_failure(error: grpc.RpcError, *, tls: bool, client_cert: bool) -> ClientError:
    """The ClientError of a failed call, with connection_hint's hint on UNAVAILABLE."""
    failure = ClientError.from_rpc_error(error)
    if failure.code == "UNAVAILABLE":
        failure.hint = connection_hint(failure.message, tls=tls, client_cert=client_cert)
    return failure


def connection_hint(message: str, *, tls: bool, client_cert: bool) -> str:
    """What an UNAVAILABLE's message suggests about the client's security settings, or "".

    A TLS server closes a plaintext client's connection, and a mutual-TLS server that of a
    client without a certificate, and grpc reports only "Socket closed"; a plaintext
    server answers a TLS hello with bytes TLS cannot read (WRONG_VERSION_NUMBER).
    Options are named as enrollment-client and `enrollment-server health` spell them
    (EnrollmentClient takes the same names as keywords: tls_ca, tls_cert, tls_key).
    """
    if tls and "WRONG_VERSION_NUMBER" in message:
        return "the server may not speak TLS: connect without --tls-ca and --tls-cert"
    if tls and "CERTIFICATE_VERIFY_FAILED" in message:
        return "the server's certificate is not signed by the CA of --tls-ca"
    if "Socket closed" not in message:
        return ""
    if not tls:
        return (
            "the server may expect TLS: give --tls-ca (and --tls-cert/--tls-key when it "
            "asks for a client certificate)"
        )
    if not client_cert:
        return "the server may ask for a client certificate (mutual TLS): give --tls-cert/--tls-key"
    return "the server may not accept this client certificate, or may not speak TLS"


@dataclass(frozen=True)
class BatchResult:
    """One item of a batch: its enrollment (for a drop: whoever was promoted, if anyone)
    when it was applied, else its error."""

    enrollment: pb.Enrollment | None
    error: ClientError | None

    @property
    def ok(self) -> bool:
        return self.error is None
