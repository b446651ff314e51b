"""The caller's trace context (W3C traceparent) on every call, when OpenTelemetry is installed.

With opentelemetry-api installed (`pip install 'enrollment-client[tracing]'`), each
call carries what the configured propagators (OTEL_PROPAGATORS; default W3C
tracecontext and baggage) inject from the current context, so the server's span
continues the caller's trace. Without it, or outside any span, the metadata is left
as it is. OpenTelemetry is imported at the first call, never by importing the client.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable

Metadata = tuple[tuple[str, str], ...]

_INSTALLED = importlib.util.find_spec("opentelemetry") is not None


def call_metadata(metadata: Metadata | None) -> Metadata | None:
    """metadata plus the current trace context's headers (traceparent, ...), if any."""
    if not _INSTALLED:
        return metadata
    inject = _injector()
    if inject is None:
        return metadata
    carrier: dict[str, str] = {}
    inject(carrier)
    if not carrier:
        return metadata
    return (*(metadata or ()), *carrier.items())


@functools.cache
def _injector() -> Callable[[dict[str, str]], None] | None:
    try:
        from opentelemetry import propagate
    except ImportError:  # another opentelemetry distribution, without the API
        return None
    return propagate.inject
