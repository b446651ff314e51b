"""Fetch one student or course by id, or raise the domain's NOT_FOUND error."""

from __future__ import annotations

from enrollment.server.errors import CourseNotFound, StudentNotFound
from enrollment.server.persistence.models import Course, Student
from enrollment.server.persistence.prepared import Prepared
from enrollment.server.persistence.unit_of_work import locking

_STUDENT: Prepared[Student] = Prepared(
    lambda student_id: Student.select().where(Student.id == student_id), 1
)
_COURSE: Prepared[Course] = Prepared(
    lambda course_id: Course.select().where(Course.id == course_id), 1
)
# The same with FOR UPDATE where the database has it (locking() decides when the SQL is
# compiled, which happens again for each database the models are bound to).
_STUDENT_LOCKED: Prepared[Student] = Prepared(
    lambda student_id: locking(Student.select().where(Student.id == student_id)), 1
)
_COURSE_LOCKED: Prepared[Course] = Prepared(
    lambda course_id: locking(Course.select().where(Course.id == course_id)), 1
)


def course_or_none(course_id: int, *, lock: bool = False) -> Course | None:
    """lock: hold the row until the transaction ends; writers of one course's seats
    then take turns, and its count moves one call at a time."""
    return (_COURSE_LOCKED if lock else _COURSE).first(course_id)


def find_student(student_id: int, *, lock: bool = False) -> Student:
    """lock: hold the row until the transaction ends (SELECT … FOR UPDATE), so that no
    enrollment of this student can commit in between."""
    student = (_STUDENT_LOCKED if lock else _STUDENT).first(student_id)
    if student is None:
        raise StudentNotFound.of(student_id)
    return student


def find_course(course_id: int, *, lock: bool = False) -> Course:
    """lock: see course_or_none."""
    course = course_or_none(course_id, lock=lock)
    if course is None:
        raise CourseNotFound.of(course_id)
    return course
