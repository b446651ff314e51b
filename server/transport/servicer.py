"""The gRPC face of the service: parse, call one service function, build the response."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable, Generator, Iterable
from typing import Any, Generic, Protocol, TypeVar

import grpc
from google.protobuf.message import Message
from google.rpc import status_pb2

from enrollment.server.domain import batches, courses, enrollments, events, retries, students
from enrollment.server.errors import ShuttingDown
from enrollment.server.transport.convert import (
    course_to_proto,
    enrollment_to_proto,
    event_to_proto,
    student_to_proto,
)
from enrollment.server.transport.error_status import status_of
from enrollment.server.transport.watch import WatchHub
from enrollment.v1 import enrollment_pb2 as pb
from enrollment.v1 import enrollment_pb2_grpc as pb_grpc

# Events per WatchEventsResponse: a backlog page is split so no message grows large.
STREAM_BATCH = 100
R = TypeVar("R", bound=Message)
Q = TypeVar("Q", bound=Message)
A = TypeVar("A")
A_co = TypeVar("A_co", covariant=True)


class DomainRead(Protocol[A_co]):
    """A domain read (persistence/steps.py, Read): run(...) runs it in a unit of work;
    steps(...) are its statements and rules, for a driver on the event loop."""

    @property
    def run(self) -> Callable[..., A_co]: ...

    @property
    def steps(self) -> Callable[..., Generator[Any, Any, A_co]]: ...


def fingerprint(request: Message) -> str:
    """sha256 of the request as serialized without its request_id."""
    bare = type(request)()
    bare.CopyFrom(request)
    bare.ClearField("request_id")
    return hashlib.sha256(bare.SerializeToString(deterministic=True)).hexdigest()


def mutate(request: Message, run: Callable[[], Any], build: Callable[[Any], R]) -> R:
    """The one place a mutating call meets its request_id: run() calls the domain,
    build() makes the response of its result. With a request_id the response is
    recorded in the call's transaction, or replayed from an earlier call."""
    if not request.request_id:  # type: ignore[attr-defined]
        return build(run())
    name = type(request).DESCRIPTOR.name
    key = retries.Key(
        method=name.removesuffix("Request"),
        request_id=request.request_id,  # type: ignore[attr-defined]
        fingerprint=fingerprint(request),
        encode=lambda result: build(result).SerializeToString(deterministic=True),
    )
    response_type = getattr(pb, name.removesuffix("Request") + "Response")
    response: R = response_type.FromString(retries.run_once(key, run))
    return response


def _dropped(promoted: enrollments.Entry | None) -> pb.DropCourseResponse:
    if promoted is None:
        return pb.DropCourseResponse()
    return pb.DropCourseResponse(promoted=enrollment_to_proto(promoted))


def _items(
    requests: Iterable[pb.EnrollStudentRequest] | Iterable[pb.DropCourseRequest],
) -> list[batches.Item]:
    return [
        batches.Item(
            student_id=r.student_id,
            course_id=r.course_id,
            waitlist_if_full=getattr(r, "waitlist_if_full", False),
            request_id=r.request_id,
        )
        for r in requests
    ]


def _status(outcome: batches.Outcome) -> status_pb2.Status:
    return status_pb2.Status() if outcome.error is None else status_of(outcome.error)


def _batch_results(
    response: type[R], result: type[Message], entry_field: str
) -> Callable[[list[batches.Outcome]], R]:
    """The builder of a Batch*Response: per outcome, a result with its status, and its
    entry (if any) in entry_field."""

    def build(outcomes: list[batches.Outcome]) -> R:
        results = []
        for outcome in outcomes:
            entry = (
                {} if outcome.entry is None else {entry_field: enrollment_to_proto(outcome.entry)}
            )
            results.append(result(status=_status(outcome), **entry))
        return response(results=results)

    return build


_enroll_results = _batch_results(
    pb.BatchEnrollStudentsResponse, pb.BatchEnrollStudentsResult, "enrollment"
)
_drop_results = _batch_results(pb.BatchDropCoursesResponse, pb.BatchDropCoursesResult, "promoted")


class ReadMethod(Generic[Q, A, R]):
    """A read method: its domain Read (persistence/steps.py), the read's arguments of a
    request, and the response made of its result. Called, it answers in a pool thread;
    steps(request) are the same read as steps, which the event loop drives on
    PostgreSQL (persistence/loop_reads.py)."""

    def __init__(
        self, read: DomainRead[A], arguments: Callable[[Q], dict[str, Any]], reply: Callable[[A], R]
    ) -> None:
        self.read, self.arguments, self.reply = read, arguments, reply
        self._run = read.run

    def __call__(self, request: Q) -> R:
        return self.reply(self._run(**self.arguments(request)))

    def steps(self, request: Q) -> Generator[Any, Any, R]:
        found = yield from self.read.steps(**self.arguments(request))
        return self.reply(found)


