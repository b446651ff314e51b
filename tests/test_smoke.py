"""The seed scenarios: enroll, list a student's courses, drop, enroll in a missing course."""

import grpc

from enrollment.v1 import enrollment_pb2 as pb
from tests.rpc import TIMEOUT, enroll, expect_error, new_course, new_student


def test_successful_enrollment(stub):
    student = new_student(stub)
    course = new_course(stub, capacity=2)
    enrollment = enroll(stub, student.id, course.id)
    assert (enrollment.student_id, enrollment.course_id) == (student.id, course.id)
    assert enrollment.enroll_time.seconds > 0
    got = stub.GetCourse(pb.GetCourseRequest(course_id=course.id), timeout=TIMEOUT).course
    assert got.enrolled_count == 1


def test_fetching_a_students_courses(stub):
    student = new_student(stub)
    courses = [new_course(stub) for _ in range(3)]
    new_course(stub)  # not enrolled in this one
    for course in courses:
        enroll(stub, student.id, course.id)
    page = stub.ListCourses(pb.ListCoursesRequest(student_id=student.id), timeout=TIMEOUT)
    assert [c.id for c in page.courses] == [c.id for c in courses]
    assert page.next_page_token == ""


def test_dropping_a_course(stub):
    student = new_student(stub)
    course = new_course(stub)
    enroll(stub, student.id, course.id)
    stub.DropCourse(
        pb.DropCourseRequest(student_id=student.id, course_id=course.id), timeout=TIMEOUT
    )
    page = stub.ListCourses(pb.ListCoursesRequest(student_id=student.id), timeout=TIMEOUT)
    assert list(page.courses) == []
    got = stub.GetCourse(pb.GetCourseRequest(course_id=course.id), timeout=TIMEOUT).course
    assert got.enrolled_count == 0


def test_enrolling_in_a_missing_course_is_invalid_argument(stub):
    student = new_student(stub)
    got = expect_error(
        stub.EnrollStudent,
        pb.EnrollStudentRequest(student_id=student.id, course_id=424242),
        grpc.StatusCode.INVALID_ARGUMENT,
        "COURSE_NOT_FOUND",
        fields=["course_id"],
    )
    assert "424242" in got.message
