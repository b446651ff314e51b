"""Wraps each EnrollmentService call: errors to statuses, surprises to INTERNAL, one log line."""

from __future__ import annotations

import logging
import time

import grpc

from server import status
from server.errors import EnrollmentError

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
        wrapped = handler._replace(unary_unary=_guard(handler.unary_unary, method))
        self._wrapped[method] = wrapped
        return wrapped


def _guard(behavior, method: str):
    name = method.rsplit("/", 1)[-1]

    def guarded(request, context: grpc.ServicerContext):
        start = time.perf_counter()
        code, reason = "OK", ""
        try:
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
