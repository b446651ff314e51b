"""Courses: create, read, list (the catalogue or one student's courses), delete."""

from __future__ import annotations

from dataclasses import dataclass

import peewee as pw

from server.db import transactional
from server.errors import CourseCodeTaken, CourseNotFound, HasEnrollments
from server.models import Course, StudentCourse, casefold_key, utcnow
from server.services import pagination
from server.services.student_service import find_student
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
        with Course._meta.database.atomic():  # savepoint: the transaction survives a duplicate
            return Course.create(
                code=code,
                code_key=casefold_key(code),
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


def find_course(course_id: int) -> Course:
    course = Course.get_or_none(Course.id == course_id)
    if course is None:
        raise CourseNotFound.of(course_id)
    return course


@transactional(write=False)
def list_courses(*, student_id: int, page_size: int, page_token: str) -> CoursePage:
    fields = Fields()
    student_id = fields.optional_id("student_id", student_id)
    size = fields.page_size("page_size", page_size)
    after_id = fields.page_token(
        "page_token", page_token, kind=pagination.Kind.COURSES, filter_id=student_id
    )
    fields.check()

    query = Course.select().where(Course.id > after_id).order_by(Course.id).limit(size + 1)
    if student_id:
        query = query.join(StudentCourse).where(StudentCourse.student == student_id)
    rows = list(query)
    # No courses and a missing student look alike; only then ask which it is.
    if student_id and not rows:
        find_student(student_id)
    rows, token = pagination.next_token(
        rows, size, kind=pagination.Kind.COURSES, filter_id=student_id
    )
    return CoursePage(rows, token)


@transactional(write=True)
def delete_course(*, course_id: int, force: bool) -> None:
    fields = Fields()
    fields.required_id("course_id", course_id)
    fields.check()
    course = find_course(course_id)
    count = StudentCourse.select().where(StudentCourse.course == course_id).count()
    if count and not force:
        raise HasEnrollments.of("course", course.id, count)
    if count:
        StudentCourse.delete().where(StudentCourse.course == course_id).execute()
    Course.delete().where(Course.id == course_id).execute()
