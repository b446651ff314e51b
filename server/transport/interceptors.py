"""Wraps each EnrollmentService call: auth, errors to statuses, metrics, one log line."""

from __future__ import annotations

import logging
import re
import time
import uuid

import grpc
from google.protobuf.message import DecodeError

from enrollment.server import callstate
from enrollment.server.errors import CallEnded, EnrollmentError, InvalidField
from enrollment.server.operations.metrics import RpcMetrics
from enrollment.server.transport import error_status
from enrollment.server.transport.auth import Authenticator, required_role

log = logging.getLogger("enrollment.rpc")

SERVICE_PREFIX = "/enrollment.v1.EnrollmentService/"

# A caller's x-request-id is kept (and logged) only when it is short and plain;
# anything else is replaced by a fresh one, so logs cannot be forged through it.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


class RpcInterceptor(grpc.ServerInterceptor):
    def __init__(
        self,
        *,
        authenticator: Authenticator | None = None,
        metrics: RpcMetrics | None = None,
    ) -> None:
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}
        self._auth = authenticator
        self._metrics = metrics

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
            unary_unary=_guard(handler.unary_unary, method, self._auth, self._metrics),
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


def _guard(behavior, method: str, auth: Authenticator | None, metrics: RpcMetrics | None):
    name = method.rsplit("/", 1)[-1]
    needed = required_role(name)
    latency = metrics.latency(name) if metrics is not None else None

    def guarded(request, context: grpc.ServicerContext):
        start = time.perf_counter()
        code, reason, caller = "OK", "", "-"
        request_id = authorization = None
        for key, value in context.invocation_metadata():
            if key == "x-request-id":
                request_id = value
            elif key == "authorization":
                authorization = value
        if request_id is None or not _REQUEST_ID.fullmatch(request_id):
            request_id = uuid.uuid4().hex
        trailer = (("x-request-id", request_id),)
        context.set_trailing_metadata(trailer)
        if metrics is not None:
            metrics.in_flight.inc()
        bound = callstate.bind(context.is_active)
        who = None
        try:
            if auth is not None:
                token = auth.authenticate(authorization)
                caller = token.name
                auth.authorize(token, name, needed)
            who = callstate.bind_caller(request_id, caller if auth is not None else "")
            if isinstance(request, _Undecodable):
                raise InvalidField(
                    f"the request is not a valid {request.type_name} (is every string field UTF-8?)"
                )
            return behavior(request, context)
        except CallEnded as error:
            # The caller is gone; its answer is already decided. This is for logs and metrics.
            code = "DEADLINE_EXCEEDED" if context.time_remaining() <= 0 else "CANCELLED"
            reason = error.reason
            context.abort_with_status(
                error_status.with_trailers(error_status.to_status(error), trailer)
            )
        except EnrollmentError as error:
            code, reason = error.code, error.reason
            context.abort_with_status(
                error_status.with_trailers(error_status.to_status(error), trailer)
            )
        except Exception:
            code, reason = "INTERNAL", "INTERNAL"
            log.exception("rpc %s failed unexpectedly", name)
            context.abort_with_status(error_status.with_trailers(error_status.INTERNAL, trailer))
        finally:
            if who is not None:
                callstate.unbind_caller(who)
            callstate.unbind(bound)
            elapsed = time.perf_counter() - start
            if metrics is not None:
                metrics.in_flight.dec()
                latency.observe(elapsed)
                metrics.count(name, code)
            if log.isEnabledFor(logging.INFO):
                _log_call(name, code, reason or "-", elapsed, context.peer(), caller, request_id)

    return guarded


def _log_call(method, code, reason, elapsed, peer, caller, request_id) -> None:
    duration_ms = round(elapsed * 1000, 2)
    log.info(
        "rpc method=%s code=%s reason=%s duration_ms=%.2f peer=%s token=%s request_id=%s",
        method,
        code,
        reason,
        duration_ms,
        peer,
        caller,
        request_id,
        extra={
            "rpc": {
                "method": method,
                "code": code,
                "reason": reason,
                "duration_ms": duration_ms,
                "peer": peer,
                "token": caller,
                "request_id": request_id,
            }
        },
    )
