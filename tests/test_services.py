"""Service rules tested without the transport: domain errors, not gRPC statuses."""

import pytest

from enrollment.server.domain import courses, enrollments, page_tokens, students
from enrollment.server.domain.validation import Fields
from enrollment.server.errors import (
    AlreadyEnrolled,
    CourseFull,
    HasEnrollments,
    InvalidField,
    NotEnrolled,
    StudentNotFound,
    UnknownCourseArgument,
)
from enrollment.server.persistence import engine
from enrollment.server.persistence.models import Course, Student


@pytest.fixture
def services(db_url):
    engine.open_pool(db_url, max_connections=2)
    yield
    engine.close_pool()


def test_token_round_trip_and_binding():
    token = page_tokens.encode(kind=page_tokens.Kind.COURSES, filter_id=7, after_id=42)
    assert page_tokens.decode(token, kind=page_tokens.Kind.COURSES, filter_id=7) == 42
    assert page_tokens.decode("", kind=page_tokens.Kind.COURSES, filter_id=7) == 0
    with pytest.raises(page_tokens.BadToken, match="different filter"):
        page_tokens.decode(token, kind=page_tokens.Kind.COURSES, filter_id=8)
    with pytest.raises(page_tokens.BadToken):
        page_tokens.decode(token, kind=page_tokens.Kind.STUDENTS, filter_id=7)
    for garbage in ("x", token[:-1], token + "AA", "é"):
        with pytest.raises(page_tokens.BadToken):
            page_tokens.decode(garbage, kind=page_tokens.Kind.COURSES, filter_id=7)


@pytest.mark.parametrize(("requested", "effective"), [(0, 50), (1, 1), (1000, 1000), (1001, 1000)])
def test_effective_page_size(requested, effective):
    assert page_tokens.effective_page_size(requested) == effective


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
    student = students.create_student(name="Ada", email="ada@example.com")
    other = students.create_student(name="Bob", email="bob@example.com")
    course = courses.create_course(code="CS-1", title="One", capacity=1)
    enrollment = enrollments.enroll_student(student_id=student.id, course_id=course.id)
    assert (enrollment.student_id, enrollment.course_id) == (student.id, course.id)
    with pytest.raises(AlreadyEnrolled):
        enrollments.enroll_student(student_id=student.id, course_id=course.id)
    with pytest.raises(CourseFull) as full:
        enrollments.enroll_student(student_id=other.id, course_id=course.id)
    assert (full.value.code, full.value.reason) == ("FAILED_PRECONDITION", "COURSE_FULL")
    with pytest.raises(UnknownCourseArgument) as unknown:
        enrollments.enroll_student(student_id=999, course_id=999)
    assert unknown.value.code == "INVALID_ARGUMENT"
    with pytest.raises(StudentNotFound):
        enrollments.drop_course(student_id=999, course_id=course.id)
    with pytest.raises(NotEnrolled):
        enrollments.drop_course(student_id=other.id, course_id=course.id)
    with pytest.raises(HasEnrollments):
        courses.delete_course(course_id=course.id, force=False)
    enrollments.drop_course(student_id=student.id, course_id=course.id)
    assert courses.get_course(course_id=course.id).enrolled_count == 0
    page = courses.list_courses(student_id=student.id, page_size=0, page_token="")
    assert page.courses == [] and page.next_page_token == ""


def test_list_pages_hold_the_same_values_as_the_models(services):
    """The hot pages come back as named tuples (Prepared plain=True) and the one-statement
    reads run without a transaction: each row's fields are the model's, converted alike."""
    made = [students.create_student(name=f"S{i}", email=f"s{i}@example.com") for i in range(3)]
    course = courses.create_course(code="P-1", title="Plain", capacity=10)
    for student in made[:2]:
        enrollments.enroll_student(student_id=student.id, course_id=course.id)
    with engine.proxy.connection_context():
        expected_students = {s.id: s.__data__ for s in Student.select()}
        expected_course = Course.get_by_id(course.id).__data__
    page = students.list_students(course_id=0, page_size=0, page_token="")
    assert [s._asdict() for s in page.students] == list(expected_students.values())
    roster = students.list_students(course_id=course.id, page_size=1, page_token="")
    assert [s._asdict() for s in roster.students] == [expected_students[made[0].id]]
    following = students.list_students(
        course_id=course.id, page_size=1, page_token=roster.next_page_token
    )
    assert [s.id for s in following.students] == [made[1].id]
    (listed,) = courses.list_courses(student_id=made[0].id, page_size=0, page_token="").courses
    assert listed._asdict() == expected_course
    assert courses.list_courses(student_id=made[2].id, page_size=0, page_token="").courses == []
    with pytest.raises(StudentNotFound):
        courses.list_courses(student_id=999, page_size=0, page_token="")
    assert students.get_student(student_id=made[1].id).__data__ == expected_students[made[1].id]
