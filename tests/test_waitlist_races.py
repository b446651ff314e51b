"""Waitlist races on a 2-worker server, per database; invariants checked in SQL, one query each."""

from __future__ import annotations

import random
import threading
import time

import grpc
from google.protobuf import field_mask_pb2

from enrollment.v1 import enrollment_pb2 as pb
from enrollment.v1 import enrollment_pb2_grpc as pb_grpc
from tests import databases
from tests.rpc import TIMEOUT, race

CONNECTIONS = 8
WAITLISTED = 2

# Each query returns the rows that break one invariant of the contract's Waitlists section.
INVARIANTS = {
    "enrolled_count = entries ENROLLED": (
        "SELECT c.id FROM courses c WHERE c.enrolled_count <> "
        "(SELECT COUNT(*) FROM student_courses e WHERE e.course_id = c.id AND e.state = 1)"
    ),
    "waitlisted_count = entries WAITLISTED": (
        "SELECT c.id FROM courses c WHERE c.waitlisted_count <> "
        "(SELECT COUNT(*) FROM student_courses e WHERE e.course_id = c.id AND e.state = 2)"
    ),
    "enrolled_count <= capacity": (
        "SELECT id FROM courses WHERE capacity > 0 AND enrolled_count > capacity"
    ),
    "waitlisted_count <= waitlist_capacity": (
        "SELECT id FROM courses WHERE waitlisted_count > waitlist_capacity"
    ),
    "nobody waits while a seat is free": (
        "SELECT id FROM courses WHERE waitlisted_count > 0 "
        "AND (capacity = 0 OR enrolled_count < capacity)"
    ),
    # Positions are 1 + the waiting entries with a smaller join number: they run
    # 1..n without gaps exactly when join numbers are distinct and positive.
    "join numbers distinct and positive among waiting entries": (
        "SELECT course_id, join_number FROM student_courses WHERE state = 2 "
        "GROUP BY course_id, join_number HAVING COUNT(*) > 1 OR join_number < 1"
    ),
    "enrolled entries carry no join number": (
        "SELECT course_id, student_id FROM student_courses WHERE state = 1 AND join_number <> 0"
    ),
    "join numbers below the course's counter": (
        "SELECT e.course_id FROM student_courses e JOIN courses c ON c.id = e.course_id "
        "WHERE e.join_number > c.waitlist_joins"
    ),
}


def check_invariants(url: str) -> None:
    with databases.connection(url) as db:
        for name, sql in INVARIANTS.items():
            assert databases.sql(db, sql) == [], name


def _stubs(address: str):
    channels = [
        grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(CONNECTIONS)
    ]
    for channel in channels:
        grpc.channel_ready_future(channel).result(timeout=20)
    return channels, [pb_grpc.EnrollmentServiceStub(c) for c in channels]


def test_sixty_race_for_five_seats_and_ten_places_then_a_storm(db_url, server_process):
    address = server_process("--database-url", db_url, "--workers", "2").address
    channels = []
    try:
        channels, stubs = _stubs(address)
        stub = stubs[0]
        course = stub.CreateCourse(
            pb.CreateCourseRequest(code="RACE-1", title="Race", capacity=5, waitlist_capacity=10),
            timeout=TIMEOUT,
        ).course
        students = [
            stub.CreateStudent(
                pb.CreateStudentRequest(name=f"S{i}", email=f"race{i}@example.com"),
                timeout=TIMEOUT,
            ).student
            for i in range(60)
        ]
        outcomes = []

        def enroll(i, s):
            def call():
                got = stubs[i % CONNECTIONS].EnrollStudent(
                    pb.EnrollStudentRequest(
                        student_id=s.id, course_id=course.id, waitlist_if_full=True
                    ),
                    timeout=TIMEOUT,
                )
                outcomes.append(got.enrollment.state)

            return call

        codes = race([enroll(i, s) for i, s in enumerate(students)])
        assert codes.count(grpc.StatusCode.OK) == 15
        assert codes.count(grpc.StatusCode.FAILED_PRECONDITION) == 45
        assert outcomes.count(pb.ENROLLMENT_STATE_ENROLLED) == 5
        assert outcomes.count(pb.ENROLLMENT_STATE_WAITLISTED) == 10
        got = stub.GetCourse(pb.GetCourseRequest(course_id=course.id)).course
        assert (got.enrolled_count, got.waitlisted_count) == (5, 10)
        line = stub.ListEnrollments(
            pb.ListEnrollmentsRequest(course_id=course.id, state=WAITLISTED)
        ).enrollments
        assert [e.waitlist_position for e in line] == list(range(1, 11))
        check_invariants(db_url)

        # The storm: drops, re-enrolls (with and without the waitlist) and capacity changes.
        rng = random.Random(11)

        def one_call(i):
            stub_i = stubs[i % CONNECTIONS]
            s = rng.choice(students).id
            kind = rng.random()
            if kind < 0.4:
                return lambda: stub_i.DropCourse(
                    pb.DropCourseRequest(student_id=s, course_id=course.id), timeout=TIMEOUT
                )
            if kind < 0.85:
                wait = rng.random() < 0.8
                return lambda: stub_i.EnrollStudent(
                    pb.EnrollStudentRequest(
                        student_id=s, course_id=course.id, waitlist_if_full=wait
                    ),
                    timeout=TIMEOUT,
                )
            capacity = rng.choice([0, 3, 5, 6, 8])
            waitlist = rng.choice([0, 4, 10, 12])
            return lambda: stub_i.UpdateCourse(
                pb.UpdateCourseRequest(
                    course=pb.Course(id=course.id, capacity=capacity, waitlist_capacity=waitlist),
                    update_mask=field_mask_pb2.FieldMask(paths=["capacity", "waitlist_capacity"]),
                ),
                timeout=TIMEOUT,
            )

        expected = {
            grpc.StatusCode.OK,
            grpc.StatusCode.ALREADY_EXISTS,
            grpc.StatusCode.FAILED_PRECONDITION,
            grpc.StatusCode.NOT_FOUND,
        }
        for _ in range(8):
            codes = race([one_call(i) for i in range(40)])
            assert set(codes) <= expected, codes
            check_invariants(db_url)
        line = stub.ListEnrollments(
            pb.ListEnrollmentsRequest(course_id=course.id, state=WAITLISTED)
        ).enrollments
        assert [e.waitlist_position for e in line] == list(range(1, len(line) + 1))
    finally:
        for channel in channels:
            channel.close()


