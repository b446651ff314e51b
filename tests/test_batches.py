"""BatchEnrollStudents and BatchDropCourses: limits, all or nothing, partial success,
waitlists, and races against single calls and other batches."""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2

from enrollment.v1 import enrollment_pb2 as pb
from enrollment.v1 import enrollment_pb2_grpc as pb_grpc
from tests import databases, servers
from tests.rpc import TIMEOUT, expect_error, failure, new_course, new_student

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


REQUEST_ID = "123e4567-e89b-12d3-a456-426614174000"


def test_an_item_request_id_is_named_in_item_order_and_index_is_the_first_failing_item(live):
    # The item request_id violations were listed before every malformed id, and "index"
    # counted only the malformed items: missing, or naming a later item.
    stub, url = live.stub, live.database_url
    student, course = new_student(stub), new_course(stub)
    cases = [
        # (pairs, the items with a request_id, partial, the fields in order, index)
        ([(student.id, course.id)] * 2, [1], False, ["requests[1].request_id"], "1"),
        ([(student.id, course.id)] * 2, [1], True, ["requests[1].request_id"], "1"),
        (
            [(student.id, course.id), (student.id, course.id), (0, course.id)],
            [1], False, ["requests[1].request_id", "requests[2].student_id"], "1",
        ),
        (
            [(0, course.id), (student.id, course.id)],
            [1], False, ["requests[0].student_id", "requests[1].request_id"], "0",
        ),
        # Allowed partial success, a malformed item is its own outcome: the call fails
        # for the item request_id alone.
        ([(0, course.id), (student.id, course.id)], [1], True, ["requests[1].request_id"], "1"),
    ]  # fmt: skip
    for pairs, named, partial, fields, index in cases:
        for build, call in ((enrolls, stub.BatchEnrollStudents), (drops, stub.BatchDropCourses)):
            request = build(pairs, allow_partial_success=partial)
            for i in named:
                request.requests[i].request_id = REQUEST_ID
            got = expect_error(call, request, *INVALID, fields)
            assert (got.fields, got.metadata.get("index")) == (fields, index), (pairs, partial)
            assert got.message.index(fields[0]) <= got.message.index(fields[-1])
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


MISSING = 999_999


def _entry_of(entry) -> tuple:
    return ("OK", (entry.student_id, entry.state, entry.waitlist_position))


def _singly(stub, kind: str, items) -> list[tuple]:
    """Each item made alone with EnrollStudent/DropCourse: ("OK", entry or None) or
    (code, reason)."""
    out: list[tuple] = []
    for student, course, waitlist in items:
        try:
            if kind == "enroll":
                request = pb.EnrollStudentRequest(
                    student_id=student, course_id=course, waitlist_if_full=waitlist
                )
                out.append(_entry_of(stub.EnrollStudent(request, timeout=TIMEOUT).enrollment))
            else:
                request = pb.DropCourseRequest(student_id=student, course_id=course)
                response = stub.DropCourse(request, timeout=TIMEOUT)
                out.append(_entry_of(response.promoted) if response.HasField("promoted")
                           else ("OK", None))  # fmt: skip
        except grpc.RpcError as exc:
            out.append((exc.code().name, failure(exc).reason))
    return out


def _batch_request(kind: str, items, partial: bool):
    if kind == "enroll":
        return stub_call("BatchEnrollStudents"), pb.BatchEnrollStudentsRequest(
            requests=[
                pb.EnrollStudentRequest(student_id=s, course_id=c, waitlist_if_full=w)
                for s, c, w in items
            ],
            allow_partial_success=partial,
        )
    return stub_call("BatchDropCourses"), drops([(s, c) for s, c, _ in items],
                                                allow_partial_success=partial)  # fmt: skip


def stub_call(name: str):
    return lambda stub: getattr(stub, name)


def _batched(stub, kind: str, items) -> list[tuple]:
    """The items as one batch with allow_partial_success, outcomes as _singly's."""
    method, request = _batch_request(kind, items, True)
    out: list[tuple] = []
    for result in method(stub)(request, timeout=60).results:
        entry = result.enrollment if kind == "enroll" else result.promoted
        if result.status.code:
            out.append((grpc.StatusCode(_CODES[result.status.code]).name, reason(result.status)))
        elif result.HasField("enrollment" if kind == "enroll" else "promoted"):
            out.append(_entry_of(entry))
        else:
            out.append(("OK", None))
    return out


_CODES = {code.value[0]: code for code in grpc.StatusCode}


def _state(url: str, course_ids: list[int]) -> list:
    """Per course: its counts, who is enrolled, and who waits in line order."""
    found = []
    for course_id in course_ids:
        counts = databases.query(
            url, "SELECT enrolled_count, waitlisted_count FROM courses WHERE id = ?", (course_id,)
        )
        rows = databases.query(
            url,
            "SELECT student_id, state FROM student_courses WHERE course_id = ? "
            "ORDER BY state, join_number, student_id",
            (course_id,),
        )
        found.append((counts, rows))
    return found


