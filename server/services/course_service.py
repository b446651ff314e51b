"""Courses: create, read, list (the catalogue or one student's courses), delete."""

from __future__ import annotations

from dataclasses import dataclass

import peewee as pw

from server.db import savepoint, transactional
from server.errors import CourseCodeTaken, HasEnrollments
from server.models import Course, StudentCourse, lowercase_key, utcnow
from server.services import pagination
from server.services.lookups import find_course, find_student
from server.services.validation import Fields


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
    try:
        with savepoint():
            return Course.create(
                code=code,
                code_key=lowercase_key(code),
                title=title,
                capacity=capacity,
                enrolled_count=0,
                create_time=utcnow(),
            )
    except pw.IntegrityError:
        raise CourseCodeTaken.of() from None


@transactional(write=False)
def get_course(*, course_id: int) -> Course:
    fields = Fields()
    fields.required_id("course_id", course_id)
    fields.check()
    return find_course(course_id)


@transactional(write=False)
def list_courses(*, student_id: int, page_size: int, page_token: str) -> CoursePage:
    fields = Fields()
    page = fields.page_request(
        pagination.Kind.COURSES,
        filter_field="student_id",
        filter_id=student_id,
        page_size=page_size,
        page_token=page_token,
    )
    fields.check()
    query = Course.select()
    if page.filter_id:
        query = query.join(StudentCourse).where(StudentCourse.student == page.filter_id)
    rows, token = page.fetch(query, Course.id)
    # No courses and a missing student look alike; only then ask which it is.
    if page.filter_id and not rows:
        find_student(page.filter_id)
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
