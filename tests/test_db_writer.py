"""SQLite writers of one process take turns on a lock; waiting past the timeout is UNAVAILABLE."""

from __future__ import annotations

import threading
import time

import pytest

from enrollment.server.domain import courses, enrollments, students
from enrollment.server.errors import DatabaseUnavailable
from enrollment.server.persistence import engine, unit_of_work


@pytest.mark.databases("sqlite")  # the lock is SQLite's; other databases lock rows
def test_a_writer_waiting_past_the_timeout_is_unavailable(db_url):
    engine.open_pool(db_url, max_connections=2, timeout=0.3)
    try:
        students.create_student(name="Ada", email="ada@example.com")
        courses.create_course(code="CS-1", title="Computing", capacity=0)
        with unit_of_work._sqlite_writer:  # another call of this process is writing
            started = time.monotonic()
            with pytest.raises(DatabaseUnavailable):
                enrollments.enroll_student(student_id=1, course_id=1)
            assert 0.25 < time.monotonic() - started < 3
            # Readers do not wait for writers.
            assert students.get_student(student_id=1).name == "Ada"
        enrollment = enrollments.enroll_student(student_id=1, course_id=1)
        assert (enrollment.student_id, enrollment.course_id) == (1, 1)
        assert courses.get_course(course_id=1).enrolled_count == 1
    finally:
        engine.close_pool()


@pytest.mark.databases("sqlite")
@pytest.mark.parametrize(
    ("database_timeout", "pool_timeout"), [(0.3, 3.0), (1.5, 0.2)], ids=["short", "long"]
)
def test_a_writer_waits_the_database_timeout_not_the_pool_timeout(
    db_url, database_timeout, pool_timeout
):
    """--database-timeout is how long a call waits for a lock (README, Configuration);
    --pool-timeout only how long it waits for a free pooled connection."""
    engine.open_pool(db_url, max_connections=4, timeout=database_timeout, pool_timeout=pool_timeout)
    writing, done = threading.Event(), threading.Event()

    def another_write():  # another call of this process, inside its transaction
        with unit_of_work.unit_of_work(write=True):
            writing.set()
            done.wait(30)

    writer = threading.Thread(target=another_write)
    writer.start()
    try:
        assert writing.wait(10)
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailable):
            students.create_student(name="Ada", email="ada@example.com")
        waited = time.monotonic() - started
        assert database_timeout * 0.8 < waited < database_timeout + 1.0, waited
    finally:
        done.set()
        writer.join(10)
        engine.close_pool()


def test_the_writer_lock_is_handed_over_in_arrival_order_and_times_out():
    lock = unit_of_work.FairLock()
    order: list[int] = []
    lock.acquire()
    threads = []
    for i in range(5):

        def take(i=i):
            with lock:
                order.append(i)

        thread = threading.Thread(target=take)
        thread.start()
        threads.append(thread)
        while len(lock._waiters) < i + 1:  # queued before the next one starts
            time.sleep(0.001)
    started = time.monotonic()
    assert not lock.acquire(timeout=0.1)  # behind five others: gives up
    assert time.monotonic() - started >= 0.1
    lock.release()
    for thread in threads:
        thread.join(5)
    assert order == [0, 1, 2, 3, 4]
    assert lock.acquire(timeout=0)
    lock.release()
