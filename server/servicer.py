"""The gRPC face of the service: parse, call one service function, build the response."""

from __future__ import annotations

from enrollment.v1 import enrollment_pb2 as pb
from enrollment.v1 import enrollment_pb2_grpc as pb_grpc
from server.convert import course_to_proto, enrollment_to_proto, student_to_proto
from server.services import course_service, student_course_service, student_service


class EnrollmentServicer(pb_grpc.EnrollmentServiceServicer):
    def CreateStudent(self, request, context):
        student = student_service.create_student(name=request.name, email=request.email)
        return pb.CreateStudentResponse(student=student_to_proto(student))

    def GetStudent(self, request, context):
        student = student_service.get_student(student_id=request.student_id)
        return pb.GetStudentResponse(student=student_to_proto(student))

    def ListStudents(self, request, context):
        page = student_service.list_students(
            course_id=request.course_id,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return pb.ListStudentsResponse(
            students=[student_to_proto(s) for s in page.students],
            next_page_token=page.next_page_token,
        )

    def DeleteStudent(self, request, context):
        student_service.delete_student(student_id=request.student_id, force=request.force)
        return pb.DeleteStudentResponse()

    def CreateCourse(self, request, context):
        course = course_service.create_course(
            code=request.code, title=request.title, capacity=request.capacity
        )
        return pb.CreateCourseResponse(course=course_to_proto(course))

    def GetCourse(self, request, context):
        course = course_service.get_course(course_id=request.course_id)
        return pb.GetCourseResponse(course=course_to_proto(course))

    def ListCourses(self, request, context):
        page = course_service.list_courses(
            student_id=request.student_id,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return pb.ListCoursesResponse(
            courses=[course_to_proto(c) for c in page.courses],
            next_page_token=page.next_page_token,
        )

    def DeleteCourse(self, request, context):
        course_service.delete_course(course_id=request.course_id, force=request.force)
        return pb.DeleteCourseResponse()

    def EnrollStudent(self, request, context):
        enrollment = student_course_service.enroll_student(
            student_id=request.student_id, course_id=request.course_id
        )
        return pb.EnrollStudentResponse(enrollment=enrollment_to_proto(enrollment))

    def DropCourse(self, request, context):
        student_course_service.drop_course(
            student_id=request.student_id, course_id=request.course_id
        )
        return pb.DropCourseResponse()
