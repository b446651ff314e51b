"""OpenTelemetry tracing: a real server process exporting OTLP/HTTP to a local receiver.

The caller's span is made here with opentelemetry-api only (a known trace and span id);
the client library carries it as W3C traceparent, and the server's spans must join it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time

import grpc
import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace

from enrollment.client.aio import AsyncEnrollmentClient
from enrollment.client.api import ClientError, EnrollmentClient
from enrollment.v1 import enrollment_pb2 as pb
from enrollment.v1 import enrollment_pb2_grpc as pb_grpc
from tests.otlp import SERVER_KIND, Receiver, Span
from tests.rpc import TIMEOUT
from tests.servers import SERVER, free_port

SERVICE = "enrollment.v1.EnrollmentService"
INTERNAL_KIND = 1  # opentelemetry.proto.trace.v1.Span.SpanKind
STATUS_ERROR = 2  # opentelemetry.proto.trace.v1.Status.StatusCode
CALLER_TRACE = 0x0AF7651916CD43DD8448EB211C80319C
CALLER_SPAN = 0xB7AD6B7169203331
DB_SYSTEM = {"sqlite": "sqlite", "postgresql": "postgresql", "mysql": "mysql"}


def traced_env(receiver: Receiver, **more: str) -> dict[str, str]:
    return {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_SERVICE_NAME": "enrollment-under-test",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
        "OTEL_SDK_DISABLED": "",
        **more,
    }


@contextlib.contextmanager
def caller_span(trace_id: int = CALLER_TRACE, span_id: int = CALLER_SPAN):
    """A sampled span of the caller's, current while the block runs (API only, no SDK)."""
    span = trace.NonRecordingSpan(
        trace.SpanContext(trace_id, span_id, is_remote=False, trace_flags=trace.TraceFlags.SAMPLED)
    )
    token = otel_context.attach(trace.set_span_in_context(span))
    try:
        yield
    finally:
        otel_context.detach(token)


def server_spans(spans: list[Span], method: str) -> list[Span]:
    return [s for s in spans if s.name == f"{SERVICE}/{method}"]


def children(spans: list[Span], parent: Span) -> list[Span]:
    return [s for s in spans if s.parent_span_id == parent.span_id]


def test_server_spans_continue_the_callers_trace_with_a_transaction_child(
    server_process, db_url, backend
):
    with Receiver() as receiver:
        server = server_process("--database-url", db_url, env=traced_env(receiver))
        with EnrollmentClient(server.address, timeout=TIMEOUT) as client, caller_span():
            student = client.create_student("Ada", "ada@example.com")
            with pytest.raises(ClientError) as failed:
                client.get_student(student.id + 1000)
        assert (failed.value.code, failed.value.reason) == ("NOT_FOUND", "STUDENT_NOT_FOUND")
        spans = receiver.wait_for(
            lambda spans: server_spans(spans, "CreateStudent") and server_spans(spans, "GetStudent")
        )
        spans = receiver.wait_for(lambda spans: len(spans) >= 4)

    (created,) = server_spans(spans, "CreateStudent")
    assert created.kind == SERVER_KIND
    assert created.trace_id == f"{CALLER_TRACE:032x}", "the caller's trace continues"
    assert created.parent_span_id == f"{CALLER_SPAN:016x}", "the caller's span is the parent"
    assert created.attributes["rpc.system"] == "grpc"
    assert created.attributes["rpc.service"] == SERVICE
    assert created.attributes["rpc.method"] == "CreateStudent"
    assert created.attributes["rpc.grpc.status_code"] == 0
    assert len(created.attributes["enrollment.request_id"]) == 32  # the server's own id
    assert "enrollment.error.reason" not in created.attributes
    assert created.status_code != STATUS_ERROR
    assert created.resource["service.name"] == "enrollment-under-test"

    (transaction,) = children(spans, created)
    assert transaction.name == "db.transaction"
    assert transaction.kind == INTERNAL_KIND
    assert transaction.trace_id == created.trace_id
    assert transaction.attributes["db.system"] == DB_SYSTEM[backend]
    assert transaction.attributes["enrollment.db.function"] == "create_student"
    assert transaction.attributes["enrollment.db.write"] is True
    assert transaction.status_code != STATUS_ERROR

    (missing,) = server_spans(spans, "GetStudent")
    assert missing.trace_id == f"{CALLER_TRACE:032x}"
    assert missing.parent_span_id == f"{CALLER_SPAN:016x}"
    assert missing.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert missing.attributes["enrollment.error.reason"] == "STUDENT_NOT_FOUND"
    assert missing.status_code == STATUS_ERROR
    assert missing.status_message == "NOT_FOUND STUDENT_NOT_FOUND"
    (read,) = children(spans, missing)
    assert read.attributes["enrollment.db.function"] == "get_student"
    assert read.attributes["enrollment.db.write"] is False
    assert read.attributes["error.type"] == "StudentNotFound"
    assert read.status_code == STATUS_ERROR


