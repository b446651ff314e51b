"""OpenTelemetry tracing, set up only from the standard OTEL_* environment variables.

Off unless OTEL_TRACES_EXPORTER names an exporter: unset or "none" is off (the
OpenTelemetry spec's default is "otlp"; this server exports nothing unless asked), and
so is OTEL_SDK_DISABLED=true. Off, nothing of OpenTelemetry is imported and no
interceptor or hook is installed: the call path is the one without tracing.

On (the `tracing` extra: opentelemetry-api, -sdk, -exporter-otlp-proto-http), each
server process (each worker of `serve --workers N`, after the fork) builds its own
TracerProvider: the resource from OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES
(service.name defaults to "enrollment-server"), the sampler from OTEL_TRACES_SAMPLER,
one BatchSpanProcessor (OTEL_BSP_*) per exporter of OTEL_TRACES_EXPORTER, each exporter
configured by its own variables (OTEL_EXPORTER_OTLP_ENDPOINT, _HEADERS, _TIMEOUT, ...).
"otlp" is the HTTP/protobuf exporter unless OTEL_EXPORTER_OTLP_TRACES_PROTOCOL or
OTEL_EXPORTER_OTLP_PROTOCOL says "grpc" (the spec's default; the Python SDK's own
default is grpc, which the extra does not install). Incoming trace context is read
with the propagators of OTEL_PROPAGATORS (default W3C tracecontext and baggage).

transport/tracing.py makes the server span of each call; the unit of work's spans are
made here (transaction_span), hooked into persistence when tracing starts.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from enrollment.server.callstate import WouldWait
from enrollment.server.persistence import engine, unit_of_work

EXPORTERS = "opentelemetry_traces_exporter"  # the SDK's entry point group
_OTLP_BY_PROTOCOL = {"http/protobuf": "otlp_proto_http", "grpc": "otlp_proto_grpc"}
EXTRA = "pip install 'enrollment-server[tracing]'"

# Span and attribute names (README "Tracing").
TRANSACTION_SPAN = "db.transaction"
REASON = "enrollment.error.reason"
REQUEST_ID = "enrollment.request_id"
# Seconds a stop waits for the last spans to be exported.
SHUTDOWN_SECONDS = 5.0

log = logging.getLogger("enrollment.server")


class TracingError(Exception):
    """The environment asks for tracing this installation cannot do; says what to change."""


def requested(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the environment asks for traces (reads variables only, imports nothing)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    names = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    return bool(names) and names != "none"


def exporter_names(environ: Mapping[str, str] = os.environ) -> list[str]:
    """The entry point names of OTEL_TRACES_EXPORTER's exporters, "otlp" resolved by the
    OTLP protocol variables; raises TracingError when one is not installed."""
    if not _installed("opentelemetry.sdk"):
        raise TracingError(
            f"OTEL_TRACES_EXPORTER={environ.get('OTEL_TRACES_EXPORTER', '')} asks for "
            f"tracing, but OpenTelemetry is not installed: {EXTRA}, or unset "
            "OTEL_TRACES_EXPORTER"
        )
    installed = {entry.name for entry in importlib.metadata.entry_points(group=EXPORTERS)}
    names = []
    for name in environ.get("OTEL_TRACES_EXPORTER", "").split(","):
        name = name.strip()
        if not name or name == "none":
            continue
        if name == "otlp":
            protocol = (
                environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "http/protobuf"
            ).strip()
            if protocol not in _OTLP_BY_PROTOCOL:
                raise TracingError(
                    f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r} is not an OTLP protocol for "
                    "traces: use http/protobuf or grpc"
                )
            name = _OTLP_BY_PROTOCOL[protocol]
        if name not in installed:
            hint = EXTRA if name == "otlp_proto_http" else "install the exporter's package"
            if name == "otlp_proto_grpc":
                hint = (
                    "pip install opentelemetry-exporter-otlp-proto-grpc, or set "
                    "OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf (the tracing extra's)"
                )
            raise TracingError(
                f"OTEL_TRACES_EXPORTER: no trace exporter {name!r} is installed "
                f"(installed: {', '.join(sorted(installed)) or 'none'}): {hint}"
            )
        names.append(name)
    return names


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # its parent package is missing
        return False


# The batch span processor's settings, with the SDK's defaults. Read here, not by the
# SDK: it raises on a value below 1 in each worker as it starts, and on one that is not
# a number logs a traceback and serves with its default.
_QUEUE, _BATCH = "OTEL_BSP_MAX_QUEUE_SIZE", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE"
_BSP = {
    _QUEUE: ("max_queue_size", 2048),
    "OTEL_BSP_SCHEDULE_DELAY": ("schedule_delay_millis", 5000),
    _BATCH: ("max_export_batch_size", 512),
    "OTEL_BSP_EXPORT_TIMEOUT": ("export_timeout_millis", 30000),
}
PROPAGATORS = "opentelemetry_propagator"  # the API's entry point group


def batch_settings(environ: Mapping[str, str] = os.environ) -> dict[str, int]:
    """BatchSpanProcessor's keyword arguments from OTEL_BSP_*; raises TracingError."""
    settings = {}
    for name, (argument, default) in _BSP.items():
        text = environ.get(name, "").strip()
        try:
            value = int(text) if text else default
        except ValueError:
            value = 0
        if value < 1:
            raise TracingError(f"{name} must be a whole number above 0, not {text!r}")
        settings[argument] = value
    batch, queue = settings["max_export_batch_size"], settings["max_queue_size"]
    if batch > queue:
        raise TracingError(f"{_BATCH} ({batch}) must be at most {_QUEUE} ({queue})")
    return settings


