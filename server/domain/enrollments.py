"""Enrollment rules: who may join or leave a course, and the course's count kept exact."""

from __future__ import annotations

import peewee as pw

from enrollment.server.domain.lookups import course_or_none, find_student
from enrollment.server.domain.validation import Fields
from enrollment.server.errors import (
    AlreadyEnrolled,
    CourseFull,
    NotEnrolled,
    UnknownCourseArgument,
)
from enrollment.server.persistence.models import Course, StudentCourse, utcnow
from enrollment.server.persistence.prepared import Prepared
from enrollment.server.persistence.unit_of_work import savepoint, transactional

_INSERT = Prepared(
    lambda student_id, course_id, enroll_time: StudentCourse.insert(
        student=student_id, course=course_id, enroll_time=enroll_time
    ),
    3,
)
# One conditional UPDATE takes a seat; no row changed means the course is full.
_TAKE_SEAT = Prepared(
    lambda course_id: Course.update(enrolled_count=Course.enrolled_count + 1).where(
        (Course.id == course_id)
        & ((Course.capacity == 0) | (Course.enrolled_count < Course.capacity))
    ),
    1,
)
_DELETE = Prepared(
    lambda student_id, course_id: StudentCourse.delete().where(
        (StudentCourse.student == student_id) & (StudentCourse.course == course_id)
    ),
    2,
)
_FREE_SEAT = Prepared(
    lambda course_id: Course.update(enrolled_count=Course.enrolled_count - 1).where(
        Course.id == course_id
    ),
    1,
)


def _validate_pair(student_id: int, course_id: int) -> Course:
    """Checks in contract order: malformed ids, then the course, then the student."""
    fields = Fields()
    fields.required_id("student_id", student_id)
    fields.required_id("course_id", course_id)
    fields.check()
    # The course row is locked first, by every writer of its seats in the same order,
    # so PostgreSQL and MariaDB never deadlock two enrollments on the count.
    course = course_or_none(course_id, lock=True)
    if course is None:
        raise UnknownCourseArgument.of(course_id)
    find_student(student_id)
    return course


@transactional(write=True)
def enroll_student(*, student_id: int, course_id: int) -> StudentCourse:
    course = _validate_pair(student_id, course_id)
    enroll_time = utcnow()
    try:
        # The primary key decides duplicates.
        with savepoint():
            _INSERT.execute(student_id, course_id, enroll_time)
    except pw.IntegrityError:
        _raise_rejected_enrollment(student_id, course_id)
        raise  # a constraint this code does not know: INTERNAL, with the traceback logged
    # Raising when the course is full rolls the enrollment back with the transaction.
    if _TAKE_SEAT.execute(course_id) != 1:
        raise CourseFull.of(course_id, course.capacity)
    return StudentCourse(student=student_id, course=course_id, enroll_time=enroll_time)


def _raise_rejected_enrollment(student_id: int, course_id: int) -> None:
    """The insert broke a constraint: raise why (a duplicate, or a row deleted by a
    concurrent call), or return when it is none of these.

    It raises rather than returns the error on purpose. A returned error held in a local
    of enroll_student forms a cycle (frame -> error -> traceback -> frame) that keeps the
    failed insert's cursor alive past the call; the garbage collector later finalizes it
    on a pooled connection another call may be using, and the race tests then saw
    "database is locked".
    """
    duplicate = StudentCourse.select().where(
        (StudentCourse.student == student_id) & (StudentCourse.course == course_id)
    )
    if duplicate.exists():
        raise AlreadyEnrolled.of(student_id, course_id) from None
    if not Course.select().where(Course.id == course_id).exists():
        raise UnknownCourseArgument.of(course_id) from None
    find_student(student_id)


@transactional(write=True)
def drop_course(*, student_id: int, course_id: int) -> None:
    _validate_pair(student_id, course_id)
    if _DELETE.execute(student_id, course_id) != 1:
        raise NotEnrolled.of(student_id, course_id)
    _FREE_SEAT.execute(course_id)