def _events(stub, course_id: int) -> list[tuple]:
    page = stub.ListEvents(pb.ListEventsRequest(course_id=course_id, page_size=1000))
    return [
        (e.type, e.enrollment.student_id, e.enrollment.state, e.enrollment.waitlist_position)
        for e in page.events
    ]


def test_a_batch_does_what_its_items_do_one_by_one(live):
    """Random rounds of enroll and drop batches over small courses with waitlists (with
    duplicates, missing students and courses, full courses and waitlists) against a
    mirror of the same courses where each item is made alone: the same outcome per
    item, the same rosters and waitlists, the same events. All or nothing, tried
    first in some rounds, fails at the first item that fails alone and changes nothing."""
    stub, url = live.stub, live.database_url
    rng = random.Random(12)
    students = [new_student(stub).id for _ in range(8)]
    shapes = [(1, 3), (2, 2), (3, 0)]
    mine, mirror = [], []
    for capacity, waitlist in shapes:
        for side in (mine, mirror):
            request = pb.CreateCourseRequest(
                code=f"D-{len(mine)}-{len(mirror)}", title="D", capacity=capacity,
                waitlist_capacity=waitlist,
            )  # fmt: skip
            side.append(stub.CreateCourse(request, timeout=TIMEOUT).course.id)
    to_mirror = dict(zip(mine, mirror, strict=True))
    seen: set = set()
    for round_ in range(8):
        kind = "enroll" if round_ % 2 == 0 else "drop"
        items = [
            (
                MISSING if rng.random() < 0.05 else rng.choice(students),
                MISSING if rng.random() < 0.05 else rng.choice(mine),
                rng.random() < 0.7,
            )
            for _ in range(14)
        ]
        expected = _singly(stub, kind, [(s, to_mirror.get(c, c), w) for s, c, w in items])
        seen |= {(kind, o[1] if o[0] != "OK" else o[1] and o[1][1]) for o in expected}
        if rng.random() < 0.5:
            before = databases.snapshot(url)
            method, request = _batch_request(kind, items, False)
            failing = [i for i, outcome in enumerate(expected) if outcome[0] != "OK"]
            if failing:
                got = expect_error(method(stub), request, grpc.StatusCode[expected[failing[0]][0]],
                                   expected[failing[0]][1])  # fmt: skip
                assert got.metadata["index"] == str(failing[0])
                assert databases.snapshot(url) == before
        assert _batched(stub, kind, items) == expected, (round_, kind, items)
        assert _state(url, mine) == _state(url, mirror), round_
    # The rounds met every outcome: seats, waitlist places, promotions, each failure.
    assert seen >= {
        ("enroll", pb.ENROLLMENT_STATE_ENROLLED), ("enroll", pb.ENROLLMENT_STATE_WAITLISTED),
        ("drop", pb.ENROLLMENT_STATE_ENROLLED), ("drop", None), ("enroll", "COURSE_FULL"),
        ("enroll", "WAITLIST_FULL"), ("enroll", "ALREADY_ENROLLED"),
        ("enroll", "ALREADY_WAITLISTED"), ("drop", "NOT_ENROLLED"),
        ("enroll", "COURSE_NOT_FOUND"), ("enroll", "STUDENT_NOT_FOUND"),
    }, seen  # fmt: skip
    for course, twin in to_mirror.items():
        assert _events(stub, course) == _events(stub, twin)
    assert databases.miscounted_courses(url) == []


def test_a_bad_batch_of_any_size_reaches_a_grpcio_client_as_invalid_argument(live):
    # Each bad item is a field violation, listed in the message (grpc-message) and in
    # BadRequest (grpc-status-details-bin). Past about 80 of them the two passed the 8 KiB
    # that grpcio's C-core client allows for trailers, and it answered RESOURCE_EXHAUSTED
    # with no details in place of the server's INVALID_ARGUMENT.
    for size in (1000, 100):
        with pytest.raises(grpc.RpcError) as raised:
            live.stub.BatchEnrollStudents(enrolls([(0, 1)] * size), timeout=TIMEOUT)
        got = failure(raised.value)
        assert (got.code, got.reason) == INVALID, got.message[:300]
        assert got.message.startswith("requests[0].student_id: must be 1 or more; ")
        assert got.message.endswith(f"({size} field violations in all)"), got.message[-200:]
        # The first ones, in order: enough to act on.
        assert 10 <= len(got.fields) < size
        assert got.fields == [f"requests[{i}].student_id" for i in range(len(got.fields))]
