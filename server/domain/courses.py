"""Courses: create, read, list (the catalogue or one student's courses), delete."""

from __future__ import annotations

from dataclasses import dataclass

from enrollment.server.domain import page_tokens
from enrollment.server.domain.lookups import find_course, find_student
from enrollment.server.domain.rows import create_unique, list_page
from enrollment.server.domain.validation import Fields
from enrollment.server.errors import CourseCodeTaken, HasEnrollments
from enrollment.server.persistence.models import Course, StudentCourse, lowercase_key, utcnow
from enrollment.server.persistence.prepared import Prepared
from enrollment.server.persistence.unit_of_work import transactional

# A page of the catalogue, and of one student's courses: keyset on the course id. A
# student's courses are ordered by the join table's course_id, the same values, so that
# SQLite walks the primary key (student_id, course_id) in order instead of sorting.
_CATALOGUE_PAGE = Prepared(
    lambda after_id, limit: (
        Course.select().where(Course.id > after_id).order_by(Course.id).limit(limit)
    ),
    2,
)
_STUDENT_COURSES_PAGE = Prepared(
    lambda student_id, after_id, limit: (
        Course.select()
        .join(StudentCourse)
        .where((StudentCourse.student == student_id) & (StudentCourse.course > after_id))
        .order_by(StudentCourse.course)
        .limit(limit)
    ),
    3,
)


@dataclass(frozen=True)
class CoursePage:
    courses: list[Course]
    next_page_token: str


@transactional(write=True)
def create_course(*, code: str, title: str, capacity: int) -> Course:
    fields = Fields()
    code = fields.code("code", code)
    title = fields.name("title", title)
    capacity = fields.capacity("capacity", capacity)
    fields.check()
    return create_unique(
        Course,
        CourseCodeTaken.of,
        code=code,
        code_key=lowercase_key(code),
        title=title,
        capacity=capacity,
        enrolled_count=0,
        create_time=utcnow(),
    )


@transactional(write=False)
def get_course(*, course_id: int) -> Course:
    fields = Fields()
    fields.required_id("course_id", course_id)
    fields.check()
    return find_course(course_id)


@transactional(write=False)
def list_courses(*, student_id: int, page_size: int, page_token: str) -> CoursePage:
    rows, token = list_page(
        page_tokens.Kind.COURSES,
        filter_field="student_id",
        filter_id=student_id,
        page_size=page_size,
        page_token=page_token,
        every_row=_CATALOGUE_PAGE,
        filtered=_STUDENT_COURSES_PAGE,
        find_filter=find_student,  # no courses, or no such student?
    )
    return CoursePage(rows, token)


@transactional(write=True)
def delete_course(*, course_id: int, force: bool) -> None:
    fields = Fields()
    fields.required_id("course_id", course_id)
    fields.check()
    course = find_course(course_id, lock=True)
    count = StudentCourse.select().where(StudentCourse.course == course_id).count()
    if count and not force:
        raise HasEnrollments.of("course", course.id, count)
    if count:
        StudentCourse.delete().where(StudentCourse.course == course_id).execute()
    Course.delete().where(Course.id == course_id).execute()
