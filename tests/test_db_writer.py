"""SQLite writers of one process take turns on a lock; waiting past the timeout is UNAVAILABLE."""

from __future__ import annotations

import time

import pytest

from server import db as database
from server.errors import DatabaseUnavailable
from server.services import course_service, student_course_service, student_service


@pytest.mark.databases("sqlite")  # the lock is SQLite's; other databases lock rows
def test_a_writer_waiting_past_the_timeout_is_unavailable(db_url):
    database.connect(db_url, max_connections=2, timeout=0.3)
    try:
        student_service.create_student(name="Ada", email="ada@example.com")
        course_service.create_course(code="CS-1", title="Computing", capacity=0)
        with database._sqlite_writer:  # another call of this process is writing
            started = time.monotonic()
            with pytest.raises(DatabaseUnavailable):
                student_course_service.enroll_student(student_id=1, course_id=1)
            assert 0.25 < time.monotonic() - started < 3
            # Readers do not wait for writers.
            assert student_service.get_student(student_id=1).name == "Ada"
        enrollment = student_course_service.enroll_student(student_id=1, course_id=1)
        assert (enrollment.student_id, enrollment.course_id) == (1, 1)
        assert course_service.get_course(course_id=1).enrolled_count == 1
    finally:
        database.close()
