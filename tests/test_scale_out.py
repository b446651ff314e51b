"""Scale-out: three server processes on one PostgreSQL database, one client balancing
calls over them with round_robin (as over the pods behind a headless Service)."""

from __future__ import annotations

import re
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from enrollment.client.api import ClientError, EnrollmentClient
from tests import databases
from tests.rpc import TIMEOUT

REPLICAS = 3
THREADS = 16


@pytest.fixture
def replicas(db_url, server_process):
    """REPLICAS `enrollment-server serve` processes on their own ports, each SERVING."""
    return [server_process("--database-url", db_url) for _ in range(REPLICAS)]


def miscounted_courses(url: str) -> list[tuple]:
    """Courses, read straight from the database, whose count is not their roster's size
    or is over their capacity."""
    return databases.query(
        url,
        "SELECT c.id, c.capacity, c.enrolled_count, COUNT(sc.student_id) FROM courses c "
        "LEFT JOIN student_courses sc ON sc.course_id = c.id "
        "GROUP BY c.id, c.capacity, c.enrolled_count "
        "HAVING c.enrolled_count <> COUNT(sc.student_id) "
        "OR (c.capacity > 0 AND COUNT(sc.student_id) > c.capacity)",
    )


def served(replica) -> Counter:
    """Calls a replica logged, by method."""
    return Counter(re.findall(r"\brpc method=(\w+) code=", replica.log))


def outcome(call) -> str:
    try:
        call()
        return "OK"
    except ClientError as error:
        return f"{error.code} {error.reason}"


def race(calls) -> Counter:
    """Start the calls at once from as many threads; count their outcomes."""
    barrier = threading.Barrier(len(calls))

    def run(call) -> str:
        barrier.wait()
        return outcome(call)

    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        return Counter(pool.map(run, calls))


@pytest.mark.databases("postgresql")
def test_round_robin_over_three_replicas_keeps_every_invariant(replicas, db_url):
    target = "ipv4:" + ",".join(replica.address for replica in replicas)
    with EnrollmentClient(target, timeout=TIMEOUT, lb_policy="round_robin") as api:
        # Many students race for the few seats of one course.
        capacity = 7
        course = api.create_course("SCALE-1", "Scale out", capacity=capacity)
        students = [api.create_student(f"S{i}", f"scale{i}@example.com") for i in range(40)]
        codes = race([lambda s=s: api.enroll(s.id, course.id) for s in students])
        assert codes == {
            "OK": capacity,
            "FAILED_PRECONDITION COURSE_FULL": len(students) - capacity,
        }

        # One enrollment raced from every thread happens once.
        other = api.create_course("SCALE-2", "Once", capacity=0)
        pair = (students[0].id, other.id)
        codes = race([lambda: api.enroll(*pair)] * THREADS)
        assert codes == {"OK": 1, "ALREADY_EXISTS ALREADY_ENROLLED": THREADS - 1}

        # Enroll and drop churn on a small course.
        churn = api.create_course("SCALE-3", "Churn", capacity=3)

        def enroll_and_drop(student_id: int) -> None:
            for _ in range(5):
                if outcome(lambda: api.enroll(student_id, churn.id)) == "OK":
                    api.drop(student_id, churn.id)

        with ThreadPoolExecutor(THREADS) as pool:
            list(pool.map(enroll_and_drop, [s.id for s in students[:THREADS]]))

        for each in (course, other, churn):
            got = api.get_course(each.id)
            roster = list(api.iter_students(each.id))
            assert got.enrolled_count == len(roster)
            assert got.capacity == 0 or got.enrolled_count <= got.capacity
        assert api.get_course(course.id).enrolled_count == capacity
        assert api.get_course(churn.id).enrolled_count == 0
    assert miscounted_courses(db_url) == []

    # Every replica served a share of the calls.
    for replica in replicas:
        calls = served(replica)
        where = replica.address
        assert calls["EnrollStudent"] > 0, f"{where} served no EnrollStudent: {dict(calls)}"
        assert sum(calls.values()) >= 10, f"{where} served only {dict(calls)}"


def test_the_client_refuses_an_unknown_lb_policy():
    with pytest.raises(ValueError, match="round_robin"):
        EnrollmentClient("127.0.0.1:1", lb_policy="round-robin")
