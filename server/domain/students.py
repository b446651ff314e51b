"""Students: create, read, list (all or a course's roster), delete."""

from __future__ import annotations

from dataclasses import dataclass

from enrollment.server.domain import page_tokens
from enrollment.server.domain.lookups import find_course, find_student
from enrollment.server.domain.rows import create_unique, list_page
from enrollment.server.domain.validation import Fields
from enrollment.server.errors import EmailTaken, HasEnrollments
from enrollment.server.persistence.models import (
    Course,
    Student,
    StudentCourse,
    lowercase_key,
    utcnow,
)
from enrollment.server.persistence.prepared import Prepared
from enrollment.server.persistence.unit_of_work import locking, transactional

# A page of all students, and of one course's roster: keyset on the student id. The roster
# is ordered by the join table's student_id, the same values, so that SQLite reads the
# (course_id, student_id) index in order and stops after one page instead of sorting
# the whole roster.
_STUDENTS_PAGE = Prepared(
    lambda after_id, limit: (
        Student.select().where(Student.id > after_id).order_by(Student.id).limit(limit)
    ),
    2,
)
_ROSTER_PAGE = Prepared(
    lambda course_id, after_id, limit: (
        Student.select()
        .join(StudentCourse)
        .where((StudentCourse.course == course_id) & (StudentCourse.student > after_id))
        .order_by(StudentCourse.student)
        .limit(limit)
    ),
    3,
)


@dataclass(frozen=True)
class StudentPage:
    students: list[Student]
    next_page_token: str


@transactional(write=True)
def create_student(*, name: str, email: str) -> Student:
    fields = Fields()
    name = fields.name("name", name)
    email = fields.email("email", email)
    fields.check()
    return create_unique(
        Student,
        EmailTaken.of,
        name=name,
        email=email,
        email_key=lowercase_key(email),
        create_time=utcnow(),
    )


@transactional(write=False)
def get_student(*, student_id: int) -> Student:
    fields = Fields()
    fields.required_id("student_id", student_id)
    fields.check()
    return find_student(student_id)


@transactional(write=False)
def list_students(*, course_id: int, page_size: int, page_token: str) -> StudentPage:
    rows, token = list_page(
        page_tokens.Kind.STUDENTS,
        filter_field="course_id",
        filter_id=course_id,
        page_size=page_size,
        page_token=page_token,
        every_row=_STUDENTS_PAGE,
        filtered=_ROSTER_PAGE,
        find_filter=find_course,  # an empty roster, or no such course?
    )
    return StudentPage(rows, token)


@transactional(write=True)
def delete_student(*, student_id: int, force: bool) -> None:
    fields = Fields()
    fields.required_id("student_id", student_id)
    fields.check()
    # Locked first: an enrollment of this student racing the delete either committed
    # before (and is counted below) or waits and then finds no student.
    find_student(student_id, lock=True)
    courses = _courses_of(student_id)
    if courses:
        # Every enroll and drop locks its course first, so with these courses locked
        # (in id order, as enrollment writers do) none of the student's enrollments
        # can change under us; read them again, as a drop may have just committed.
        locking(
            Course.select(Course.id).where(Course.id.in_(courses)).order_by(Course.id)
        ).execute()
        courses = _courses_of(student_id)
    if courses and not force:
        raise HasEnrollments.of("student", student_id, len(courses))
    if courses:
        # Each course the student leaves loses one enrolled student: the courses are
        # named by value, not by a subquery a concurrent drop could have changed.
        Course.update(enrolled_count=Course.enrolled_count - 1).where(
            Course.id.in_(courses)
        ).execute()
        StudentCourse.delete().where(StudentCourse.student == student_id).execute()
    Student.delete().where(Student.id == student_id).execute()


def _courses_of(student_id: int) -> list[int]:
    query = StudentCourse.select(StudentCourse.course).where(StudentCourse.student == student_id)
    return [row.course_id for row in query]
