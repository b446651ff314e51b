"""The server span of each EnrollmentService call, continuing the caller's W3C trace.

Installed (startup/server.py) only when tracing is on (operations/tracing.py), as the
outermost interceptor: the span is the current span while the rest of the chain runs,
so the call's database work (run in a copy of this context) makes its transaction
spans as children of it. Health checks and reflection are not traced.

Span: "enrollment.v1.EnrollmentService/<Method>", kind SERVER, with rpc.system "grpc",
rpc.service, rpc.method, rpc.grpc.status_code (int), enrollment.request_id (the
call's x-request-id) and, on failure, enrollment.error.reason (ErrorInfo's reason)
and status ERROR. A WatchEvents span lasts as long as its stream.
"""

from __future__ import annotations

import asyncio

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import Getter

from enrollment.server.operations.tracing import REASON, REQUEST_ID
from enrollment.server.transport import error_status

SERVICE_PREFIX = "/enrollment.v1.EnrollmentService/"


class _MetadataGetter(Getter):
    """Reads the propagators' keys (traceparent, tracestate, baggage) from call metadata."""

    def get(self, carrier, key: str) -> list[str] | None:
        found = [value for name, value in carrier if name == key]
        return found or None

    def keys(self, carrier) -> list[str]:
        return [name for name, _ in carrier]


_GETTER = _MetadataGetter()


class TracingInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, tracer: trace.Tracer) -> None:
        self._tracer = tracer
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is not None:
            return wrapped
        handler = await continuation(handler_call_details)
        if handler is None or not method.startswith(SERVICE_PREFIX):
            return handler
        traced = _Traced(self._tracer, method)
        for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            behavior = getattr(handler, kind)
            if behavior is not None:
                wrapped = handler._replace(**{kind: traced.wrap(behavior)})
                break
        else:
            return handler
        self._wrapped[method] = wrapped
        return wrapped


class _Traced:
    """The spans of one method."""

    def __init__(self, tracer: trace.Tracer, method: str) -> None:
        self._tracer = tracer
        self._name = method[1:]
        service, name = self._name.rsplit("/", 1)
        self._attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}

    def wrap(self, behavior):
        async def traced(request_or_iterator, context: grpc.aio.ServicerContext):
            parent = propagate.extract(context.invocation_metadata() or (), getter=_GETTER)
            span = self._tracer.start_span(
                self._name, context=parent, kind=trace.SpanKind.SERVER, attributes=self._attributes
            )
            token = otel_context.attach(trace.set_span_in_context(span, parent))
            code = None
            try:
                result = behavior(request_or_iterator, context)
                if hasattr(result, "__aiter__"):  # a stream of replies, as an async generator
                    async for reply in result:
                        await context.write(reply)
                    return None
                return await result
            except asyncio.CancelledError:
                # The caller cancelled, its deadline passed, or the server stopped.
                remaining = context.time_remaining()
                expired = remaining is not None and remaining <= 0
                code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
                raise
            except grpc.aio.AbortError:
                raise  # the status is the context's
            except BaseException:
                code = grpc.StatusCode.UNKNOWN  # what grpc answers an unhandled exception
                raise
            finally:
                otel_context.detach(token)
                _finish(span, context, code)

        return traced


def _finish(span: trace.Span, context: grpc.aio.ServicerContext, code) -> None:
    if code is None:
        code = context.code()
    number = _number(code)
    attributes: dict[str, str | int] = {"rpc.grpc.status_code": number}
    trailers = context.trailing_metadata() or ()
    for key, value in trailers:
        if key == "x-request-id":
            attributes[REQUEST_ID] = value
            break
    if number != 0:
        reason = error_status.reason_of(trailers)
        if reason:
            attributes[REASON] = reason
        name = _NAMES.get(number, str(number))
        span.set_status(trace.StatusCode.ERROR, f"{name} {reason}".strip())
    span.set_attributes(attributes)
    span.end()


_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


def _number(code) -> int:
    """A status code as its number: the context holds a grpc.StatusCode, an int, or None
    (nothing set: OK)."""
    if code is None:
        return 0
    if isinstance(code, grpc.StatusCode):
        return code.value[0]
    return int(code)
