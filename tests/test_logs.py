"""The server's text log lines are logging's own, with the time part cached per second."""

from __future__ import annotations

import contextlib
import io
import logging
import time

import grpc
import pytest

from enrollment.server.operations import logs
from enrollment.v1 import enrollment_pb2 as pb
from enrollment.v1 import enrollment_pb2_grpc as pb_grpc
from tests.rpc import TIMEOUT
from tests.servers import SERVER, free_port


def test_cached_time_lines_equal_logging_formatter_lines():
    cached = logs._SecondCachedFormatter(logs.TEXT_FORMAT)
    reference = logging.Formatter(logs.TEXT_FORMAT)
    logger = logging.getLogger("enrollment.rpc.test")
    lines = []
    for created in (1795792000.25, 1795792000.75, 1795792001.5, 1795792000.5, 1795795600.0):
        record = logger.makeRecord(
            logger.name, logging.INFO, __file__, 1, "rpc method=%s n=%d", ("GetStudent", 1), None
        )
        record.created, record.msecs = created, (created - int(created)) * 1000
        lines.append((cached.format(record), reference.format(record)))
    for mine, theirs in lines:
        assert mine == theirs
    assert len({mine for mine, _ in lines}) == 5  # every second, and every millisecond, shows


def serve_and_create_a_student(server_process, db_url: str, *flags: str) -> str:
    """Run `enrollment-server <flags> serve`, create one student, return the log."""
    port = free_port()
    argv = [SERVER, *flags, "serve", "--address", f"127.0.0.1:{port}", "--database-url", db_url]
    server = server_process(argv=argv, port=port)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.EnrollmentServiceStub(channel)
        request = pb.CreateStudentRequest(name="Zelda Quixote", email="zq@secret.example")
        stub.CreateStudent(request, timeout=TIMEOUT)
        stub.ListStudents(pb.ListStudentsRequest(), timeout=TIMEOUT)
    assert server.stop() == 0, server.log
    return server.log


@pytest.mark.databases("sqlite")
def test_debug_logs_sql_without_its_bound_values(server_process, db_url):
    """Names and emails stay out of the log at DEBUG; the SQL itself is still there."""
    out = serve_and_create_a_student(server_process, db_url, "--log-level", "DEBUG")
    assert "INSERT INTO" in out, out  # the statements are logged
    assert "Zelda" not in out and "zq@secret.example" not in out, out
    assert "value(s) not logged" in out


@pytest.mark.databases("sqlite")
def test_log_sql_values_flag_asks_for_them(server_process, db_url):
    out = serve_and_create_a_student(
        server_process, db_url, "--log-level", "DEBUG", "--log-sql-values"
    )
    assert "zq@secret.example" in out


@pytest.fixture()
def text_logging(monkeypatch):
    """logs.setup("INFO")'s handler, writing to a StringIO; the root's previous handlers
    and level, and the logging globals setup() sets, come back afterwards."""
    for name in ("_srcfile", "logThreads", "logMultiprocessing"):
        monkeypatch.setattr(logging, name, getattr(logging, name))
    root = logging.getLogger()
    saved = root.handlers[:], root.level, logs._text_handler
    root.handlers.clear()
    logs.setup("INFO")
    stream = io.StringIO()
    logs._text_handler.setStream(stream)
    yield stream
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    logs._text_handler = saved[2]


@contextlib.contextmanager
def alone():
    """The root logger with setup()'s handler only, as in the server (pytest adds its
    capturing handlers to the root during each test)."""
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers[:] = [logs._text_handler]
    try:
        yield
    finally:
        root.handlers[:] = saved


ARGS = ("GetStudent", "OK", "-", 1.5, "ipv4:127.0.0.1:5000", "-", "0123456789abcdef")


def test_a_call_line_written_directly_equals_logging_own(text_logging, monkeypatch):
    """rpc() writes the handler's line itself while nothing else would see the record;
    a filter on the way sends the same call through logging, and the lines are equal."""
    logger = logging.getLogger("enrollment.rpc")
    seen = []
    with alone():
        lines(logger, seen, text_logging, monkeypatch)
    assert len(seen) == 3  # the filter saw each record: logging's own way ran


