"""SQLite's WAL is checkpointed in the background, not by the COMMIT of a call
(server/persistence/checkpoint.py)."""

from __future__ import annotations

import shutil
import sqlite3
import time

import grpc
import pytest

from enrollment.v1 import enrollment_pb2 as pb
from enrollment.v1 import enrollment_pb2_grpc as pb_grpc

pytestmark = pytest.mark.databases("sqlite")


def _names_in_main_file(path: str, tmp_path) -> set[str]:
    """The students the database file holds by itself, without its WAL: what has been
    checkpointed."""
    copy = tmp_path / "main-only.db"
    shutil.copyfile(path, copy)
    with sqlite3.connect(copy) as connection:
        return {name for (name,) in connection.execute("SELECT name FROM students")}


def test_a_commit_reaches_the_database_file_by_a_background_checkpoint(
    db_url, server_process, tmp_path
):
    path = db_url.removeprefix("sqlite:///")
    server = server_process("--database-url", db_url)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.EnrollmentServiceStub(channel)
        stub.CreateStudent(pb.CreateStudentRequest(name="Ada Lovelace", email="ada@example.com"))
    # A handful of WAL pages, far below any automatic checkpoint's threshold: only the
    # server's checkpointer copies them into the file.
    deadline = time.monotonic() + 5
    while "Ada Lovelace" not in _names_in_main_file(path, tmp_path):
        assert time.monotonic() < deadline, "the commit is still only in the WAL after 5 s"
        time.sleep(0.1)
    assert server.stop() == 0
