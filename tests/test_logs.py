"""The server's text log lines are logging's own, with the time part cached per second."""

from __future__ import annotations

import logging

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
