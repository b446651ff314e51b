"""v1.1 lifecycle: updates (masks, etags), waitlists, enrollments as a resource; every new
status row with its code, reason, domain and BadRequest fields, in the contract's order."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import field_mask_pb2

from enrollment.server.transport import error_status
from enrollment.v1 import enrollment_pb2 as pb
from tests import databases
from tests.rpc import TIMEOUT, expect_error, failure, new_student, varint

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
FAILED = grpc.StatusCode.FAILED_PRECONDITION
EXISTS = grpc.StatusCode.ALREADY_EXISTS
ABORTED = grpc.StatusCode.ABORTED
ENROLLED = pb.ENROLLMENT_STATE_ENROLLED
WAITLISTED = pb.ENROLLMENT_STATE_WAITLISTED


def mask(*paths: str) -> field_mask_pb2.FieldMask:
    return field_mask_pb2.FieldMask(paths=list(paths))


def course(stub, capacity=0, waitlist=0, code=None) -> pb.Course:
    code = code or f"W-{course.serial}"
    course.serial += 1
    request = pb.CreateCourseRequest(
        code=code, title="Waitlisted", capacity=capacity, waitlist_capacity=waitlist
    )
    return stub.CreateCourse(request, timeout=TIMEOUT).course


course.serial = 1


def enroll(stub, student_id, course_id, wait=False) -> pb.Enrollment:
    request = pb.EnrollStudentRequest(
        student_id=student_id, course_id=course_id, waitlist_if_full=wait
    )
    return stub.EnrollStudent(request, timeout=TIMEOUT).enrollment


def drop(stub, student_id, course_id) -> pb.DropCourseResponse:
    request = pb.DropCourseRequest(student_id=student_id, course_id=course_id)
    return stub.DropCourse(request, timeout=TIMEOUT)


def get_course(stub, course_id) -> pb.Course:
    return stub.GetCourse(pb.GetCourseRequest(course_id=course_id), timeout=TIMEOUT).course


def waitlist(stub, course_id) -> list[tuple[int, int]]:
    request = pb.ListEnrollmentsRequest(course_id=course_id, state=WAITLISTED)
    got = stub.ListEnrollments(request, timeout=TIMEOUT).enrollments
    return [(e.student_id, e.waitlist_position) for e in got]


def snapshot(live) -> dict[str, list[tuple]]:
    with databases.connection(live.database_url) as db:
        return {
            t: databases.sql(db, f"SELECT * FROM {t} ORDER BY {order}")
            for t, order in (
                ("students", "id"),
                ("courses", "id"),
                ("student_courses", "course_id, student_id"),
            )
        }


@pytest.fixture
def full(stub):
    """A course of capacity 2 and waitlist 2, full, with two students waiting."""
    c = course(stub, capacity=2, waitlist=2)
    people = [new_student(stub) for _ in range(6)]
    for s in people[:2]:
        assert enroll(stub, s.id, c.id).state == ENROLLED
    for n, s in enumerate(people[2:4], start=1):
        e = enroll(stub, s.id, c.id, wait=True)
        assert (e.state, e.waitlist_position, e.HasField("enroll_time")) == (WAITLISTED, n, False)
    return c, people


# --- waitlists ---------------------------------------------------------------------------


def test_waitlist_story_drop_promotes_position_one(stub, full):
    c, people = full
    got = get_course(stub, c.id)
    assert (got.enrolled_count, got.waitlisted_count) == (2, 2)
    assert waitlist(stub, c.id) == [(people[2].id, 1), (people[3].id, 2)]
    promoted = drop(stub, people[0].id, c.id).promoted
    assert (promoted.student_id, promoted.state, promoted.waitlist_position) == (
        people[2].id, ENROLLED, 0,
    )  # fmt: skip
    assert promoted.HasField("enroll_time") and promoted.HasField("create_time")
    assert waitlist(stub, c.id) == [(people[3].id, 1)]
    got = get_course(stub, c.id)
    assert (got.enrolled_count, got.waitlisted_count) == (2, 1)
    # Dropping a waiting entry promotes nobody, and positions close up.
    assert not drop(stub, people[3].id, c.id).HasField("promoted")
    assert waitlist(stub, c.id) == []
    # Rosters show enrolled entries only.
    roster = stub.ListStudents(pb.ListStudentsRequest(course_id=c.id)).students
    assert sorted(s.id for s in roster) == sorted([people[1].id, people[2].id])


def test_already_waitlisted_then_full_waitlist_then_course_full(stub, full):
    c, people = full
    expect_error(
        stub.EnrollStudent,
        pb.EnrollStudentRequest(student_id=people[0].id, course_id=c.id, waitlist_if_full=True),
        EXISTS, "ALREADY_ENROLLED",
    )  # fmt: skip
    expect_error(
        stub.EnrollStudent,
        pb.EnrollStudentRequest(student_id=people[2].id, course_id=c.id, waitlist_if_full=True),
        EXISTS, "ALREADY_WAITLISTED",
    )  # fmt: skip
    expect_error(
        stub.EnrollStudent,
        pb.EnrollStudentRequest(student_id=people[4].id, course_id=c.id, waitlist_if_full=True),
        FAILED, "WAITLIST_FULL",
    )  # fmt: skip
    # Without waitlist_if_full a full course is COURSE_FULL, as in v1.0.
    expect_error(
        stub.EnrollStudent,
        pb.EnrollStudentRequest(student_id=people[4].id, course_id=c.id),
        FAILED, "COURSE_FULL",
    )  # fmt: skip
    # A course without a waitlist: COURSE_FULL even when asked for the waitlist.
    plain = course(stub, capacity=1)
    enroll(stub, people[0].id, plain.id)
    expect_error(
        stub.EnrollStudent,
        pb.EnrollStudentRequest(student_id=people[4].id, course_id=plain.id, waitlist_if_full=True),
        FAILED, "COURSE_FULL",
    )  # fmt: skip


def test_forced_deletes(live, stub, full):
    c, people = full
    # HAS_ENROLLMENTS counts waitlist entries too.
    expect_error(
        stub.DeleteStudent, pb.DeleteStudentRequest(student_id=people[3].id), FAILED,
        "HAS_ENROLLMENTS",
    )  # fmt: skip
    # A forced DeleteStudent of an enrolled student frees the seat: position 1 takes it.
    stub.DeleteStudent(pb.DeleteStudentRequest(student_id=people[0].id, force=True))
    got = get_course(stub, c.id)
    assert (got.enrolled_count, got.waitlisted_count) == (2, 1)
    assert waitlist(stub, c.id) == [(people[3].id, 1)]
    e = stub.GetEnrollment(pb.GetEnrollmentRequest(student_id=people[2].id, course_id=c.id))
    assert e.enrollment.state == ENROLLED
    # A forced DeleteCourse empties its waitlist and roster.
    stub.DeleteCourse(pb.DeleteCourseRequest(course_id=c.id, force=True))
    assert databases.query(live.database_url, "SELECT COUNT(*) FROM student_courses") == [(0,)]


def test_raising_capacity_promotes_in_line_order(stub, full):
    c, people = full
    got = stub.UpdateCourse(
        pb.UpdateCourseRequest(course=pb.Course(id=c.id, capacity=3), update_mask=mask("capacity"))
    ).course
    assert (got.capacity, got.enrolled_count, got.waitlisted_count) == (3, 3, 1)
    assert waitlist(stub, c.id) == [(people[3].id, 1)]
    got = stub.UpdateCourse(
        pb.UpdateCourseRequest(course=pb.Course(id=c.id, capacity=0), update_mask=mask("capacity"))
    ).course
    assert (got.capacity, got.enrolled_count, got.waitlisted_count) == (0, 4, 0)


def test_list_enrollments_orders_and_pages(stub, full):
    c, people = full
    other = course(stub)
    enroll(stub, people[5].id, other.id)
    everything = []
    token = ""
    while True:
        page = stub.ListEnrollments(pb.ListEnrollmentsRequest(page_size=2, page_token=token))
        everything += [(e.course_id, e.student_id) for e in page.enrollments]
        token = page.next_page_token
        if not token:
            break
    assert everything == sorted(everything) and len(everything) == 5
    mine = stub.ListEnrollments(pb.ListEnrollmentsRequest(student_id=people[3].id)).enrollments
    assert [(e.course_id, e.state, e.waitlist_position) for e in mine] == [(c.id, WAITLISTED, 2)]
    # A token is bound to its filters.
    page = stub.ListEnrollments(pb.ListEnrollmentsRequest(course_id=c.id, page_size=1))
    expect_error(
        stub.ListEnrollments,
        pb.ListEnrollmentsRequest(course_id=other.id, page_token=page.next_page_token),
        INVALID, "INVALID_FIELD", ["page_token"],
    )  # fmt: skip
    # Waitlist order, paged.
    first = stub.ListEnrollments(
        pb.ListEnrollmentsRequest(course_id=c.id, state=WAITLISTED, page_size=1)
    )
    assert [e.student_id for e in first.enrollments] == [people[2].id]
    second = stub.ListEnrollments(
        pb.ListEnrollmentsRequest(
            course_id=c.id, state=WAITLISTED, page_size=1, page_token=first.next_page_token
        )
    )
    assert [(e.student_id, e.waitlist_position) for e in second.enrollments] == [(people[3].id, 2)]
    assert second.next_page_token == ""


def test_get_and_list_enrollments_check_the_course_before_the_student(stub, full):
    c, people = full
    expect_error(
        stub.GetEnrollment, pb.GetEnrollmentRequest(student_id=10**9, course_id=10**9),
        NOT_FOUND, "COURSE_NOT_FOUND",
    )  # fmt: skip
    expect_error(
        stub.GetEnrollment, pb.GetEnrollmentRequest(student_id=10**9, course_id=c.id),
        NOT_FOUND, "STUDENT_NOT_FOUND",
    )  # fmt: skip
    expect_error(
        stub.GetEnrollment, pb.GetEnrollmentRequest(student_id=people[5].id, course_id=c.id),
        NOT_FOUND, "NOT_ENROLLED",
    )  # fmt: skip
    expect_error(
        stub.GetEnrollment, pb.GetEnrollmentRequest(student_id=0, course_id=-1),
        INVALID, "INVALID_FIELD", ["student_id", "course_id"],
    )  # fmt: skip
    expect_error(
        stub.ListEnrollments, pb.ListEnrollmentsRequest(student_id=10**9, course_id=10**9),
        NOT_FOUND, "COURSE_NOT_FOUND",
    )  # fmt: skip
    expect_error(
        stub.ListEnrollments, pb.ListEnrollmentsRequest(student_id=10**9),
        NOT_FOUND, "STUDENT_NOT_FOUND",
    )  # fmt: skip
    expect_error(
        stub.ListEnrollments, pb.ListEnrollmentsRequest(state=7, page_size=-1),
        INVALID, "INVALID_FIELD", ["state", "page_size"],
    )  # fmt: skip
    got = stub.GetEnrollment(pb.GetEnrollmentRequest(student_id=people[3].id, course_id=c.id))
    assert (got.enrollment.state, got.enrollment.waitlist_position) == (WAITLISTED, 2)


# --- updates -----------------------------------------------------------------------------


def test_update_student_mask_etag_and_update_time(stub):
    s = new_student(stub, name="Ada")
    assert s.etag and s.update_time == s.create_time
    same = stub.UpdateStudent(pb.UpdateStudentRequest(student=pb.Student(id=s.id, name="Ada")))
    assert same.student.etag == s.etag and same.student.update_time == s.update_time
    changed = stub.UpdateStudent(
        pb.UpdateStudentRequest(student=pb.Student(id=s.id, name="Grace", etag=s.etag))
    ).student
    assert (changed.name, changed.email) == ("Grace", s.email)
    assert changed.etag != s.etag and changed.update_time != s.update_time
    expect_error(
        stub.UpdateStudent,
        pb.UpdateStudentRequest(student=pb.Student(id=s.id, name="Old", etag=s.etag)),
        ABORTED, "ETAG_MISMATCH",
    )  # fmt: skip
    # An etag it never had: the message does not claim the student changed.
    never = expect_error(
        stub.UpdateStudent,
        pb.UpdateStudentRequest(student=pb.Student(id=s.id, name="Old", etag='W/"999"')),
        ABORTED, "ETAG_MISMATCH",
    )  # fmt: skip
    assert f"the etag is not student {s.id}'s current one" in never.message
    other = new_student(stub)
    expect_error(
        stub.UpdateStudent,
        pb.UpdateStudentRequest(student=pb.Student(id=s.id, email=other.email.upper())),
        EXISTS, "EMAIL_TAKEN",
    )  # fmt: skip
    # "*" sets every mutable field, zero values included: a blank name is invalid.
    expect_error(
        stub.UpdateStudent,
        pb.UpdateStudentRequest(
            student=pb.Student(id=s.id, email="x@y.org"), update_mask=mask("*")
        ),
        INVALID, "INVALID_FIELD", ["student.name"],
    )  # fmt: skip


def test_update_course_check_order(stub, full):
    c, people = full
    taken = course(stub)
    # INVALID_FIELD before NOT_FOUND.
    expect_error(
        stub.UpdateCourse,
        pb.UpdateCourseRequest(
            course=pb.Course(id=10**9, capacity=-1), update_mask=mask("capacity")
        ),
        INVALID, "INVALID_FIELD", ["course.capacity"],
    )  # fmt: skip
    # NOT_FOUND before ETAG_MISMATCH.
    expect_error(
        stub.UpdateCourse,
        pb.UpdateCourseRequest(course=pb.Course(id=10**9, title="T", etag="nope")),
        NOT_FOUND, "COURSE_NOT_FOUND",
    )  # fmt: skip
    # ETAG_MISMATCH before COURSE_CODE_TAKEN.
    expect_error(
        stub.UpdateCourse,
        pb.UpdateCourseRequest(course=pb.Course(id=c.id, code=taken.code, etag="nope")),
        ABORTED, "ETAG_MISMATCH",
    )  # fmt: skip
    # COURSE_CODE_TAKEN before CAPACITY_BELOW_ENROLLMENT.
    expect_error(
        stub.UpdateCourse,
        pb.UpdateCourseRequest(
            course=pb.Course(id=c.id, code=taken.code.lower(), capacity=1, etag=c.etag)
        ),
        EXISTS, "COURSE_CODE_TAKEN",
    )  # fmt: skip
    # CAPACITY_BELOW_ENROLLMENT before WAITLIST_BELOW_WAITING.
    expect_error(
        stub.UpdateCourse,
        pb.UpdateCourseRequest(
            course=pb.Course(id=c.id, capacity=1, waitlist_capacity=1),
            update_mask=mask("capacity", "waitlist_capacity"),
        ),
        FAILED, "CAPACITY_BELOW_ENROLLMENT",
    )  # fmt: skip
    expect_error(
        stub.UpdateCourse,
        pb.UpdateCourseRequest(course=pb.Course(id=c.id, waitlist_capacity=1)),
        FAILED, "WAITLIST_BELOW_WAITING",
    )  # fmt: skip
    # waitlist_capacity is checked against what waits after this update's promotions:
    # one new seat leaves one waiting, which a waitlist of 1 holds.
    got = stub.UpdateCourse(
        pb.UpdateCourseRequest(
            course=pb.Course(id=c.id, capacity=3, waitlist_capacity=1, etag=c.etag)
        )
    ).course
    assert (got.enrolled_count, got.waitlisted_count, got.waitlist_capacity) == (3, 1, 1)
    assert got.etag != c.etag
    # Counts moving alone do not change the etag.
    drop(stub, people[0].id, c.id)
    assert get_course(stub, c.id).etag == got.etag


BAD_MASKS = [
    (["nickname"], "unknown"),
    (["enrolled_count"], "output only"),
    (["waitlisted_count"], "output only"),
    (["create_time"], "output only"),
    (["update_time"], "output only"),
    (["id"], "the name"),
    (["etag"], "the guard"),
    (["title", "title"], "duplicated"),
    ([""], "empty"),
    (["*", "title"], "* beside others"),
    (["create_time.seconds"], "a sub-field"),
]


@pytest.mark.parametrize(("paths", "why"), BAD_MASKS, ids=[b[1] + str(b[0]) for b in BAD_MASKS])
def test_bad_masks_change_nothing(live, stub, paths, why):
    c = course(stub, capacity=3, waitlist=1)
    s = new_student(stub)
    before = snapshot(live)
    expect_error(
        stub.UpdateCourse,
        pb.UpdateCourseRequest(
            course=pb.Course(id=c.id, title="New", capacity=9), update_mask=mask(*paths)
        ),
        INVALID, "INVALID_FIELD", ["update_mask"],
    )  # fmt: skip
    student_paths = [{"title": "name"}.get(p, p) for p in paths]
    if not any(p in ("enrolled_count", "waitlisted_count") for p in student_paths):
        expect_error(
            stub.UpdateStudent,
            pb.UpdateStudentRequest(
                student=pb.Student(id=s.id, name="N"), update_mask=mask(*student_paths)
            ),
            INVALID, "INVALID_FIELD", ["update_mask"],
        )  # fmt: skip
    assert snapshot(live) == before


@pytest.mark.parametrize("etag", ["garbage", 'W/"999"', "\x00", "x" * 1000, 'W/"1" '])
def test_garbage_etags_are_aborted_and_change_nothing(live, stub, etag):
    c = course(stub)
    s = new_student(stub)
    before = snapshot(live)
    expect_error(
        stub.UpdateCourse,
        pb.UpdateCourseRequest(course=pb.Course(id=c.id, title="T2", etag=etag)),
        ABORTED, "ETAG_MISMATCH",
    )  # fmt: skip
    expect_error(
        stub.UpdateStudent,
        pb.UpdateStudentRequest(student=pb.Student(id=s.id, name="N2", etag=etag)),
        ABORTED, "ETAG_MISMATCH",
    )  # fmt: skip
    assert snapshot(live) == before


@pytest.mark.parametrize("field", ["capacity", "waitlist_capacity"])
@pytest.mark.parametrize("value", [-1, -(2**31), 2**31, 2**32 - 1, 2**63 - 1])
def test_capacities_negative_or_above_int32_change_nothing(live, stub, field, value):
    c = course(stub, capacity=3, waitlist=2)
    before = snapshot(live)
    number = pb.Course.DESCRIPTOR.fields_by_name[field].number
    # Course{id, <field>} encoded by hand: a varint wider than int32 reaches the server,
    # which reads its low 32 bits as a two's-complement int32 (negative here, or else
    # a value the client could not have meant).
    inner = b"\x08" + varint(c.id) + bytes([number << 3]) + varint(value)
    raw = b"\x0a" + varint(len(inner)) + inner + b"\x12" + varint(len(field) + 2)
    raw += b"\x0a" + varint(len(field)) + field.encode()
    call = live.channel.unary_unary(
        "/enrollment.v1.EnrollmentService/UpdateCourse",
        request_serializer=lambda b: b,
        response_deserializer=pb.UpdateCourseResponse.FromString,
    )
    as_int32 = ((value & 0xFFFFFFFF) ^ 0x80000000) - 0x80000000
    assert as_int32 < 0
    expect_error(call, raw, INVALID, "INVALID_FIELD", [f"course.{field}"])
    expect_error(
        stub.CreateCourse,
        pb.CreateCourseRequest(code="NEG-1", title="T", **{field: as_int32}),
        INVALID, "INVALID_FIELD", [field],
    )  # fmt: skip
    assert snapshot(live) == before


def test_a_long_or_many_times_wrong_update_mask_reaches_a_grpcio_client_whole(live):
    # A status's violations, in its message and its BadRequest, stop where grpcio's
    # C-core client would refuse the trailers (8 KiB) and answer RESOURCE_EXHAUSTED
    # without details: here unknown mask paths, many and one very long.
    student = new_student(live.stub)
    for paths in ([f"p{i}" for i in range(400)], ["x" * 40_000]):
        request = pb.UpdateStudentRequest(
            student=pb.Student(id=student.id, name="B"),
            update_mask=field_mask_pb2.FieldMask(paths=paths),
        )
        with pytest.raises(grpc.RpcError) as raised:
            live.stub.UpdateStudent(request, timeout=TIMEOUT)
        got = failure(raised.value)
        assert (got.code, got.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD")
        assert got.fields and set(got.fields) == {"update_mask"}
        assert len(got.message) <= error_status.MESSAGE_BUDGET
