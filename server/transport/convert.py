"""The rows the domain returns to protobuf messages."""

from __future__ import annotations

import datetime as dt
from typing import Protocol

from google.protobuf.timestamp_pb2 import Timestamp

from enrollment.server.domain.updates import etag_of
from enrollment.v1 import enrollment_pb2 as pb


# The shapes read here: the domain hands back its rows, and this layer needs only
# their fields (it never imports the persistence layer).
class Student(Protocol):
    id: int
    name: str
    email: str
    create_time: dt.datetime
    update_time: dt.datetime | None
    version: int


class Course(Protocol):
    id: int
    code: str
    title: str
    capacity: int
    enrolled_count: int
    create_time: dt.datetime
    waitlist_capacity: int
    waitlisted_count: int
    update_time: dt.datetime | None
    version: int


class Entry(Protocol):
    student_id: int
    course_id: int
    state: int  # the proto's EnrollmentState numbers
    waitlist_position: int
    create_time: dt.datetime
    enroll_time: dt.datetime | None


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
        # NULL only on rows from before update_time existed: never updated since.
        update_time=timestamp(student.update_time or student.create_time),
        etag=etag_of(student.version),
    )


def course_to_proto(course: Course) -> pb.Course:
    return pb.Course(
        id=course.id,
        code=course.code,
        title=course.title,
        capacity=course.capacity,
        enrolled_count=course.enrolled_count,
        create_time=timestamp(course.create_time),
        waitlist_capacity=course.waitlist_capacity,
        waitlisted_count=course.waitlisted_count,
        update_time=timestamp(course.update_time or course.create_time),
        etag=etag_of(course.version),
    )


def enrollment_to_proto(enrollment: Entry) -> pb.Enrollment:
    message = pb.Enrollment(
        student_id=enrollment.student_id,
        course_id=enrollment.course_id,
        state=enrollment.state,
        waitlist_position=enrollment.waitlist_position,
        create_time=timestamp(enrollment.create_time),
    )
    if enrollment.enroll_time is not None:
        message.enroll_time.CopyFrom(timestamp(enrollment.enroll_time))
    return message
