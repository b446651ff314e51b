"""Proto conversion: the fast timestamp path equals protobuf's own FromDatetime."""

from __future__ import annotations

import datetime as dt
import random
from types import SimpleNamespace

from google.protobuf.timestamp_pb2 import Timestamp

from enrollment.server.domain.enrollments import Entry
from enrollment.server.transport.convert import (
    course_to_proto,
    enrollment_to_proto,
    student_to_proto,
    timestamp,
)
from enrollment.v1 import enrollment_pb2 as pb


def _values() -> list[dt.datetime]:
    rng = random.Random(5)
    span = int((dt.datetime(9999, 12, 31) - dt.datetime(1, 1, 1)).total_seconds() * 1e6)
    edges = [dt.datetime(1970, 1, 1), dt.datetime(1969, 12, 31, 23, 59, 59, 999999)]
    return edges + [
        dt.datetime(1, 1, 1) + dt.timedelta(microseconds=rng.randrange(span)) for _ in range(2000)
    ]


def _protobufs(value: dt.datetime) -> Timestamp:
    made = Timestamp()
    made.FromDatetime(value.replace(tzinfo=dt.UTC))
    return made


def test_timestamp_matches_from_datetime():
    for value in _values():
        expected = Timestamp()
        expected.FromDatetime(value.replace(tzinfo=dt.UTC))
        assert timestamp(value) == expected, value


def test_messages_carry_the_times_protobuf_would():
    """The converters fill their time fields from dicts (convert._stamp), not from a
    Timestamp copied in: the same messages as with FromDatetime."""
    for value in _values()[:200]:
        later = value + dt.timedelta(microseconds=1) if value.year < 9999 else value
        student = SimpleNamespace(
            id=1, name="Ada", email="ada@example.com", create_time=value, update_time=later,
            version=2,
        )  # fmt: skip
        got = student_to_proto(student)
        assert (got.create_time, got.update_time) == (_protobufs(value), _protobufs(later))
        course = SimpleNamespace(
            id=2, code="CS-1", title="Intro", capacity=3, enrolled_count=1, create_time=value,
            waitlist_capacity=0, waitlisted_count=0, update_time=None, version=1,
        )  # fmt: skip
        got_course = course_to_proto(course)
        assert got_course.create_time == _protobufs(value)
        assert got_course.update_time == _protobufs(value)  # never updated: create_time
        entry = enrollment_to_proto(Entry(1, 2, pb.ENROLLMENT_STATE_ENROLLED, 0, value, later))
        assert (entry.create_time, entry.enroll_time) == (_protobufs(value), _protobufs(later))
        waiting = enrollment_to_proto(Entry(1, 2, pb.ENROLLMENT_STATE_WAITLISTED, 1, value, None))
        assert waiting.create_time == _protobufs(value)
        assert not waiting.HasField("enroll_time")  # no seat taken yet
