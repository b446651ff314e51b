"""The gRPC face of the service: parse, call one service function, build the response."""

from __future__ import annotations

from enrollment.server.domain import courses, enrollments, events, students
from enrollment.server.errors import ShuttingDown
from enrollment.server.transport.convert import (
    course_to_proto,
    enrollment_to_proto,
    event_to_proto,
    student_to_proto,
)
from enrollment.server.transport.watch import WatchHub
from enrollment.v1 import enrollment_pb2 as pb
from enrollment.v1 import enrollment_pb2_grpc as pb_grpc

# Events per WatchEventsResponse: a backlog page is split so no message grows large.
STREAM_BATCH = 100


class EnrollmentServicer(pb_grpc.EnrollmentServiceServicer):
    def __init__(self, hub: WatchHub | None = None) -> None:
        self._hub = hub

    def CreateStudent(self, request, context):
        student = students.create_student(name=request.name, email=request.email)
        return pb.CreateStudentResponse(student=student_to_proto(student))

    def GetStudent(self, request, context):
        student = students.get_student(student_id=request.student_id)
        return pb.GetStudentResponse(student=student_to_proto(student))

    def ListStudents(self, request, context):
        page = students.list_students(
            course_id=request.course_id,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return pb.ListStudentsResponse(
            students=[student_to_proto(s) for s in page.students],
            next_page_token=page.next_page_token,
        )

    def DeleteStudent(self, request, context):
        students.delete_student(student_id=request.student_id, force=request.force)
        return pb.DeleteStudentResponse()

    def CreateCourse(self, request, context):
        course = courses.create_course(
            code=request.code,
            title=request.title,
            capacity=request.capacity,
            waitlist_capacity=request.waitlist_capacity,
        )
        return pb.CreateCourseResponse(course=course_to_proto(course))

    def GetCourse(self, request, context):
        course = courses.get_course(course_id=request.course_id)
        return pb.GetCourseResponse(course=course_to_proto(course))

    def ListCourses(self, request, context):
        page = courses.list_courses(
            student_id=request.student_id,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return pb.ListCoursesResponse(
            courses=[course_to_proto(c) for c in page.courses],
            next_page_token=page.next_page_token,
        )

    def DeleteCourse(self, request, context):
        courses.delete_course(course_id=request.course_id, force=request.force)
        return pb.DeleteCourseResponse()

    def EnrollStudent(self, request, context):
        enrollment = enrollments.enroll_student(
            student_id=request.student_id,
            course_id=request.course_id,
            waitlist_if_full=request.waitlist_if_full,
        )
        return pb.EnrollStudentResponse(enrollment=enrollment_to_proto(enrollment))

    def DropCourse(self, request, context):
        promoted = enrollments.drop_course(
            student_id=request.student_id, course_id=request.course_id
        )
        if promoted is None:
            return pb.DropCourseResponse()
        return pb.DropCourseResponse(promoted=enrollment_to_proto(promoted))

    def UpdateStudent(self, request, context):
        s = request.student
        student = students.update_student(
            student_id=s.id,
            etag=s.etag,
            paths=list(request.update_mask.paths),
            name=s.name,
            email=s.email,
        )
        return pb.UpdateStudentResponse(student=student_to_proto(student))

    def UpdateCourse(self, request, context):
        c = request.course
        course = courses.update_course(
            course_id=c.id,
            etag=c.etag,
            paths=list(request.update_mask.paths),
            code=c.code,
            title=c.title,
            capacity=c.capacity,
            waitlist_capacity=c.waitlist_capacity,
        )
        return pb.UpdateCourseResponse(course=course_to_proto(course))

    def GetEnrollment(self, request, context):
        enrollment = enrollments.get_enrollment(
            student_id=request.student_id, course_id=request.course_id
        )
        return pb.GetEnrollmentResponse(enrollment=enrollment_to_proto(enrollment))

    def ListEnrollments(self, request, context):
        page = enrollments.list_enrollments(
            student_id=request.student_id,
            course_id=request.course_id,
            state=request.state,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return pb.ListEnrollmentsResponse(
            enrollments=[enrollment_to_proto(e) for e in page.enrollments],
            next_page_token=page.next_page_token,
        )

    def ListEvents(self, request, context):
        page = events.list_events(
            after_sequence=request.after_sequence,
            page_size=request.page_size,
            student_id=request.student_id,
            course_id=request.course_id,
        )
        return pb.ListEventsResponse(
            events=[event_to_proto(e) for e in page.events], head_sequence=page.head_sequence
        )

    async def WatchEvents(self, request, context):
        """On the event loop (the interceptor streams what this yields): the hub's
        batches as responses of at most STREAM_BATCH events."""
        if self._hub is None:
            raise ShuttingDown.of()
        batches = self._hub.watch(
            after_sequence=request.after_sequence,
            student_id=request.student_id,
            course_id=request.course_id,
        )
        async for batch in batches:
            for start in range(0, len(batch), STREAM_BATCH):
                chunk = batch[start : start + STREAM_BATCH]
                yield pb.WatchEventsResponse(events=[event_to_proto(e) for e in chunk])
