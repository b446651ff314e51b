"""AsyncEnrollmentClient: EnrollmentClient's methods as coroutines on grpc.aio, for asyncio
callers (FastAPI and the like) that must not block their event loop on a call."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc
from grpc import aio

from enrollment.client.api import (
    DEFAULT_TIMEOUT,
    BatchResult,
    ClientError,
    _next_token,
    _read,
    batch_drop_request,
    batch_enroll_request,
    batch_results,
    channel_options,
    update_course_request,
    update_student_request,
    with_request_id,
)
from enrollment.client.tracecontext import call_metadata
from enrollment.v1 import enrollment_pb2 as pb
from enrollment.v1 import enrollment_pb2_grpc as pb_grpc


class AsyncEnrollmentClient:
    """A grpc.aio channel to one server; `async with` it so the channel gets closed.

    The same methods, arguments, errors (ClientError) and page walkers as
    EnrollmentClient, each a coroutine (the walkers async iterators). Create it inside
    the event loop that will use it.
    """

    def __init__(
        self,
        address: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        token: str | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        lb_policy: str | None = None,
    ) -> None:
        """As EnrollmentClient: TLS when tls_ca or tls_cert is given, token sent as
        'authorization: Bearer <token>', lb_policy "round_robin" to spread calls."""
        if timeout <= 0:
            raise ValueError("timeout must be more than 0 seconds")
        if bool(tls_cert) != bool(tls_key):
            raise ValueError("tls_cert and tls_key go together")
        options = channel_options(lb_policy)
        self.address = address
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        if tls_ca or tls_cert:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(tls_ca),
                private_key=_read(tls_key),
                certificate_chain=_read(tls_cert),
            )
            self._channel = aio.secure_channel(address, credentials, options=options)
        else:
            self._channel = aio.insecure_channel(address, options=options)
        self._stub = pb_grpc.EnrollmentServiceStub(self._channel)

    async def __aenter__(self) -> AsyncEnrollmentClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method: Any, request: Any) -> Any:
        # As the sync client: no wait_for_ready, so a server that is down fails the call now.
        try:
            return await method(
                request, timeout=self.timeout, metadata=call_metadata(self._metadata)
            )
        except grpc.RpcError as error:
            raise ClientError.from_rpc_error(error) from None
        except aio.UsageError as error:
            # A call on a closed client: the sync client's grpc raises ValueError here too.
            raise ValueError(f"cannot call on a closed channel: {error}") from None

    # Students

    async def create_student(
        self, name: str, email: str, *, request_id: str | None = None
    ) -> pb.Student:
        request = pb.CreateStudentRequest(name=name, email=email)
        response: pb.CreateStudentResponse = await self._call(
            self._stub.CreateStudent, with_request_id(request, request_id)
        )
        return response.student

    async def get_student(self, student_id: int) -> pb.Student:
        request = pb.GetStudentRequest(student_id=student_id)
        response: pb.GetStudentResponse = await self._call(self._stub.GetStudent, request)
        return response.student

    async def list_students(
        self, course_id: int = 0, page_size: int = 0, page_token: str = ""
    ) -> pb.ListStudentsResponse:
        """One page of all students (course_id 0) or of one course's roster."""
        request = pb.ListStudentsRequest(
            course_id=course_id, page_size=page_size, page_token=page_token
        )
        response: pb.ListStudentsResponse = await self._call(self._stub.ListStudents, request)
        return response

    async def iter_students(
        self, course_id: int = 0, *, page_size: int = 0, page_token: str = ""
    ) -> AsyncIterator[pb.Student]:
        """Every student from page_token on (the start by default), fetching page after page."""
        while True:
            page = await self.list_students(course_id, page_size, page_token)
            for student in page.students:
                yield student
            page_token = _next_token(page_token, page.next_page_token)
            if not page_token:
                return

    async def update_student(
        self,
        student_id: int,
        *,
        name: str | None = None,
        email: str | None = None,
        etag: str = "",
        request_id: str | None = None,
    ) -> pb.Student:
        """Change the fields given (None leaves one as it is); etag guards the change."""
        request = update_student_request(student_id, name=name, email=email, etag=etag)
        response: pb.UpdateStudentResponse = await self._call(
            self._stub.UpdateStudent, with_request_id(request, request_id)
        )
        return response.student

    async def delete_student(
        self, student_id: int, force: bool = False, *, request_id: str | None = None
    ) -> None:
        request = pb.DeleteStudentRequest(student_id=student_id, force=force)
        await self._call(self._stub.DeleteStudent, with_request_id(request, request_id))

    # Courses

    async def create_course(
        self,
        code: str,
        title: str,
        capacity: int = 0,
        waitlist_capacity: int = 0,
        *,
        request_id: str | None = None,
    ) -> pb.Course:
        request = pb.CreateCourseRequest(
            code=code, title=title, capacity=capacity, waitlist_capacity=waitlist_capacity
        )
        response: pb.CreateCourseResponse = await self._call(
            self._stub.CreateCourse, with_request_id(request, request_id)
        )
        return response.course

    async def get_course(self, course_id: int) -> pb.Course:
        request = pb.GetCourseRequest(course_id=course_id)
        response: pb.GetCourseResponse = await self._call(self._stub.GetCourse, request)
        return response.course

    async def list_courses(
        self, student_id: int = 0, page_size: int = 0, page_token: str = ""
    ) -> pb.ListCoursesResponse:
        """One page of the catalogue (student_id 0) or of the courses one student takes."""
        request = pb.ListCoursesRequest(
            student_id=student_id, page_size=page_size, page_token=page_token
        )
        response: pb.ListCoursesResponse = await self._call(self._stub.ListCourses, request)
        return response

    async def iter_courses(
        self, student_id: int = 0, *, page_size: int = 0, page_token: str = ""
    ) -> AsyncIterator[pb.Course]:
        """Every course from page_token on (the start by default), fetching page after page."""
        while True:
            page = await self.list_courses(student_id, page_size, page_token)
            for course in page.courses:
                yield course
            page_token = _next_token(page_token, page.next_page_token)
            if not page_token:
                return

    async def update_course(
        self,
        course_id: int,
        *,
        code: str | None = None,
        title: str | None = None,
        capacity: int | None = None,
        waitlist_capacity: int | None = None,
        etag: str = "",
        request_id: str | None = None,
    ) -> pb.Course:
        """Change the fields given (None leaves one as it is; capacity=0 means unlimited).
        Raising the capacity promotes waitlisted students into the new seats."""
        request = update_course_request(
            course_id,
            code=code,
            title=title,
            capacity=capacity,
            waitlist_capacity=waitlist_capacity,
            etag=etag,
        )
        response: pb.UpdateCourseResponse = await self._call(
            self._stub.UpdateCourse, with_request_id(request, request_id)
        )
        return response.course

    async def delete_course(
        self, course_id: int, force: bool = False, *, request_id: str | None = None
    ) -> None:
        request = pb.DeleteCourseRequest(course_id=course_id, force=force)
        await self._call(self._stub.DeleteCourse, with_request_id(request, request_id))

    # Enrollments

    async def enroll(
        self,
        student_id: int,
        course_id: int,
        waitlist_if_full: bool = False,
        *,
        request_id: str | None = None,
    ) -> pb.Enrollment:
        """waitlist_if_full: join the course's waitlist when it is full."""
        request = pb.EnrollStudentRequest(
            student_id=student_id, course_id=course_id, waitlist_if_full=waitlist_if_full
        )
        response: pb.EnrollStudentResponse = await self._call(
            self._stub.EnrollStudent, with_request_id(request, request_id)
        )
        return response.enrollment

    async def drop(
        self, student_id: int, course_id: int, *, request_id: str | None = None
    ) -> pb.Enrollment | None:
        """Drop an enrolled or waitlisted entry; returns whoever took the freed seat."""
        request = pb.DropCourseRequest(student_id=student_id, course_id=course_id)
        response: pb.DropCourseResponse = await self._call(
            self._stub.DropCourse, with_request_id(request, request_id)
        )
        return response.promoted if response.HasField("promoted") else None

    async def batch_enroll(
        self,
        pairs: Iterable[tuple[int, int]],
        *,
        allow_partial_success: bool = False,
        waitlist_if_full: bool = False,
        request_id: str | None = None,
    ) -> list[BatchResult]:
        """As EnrollmentClient.batch_enroll."""
        request = batch_enroll_request(pairs, allow_partial_success, waitlist_if_full)
        response: pb.BatchEnrollStudentsResponse = await self._call(
            self._stub.BatchEnrollStudents, with_request_id(request, request_id)
        )
        return batch_results(response.results)

    async def batch_drop(
        self,
        pairs: Iterable[tuple[int, int]],
        *,
        allow_partial_success: bool = False,
        request_id: str | None = None,
    ) -> list[BatchResult]:
        """As EnrollmentClient.batch_drop."""
        request = batch_drop_request(pairs, allow_partial_success)
        response: pb.BatchDropCoursesResponse = await self._call(
            self._stub.BatchDropCourses, with_request_id(request, request_id)
        )
        return batch_results(response.results)

    async def get_enrollment(self, student_id: int, course_id: int) -> pb.Enrollment:
        request = pb.GetEnrollmentRequest(student_id=student_id, course_id=course_id)
        response: pb.GetEnrollmentResponse = await self._call(self._stub.GetEnrollment, request)
        return response.enrollment

    async def list_enrollments(
        self,
        student_id: int = 0,
        course_id: int = 0,
        state: pb.EnrollmentState.ValueType = pb.ENROLLMENT_STATE_UNSPECIFIED,
        page_size: int = 0,
        page_token: str = "",
    ) -> pb.ListEnrollmentsResponse:
        """One page of enrollments (filters combine; 0 and UNSPECIFIED mean any)."""
        request = pb.ListEnrollmentsRequest(
            student_id=student_id,
            course_id=course_id,
            state=state,
            page_size=page_size,
            page_token=page_token,
        )
        response: pb.ListEnrollmentsResponse = await self._call(self._stub.ListEnrollments, request)
        return response

    async def iter_enrollments(
        self,
        student_id: int = 0,
        course_id: int = 0,
        state: pb.EnrollmentState.ValueType = pb.ENROLLMENT_STATE_UNSPECIFIED,
        *,
        page_size: int = 0,
        page_token: str = "",
    ) -> AsyncIterator[pb.Enrollment]:
        """Every enrollment from page_token on; a course's waitlist comes in line order."""
        while True:
            page = await self.list_enrollments(student_id, course_id, state, page_size, page_token)
            for enrollment in page.enrollments:
                yield enrollment
            page_token = _next_token(page_token, page.next_page_token)
            if not page_token:
                return

    # The change feed

    async def list_events(
        self,
        after_sequence: int = 0,
        *,
        student_id: int = 0,
        course_id: int = 0,
        page_size: int = 0,
    ) -> pb.ListEventsResponse:
        """One page of events after after_sequence, with the head_sequence of the call."""
        request = pb.ListEventsRequest(
            after_sequence=after_sequence,
            page_size=page_size,
            student_id=student_id,
            course_id=course_id,
        )
        response: pb.ListEventsResponse = await self._call(self._stub.ListEvents, request)
        return response

    async def iter_events(
        self,
        after: int = 0,
        *,
        student_id: int = 0,
        course_id: int = 0,
        follow: bool = False,
        poll_interval: float = 1.0,
        page_size: int = 0,
    ) -> AsyncIterator[pb.Event]:
        """As EnrollmentClient.iter_events: the events after `after`, each once, in
        order; with follow, forever (WatchEvents, else polling), resuming by itself from
        the last sequence after UNAVAILABLE or WATCHER_TOO_SLOW."""
        last = after
        watch = follow
        while True:
            try:
                if watch:
                    request = pb.WatchEventsRequest(
                        after_sequence=last, student_id=student_id, course_id=course_id
                    )
                    stream = self._stub.WatchEvents(request, metadata=call_metadata(self._metadata))
                    try:
                        async for response in stream:
                            for event in response.events:
                                last = event.sequence
                                yield event
                    except grpc.RpcError as error:
                        raise ClientError.from_rpc_error(error) from None
                    finally:
                        stream.cancel()
                    continue
                page = await self.list_events(
                    last, student_id=student_id, course_id=course_id, page_size=page_size
                )
                for event in page.events:
                    yield event
                if page.events:
                    last = page.events[-1].sequence
                if not page.events or last >= page.head_sequence:
                    last = max(last, page.head_sequence)
                    if not follow:
                        return
                    await asyncio.sleep(poll_interval)
            except ClientError as error:
                if error.code == "UNIMPLEMENTED" and watch:
                    watch = False
                    continue
                resumable = error.code == "UNAVAILABLE" or error.reason == "WATCHER_TOO_SLOW"
                if not (follow and resumable):
                    raise
                await asyncio.sleep(poll_interval)
