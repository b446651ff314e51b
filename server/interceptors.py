"""Wraps each EnrollmentService call: errors to statuses, surprises to INTERNAL, one log line."""

from __future__ import annotations

import logging
import time

import grpc
from google.protobuf.message import DecodeError

from server import status
from server.errors import EnrollmentError, InvalidField

log = logging.getLogger("enrollment.rpc")

SERVICE_PREFIX = "/enrollment.v1.EnrollmentService/"


class RpcInterceptor(grpc.ServerInterceptor):
    def __init__(self) -> None:
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is not None:
            return wrapped
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None or not method.startswith(SERVICE_PREFIX):
            return handler
        wrapped = handler._replace(
            request_deserializer=_tolerant(handler.request_deserializer),
            unary_unary=_guard(handler.unary_unary, method),
        )
        self._wrapped[method] = wrapped
        return wrapped


class _Undecodable:
    """Stands in for a request body that is not valid protobuf (say, a string not in UTF-8)."""

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name


def _tolerant(deserialize):
    # grpc answers a body it cannot parse with a bare INTERNAL; it is the caller's
    # mistake, so hand it to the guard, which answers INVALID_ARGUMENT.
    type_name = deserialize.__self__.DESCRIPTOR.full_name

    def parse(data: bytes):
        try:
            return deserialize(data)
        except DecodeError:
            return _Undecodable(type_name)

    return parse


def _guard(behavior, method: str):
    name = method.rsplit("/", 1)[-1]

    def guarded(request, context: grpc.ServicerContext):
        start = time.perf_counter()
        code, reason = "OK", ""
        try:
            if isinstance(request, _Undecodable):
                raise InvalidField(
                    f"the request is not a valid {request.type_name} (is every string field UTF-8?)"
                )
            return behavior(request, context)
        except EnrollmentError as error:
            code, reason = error.code, error.reason
            context.abort_with_status(status.to_status(error))
        except Exception:
            code, reason = "INTERNAL", "INTERNAL"
            log.exception("rpc %s failed unexpectedly", name)
            context.abort_with_status(status.INTERNAL)
        finally:
            log.info(
                "rpc method=%s code=%s reason=%s duration_ms=%.2f",
                name,
                code,
                reason or "-",
                (time.perf_counter() - start) * 1000,
            )

    return guarded
