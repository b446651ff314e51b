"""Fetch one student or course by id, or raise the domain's NOT_FOUND error."""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any, TypeVar

import peewee as pw

from enrollment.server.errors import CourseNotFound, EnrollmentError, StudentNotFound
from enrollment.server.persistence.models import Course, Student
from enrollment.server.persistence.prepared import Prepared
from enrollment.server.persistence.steps import Step, drive
from enrollment.server.persistence.unit_of_work import locking

M = TypeVar("M", bound=pw.Model)

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
    return drive(student_found(student_id, _STUDENT_LOCKED if lock else _STUDENT))


def find_course(course_id: int, *, lock: bool = False) -> Course:
    """lock: see course_or_none."""
    return drive(course_found(course_id, _COURSE_LOCKED if lock else _COURSE))


def student_found(
    student_id: int, query: Prepared[Student] = _STUDENT
) -> Generator[Step, list[Any], Student]:
    """The steps (persistence/steps.py) of find_student: the student, or NOT_FOUND."""
    return _one(query, student_id, StudentNotFound.of)


def course_found(
    course_id: int, query: Prepared[Course] = _COURSE
) -> Generator[Step, list[Any], Course]:
    """The steps of find_course: the course, or NOT_FOUND."""
    return _one(query, course_id, CourseNotFound.of)


def _one(
    query: Prepared[M], key: int, missing: Callable[[int], EnrollmentError]
) -> Generator[Step, list[Any], M]:
    found: list[M] = yield (query, (key,))  # the rows of the query, for these values
    if not found:
        raise missing(key)
    return found[0]