ToProto = Callable[[Any], Message]  # a row's message (convert.py)


def _get_method(
    read: DomainRead[Any], id_field: str, response: type[R], item: str, to_proto: ToProto
) -> ReadMethod[Any, Any, R]:
    """A Get* method: the id of the request, and the response of the row found."""
    return ReadMethod(
        read,
        lambda request: {id_field: getattr(request, id_field)},
        lambda row: response(**{item: to_proto(row)}),
    )


def _list_method(
    read: DomainRead[Any], filter_field: str, response: type[R], items: str, to_proto: ToProto
) -> ReadMethod[Any, Any, R]:
    """A List* method: filter_field and the page of the request, and the response of
    a page whose rows (page.<items>, response.<items>) are turned by to_proto."""

    def arguments(request: Any) -> dict[str, Any]:
        return {
            filter_field: getattr(request, filter_field),
            "page_size": request.page_size,
            "page_token": request.page_token,
        }

    def reply(page: Any) -> R:
        rows = [to_proto(row) for row in getattr(page, items)]
        return response(**{items: rows}, next_page_token=page.next_page_token)

    return ReadMethod(read, arguments, reply)


_GET_STUDENT = _get_method(
    students.get_student, "student_id", pb.GetStudentResponse, "student", student_to_proto
)
_LIST_STUDENTS = _list_method(
    students.list_students, "course_id", pb.ListStudentsResponse, "students", student_to_proto
)
_GET_COURSE = _get_method(
    courses.get_course, "course_id", pb.GetCourseResponse, "course", course_to_proto
)
_LIST_COURSES = _list_method(
    courses.list_courses, "student_id", pb.ListCoursesResponse, "courses", course_to_proto
)
# The methods whose answer is a read of one statement (two at most), by name.
READS: dict[str, ReadMethod[Any, Any, Any]] = {
    "GetStudent": _GET_STUDENT,
    "ListStudents": _LIST_STUDENTS,
    "GetCourse": _GET_COURSE,
    "ListCourses": _LIST_COURSES,
}


