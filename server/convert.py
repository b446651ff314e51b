"""Model rows to protobuf messages."""

from __future__ import annotations

import datetime as dt

from google.protobuf.timestamp_pb2 import Timestamp

from enrollment.v1 import enrollment_pb2 as pb
from server.models import Course, Student, StudentCourse


def timestamp(value: dt.datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value.replace(tzinfo=dt.UTC))
    return ts


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
