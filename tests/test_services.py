"""Service rules tested without the transport: domain errors, not gRPC statuses."""

import pytest

from server import db as database
from server.errors import (
    AlreadyEnrolled,
    CourseFull,
    HasEnrollments,
    InvalidField,
    NotEnrolled,
    StudentNotFound,
    UnknownCourseArgument,
)
from server.services import course_service, pagination, student_course_service, student_service
from server.services.validation import Fields


@pytest.fixture
def services(db_url):
    database.connect(db_url, max_connections=2)
    yield
    database.close()


def test_token_round_trip_and_binding():
    token = pagination.encode(kind=pagination.Kind.COURSES, filter_id=7, after_id=42)
    assert pagination.decode(token, kind=pagination.Kind.COURSES, filter_id=7) == 42
    assert pagination.decode("", kind=pagination.Kind.COURSES, filter_id=7) == 0
    with pytest.raises(pagination.BadToken, match="different filter"):
        pagination.decode(token, kind=pagination.Kind.COURSES, filter_id=8)
    with pytest.raises(pagination.BadToken):
        pagination.decode(token, kind=pagination.Kind.STUDENTS, filter_id=7)
    for garbage in ("x", token[:-1], token + "AA", "é"):
        with pytest.raises(pagination.BadToken):
            pagination.decode(garbage, kind=pagination.Kind.COURSES, filter_id=7)


@pytest.mark.parametrize(("requested", "effective"), [(0, 50), (1, 1), (1000, 1000), (1001, 1000)])
def test_effective_page_size(requested, effective):
    assert pagination.effective_page_size(requested) == effective


def test_fields_collects_every_violation():
    fields = Fields()
    assert fields.name("name", "  Ada  ") == "Ada"
    fields.email("email", "no-at-sign")
    fields.code("code", "white space")
    fields.required_id("student_id", 0)
    with pytest.raises(InvalidField) as raised:
        fields.check()
    assert [v.field for v in raised.value.violations] == ["email", "code", "student_id"]
    assert (raised.value.code, raised.value.reason) == ("INVALID_ARGUMENT", "INVALID_FIELD")


def test_enrollment_rules(services):
    student = student_service.create_student(name="Ada", email="ada@example.com")
    other = student_service.create_student(name="Bob", email="bob@example.com")
    course = course_service.create_course(code="CS-1", title="One", capacity=1)
    enrollment = student_course_service.enroll_student(student_id=student.id, course_id=course.id)
    assert (enrollment.student_id, enrollment.course_id) == (student.id, course.id)
    with pytest.raises(AlreadyEnrolled):
        student_course_service.enroll_student(student_id=student.id, course_id=course.id)
    with pytest.raises(CourseFull) as full:
        student_course_service.enroll_student(student_id=other.id, course_id=course.id)
    assert (full.value.code, full.value.reason) == ("FAILED_PRECONDITION", "COURSE_FULL")
    with pytest.raises(UnknownCourseArgument) as unknown:
        student_course_service.enroll_student(student_id=999, course_id=999)
    assert unknown.value.code == "INVALID_ARGUMENT"
    with pytest.raises(StudentNotFound):
        student_course_service.drop_course(student_id=999, course_id=course.id)
    with pytest.raises(NotEnrolled):
        student_course_service.drop_course(student_id=other.id, course_id=course.id)
    with pytest.raises(HasEnrollments):
        course_service.delete_course(course_id=course.id, force=False)
    student_course_service.drop_course(student_id=student.id, course_id=course.id)
    assert course_service.get_course(course_id=course.id).enrolled_count == 0
    page = course_service.list_courses(student_id=student.id, page_size=0, page_token="")
    assert page.courses == [] and page.next_page_token == ""