@pytest.mark.databases("sqlite")
def test_the_async_client_carries_the_trace_into_calls_and_watch_streams(server_process, db_url):
    trace_id, span_id = 0x1234567890ABCDEF1234567890ABCDEF, 0x1122334455667788

    async def calls(address: str) -> None:
        async with AsyncEnrollmentClient(address, timeout=TIMEOUT) as client:
            with caller_span(trace_id, span_id):
                await client.create_course("CS101", "Programming", capacity=3)
                async for _event in client.iter_events(after=0, follow=True):
                    break  # WatchEvents, cancelled after its first event

    with Receiver() as receiver:
        server = server_process("--database-url", db_url, env=traced_env(receiver))
        asyncio.run(calls(server.address))
        spans = receiver.wait_for(
            lambda spans: server_spans(spans, "CreateCourse") and server_spans(spans, "WatchEvents")
        )
    for method in ("CreateCourse", "WatchEvents"):
        (span,) = server_spans(spans, method)
        assert (span.trace_id, span.parent_span_id) == (f"{trace_id:032x}", f"{span_id:016x}")
        assert span.kind == SERVER_KIND and span.attributes["rpc.method"] == method
    (watch,) = server_spans(spans, "WatchEvents")
    assert watch.attributes["rpc.grpc.status_code"] == grpc.StatusCode.CANCELLED.value[0]


@pytest.mark.databases("sqlite")
def test_a_traceparent_header_is_continued_and_health_checks_are_not_traced(server_process, db_url):
    """Any caller (grpcurl, Node, Go) continues its trace by sending the W3C header."""
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    with Receiver() as receiver:
        server = server_process("--database-url", db_url, env=traced_env(receiver))
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.EnrollmentServiceStub(channel)
            stub.ListCourses(
                pb.ListCoursesRequest(), timeout=TIMEOUT, metadata=(("traceparent", traceparent),)
            )
            stub.ListCourses(pb.ListCoursesRequest(), timeout=TIMEOUT)  # no caller trace
        spans = receiver.wait_for(lambda spans: len(server_spans(spans, "ListCourses")) == 2)
    continued, fresh = sorted(server_spans(spans, "ListCourses"), key=lambda s: s.parent_span_id)[
        ::-1
    ]
    assert continued.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert continued.parent_span_id == "00f067aa0ba902b7"
    assert fresh.parent_span_id == "" and fresh.trace_id != continued.trace_id
    assert [s for s in spans if "Health" in s.name] == [], "the readiness probes made spans"


@pytest.mark.databases("sqlite")
def test_every_worker_traces_and_exports_its_last_spans_when_it_stops(server_process, db_url):
    """`serve --workers 2`: each worker sets up its own exporter after the fork, and a
    worker that stops exports what it still holds (here: everything, the batch delay
    being far longer than the test)."""
    with Receiver() as receiver:
        env = traced_env(receiver, OTEL_BSP_SCHEDULE_DELAY="600000")
        server = server_process("--database-url", db_url, "--workers", "2", env=env)
        calls = 0
        for _ in range(40):  # new connections land on either worker (SO_REUSEPORT)
            with grpc.insecure_channel(server.address) as channel:
                pb_grpc.EnrollmentServiceStub(channel).ListCourses(
                    pb.ListCoursesRequest(), timeout=TIMEOUT
                )
            calls += 1
        assert server.stop() == 0
        spans = receiver.wait_for(
            lambda spans: len(server_spans(spans, "ListCourses")) == calls, timeout=10
        )
    pids = {s.resource["process.pid"] for s in server_spans(spans, "ListCourses")}
    assert len(pids) == 2, f"spans from workers {pids}; both serve, both trace"
    assert server.proc.pid not in pids


@pytest.mark.databases("sqlite")
@pytest.mark.parametrize("workers", ["1", "2"])
def test_tracing_asked_for_without_opentelemetry_refuses_to_start(db_url, workers):
    """Refuse, not serve untraced: the operator asked for traces (the process here sees
    OpenTelemetry as not installed)."""
    code = (
        "import sys; sys.modules['opentelemetry'] = None; "
        "from enrollment.server.startup.cli import main; sys.exit(main())"
    )
    address = f"127.0.0.1:{free_port()}"
    result = subprocess.run(
        [sys.executable, "-c", code, "serve", "--address", address, "--database-url", db_url]
        + ["--workers", workers],
        capture_output=True,
        text=True,
        timeout=60,
        env={**_environ(), "OTEL_TRACES_EXPORTER": "otlp"},
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        "enrollment-server: OTEL_TRACES_EXPORTER=otlp asks for tracing, but OpenTelemetry "
        "is not installed: pip install 'enrollment-server[tracing]', or unset "
        "OTEL_TRACES_EXPORTER"
    )


