"""BatchEnrollStudents and BatchDropCourses: limits, all or nothing, partial success,
waitlists, and races against single calls and other batches."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
from google.rpc import code_pb2, error_details_pb2

from enrollment.v1 import enrollment_pb2 as pb
from enrollment.v1 import enrollment_pb2_grpc as pb_grpc
from tests import databases, servers
from tests.rpc import TIMEOUT, expect_error, new_course, new_student

INVALID = (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD")


def enrolls(pairs, **kw):
    return pb.BatchEnrollStudentsRequest(
        requests=[pb.EnrollStudentRequest(student_id=s, course_id=c) for s, c in pairs], **kw
    )


def drops(pairs, **kw):
    return pb.BatchDropCoursesRequest(
        requests=[pb.DropCourseRequest(student_id=s, course_id=c) for s, c in pairs], **kw
    )


def bad_fields(status) -> list[str]:
    bad = error_details_pb2.BadRequest()
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            detail.Unpack(bad)
    return [v.field for v in bad.field_violations]


def reason(status) -> str:
    info = error_details_pb2.ErrorInfo()
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            detail.Unpack(info)
    return info.reason


def test_all_or_nothing_leaves_nothing_and_names_the_first_failing_item(live):
    stub, url = live.stub, live.database_url
    students = [new_student(stub).id for _ in range(4)]
    course, full = new_course(stub), new_course(stub, capacity=1)
    stub.EnrollStudent(pb.EnrollStudentRequest(student_id=students[3], course_id=full.id))
    before = databases.snapshot(url)
    pairs = [(students[0], course.id), (students[1], full.id), (students[2], 999999)]
    got = expect_error(
        stub.BatchEnrollStudents, enrolls(pairs), grpc.StatusCode.FAILED_PRECONDITION,
        "COURSE_FULL",
    )  # fmt: skip
    assert got.metadata["index"] == "1" and got.message.startswith("requests[1]: ")
    assert databases.snapshot(url) == before
    # A missing course, second in line: its BadRequest path is prefixed.
    pairs = [(students[0], course.id), (students[2], 999999)]
    got = expect_error(
        stub.BatchEnrollStudents, enrolls(pairs), grpc.StatusCode.INVALID_ARGUMENT,
        "COURSE_NOT_FOUND", ["requests[1].course_id"],
    )  # fmt: skip
    assert got.metadata["index"] == "1"
    # Malformed ids come before every other check, all listed, index the first.
    pairs = [(students[0], full.id), (0, course.id), (students[1], -1)]
    got = expect_error(
        stub.BatchEnrollStudents, enrolls(pairs), *INVALID,
        ["requests[1].student_id", "requests[2].course_id"],
    )  # fmt: skip
    assert got.metadata["index"] == "1"
    # Drops: NOT_ENROLLED of the second item undoes the first.
    stub.EnrollStudent(pb.EnrollStudentRequest(student_id=students[0], course_id=course.id))
    before = databases.snapshot(url)
    pairs = [(students[0], course.id), (students[1], course.id)]
    got = expect_error(
        stub.BatchDropCourses, drops(pairs), grpc.StatusCode.NOT_FOUND, "NOT_ENROLLED"
    )
    assert got.metadata["index"] == "1"
    assert databases.snapshot(url) == before


def test_partial_success_applies_exactly_the_ok_items(live):
    stub, url = live.stub, live.database_url
    s = [new_student(stub).id for _ in range(4)]
    course, full = new_course(stub), new_course(stub, capacity=1)
    stub.EnrollStudent(pb.EnrollStudentRequest(student_id=s[3], course_id=full.id))
    pairs = [(s[0], course.id), (s[1], full.id), (s[2], 999999), (0, course.id), (s[0], course.id),
             (s[1], course.id)]  # fmt: skip
    results = stub.BatchEnrollStudents(
        enrolls(pairs, allow_partial_success=True), timeout=TIMEOUT
    ).results
    assert [r.status.code for r in results] == [
        code_pb2.OK, code_pb2.FAILED_PRECONDITION, code_pb2.INVALID_ARGUMENT,
        code_pb2.INVALID_ARGUMENT, code_pb2.ALREADY_EXISTS, code_pb2.OK,
    ]  # fmt: skip
    assert [reason(r.status) for r in results] == [
        "", "COURSE_FULL", "COURSE_NOT_FOUND", "INVALID_FIELD", "ALREADY_ENROLLED", "",
    ]  # fmt: skip
    assert bad_fields(results[2].status) == ["requests[2].course_id"]
    assert bad_fields(results[3].status) == ["requests[3].student_id"]
    assert results[0].enrollment.student_id == s[0]
    assert results[0].enrollment.state == pb.ENROLLMENT_STATE_ENROLLED
    assert not results[1].HasField("enrollment")
    rows = databases.query(
        url, "SELECT student_id, course_id FROM student_courses ORDER BY course_id, student_id"
    )
    assert rows == sorted([(s[0], course.id), (s[1], course.id), (s[3], full.id)],
                          key=lambda r: (r[1], r[0]))  # fmt: skip
    assert databases.miscounted_courses(url) == []
    # Drops, partly: the missing entry fails alone.
    results = stub.BatchDropCourses(
        drops([(s[0], course.id), (s[2], course.id)], allow_partial_success=True),
        timeout=TIMEOUT,
    ).results
    assert [r.status.code for r in results] == [code_pb2.OK, code_pb2.NOT_FOUND]
    assert databases.query(url, "SELECT COUNT(*) FROM student_courses") == [(2,)]


def test_a_thousand_items_pass_and_a_thousand_and_one_fail(live):
    stub, url = live.stub, live.database_url
    course = new_course(stub)
    students = [new_student(stub).id for _ in range(1001)]
    expect_error(
        stub.BatchEnrollStudents, enrolls([(s, course.id) for s in students]), *INVALID,
        ["requests"],
    )  # fmt: skip
    expect_error(stub.BatchEnrollStudents, enrolls([]), *INVALID, ["requests"])
    assert databases.query(url, "SELECT COUNT(*) FROM student_courses") == [(0,)]
    results = stub.BatchEnrollStudents(
        enrolls([(s, course.id) for s in students[:1000]]), timeout=60
    ).results
    assert len(results) == 1000 and all(r.status.code == code_pb2.OK for r in results)
    assert stub.GetCourse(pb.GetCourseRequest(course_id=course.id)).course.enrolled_count == 1000
    results = stub.BatchDropCourses(
        drops([(s, course.id) for s in students[:1000]]), timeout=60
    ).results
    assert len(results) == 1000
    assert databases.query(url, "SELECT COUNT(*) FROM student_courses") == [(0,)]


def test_an_item_request_id_fails_the_whole_call_in_either_mode(live):
    stub, url = live.stub, live.database_url
    student, course = new_student(stub), new_course(stub)
    for partial in (False, True):
        request = enrolls([(student.id, course.id)] * 2, allow_partial_success=partial)
        request.requests[1].request_id = "123e4567-e89b-12d3-a456-426614174000"
        expect_error(stub.BatchEnrollStudents, request, *INVALID, ["requests[1].request_id"])
        request = drops([(student.id, course.id)], allow_partial_success=partial)
        request.requests[0].request_id = "123e4567-e89b-12d3-a456-426614174000"
        expect_error(stub.BatchDropCourses, request, *INVALID, ["requests[0].request_id"])
    assert databases.query(url, "SELECT COUNT(*) FROM student_courses") == [(0,)]


def test_batches_waitlist_and_their_drops_promote(live):
    stub, url = live.stub, live.database_url
    course = stub.CreateCourse(
        pb.CreateCourseRequest(code="W-1", title="W", capacity=2, waitlist_capacity=2)
    ).course
    s = [new_student(stub).id for _ in range(5)]
    request = enrolls([(x, course.id) for x in s], allow_partial_success=True)
    for item in request.requests:
        item.waitlist_if_full = True
    results = stub.BatchEnrollStudents(request, timeout=TIMEOUT).results
    assert [r.enrollment.state for r in results[:4]] == [1, 1, 2, 2]
    assert [r.enrollment.waitlist_position for r in results[:4]] == [0, 0, 1, 2]
    assert reason(results[4].status) == "WAITLIST_FULL"
    # Dropping both seated students promotes positions 1 and 2, in order.
    results = stub.BatchDropCourses(drops([(s[0], course.id), (s[1], course.id)])).results
    assert [r.promoted.student_id for r in results] == [s[2], s[3]]
    assert all(r.promoted.state == pb.ENROLLMENT_STATE_ENROLLED for r in results)
    assert databases.miscounted_courses(url) == []
    assert databases.query(url, "SELECT waitlisted_count FROM courses") == [(0,)]


def _stubs(address: str, n: int):
    channels = [
        grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(n)
    ]
    for channel in channels:
        grpc.channel_ready_future(channel).result(timeout=20)
    return channels, [pb_grpc.EnrollmentServiceStub(c) for c in channels]


def test_batches_racing_single_enrolls_and_each_other_never_overfill_or_deadlock(db_url, tmp_path):
    server = servers.start(tmp_path / "server.log", "--database-url", db_url, "--workers", "2")
    channels, stubs = _stubs(server.address, 8)
    try:
        stub = stubs[0]
        courses = [new_course(stub, capacity=20).id for _ in range(6)]
        students = [new_student(stub).id for _ in range(60)]
        errors: list[str] = []
        barrier = threading.Barrier(8)

        def batch(i):
            # Batches over the same courses, half of them in the opposite order.
            order = courses if i % 2 else list(reversed(courses))
            pairs = [(s, c) for c in order for s in students[i * 10 : i * 10 + 10]]
            barrier.wait()
            try:
                stubs[i].BatchEnrollStudents(enrolls(pairs, allow_partial_success=True), timeout=60)
            except grpc.RpcError as exc:
                errors.append(f"batch {i}: {exc.code()} {exc.details()}")

        def singles(i):
            barrier.wait()
            for s in students[40 + (i - 4) * 5 : 40 + (i - 4) * 5 + 5]:
                for c in courses:
                    try:
                        stubs[i].EnrollStudent(
                            pb.EnrollStudentRequest(student_id=s, course_id=c), timeout=60
                        )
                    except grpc.RpcError as exc:
                        if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
                            errors.append(f"single {i}: {exc.code()} {exc.details()}")

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: batch(i) if i < 4 else singles(i), range(8)))
        assert errors == []
        assert databases.miscounted_courses(db_url) == []
        full = databases.query(db_url, "SELECT enrolled_count FROM courses ORDER BY id")
        # 40 students by batch and 20 singly want each course of 20 seats: every seat taken.
        assert full == [(20,)] * 6
    finally:
        for channel in channels:
            channel.close()
        server.stop()
