"""Fetch one student or course by id, or raise the domain's NOT_FOUND error."""

from __future__ import annotations

from server.errors import CourseNotFound, StudentNotFound
from server.models import Course, Student


def find_student(student_id: int) -> Student:
    student = Student.get_or_none(Student.id == student_id)
    if student is None:
        raise StudentNotFound.of(student_id)
    return student


def find_course(course_id: int) -> Course:
    course = Course.get_or_none(Course.id == course_id)
    if course is None:
        raise CourseNotFound.of(course_id)
    return course
