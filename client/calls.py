"""What each RPC sends and what its answer yields, built once for both clients.

EnrollmentClient and AsyncEnrollmentClient differ only in how they wait: each method
builds its Call here and runs it (getattr(stub, call.method)(call.request), then
call.result of the answer). The page-token rule of the walkers and the resume rules
of iter_events live here too.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from google.protobuf import field_mask_pb2

from enrollment.client.errors import BatchResult, ClientError
from enrollment.v1 import enrollment_pb2 as pb

T = TypeVar("T")
# The largest batch the server takes (BatchEnrollStudents, BatchDropCourses).
MAX_BATCH = 1000


@dataclass(frozen=True)
class Call(Generic[T]):
    """One unary call: the stub's method name, its request, and what the caller gets
    from the response."""

    method: str
    request: Any
    result: Callable[[Any], T]


class _Mutation(Protocol):
    request_id: str


class Page(Protocol):
    @property
    def next_page_token(self) -> str: ...


P = TypeVar("P", bound=Page)


def _same(response: T) -> T:
    return response


def _nothing(response: object) -> None:
    return None


def with_request_id(request: _Mutation, request_id: str | None) -> None:
    """Set the mutation's request_id: the caller's, else a fresh uuid4, so that the
    channel's retries (and the caller's own, passing the same id) apply it once."""
    request.request_id = request_id or str(uuid.uuid4())


def _mutation(
    method: str, request: _Mutation, request_id: str | None, result: Callable[[Any], T]
) -> Call[T]:
    with_request_id(request, request_id)
    return Call(method, request, result)


# Students


def create_student(name: str, email: str, request_id: str | None) -> Call[pb.Student]:
    request = pb.CreateStudentRequest(name=name, email=email)
    return _mutation("CreateStudent", request, request_id, lambda r: r.student)


def get_student(student_id: int) -> Call[pb.Student]:
    request = pb.GetStudentRequest(student_id=student_id)
    return Call("GetStudent", request, lambda r: r.student)


def list_students(course_id: int, page_size: int, page_token: str) -> Call[pb.ListStudentsResponse]:
    request = pb.ListStudentsRequest(
        course_id=course_id, page_size=page_size, page_token=page_token
    )
    return Call("ListStudents", request, _same)


def update_student(
    student_id: int, name: str | None, email: str | None, etag: str, request_id: str | None
) -> Call[pb.Student]:
    """An UpdateStudent whose mask names exactly the fields given (None: left as is)."""
    student = pb.Student(id=student_id, etag=etag)
    mask = _given(student, name=name, email=email)
    request = pb.UpdateStudentRequest(student=student, update_mask=mask)
    return _mutation("UpdateStudent", request, request_id, lambda r: r.student)


def _given(resource: Any, **values: object) -> field_mask_pb2.FieldMask:
    """Set each value given on the resource message (None: leave the field alone); the
    update mask naming exactly those fields."""
    paths = [name for name, value in values.items() if value is not None]
    for name in paths:
        setattr(resource, name, values[name])
    return field_mask_pb2.FieldMask(paths=paths)


def delete_student(student_id: int, force: bool, request_id: str | None) -> Call[None]:
    request = pb.DeleteStudentRequest(student_id=student_id, force=force)
    return _mutation("DeleteStudent", request, request_id, _nothing)


# Courses


def create_course(
    code: str, title: str, capacity: int, waitlist_capacity: int, request_id: str | None
) -> Call[pb.Course]:
    request = pb.CreateCourseRequest(
        code=code, title=title, capacity=capacity, waitlist_capacity=waitlist_capacity
    )
    return _mutation("CreateCourse", request, request_id, lambda r: r.course)


def get_course(course_id: int) -> Call[pb.Course]:
    request = pb.GetCourseRequest(course_id=course_id)
    return Call("GetCourse", request, lambda r: r.course)


def list_courses(student_id: int, page_size: int, page_token: str) -> Call[pb.ListCoursesResponse]:
    request = pb.ListCoursesRequest(
        student_id=student_id, page_size=page_size, page_token=page_token
    )
    return Call("ListCourses", request, _same)


def update_course(
    course_id: int,
    code: str | None,
    title: str | None,
    capacity: int | None,
    waitlist_capacity: int | None,
    etag: str,
    request_id: str | None,
) -> Call[pb.Course]:
    """An UpdateCourse whose mask names exactly the fields given (None: left as is)."""
    course = pb.Course(id=course_id, etag=etag)
    mask = _given(
        course, code=code, title=title, capacity=capacity, waitlist_capacity=waitlist_capacity
    )
    request = pb.UpdateCourseRequest(course=course, update_mask=mask)
    return _mutation("UpdateCourse", request, request_id, lambda r: r.course)


def delete_course(course_id: int, force: bool, request_id: str | None) -> Call[None]:
    request = pb.DeleteCourseRequest(course_id=course_id, force=force)
    return _mutation("DeleteCourse", request, request_id, _nothing)


# Enrollments


def enroll(
    student_id: int, course_id: int, waitlist_if_full: bool, request_id: str | None
) -> Call[pb.Enrollment]:
    request = pb.EnrollStudentRequest(
        student_id=student_id, course_id=course_id, waitlist_if_full=waitlist_if_full
    )
    return _mutation("EnrollStudent", request, request_id, lambda r: r.enrollment)


def drop(student_id: int, course_id: int, request_id: str | None) -> Call[pb.Enrollment | None]:
    request = pb.DropCourseRequest(student_id=student_id, course_id=course_id)
    return _mutation("DropCourse", request, request_id, _promoted)


def _promoted(response: pb.DropCourseResponse) -> pb.Enrollment | None:
    return response.promoted if response.HasField("promoted") else None


def batch_enroll(
    pairs: Iterable[tuple[int, int]],
    allow_partial_success: bool,
    waitlist_if_full: bool,
    request_id: str | None,
) -> Call[list[BatchResult]]:
    request = pb.BatchEnrollStudentsRequest(
        requests=[
            pb.EnrollStudentRequest(student_id=s, course_id=c, waitlist_if_full=waitlist_if_full)
            for s, c in pairs
        ],
        allow_partial_success=allow_partial_success,
    )
    return _mutation("BatchEnrollStudents", request, request_id, _results("enrollment"))


def batch_drop(
    pairs: Iterable[tuple[int, int]], allow_partial_success: bool, request_id: str | None
) -> Call[list[BatchResult]]:
    request = pb.BatchDropCoursesRequest(
        requests=[pb.DropCourseRequest(student_id=s, course_id=c) for s, c in pairs],
        allow_partial_success=allow_partial_success,
    )
    return _mutation("BatchDropCourses", request, request_id, _results("promoted"))


def _results(entry: str) -> Callable[[Any], list[BatchResult]]:
    """One BatchResult per item of a Batch*Response; entry names the item's Enrollment
    field (enrollment, or promoted for a drop)."""

    def results(response: Any) -> list[BatchResult]:
        return [
            BatchResult(
                getattr(item, entry) if item.HasField(entry) else None,
                ClientError.from_status(item.status) if item.status.code else None,
            )
            for item in response.results
        ]

    return results


def get_enrollment(student_id: int, course_id: int) -> Call[pb.Enrollment]:
    request = pb.GetEnrollmentRequest(student_id=student_id, course_id=course_id)
    return Call("GetEnrollment", request, lambda r: r.enrollment)


def list_enrollments(
    student_id: int,
    course_id: int,
    state: pb.EnrollmentState.ValueType,
    page_size: int,
    page_token: str,
) -> Call[pb.ListEnrollmentsResponse]:
    request = pb.ListEnrollmentsRequest(
        student_id=student_id,
        course_id=course_id,
        state=state,
        page_size=page_size,
        page_token=page_token,
    )
    return Call("ListEnrollments", request, _same)


# Pages


def next_token(current: str, following: str) -> str:
    """The token of the next page, "" after the last; a server that hands back the token
    it was given would keep a walk going forever, so that is an error."""
    if following and following == current:
        raise ClientError("INTERNAL", "the server returned the same page token twice")
    return following


# The change feed


def list_events(
    after_sequence: int, student_id: int, course_id: int, page_size: int
) -> Call[pb.ListEventsResponse]:
    request = pb.ListEventsRequest(
        after_sequence=after_sequence,
        page_size=page_size,
        student_id=student_id,
        course_id=course_id,
    )
    return Call("ListEvents", request, _same)


# iter_events' on_outage: the error when a followed feed loses the server, None when it
# answers again.
OnOutage = Callable[[ClientError | None], None]


class Feed:
    """Where iter_events stands: the last sequence delivered, whether it watches
    (WatchEvents) or polls (ListEvents), and the outage it waits out, if any. Both
    clients run the same loop around it."""

    def __init__(
        self,
        after: int,
        student_id: int,
        course_id: int,
        follow: bool,
        on_outage: OnOutage | None = None,
    ) -> None:
        self.last = after
        self.student_id = student_id
        self.course_id = course_id
        self.follow = follow
        self.watching = follow
        self.on_outage = on_outage
        # The error that began the outage being waited out; meanwhile the feed asks with
        # ListEvents, whose answer (a watch stream sends none until an event) says the
        # server is back.
        self.outage: ClientError | None = None

    @property
    def streams(self) -> bool:
        """Whether the next call is a WatchEvents stream rather than ListEvents."""
        return self.watching and self.outage is None

    def answered(self) -> None:
        """After a call the server answered: the outage, if any, is over."""
        if self.outage is not None:
            self.outage = None
            if self.on_outage is not None:
                self.on_outage(None)

    def watch_request(self) -> pb.WatchEventsRequest:
        return pb.WatchEventsRequest(
            after_sequence=self.last, student_id=self.student_id, course_id=self.course_id
        )

    def list_call(self, page_size: int) -> Call[pb.ListEventsResponse]:
        return list_events(self.last, self.student_id, self.course_id, page_size)

    def delivered(self, event: pb.Event) -> pb.Event:
        self.last = event.sequence
        return event

    def caught_up(self, page: pb.ListEventsResponse) -> bool:
        """After a page's events are delivered: whether it reached the head (nothing
        matching up to it, so the next call may start there)."""
        if page.events:
            self.last = page.events[-1].sequence
        if page.events and self.last < page.head_sequence:
            return False
        self.last = max(self.last, page.head_sequence)
        return True

    def pause_after(self, error: ClientError, poll_interval: float) -> float:
        """How long to wait before going on after error (0: poll ListEvents now, for a
        server without WatchEvents or with no stream to spare: TOO_MANY_WATCHERS, which
        --max-watchers 0 always answers); the error itself when it ends the walk."""
        refused = error.code == "UNIMPLEMENTED" or error.reason == "TOO_MANY_WATCHERS"
        if refused and self.watching:
            self.watching = False
            return 0.0
        resumable = error.code == "UNAVAILABLE" or error.reason == "WATCHER_TOO_SLOW"
        # A follow never cancels its own calls while it runs: CANCELLED is the server's,
        # ending its streams as it stops (those still running at the end of its grace).
        resumable = resumable or error.code == "CANCELLED"
        # A call timing out while the server is away is the same outage (one still starting).
        resumable = resumable or (self.outage is not None and error.code == "DEADLINE_EXCEEDED")
        if not (self.follow and resumable):
            raise error
        if error.code == "UNAVAILABLE" and self.outage is None:
            # Said once per outage, not on every attempt.
            self.outage = error
            if self.on_outage is not None:
                self.on_outage(error)
        return poll_interval