def _check_propagators(environ: Mapping[str, str]) -> None:
    """OTEL_PROPAGATORS names installed propagators (the API raises on import otherwise)."""
    configured = environ.get("OTEL_PROPAGATORS", "").strip()
    if not configured:
        return
    installed = {entry.name for entry in importlib.metadata.entry_points(group=PROPAGATORS)}
    for name in (part.strip() for part in configured.split(",")):
        if name.lower() == "none":
            return  # the API's rule: none anywhere turns every propagator off
        if name not in installed:
            raise TracingError(
                f"OTEL_PROPAGATORS: no propagator {name!r} is installed (installed: "
                f"{', '.join(sorted(installed)) or 'none'})"
            )


def check(environ: Mapping[str, str] = os.environ) -> None:
    """Before serving (and before forking workers): raise TracingError when the
    environment asks for tracing that cannot start. Imports nothing of OpenTelemetry."""
    if requested(environ):
        exporter_names(environ)
        batch_settings(environ)
        _check_propagators(environ)


@dataclass
class Tracing:
    """This process's tracer provider and the tracer of the server's spans."""

    provider: Any
    tracer: Any

    def shutdown(self, timeout: float = SHUTDOWN_SECONDS) -> None:
        """Export what is still queued and stop, waiting at most timeout seconds: for a
        collector that does not answer, the SDK waits 30 s whatever
        OTEL_BSP_EXPORT_TIMEOUT says, and held the server's stop that long."""
        unit_of_work.observe_transactions(None)
        exporting = threading.Thread(
            target=self.provider.shutdown, name="trace-export", daemon=True
        )
        exporting.start()
        exporting.join(timeout)
        if exporting.is_alive():
            log.warning(
                "tracing: the last spans were not exported within %g s (the collector "
                "does not answer); stopping without them",
                timeout,
            )


def start(environ: Mapping[str, str] = os.environ) -> Tracing:
    """Build this process's tracer provider from the environment and hook the unit of
    work's spans in. Call it only when requested(); once per process (after a fork)."""
    names = exporter_names(environ)
    batching = batch_settings(environ)
    _check_propagators(environ)
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create()
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": "enrollment-server"}))
    version = _version()
    if version and "service.version" not in resource.attributes:
        resource = resource.merge(Resource({"service.version": version}))
    # Which process (each worker of `serve --workers N` sets up its own, after the fork).
    resource = resource.merge(Resource({"process.pid": os.getpid()}))
    # Not the global provider: each server has its own, shut down (its last spans
    # exported) when the server stops; a forked worker exits without atexit handlers.
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    for name in names:
        (entry,) = importlib.metadata.entry_points(group=EXPORTERS, name=name)
        processor = BatchSpanProcessor(
            entry.load()(),
            max_queue_size=batching["max_queue_size"],
            schedule_delay_millis=batching["schedule_delay_millis"],
            max_export_batch_size=batching["max_export_batch_size"],
            export_timeout_millis=batching["export_timeout_millis"],
        )
        provider.add_span_processor(processor)
    tracer = provider.get_tracer("enrollment.server", version)
    unit_of_work.observe_transactions(_TransactionSpans(tracer).span)
    return Tracing(provider, tracer)


def _version() -> str:
    try:
        return importlib.metadata.version("enrollment-server")
    except importlib.metadata.PackageNotFoundError:
        return ""


class _TransactionSpans:
    """A span for each transaction run inside a traced call, a child of its server span.
    Transactions outside calls (the change feed's poller, the purgers) make none."""

    def __init__(self, tracer: Any) -> None:
        from opentelemetry import trace

        self._tracer = tracer
        self._current_span = trace.get_current_span
        self._kind = trace.SpanKind.INTERNAL
        self._error = trace.Status(trace.StatusCode.ERROR)

    @contextlib.contextmanager
    def span(self, function: str, write: bool, attempt: int) -> Iterator[None]:
        if not self._current_span().is_recording():
            yield
            return
        attributes: dict[str, Any] = {
            "db.system": engine.kind(),
            "enrollment.db.function": function,
            "enrollment.db.write": write,
        }
        if attempt > 1:
            attributes["enrollment.db.attempt"] = attempt
        span = self._tracer.start_span(TRANSACTION_SPAN, kind=self._kind, attributes=attributes)
        try:
            yield
        except WouldWait:
            # Not a failure: the write gave way on the event loop, before any of its work,
            # and runs again in the writer thread (transport/interceptors.py, LoopWrites).
            span.set_attribute("enrollment.db.gave_way", True)
            raise
        except BaseException as exc:
            # The class only: a message may hold SQL or a caller's values.
            span.set_attribute("error.type", type(exc).__name__)
            span.set_status(self._error)
            raise
        finally:
            span.end()
