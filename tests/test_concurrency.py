"""Races: exactly-once enrollment, capacity never exceeded, enrolled_count equal to the roster."""

import random
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc

from enrollment.v1 import enrollment_pb2 as pb
from tests.rpc import TIMEOUT, new_course, new_student

THREADS = 16


def race(calls):
    """Run the calls at once from many threads; return each one's status code."""
    barrier = threading.Barrier(len(calls))

    def run(call):
        barrier.wait()
        try:
            call()
            return grpc.StatusCode.OK
        except grpc.RpcError as error:
            return error.code()

    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        return list(pool.map(run, calls))


def counts_match_rosters(live) -> None:
    path = live.database_url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as conn:
        rows = conn.execute(
            "SELECT c.id, c.capacity, c.enrolled_count, COUNT(sc.student_id) FROM courses c "
            "LEFT JOIN student_courses sc ON sc.course_id = c.id GROUP BY c.id"
        ).fetchall()
    for course_id, capacity, enrolled_count, roster in rows:
        assert enrolled_count == roster, f"course {course_id}: {enrolled_count} != {roster}"
        assert capacity == 0 or roster <= capacity


def test_same_enrollment_raced_from_many_threads_succeeds_once(live):
    stub = live.stub
    student, course = new_student(stub), new_course(stub)
    request = pb.EnrollStudentRequest(student_id=student.id, course_id=course.id)
    codes = race([lambda: stub.EnrollStudent(request, timeout=TIMEOUT)] * THREADS)
    assert codes.count(grpc.StatusCode.OK) == 1
    assert codes.count(grpc.StatusCode.ALREADY_EXISTS) == THREADS - 1
    assert stub.GetCourse(pb.GetCourseRequest(course_id=course.id)).course.enrolled_count == 1
    counts_match_rosters(live)


def test_many_students_race_for_a_small_course(live):
    stub = live.stub
    capacity = 5
    course = new_course(stub, capacity=capacity)
    students = [new_student(stub) for _ in range(THREADS * 2)]
    calls = [
        (
            lambda s=s: stub.EnrollStudent(
                pb.EnrollStudentRequest(student_id=s.id, course_id=course.id), timeout=TIMEOUT
            )
        )
        for s in students
    ]
    codes = race(calls)
    assert codes.count(grpc.StatusCode.OK) == capacity
    assert codes.count(grpc.StatusCode.FAILED_PRECONDITION) == len(students) - capacity
    got = stub.GetCourse(pb.GetCourseRequest(course_id=course.id)).course
    assert got.enrolled_count == capacity
    roster = stub.ListStudents(pb.ListStudentsRequest(course_id=course.id)).students
    assert len(roster) == capacity
    counts_match_rosters(live)


def test_random_enrolls_drops_and_deletes_keep_counts_exact(live):
    stub = live.stub
    rng = random.Random(1234)
    courses = [new_course(stub, capacity=rng.choice([0, 2, 3, 5])) for _ in range(6)]
    students = [new_student(stub) for _ in range(20)]
    expected = {
        grpc.StatusCode.OK,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.INVALID_ARGUMENT,
    }

    def one_call():
        s, c = rng.choice(students).id, rng.choice(courses).id
        kind = rng.random()
        if kind < 0.55:
            return lambda: stub.EnrollStudent(
                pb.EnrollStudentRequest(student_id=s, course_id=c), timeout=TIMEOUT
            )
        if kind < 0.95:
            return lambda: stub.DropCourse(
                pb.DropCourseRequest(student_id=s, course_id=c), timeout=TIMEOUT
            )
        return lambda: stub.DeleteStudent(
            pb.DeleteStudentRequest(student_id=s, force=True), timeout=TIMEOUT
        )

    for _ in range(5):
        codes = race([one_call() for _ in range(40)])
        assert set(codes) <= expected, codes
        counts_match_rosters(live)