def test_positions_read_while_the_line_moves_run_1_to_n(db_url, server_process):
    # Each waiting entry's position was counted in a statement of its own: under READ
    # COMMITTED (PostgreSQL, MariaDB) a page read while others joined and left showed
    # positions such as [1, 2, 2] or [1, 1, 3]; GetEnrollment paired its row with a
    # later count.
    address = server_process("--database-url", db_url, "--workers", "2").address
    channels = []
    try:
        channels, stubs = _stubs(address)
        course = (
            stubs[0]
            .CreateCourse(
                pb.CreateCourseRequest(code="LINE", title="Line", capacity=2, waitlist_capacity=30),
                timeout=TIMEOUT,
            )
            .course
        )
        students = [
            stubs[0]
            .CreateStudent(
                pb.CreateStudentRequest(name=f"L{i}", email=f"line{i}@example.com"),
                timeout=TIMEOUT,
            )
            .student.id
            for i in range(24)
        ]
        stop = time.monotonic() + 4
        wrong: list[object] = []
        reads = [0]

        def writer(i: int) -> None:
            rng = random.Random(i)
            while time.monotonic() < stop:
                student = rng.choice(students)
                try:
                    if rng.random() < 0.5:
                        stubs[i % CONNECTIONS].EnrollStudent(
                            pb.EnrollStudentRequest(
                                student_id=student, course_id=course.id, waitlist_if_full=True
                            ),
                            timeout=TIMEOUT,
                        )
                    else:
                        stubs[i % CONNECTIONS].DropCourse(
                            pb.DropCourseRequest(student_id=student, course_id=course.id),
                            timeout=TIMEOUT,
                        )
                except grpc.RpcError as error:
                    assert error.code() in (
                        grpc.StatusCode.ALREADY_EXISTS,
                        grpc.StatusCode.FAILED_PRECONDITION,
                        grpc.StatusCode.NOT_FOUND,
                    ), error

        def reader(i: int) -> None:
            stub = stubs[i % CONNECTIONS]
            while time.monotonic() < stop:
                line = stub.ListEnrollments(
                    pb.ListEnrollmentsRequest(course_id=course.id, state=WAITLISTED),
                    timeout=TIMEOUT,
                ).enrollments
                everyone = stub.ListEnrollments(
                    pb.ListEnrollmentsRequest(course_id=course.id), timeout=TIMEOUT
                ).enrollments
                waiting = sorted(e.waitlist_position for e in everyone if e.state == WAITLISTED)
                for positions in ([e.waitlist_position for e in line], waiting):
                    if positions != list(range(1, len(positions) + 1)):
                        wrong.append(positions)
                reads[0] += 2

        threads = [threading.Thread(target=writer, args=(i,)) for i in range(12)]
        threads += [threading.Thread(target=reader, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert reads[0] > 20
        assert wrong == [], f"{len(wrong)} of {reads[0]} pages, such as {wrong[:3]}"
        check_invariants(db_url)
    finally:
        for channel in channels:
            channel.close()
