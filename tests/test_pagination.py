"""AIP-158 pagination: sizes, tokens, full walks, and rows created during a walk."""

import time

import grpc
import pytest

from enrollment.server.persistence.models import Student
from enrollment.v1 import enrollment_pb2 as pb
from tests import databases
from tests.rpc import TIMEOUT, enroll, expect_error, new_course, new_student

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def bulk_students(live, count: int) -> None:
    """Insert students straight into the database, as a bulk load would."""
    with databases.connection(live.database_url) as db, db.atomic():
        Student.insert_many(
            [
                (f"S{i}", f"bulk{i}@example.com", f"bulk{i}@example.com", "2026-01-01 00:00:00")
                for i in range(count)
            ],
            fields=[Student.name, Student.email, Student.email_key, Student.create_time],
        ).execute(db)


def walk(call, request_type, page_size, **filters):
    ids, pages, token = [], 0, ""
    while True:
        page = call(request_type(page_size=page_size, page_token=token, **filters), timeout=TIMEOUT)
        rows = page.students if request_type is pb.ListStudentsRequest else page.courses
        ids += [r.id for r in rows]
        pages += 1
        token = page.next_page_token
        if not token:
            return ids, pages


def test_default_page_size_is_50(stub, live):
    bulk_students(live, 51)
    first = stub.ListStudents(pb.ListStudentsRequest(), timeout=TIMEOUT)
    assert len(first.students) == 50 and first.next_page_token
    second = stub.ListStudents(
        pb.ListStudentsRequest(page_token=first.next_page_token), timeout=TIMEOUT
    )
    assert len(second.students) == 1 and second.next_page_token == ""


def test_page_size_above_1000_is_1000(stub, live):
    bulk_students(live, 1001)
    page = stub.ListStudents(pb.ListStudentsRequest(page_size=2**31 - 1), timeout=TIMEOUT)
    assert len(page.students) == 1000 and page.next_page_token
    ids = [s.id for s in page.students]
    assert ids == sorted(ids) and len(set(ids)) == 1000


def test_no_token_on_the_last_page_when_rows_are_an_exact_multiple(stub):
    for _ in range(6):
        new_course(stub)
    ids, pages = walk(stub.ListCourses, pb.ListCoursesRequest, 3)
    assert len(ids) == 6 and pages == 2
    page = stub.ListCourses(pb.ListCoursesRequest(page_size=6), timeout=TIMEOUT)
    assert len(page.courses) == 6 and page.next_page_token == ""


def test_empty_table_gives_an_empty_page_without_token(stub):
    page = stub.ListStudents(pb.ListStudentsRequest(), timeout=TIMEOUT)
    assert list(page.students) == [] and page.next_page_token == ""


def test_full_walk_returns_each_row_once_in_id_order_with_changing_page_sizes(stub, live):
    bulk_students(live, 237)
    ids, token, sizes = [], "", iter([1, 7, 50, 3, 100, 2, 1000])
    while True:
        request = pb.ListStudentsRequest(page_size=next(sizes, 13), page_token=token)
        page = stub.ListStudents(request, timeout=TIMEOUT)
        ids += [s.id for s in page.students]
        token = page.next_page_token
        if not token:
            break
    assert len(ids) == 237 and ids == sorted(set(ids))


def test_roster_and_student_courses_walks(stub):
    course = new_course(stub)
    student = new_student(stub)
    enrolled = []
    for i in range(11):
        other = new_student(stub)
        if i % 2 == 0:
            enroll(stub, other.id, course.id)
            enrolled.append(other.id)
    courses = [new_course(stub) for _ in range(9)]
    for c in courses[::2]:
        enroll(stub, student.id, c.id)
    ids, pages = walk(stub.ListStudents, pb.ListStudentsRequest, 2, course_id=course.id)
    assert ids == enrolled and pages == 3
    ids, pages = walk(stub.ListCourses, pb.ListCoursesRequest, 4, student_id=student.id)
    assert ids == [c.id for c in courses[::2]] and pages == 2