@pytest.mark.databases("sqlite")
def test_an_exporter_that_is_not_installed_refuses_to_start(server_process, db_url):
    result = subprocess.run(
        [SERVER, "serve", "--address", f"127.0.0.1:{free_port()}", "--database-url", db_url],
        capture_output=True,
        text=True,
        timeout=60,
        env={**_environ(), "OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
    )
    assert result.returncode == 2, result.stderr
    assert "no trace exporter 'otlp_proto_grpc' is installed" in result.stderr
    assert "OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf" in result.stderr


@pytest.mark.databases("sqlite")
@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        ({"OTEL_PROPAGATORS": "tracecontext,bogus"}, "OTEL_PROPAGATORS: no propagator 'bogus'"),
        ({"OTEL_BSP_MAX_QUEUE_SIZE": "-1"}, "OTEL_BSP_MAX_QUEUE_SIZE must be a whole number"),
        ({"OTEL_BSP_SCHEDULE_DELAY": "abc"}, "OTEL_BSP_SCHEDULE_DELAY must be a whole number"),
        (
            {"OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "5000"},
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE (5000) must be at most OTEL_BSP_MAX_QUEUE_SIZE (2048)",
        ),
    ],
)
def test_unusable_otel_settings_refuse_to_start_in_one_line(db_url, workers, variables, expected):
    # The SDK's own checks raised in each worker as it started: a traceback and exit 1,
    # or (a value that is not a number) a traceback logged and the default used.
    result = subprocess.run(
        [SERVER, "serve", "--address", f"127.0.0.1:{free_port()}", "--database-url", db_url]
        + ["--workers", workers],
        capture_output=True,
        text=True,
        timeout=60,
        env={**_environ(), "OTEL_TRACES_EXPORTER": "console", **variables},
    )
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert expected in result.stderr, result.stderr


# A server in a process of its own, serving one call with tracing off: which
# OpenTelemetry modules it has imported, and whether it has a tracing interceptor.
_OFF_PROBE = """
import json, sys
import grpc
import enrollment.server.startup.cli  # imports the client library too
from enrollment.server.startup.config import ServerConfig
from enrollment.server.startup.server import create_server
from enrollment.v1 import enrollment_pb2 as pb, enrollment_pb2_grpc as pb_grpc

running = create_server(ServerConfig(address="127.0.0.1:0", database_url=sys.argv[1]))
with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
    pb_grpc.EnrollmentServiceStub(channel).ListCourses(pb.ListCoursesRequest(), timeout=10)
running.stop(None).wait(10)
running.wait_idle()
print(json.dumps({
    "modules": sorted(m for m in sys.modules if m.startswith("opentelemetry")),
    "traces": running.traces is not None,
}))
"""


@pytest.mark.databases("sqlite")
@pytest.mark.parametrize("exporter", ["", "none", "console"])
def test_tracing_off_imports_nothing_of_opentelemetry(db_url, exporter):
    result = subprocess.run(
        [sys.executable, "-c", _OFF_PROBE, db_url],
        capture_output=True,
        text=True,
        timeout=60,
        env={**_environ(), "OTEL_TRACES_EXPORTER": exporter},
    )
    assert result.returncode == 0, result.stderr
    # The console exporter prints its spans first; the probe's line is the last.
    found = json.loads(result.stdout.splitlines()[-1])
    if exporter == "console":  # on: the probe sees it
        assert found["traces"] and "opentelemetry.sdk.trace" in found["modules"]
        assert f'"name": "{SERVICE}/ListCourses"' in result.stdout
    else:
        assert found == {"modules": [], "traces": False}


def _environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}


@pytest.mark.databases("sqlite")
def test_a_collector_that_never_answers_does_not_hold_the_stop(server_process, db_url):
    # The SDK waits up to 30 s for the last export whatever OTEL_BSP_EXPORT_TIMEOUT
    # says: a stop with a collector that accepts connections and never answers took
    # 30 s, past the overdue limit (exit 1).
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)  # accepts (the backlog), never reads or answers
    try:
        env = {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{silent.getsockname()[1]}",
            "OTEL_BSP_SCHEDULE_DELAY": "600000",
            "OTEL_SDK_DISABLED": "",
        }
        server = server_process("--database-url", db_url, "--grace", "1", env=env)
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.EnrollmentServiceStub(channel)
            for _ in range(5):
                stub.ListCourses(pb.ListCoursesRequest(), timeout=TIMEOUT)
        started = time.monotonic()
        assert server.stop() == 0, server.log
        took = time.monotonic() - started
        assert took < 10, (took, server.log)
        assert "the last spans were not exported" in server.log, server.log
    finally:
        silent.close()
