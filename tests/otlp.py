"""A small OTLP/HTTP trace receiver on a free local port: what a traced server exports.

It answers every POST to /v1/traces with an empty ExportTraceServiceResponse and keeps
the request bodies; spans() decodes them with opentelemetry-proto. With keep=False
(bench/tracing.py's discard receiver) it only counts the server spans, as they come.
"""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TRACES_PATH = "/v1/traces"
SERVER_KIND = 2  # opentelemetry.proto.trace.v1.Span.SpanKind.SPAN_KIND_SERVER


@dataclass(frozen=True)
class Span:
    """One exported span, with its resource's and its own attributes as plain values."""

    name: str
    kind: int  # opentelemetry.proto.trace.v1.Span.SpanKind
    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits
    parent_span_id: str  # "" for a root span
    attributes: dict[str, Any]
    status_code: int  # opentelemetry.proto.trace.v1.Status.StatusCode
    status_message: str
    resource: dict[str, Any]


class Receiver:
    """Start with `with Receiver() as receiver:`; receiver.endpoint is the base URL
    (OTEL_EXPORTER_OTLP_ENDPOINT)."""

    def __init__(self, *, keep: bool = True) -> None:
        self._bodies: list[bytes] = []
        self._lock = threading.Lock()
        self.server_spans = 0  # counted as they come (keep=False)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path == TRACES_PATH:
                    receiver._received(body, keep)
                    self.send_response(200)
                else:
                    self.send_response(404)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _received(self, body: bytes, keep: bool) -> None:
        if keep:
            with self._lock:
                self._bodies.append(body)
            return
        count = sum(
            1
            for resource_spans in _decode(body).resource_spans
            for scope_spans in resource_spans.scope_spans
            for span in scope_spans.spans
            if span.kind == SERVER_KIND
        )
        with self._lock:
            self.server_spans += count

    def spans(self) -> list[Span]:
        with self._lock:
            bodies = list(self._bodies)
        found = []
        for body in bodies:
            request = _decode(body)
            for resource_spans in request.resource_spans:
                resource = _attributes(resource_spans.resource.attributes)
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        found.append(
                            Span(
                                name=span.name,
                                kind=span.kind,
                                trace_id=span.trace_id.hex(),
                                span_id=span.span_id.hex(),
                                parent_span_id=span.parent_span_id.hex(),
                                attributes=_attributes(span.attributes),
                                status_code=span.status.code,
                                status_message=span.status.message,
                                resource=resource,
                            )
                        )
        return found

    def wait_for(self, found: Callable[[list[Span]], bool], timeout: float = 30.0) -> list[Span]:
        """The spans once found(spans) holds; AssertionError with what came after timeout."""
        deadline = time.monotonic() + timeout
        while True:
            spans = self.spans()
            if found(spans):
                return spans
            if time.monotonic() > deadline:
                names = [(s.name, s.attributes.get("rpc.grpc.status_code")) for s in spans]
                raise AssertionError(f"not among the {len(spans)} spans exported: {names}")
            time.sleep(0.05)


def _decode(body: bytes):
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    return ExportTraceServiceRequest.FromString(body)


def _attributes(pairs) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for pair in pairs:
        kind = pair.value.WhichOneof("value")
        values[pair.key] = getattr(pair.value, kind) if kind else None
    return values
