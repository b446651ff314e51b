"""Prometheus metrics, JSON logs and request ids, against live servers."""

from __future__ import annotations

import json
import logging
import re
import socket
import sqlite3
import sys
import time

import grpc
import pytest

from enrollment.server.operations.logs import JsonFormatter
from enrollment.server.startup.config import ServerConfig, StartupError
from enrollment.server.startup.server import create_server
from enrollment.server.transport.interceptors import LoopWrites
from enrollment.v1 import enrollment_pb2 as pb
from enrollment.v1 import enrollment_pb2_grpc as pb_grpc
from tests.databases import sqlite_path
from tests.rpc import TIMEOUT, new_student
from tests.servers import free_port, scrape

# Metrics and logs are the same on every database; one test holds SQLite's write lock.
pytestmark = pytest.mark.databases("sqlite")


def wait_for(predicate, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def test_metrics_count_calls_by_method_and_code(start_server):
    live = start_server(metrics_address="127.0.0.1:0")
    assert live.running.metrics_port
    new_student(live.stub)
    new_student(live.stub)
    with pytest.raises(grpc.RpcError):
        live.stub.GetStudent(pb.GetStudentRequest(student_id=99), timeout=TIMEOUT)
    metrics = scrape(live.running.metrics_port)

    def requests(method, code):
        key = ("enrollment_rpc_requests_total", (("code", code), ("method", method)))
        return metrics.get(key)

    assert requests("CreateStudent", "OK") == 2
    assert requests("GetStudent", "NOT_FOUND") == 1
    assert requests("GetStudent", "OK") is None
    count = ("enrollment_rpc_duration_seconds_count", (("method", "CreateStudent"),))
    assert metrics[count] == 2
    inf = ("enrollment_rpc_duration_seconds_bucket", (("le", "+Inf"), ("method", "GetStudent")))
    assert metrics[inf] == 1
    assert metrics[("enrollment_rpcs_in_flight", ())] == 0
    assert metrics[("enrollment_db_connections_in_use", ())] == 0


def test_metrics_show_calls_in_flight_and_connections_in_use(start_server):
    live = start_server(metrics_address="127.0.0.1:0", database_timeout=30)
    port = live.running.metrics_port
    blocker = sqlite3.connect(sqlite_path(live), isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        held = live.stub.CreateStudent.future(
            pb.CreateStudentRequest(name="Held", email="held@example.com"), timeout=60
        )
        wait_for(lambda: scrape(port)[("enrollment_db_connections_in_use", ())] == 1)
        assert scrape(port)[("enrollment_rpcs_in_flight", ())] == 1
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    held.result(timeout=TIMEOUT)
    after = scrape(port)
    assert after[("enrollment_rpcs_in_flight", ())] == 0
    assert after[("enrollment_db_connections_in_use", ())] == 0


def test_metrics_count_the_sqlite_writes_committed_together(start_server, monkeypatch):
    """Writes sent together commit in groups: their sizes add up to the writes. (No
    pauses here: a loaded machine's slow fsyncs would send later writes to the writer
    thread, which counts no group.)"""
    monkeypatch.setattr(LoopWrites, "held", lambda self, seconds, now: None)
    live = start_server(metrics_address="127.0.0.1:0")
    port = live.running.metrics_port
    sent = [
        live.stub.CreateStudent.future(
            pb.CreateStudentRequest(name=f"S{i}", email=f"s{i}@example.com"), timeout=TIMEOUT
        )
        for i in range(8)
    ]
    assert sorted(f.result(timeout=TIMEOUT).student.id for f in sent) == list(range(1, 9))
    metrics = scrape(port)
    assert metrics[("enrollment_sqlite_write_group_size_sum", ())] == 8
    assert 1 <= metrics[("enrollment_sqlite_write_group_size_count", ())] <= 8
    # Registered beside the groups (held() is stubbed here, so never raised: the pauses
    # are counted in test_loop_writes.test_the_pauses_are_counted).
    assert metrics[("enrollment_sqlite_write_pauses_total", ())] == 0
    new_student(live.stub)  # alone: a group of one
    after = scrape(port)
    assert after[("enrollment_sqlite_write_group_size_sum", ())] == 9
    one = ("enrollment_sqlite_write_group_size_bucket", (("le", "1.0"),))
    assert after[one] == metrics.get(one, 0) + 1


def test_a_busy_metrics_port_is_a_startup_error(db_url):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = ServerConfig(
            address="127.0.0.1:0", database_url=db_url, metrics_address=f"127.0.0.1:{port}"
        )
        with pytest.raises(StartupError, match="cannot serve metrics"):
            create_server(config)


def request_id_of(call) -> str:
    return dict(call.trailing_metadata())["x-request-id"]


def test_request_id_is_echoed_or_generated_in_trailing_metadata(live, caplog):
    caplog.set_level(logging.INFO, logger="enrollment.rpc")
    request = pb.CreateStudentRequest(name="Ada", email="ada@example.com")
    _, call = live.stub.CreateStudent.with_call(
        request, timeout=TIMEOUT, metadata=(("x-request-id", "req-42"),)
    )
    assert request_id_of(call) == "req-42"
    _, call = live.stub.GetStudent.with_call(pb.GetStudentRequest(student_id=1), timeout=TIMEOUT)
    generated = request_id_of(call)
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    # On errors too, next to the status details.
    with pytest.raises(grpc.RpcError) as raised:
        live.stub.CreateStudent(request, timeout=TIMEOUT, metadata=(("x-request-id", "req-43"),))
    trailers = dict(raised.value.trailing_metadata())
    assert trailers["x-request-id"] == "req-43" and "grpc-status-details-bin" in trailers
    # An id that could forge log fields is replaced.
    _, call = live.stub.GetStudent.with_call(
        pb.GetStudentRequest(student_id=1),
        timeout=TIMEOUT,
        metadata=(("x-request-id", "a code=OK"),),
    )
    assert request_id_of(call) != "a code=OK"
    lines = [r.getMessage() for r in caplog.records if r.name == "enrollment.rpc"]
    assert lines[0].endswith(" token=- request_id=req-42") and "peer=ipv4:127.0.0.1:" in lines[0]
    assert f"request_id={generated}" in lines[1]
    assert "reason=EMAIL_TAKEN" in lines[2] and "request_id=req-43" in lines[2]


def test_serve_with_json_logs_and_metrics(db_url, server_process):
    metrics_port = free_port()
    process = server_process(
        "--database-url", db_url,
        "--log-format", "json", "--metrics-address", f"127.0.0.1:{metrics_port}",
    )  # fmt: skip
    try:
        with grpc.insecure_channel(process.address) as channel:
            grpc.channel_ready_future(channel).result(timeout=15)
            stub = pb_grpc.EnrollmentServiceStub(channel)
            stub.CreateCourse(
                pb.CreateCourseRequest(code="CS-101", title="Intro"),
                timeout=TIMEOUT,
                metadata=(("x-request-id", "from-the-test"),),
            )
            with pytest.raises(grpc.RpcError):
                stub.GetCourse(pb.GetCourseRequest(course_id=7), timeout=TIMEOUT)
        metrics = scrape(metrics_port)
        key = ("enrollment_rpc_requests_total", (("code", "OK"), ("method", "CreateCourse")))
        assert metrics[key] == 1
    finally:
        returncode = process.stop(timeout=30)
    out = process.log
    assert returncode == 0, out
    lines = [line for line in out.splitlines() if line.strip()]
    # Every line of ours is JSON; grpc's C core may add its own (I1127 12:00:00.000 ...).
    entries = [json.loads(line) for line in lines if not re.match(r"[IWE]\d{4} ", line)]
    rpcs = [e for e in entries if e.get("logger") == "enrollment.rpc"]
    assert len(rpcs) == 2, out
    first, second = rpcs
    assert first["method"] == "CreateCourse" and first["code"] == "OK"
    assert first["reason"] == "-" and first["request_id"] == "from-the-test"
    assert first["peer"].startswith("ipv4:127.0.0.1:") and first["token"] == "-"
    assert isinstance(first["duration_ms"], float) and first["level"] == "INFO"
    assert (second["code"], second["reason"]) == ("NOT_FOUND", "COURSE_NOT_FOUND")
    assert re.fullmatch(r"[0-9a-f]{32}", second["request_id"])
    assert any("serving enrollment.v1.EnrollmentService" in e["message"] for e in entries)


def test_json_log_lines_carry_exceptions_and_plain_messages():
    formatter = JsonFormatter()
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord(
            "enrollment.rpc", logging.ERROR, __file__, 1, "rpc %s failed", ("X",), sys.exc_info()
        )
    entry = json.loads(formatter.format(record))
    assert entry["message"] == "rpc X failed" and entry["level"] == "ERROR"
    assert "ValueError: boom" in entry["exception"] and "\n" not in formatter.format(record)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"])