def lines(logger, seen, text_logging, monkeypatch):
    for created in (1795792000.25, 1795792000.999, 1795795600.0):
        monkeypatch.setattr(time, "time", lambda created=created: created)
        assert logs._direct(logger, logs._text_handler)
        logs.rpc(logger, ARGS, None)
        direct = text_logging.getvalue()
        text_logging.seek(0)
        text_logging.truncate()

        def keep(record, seen=seen):
            seen.append(record)
            return True

        logger.addFilter(keep)
        try:
            assert not logs._direct(logger, logs._text_handler)
            logs.rpc(logger, ARGS, None)
        finally:
            logger.removeFilter(keep)
        through_logging = text_logging.getvalue()
        text_logging.seek(0)
        text_logging.truncate()
        assert direct == through_logging, (direct, through_logging)
        assert direct.endswith(
            " enrollment.rpc rpc method=GetStudent code=OK reason=- "
            "duration_ms=1.50 peer=ipv4:127.0.0.1:5000 token=- "
            "request_id=0123456789abcdef\n"
        ), direct


def test_anything_else_listening_gets_logging_records(text_logging, caplog):
    """A second handler (here pytest's capture), a disabled logger or a level above INFO
    on the handler: the direct way is not taken."""
    logger = logging.getLogger("enrollment.rpc")
    with caplog.at_level(logging.INFO, logger="enrollment.rpc"):
        logs.rpc(logger, ARGS, None)
    assert [r.getMessage() for r in caplog.records] == [logs.RPC_MESSAGE % ARGS]
    assert "method=GetStudent" in text_logging.getvalue()  # and the handler still has it
    handler = logs._text_handler
    assert not logs._direct(logger, handler)  # pytest's handlers are on the root
    with alone():
        assert logs._direct(logger, handler)
        handler.setLevel(logging.WARNING)
        assert not logs._direct(logger, handler)
        handler.setLevel(logging.NOTSET)
        logger.disabled = True
        try:
            assert not logs._direct(logger, handler)
        finally:
            logger.disabled = False
        assert logs._direct(logger, handler)
    logs.setup("INFO", "json")
    assert logs._text_handler is None  # JSON lines always go through logging


@pytest.mark.databases("sqlite")
def test_answers_to_calls_that_ended_first_are_no_error_lines(server_process, db_url):
    """A caller whose deadline passes just as its answer goes out: grpc's core has ended
    the call, and grpc.aio logs the answer it could not send as an ERROR with a
    traceback. The call's own line says how it ended; what is left of grpc's is one
    INFO line naming the method, without a traceback (an operator's alerts count ERRORs)."""
    port = free_port()
    argv = [SERVER, "serve", "--address", f"127.0.0.1:{port}", "--database-url", db_url]
    server = server_process(argv=argv, port=port)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.EnrollmentServiceStub(channel)
        course = stub.CreateCourse(pb.CreateCourseRequest(code="C-1", title="T"), timeout=TIMEOUT)
        student = stub.CreateStudent(
            pb.CreateStudentRequest(name="N", email="n@example.com"), timeout=TIMEOUT
        )
        pair = {"student_id": student.student.id, "course_id": course.course.id}
        ended = 0
        for attempt in range(400):
            for method, request in (
                (stub.EnrollStudent, pb.EnrollStudentRequest(**pair)),
                (stub.DropCourse, pb.DropCourseRequest(**pair)),
            ):
                with contextlib.suppress(grpc.RpcError):
                    method(request, timeout=0.001 + (attempt % 3) / 1000)
            ended = server.log.count("was not sent")
            if ended and attempt >= 100:
                break
    assert server.stop() == 0, server.log
    log = server.log
    assert " ERROR " not in log and "Traceback" not in log, log
    # And the lines that stand for grpc's say what happened (when the race was met).
    for line in log.splitlines():
        if "was not sent" in line:
            assert " INFO " in line and "EnrollmentService/" in line, line