def test_rows_created_during_a_walk_are_neither_skipped_nor_repeated(stub):
    before = [new_student(stub).id for _ in range(5)]
    seen, created, token = [], [], ""
    while True:
        page = stub.ListStudents(pb.ListStudentsRequest(page_size=2, page_token=token))
        seen += [s.id for s in page.students]
        # Someone keeps creating students while we walk (for the first few pages).
        if len(created) < 6:
            created += [new_student(stub).id, new_student(stub).id]
        token = page.next_page_token
        if not token:
            break
    assert seen == sorted(set(seen))
    assert seen == before + created


_HELD = {  # a row of each kind inserted by hand, uncommitted: its unique key is held
    "student": (
        "INSERT INTO students (name, email, email_key, create_time, update_time, version)"
        " VALUES ('Held', 'late@example.com', 'late@example.com', ?, ?, 0)"
    ),
    "course": (
        "INSERT INTO courses (code, code_key, title, capacity, enrolled_count,"
        " waitlist_capacity, waitlisted_count, create_time, update_time, version)"
        " VALUES ('LATE-1', 'late-1', 'Held', 0, 0, 0, 0, ?, ?, 0)"
    ),
}


def _create(stub, kind: str, key: str):
    """A create of kind under key (an email's local part or a code), as a future."""
    if kind == "student":
        request = pb.CreateStudentRequest(name=key, email=f"{key}@example.com")
        return stub.CreateStudent.future(request, timeout=TIMEOUT)
    return stub.CreateCourse.future(pb.CreateCourseRequest(code=key, title=key), timeout=TIMEOUT)


@pytest.mark.parametrize("kind", ["student", "course"])
def test_a_create_that_commits_late_is_not_left_behind_a_walk(backend, live, stub, kind):
    """PostgreSQL's sequences and InnoDB's AUTO_INCREMENT hand out an id at the INSERT,
    and the row appears at the COMMIT: unless creates take turns, a create that has its
    id and then waits lets later creates commit higher ids, a walk passes them, and the
    first row commits behind the walk's position, never to be listed.

    The first create here waits on a unique key another connection holds uncommitted;
    two plain creates follow. A walk goes to the end of what is visible, keeping the
    token before its last page (as a client that follows new rows does); then the other
    connection rolls back, every create finishes, and the walk goes on from that token:
    every created row must be in the walk."""
    if backend == "sqlite":
        pytest.skip("SQLite has one writer at a time: ids are taken in commit order")
    list_rpc, request_type = (
        (stub.ListStudents, pb.ListStudentsRequest)
        if kind == "student"
        else (stub.ListCourses, pb.ListCoursesRequest)
    )

    def ids(page):
        return [r.id for r in (page.students if kind == "student" else page.courses)]

    _create(stub, kind, "first-1").result(timeout=TIMEOUT)  # a row before the position
    with databases.connection(live.database_url) as db:
        db.begin()
        try:
            db.execute_sql(_HELD[kind].replace("?", db.param), ("2026-01-01",) * 2)
            late = _create(stub, kind, "late" if kind == "student" else "LATE-1")
            time.sleep(0.5)
            assert not late.done(), "the held key did not make the create wait"
            others = [_create(stub, kind, name) for name in ("next-1", "next-2")]
            time.sleep(1.0)  # unordered, the others commit now; taking turns, they wait
            seen, token = [], ""
            while True:
                page = list_rpc(request_type(page_size=1, page_token=token), timeout=TIMEOUT)
                seen += ids(page)
                if not page.next_page_token:
                    break  # token stays the one before the last page
                token = page.next_page_token
        finally:
            db.rollback()
    created = [ids_of(future.result(timeout=TIMEOUT), kind) for future in (late, *others)]
    while True:
        page = list_rpc(request_type(page_size=10, page_token=token), timeout=TIMEOUT)
        seen += ids(page)
        if not page.next_page_token:
            break
        token = page.next_page_token
    assert set(created) <= set(seen), f"created {created}, walked {seen}"


def ids_of(response, kind: str) -> int:
    return (response.student if kind == "student" else response.course).id


def test_a_row_deleted_during_a_walk_does_not_break_it(stub):
    ids = [new_course(stub).id for _ in range(6)]
    first = stub.ListCourses(pb.ListCoursesRequest(page_size=2))
    stub.DeleteCourse(pb.DeleteCourseRequest(course_id=ids[1]))  # the token's own row
    stub.DeleteCourse(pb.DeleteCourseRequest(course_id=ids[2]))
    rest, _ = walk(stub.ListCourses, pb.ListCoursesRequest, 2)
    second = stub.ListCourses(pb.ListCoursesRequest(page_size=10, page_token=first.next_page_token))
    assert [c.id for c in second.courses] == ids[3:]
    assert rest == [ids[0], *ids[3:]]


