"""The rows the domain returns to protobuf messages."""

from __future__ import annotations

import datetime as dt
from typing import Any, Protocol, cast

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
    # Read-only: the domain's entries are frozen.
    @property
    def student_id(self) -> int: ...
    @property
    def course_id(self) -> int: ...
    @property
    def state(self) -> int: ...  # the proto's EnrollmentState numbers
    @property
    def waitlist_position(self) -> int: ...
    @property
    def create_time(self) -> dt.datetime: ...
    @property
    def enroll_time(self) -> dt.datetime | None: ...


_EPOCH = dt.datetime(1970, 1, 1)


def timestamp(value: dt.datetime) -> Timestamp:
    """A naive UTC datetime as a Timestamp: what Timestamp.FromDatetime gives, for less CPU
    (`make bench-micro`; bench/PROFILE.md)."""
    return Timestamp(**_stamp(value))


def _stamp(value: dt.datetime) -> Any:
    """timestamp(value)'s fields, for a message's constructor: given a dict, the field is
    filled in place, where a Timestamp is first built and then copied into it (a Course
    message about 1-2 µs less; bench/PROFILE.md, "Figures behind code comments")."""
    since = value - _EPOCH
    return {"seconds": since.days * 86400 + since.seconds, "nanos": since.microseconds * 1000}


def student_to_proto(student: Student) -> pb.Student:
    return pb.Student(
        id=student.id,
        name=student.name,
        email=student.email,
        create_time=_stamp(student.create_time),
        # NULL only on rows from before update_time existed: never updated since.
        update_time=_stamp(student.update_time or student.create_time),
        etag=etag_of(student.version),
    )


def course_to_proto(course: Course) -> pb.Course:
    return pb.Course(
        id=course.id,
        code=course.code,
        title=course.title,
        capacity=course.capacity,
        enrolled_count=course.enrolled_count,
        create_time=_stamp(course.create_time),
        waitlist_capacity=course.waitlist_capacity,
        waitlisted_count=course.waitlisted_count,
        update_time=_stamp(course.update_time or course.create_time),
        etag=etag_of(course.version),
    )


class EventRecord(Protocol):
    # Read-only: the domain's records are frozen; the snapshots have their row's fields.
    @property
    def sequence(self) -> int: ...
    @property
    def event_time(self) -> dt.datetime: ...
    @property
    def type(self) -> int: ...  # the proto's EventType numbers
    @property
    def student_id(self) -> int: ...
    @property
    def course_id(self) -> int: ...
    @property
    def student(self) -> Any: ...  # a Student's fields
    @property
    def course(self) -> Any: ...  # a Course's fields
    @property
    def enrollment(self) -> Any: ...  # an Entry's fields
    @property
    def request_id(self) -> str: ...
    @property
    def actor(self) -> str: ...


def event_to_proto(event: EventRecord) -> pb.Event:
    message = pb.Event(
        sequence=event.sequence,
        event_time=_stamp(event.event_time),
        type=cast(pb.EventType.ValueType, event.type),
        student_id=event.student_id,
        course_id=event.course_id,
        request_id=event.request_id,
        actor=event.actor,
    )
    if event.student is not None:
        message.student.CopyFrom(student_to_proto(event.student))
    if event.course is not None:
        message.course.CopyFrom(course_to_proto(event.course))
    if event.enrollment is not None:
        message.enrollment.CopyFrom(enrollment_to_proto(event.enrollment))
    return message


def enrollment_to_proto(enrollment: Entry) -> pb.Enrollment:
    enroll_time = enrollment.enroll_time
    return pb.Enrollment(
        student_id=enrollment.student_id,
        course_id=enrollment.course_id,
        state=cast(pb.EnrollmentState.ValueType, enrollment.state),
        waitlist_position=enrollment.waitlist_position,
        create_time=_stamp(enrollment.create_time),
        # None leaves the field unset: still waiting, no seat taken.
        enroll_time=None if enroll_time is None else _stamp(enroll_time),
    )
