"""The rows the domain returns to protobuf messages."""

from __future__ import annotations

import datetime as dt
from typing import Protocol

from google.protobuf.timestamp_pb2 import Timestamp

from enrollment.v1 import enrollment_pb2 as pb


# The shapes read here: the domain hands back its rows, and this layer needs only
# their fields (it never imports the persistence layer).
class Student(Protocol):
    id: int
    name: str
    email: str
    create_time: dt.datetime


class Course(Protocol):
    id: int
    code: str
    title: str
    capacity: int
    enrolled_count: int
    create_time: dt.datetime


class StudentCourse(Protocol):
    student_id: int
    course_id: int
    enroll_time: dt.datetime


_EPOCH = dt.datetime(1970, 1, 1)


def timestamp(value: dt.datetime) -> Timestamp:
    """A naive UTC datetime as a Timestamp: what Timestamp.FromDatetime gives, for less CPU
    (`make bench-micro`; bench/PROFILE.md)."""
    since = value - _EPOCH
    return Timestamp(seconds=since.days * 86400 + since.seconds, nanos=since.microseconds * 1000)


def student_to_proto(student: Student) -> pb.Student:
    return pb.Student(
        id=student.id,
        name=student.name,
        email=student.email,
        create_time=timestamp(student.create_time),
    )


def course_to_proto(course: Course) -> pb.Course:
    return pb.Course(
        id=course.id,
        code=course.code,
        title=course.title,
        capacity=course.capacity,
        enrolled_count=course.enrolled_count,
        create_time=timestamp(course.create_time),
    )


def enrollment_to_proto(enrollment: StudentCourse) -> pb.Enrollment:
    return pb.Enrollment(
        student_id=enrollment.student_id,
        course_id=enrollment.course_id,
        enroll_time=timestamp(enrollment.enroll_time),
    )