def test_token_reused_with_another_filter_is_invalid(stub):
    course_a, course_b = new_course(stub), new_course(stub)
    for _ in range(3):
        enroll(stub, new_student(stub).id, course_a.id)
    page = stub.ListStudents(pb.ListStudentsRequest(course_id=course_a.id, page_size=1))
    token = page.next_page_token
    assert token
    for course_id in (course_b.id, 0):
        request = pb.ListStudentsRequest(course_id=course_id, page_token=token)
        got = expect_error(stub.ListStudents, request, INVALID, "INVALID_FIELD", ["page_token"])
        assert "filter" in got.message
    # The same token with the same filter still works.
    request = pb.ListStudentsRequest(course_id=course_a.id, page_token=token, page_size=5)
    assert len(stub.ListStudents(request).students) == 2


def test_token_of_another_method_is_invalid(stub):
    for _ in range(2):
        new_course(stub)
        new_student(stub)
    courses_token = stub.ListCourses(pb.ListCoursesRequest(page_size=1)).next_page_token
    students_token = stub.ListStudents(pb.ListStudentsRequest(page_size=1)).next_page_token
    expect_error(
        stub.ListStudents,
        pb.ListStudentsRequest(page_token=courses_token),
        INVALID,
        "INVALID_FIELD",
        ["page_token"],
    )
    expect_error(
        stub.ListCourses,
        pb.ListCoursesRequest(page_token=students_token),
        INVALID,
        "INVALID_FIELD",
        ["page_token"],
    )


@pytest.mark.parametrize(
    "token",
    ["!", "not a token", "AQEAAAAAAAAAAAAAAAAAAAAB" * 3, "A" * 10_000, "ünï", "AQ EA", "AQ+/"],
)
def test_garbage_tokens_are_invalid(stub, token):
    request = pb.ListCoursesRequest(page_token=token)
    got = expect_error(stub.ListCourses, request, INVALID, "INVALID_FIELD", ["page_token"])
    assert got.message == "page_token: is not a page token issued by this method"


@pytest.mark.parametrize("dirt", ["\x00", "\n", "\t", "\x7f", "\r\n", "\x1f"])
@pytest.mark.parametrize("where", ["end", "middle"])
def test_an_issued_token_with_control_characters_is_invalid(stub, dirt, where):
    # A page token is text like every request field: control characters are refused,
    # not skipped (base64 decoding would drop them and serve the page).
    for _ in range(3):
        new_student(stub)
        new_course(stub)
    student = new_student(stub)
    enroll(stub, student.id, new_course(stub).id)
    enroll(stub, student.id, new_course(stub).id)
    for method, request_type, token in (
        (
            stub.ListStudents,
            pb.ListStudentsRequest,
            stub.ListStudents(pb.ListStudentsRequest(page_size=1)).next_page_token,
        ),
        (
            stub.ListEnrollments,
            pb.ListEnrollmentsRequest,
            stub.ListEnrollments(pb.ListEnrollmentsRequest(page_size=1)).next_page_token,
        ),
    ):
        assert token
        half = len(token) // 2
        dirty = token + dirt if where == "end" else token[:half] + dirt + token[half:]
        request = request_type(page_size=1, page_token=dirty)
        got = expect_error(method, request, INVALID, "INVALID_FIELD", ["page_token"])
        assert got.message == "page_token: must not contain control characters"
        # Surrounding spaces are trimmed, as in every text field: the same page.
        spaced = method(request_type(page_size=1, page_token=f"  {token} "), timeout=TIMEOUT)
        clean = method(request_type(page_size=1, page_token=token), timeout=TIMEOUT)
        assert spaced == clean


def test_negative_page_size_is_invalid(stub):
    expect_error(
        stub.ListStudents,
        pb.ListStudentsRequest(page_size=-1),
        INVALID,
        "INVALID_FIELD",
        ["page_size"],
    )