class EnrollmentServicer(pb_grpc.EnrollmentServiceServicer):
    def __init__(self, hub: WatchHub | None = None) -> None:
        self._hub = hub

    def CreateStudent(
        self, request: pb.CreateStudentRequest, context: grpc.ServicerContext
    ) -> pb.CreateStudentResponse:
        return mutate(
            request,
            lambda: students.create_student(name=request.name, email=request.email),
            lambda student: pb.CreateStudentResponse(student=student_to_proto(student)),
        )

    def GetStudent(
        self, request: pb.GetStudentRequest, context: grpc.ServicerContext
    ) -> pb.GetStudentResponse:
        return _GET_STUDENT(request)

    def ListStudents(
        self, request: pb.ListStudentsRequest, context: grpc.ServicerContext
    ) -> pb.ListStudentsResponse:
        return _LIST_STUDENTS(request)

    def DeleteStudent(
        self, request: pb.DeleteStudentRequest, context: grpc.ServicerContext
    ) -> pb.DeleteStudentResponse:
        return mutate(
            request,
            lambda: students.delete_student(student_id=request.student_id, force=request.force),
            lambda _: pb.DeleteStudentResponse(),
        )

    def CreateCourse(
        self, request: pb.CreateCourseRequest, context: grpc.ServicerContext
    ) -> pb.CreateCourseResponse:
        return mutate(
            request,
            lambda: courses.create_course(
                code=request.code,
                title=request.title,
                capacity=request.capacity,
                waitlist_capacity=request.waitlist_capacity,
            ),
            lambda course: pb.CreateCourseResponse(course=course_to_proto(course)),
        )

    def GetCourse(
        self, request: pb.GetCourseRequest, context: grpc.ServicerContext
    ) -> pb.GetCourseResponse:
        return _GET_COURSE(request)

    def ListCourses(
        self, request: pb.ListCoursesRequest, context: grpc.ServicerContext
    ) -> pb.ListCoursesResponse:
        return _LIST_COURSES(request)

    def DeleteCourse(
        self, request: pb.DeleteCourseRequest, context: grpc.ServicerContext
    ) -> pb.DeleteCourseResponse:
        return mutate(
            request,
            lambda: courses.delete_course(course_id=request.course_id, force=request.force),
            lambda _: pb.DeleteCourseResponse(),
        )

    def EnrollStudent(
        self, request: pb.EnrollStudentRequest, context: grpc.ServicerContext
    ) -> pb.EnrollStudentResponse:
        return mutate(
            request,
            lambda: enrollments.enroll_student(
                student_id=request.student_id,
                course_id=request.course_id,
                waitlist_if_full=request.waitlist_if_full,
            ),
            lambda entry: pb.EnrollStudentResponse(enrollment=enrollment_to_proto(entry)),
        )

    def DropCourse(
        self, request: pb.DropCourseRequest, context: grpc.ServicerContext
    ) -> pb.DropCourseResponse:
        return mutate(
            request,
            lambda: enrollments.drop_course(
                student_id=request.student_id, course_id=request.course_id
            ),
            _dropped,
        )

    def UpdateStudent(
        self, request: pb.UpdateStudentRequest, context: grpc.ServicerContext
    ) -> pb.UpdateStudentResponse:
        s = request.student
        return mutate(
            request,
            lambda: students.update_student(
                student_id=s.id,
                etag=s.etag,
                paths=list(request.update_mask.paths),
                name=s.name,
                email=s.email,
            ),
            lambda student: pb.UpdateStudentResponse(student=student_to_proto(student)),
        )

    def UpdateCourse(
        self, request: pb.UpdateCourseRequest, context: grpc.ServicerContext
    ) -> pb.UpdateCourseResponse:
        c = request.course
        return mutate(
            request,
            lambda: courses.update_course(
                course_id=c.id,
                etag=c.etag,
                paths=list(request.update_mask.paths),
                code=c.code,
                title=c.title,
                capacity=c.capacity,
                waitlist_capacity=c.waitlist_capacity,
            ),
            lambda course: pb.UpdateCourseResponse(course=course_to_proto(course)),
        )

    def GetEnrollment(
        self, request: pb.GetEnrollmentRequest, context: grpc.ServicerContext
    ) -> pb.GetEnrollmentResponse:
        enrollment = enrollments.get_enrollment(
            student_id=request.student_id, course_id=request.course_id
        )
        return pb.GetEnrollmentResponse(enrollment=enrollment_to_proto(enrollment))

    def ListEnrollments(
        self, request: pb.ListEnrollmentsRequest, context: grpc.ServicerContext
    ) -> pb.ListEnrollmentsResponse:
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

    def ListEvents(
        self, request: pb.ListEventsRequest, context: grpc.ServicerContext
    ) -> pb.ListEventsResponse:
        page = events.list_events(
            after_sequence=request.after_sequence,
            page_size=request.page_size,
            student_id=request.student_id,
            course_id=request.course_id,
        )
        return pb.ListEventsResponse(
            events=[event_to_proto(e) for e in page.events], head_sequence=page.head_sequence
        )

    async def WatchEvents(
        self, request: pb.WatchEventsRequest, context: grpc.ServicerContext
    ) -> AsyncIterator[pb.WatchEventsResponse]:
        """On the event loop (the interceptor streams what this yields): the hub's
        batches as responses of at most STREAM_BATCH events."""
        if self._hub is None:
            raise ShuttingDown.of()
        stream = self._hub.watch(
            after_sequence=request.after_sequence,
            student_id=request.student_id,
            course_id=request.course_id,
        )
        async for batch in stream:
            for start in range(0, len(batch), STREAM_BATCH):
                chunk = batch[start : start + STREAM_BATCH]
                yield pb.WatchEventsResponse(events=[event_to_proto(e) for e in chunk])

    def BatchEnrollStudents(
        self, request: pb.BatchEnrollStudentsRequest, context: grpc.ServicerContext
    ) -> pb.BatchEnrollStudentsResponse:
        return mutate(
            request,
            lambda: batches.batch_enroll(
                items=_items(request.requests),
                allow_partial_success=request.allow_partial_success,
            ),
            _enroll_results,
        )

    def BatchDropCourses(
        self, request: pb.BatchDropCoursesRequest, context: grpc.ServicerContext
    ) -> pb.BatchDropCoursesResponse:
        return mutate(
            request,
            lambda: batches.batch_drop(
                items=_items(request.requests),
                allow_partial_success=request.allow_partial_success,
            ),
            _drop_results,
        )
