"""Fetch one student or course by id, or raise the domain's NOT_FOUND error."""

from __future__ import annotations

from server.db import locking
from server.errors import CourseNotFound, StudentNotFound
from server.models import Course, Student


def find_student(student_id: int, *, lock: bool = False) -> Student:
    """lock: hold the row until the transaction ends (SELECT … FOR UPDATE), so that no
    enrollment of this student can commit in between."""
    query = Student.select().where(Student.id == student_id)
    student = (locking(query) if lock else query).first()
    if student is None:
        raise StudentNotFound.of(student_id)
    return student


def find_course(course_id: int, *, lock: bool = False) -> Course:
    """lock: hold the row until the transaction ends; writers of one course's seats
    then take turns, and its count moves one call at a time."""
    query = Course.select().where(Course.id == course_id)
    course = (locking(query) if lock else query).first()
    if course is None:
        raise CourseNotFound.of(course_id)
    return course
