"""Enrollment rules: who may join or leave a course, and the course's count kept exact."""

from __future__ import annotations

import peewee as pw

from server.db import transactional
from server.errors import (
    AlreadyEnrolled,
    CourseFull,
    NotEnrolled,
    StudentNotFound,
    UnknownCourseArgument,
)
from server.models import Course, StudentCourse, utcnow
from server.services.lookups import find_student
from server.services.validation import Fields


def _validate_pair(student_id: int, course_id: int) -> Course:
    """Checks in contract order: malformed ids, then the course, then the student."""
    fields = Fields()
    fields.required_id("student_id", student_id)
    fields.required_id("course_id", course_id)
    fields.check()
    course = Course.get_or_none(Course.id == course_id)
    if course is None:
        raise UnknownCourseArgument.of(course_id)
    find_student(student_id)
    return course


@transactional(write=True)
def enroll_student(*, student_id: int, course_id: int) -> StudentCourse:
    course = _validate_pair(student_id, course_id)
    try:
        # The primary key decides duplicates; the savepoint keeps the transaction usable.
        with StudentCourse._meta.database.atomic():
            enrollment = StudentCourse.create(
                student=student_id, course=course_id, enroll_time=utcnow()
            )
    except pw.IntegrityError:
        raise _explain_rejected_enrollment(student_id, course_id) from None
    # One conditional UPDATE takes the seat; no row changed means the course is full,
    # and raising rolls the enrollment back with the rest of the transaction.
    taken = (
        Course.update(enrolled_count=Course.enrolled_count + 1)
        .where(
            (Course.id == course_id)
            & ((Course.capacity == 0) | (Course.enrolled_count < Course.capacity))
        )
        .execute()
    )
    if taken != 1:
        raise CourseFull.of(course_id, course.capacity)
    return enrollment


def _explain_rejected_enrollment(student_id: int, course_id: int) -> Exception:
    """The insert broke a constraint: a duplicate, or a row deleted by a concurrent call."""
    exists = StudentCourse.select().where(
        (StudentCourse.student == student_id) & (StudentCourse.course == course_id)
    )
    if exists.exists():
        return AlreadyEnrolled.of(student_id, course_id)
    if not Course.select().where(Course.id == course_id).exists():
        return UnknownCourseArgument.of(course_id)
    try:
        find_student(student_id)
    except StudentNotFound as missing:
        return missing
    return AlreadyEnrolled.of(student_id, course_id)


@transactional(write=True)
def drop_course(*, student_id: int, course_id: int) -> None:
    _validate_pair(student_id, course_id)
    removed = (
        StudentCourse.delete()
        .where((StudentCourse.student == student_id) & (StudentCourse.course == course_id))
        .execute()
    )
    if removed != 1:
        raise NotEnrolled.of(student_id, course_id)
    Course.update(enrolled_count=Course.enrolled_count - 1).where(Course.id == course_id).execute()
