"""Fetch one student or course by id, or raise the domain's NOT_FOUND error."""

from __future__ import annotations

from server.errors import CourseNotFound, StudentNotFound
from server.models import Course, Student
from server.services.prepared import Prepared

_STUDENT = Prepared(lambda student_id: Student.select().where(Student.id == student_id), 1)
_COURSE = Prepared(lambda course_id: Course.select().where(Course.id == course_id), 1)


def course_or_none(course_id: int) -> Course | None:
    return _COURSE.first(course_id)


def find_student(student_id: int) -> Student:
    student = _STUDENT.first(student_id)
    if student is None:
        raise StudentNotFound.of(student_id)
    return student


def find_course(course_id: int) -> Course:
    course = _COURSE.first(course_id)
    if course is None:
        raise CourseNotFound.of(course_id)
    return course
