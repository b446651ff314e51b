"""AsyncEnrollmentClient: EnrollmentClient's methods as coroutines on grpc.aio, for asyncio
callers (FastAPI and the like) that must not block their event loop on a call."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable

import grpc
from grpc import aio

from enrollment.client import calls
from enrollment.client.api import (
    DEFAULT_TIMEOUT,
    channel_credentials,
    channel_options,
    check_timeout,
    check_token,
)
from enrollment.client.calls import Call, P, T
from enrollment.client.errors import BatchResult, ClientError, call_failure
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
        check_timeout(timeout)
        check_token(token)
        options = channel_options(lb_policy)
        credentials = channel_credentials(tls_ca, tls_cert, tls_key)
        self.address = address
        self.timeout = timeout
        self._tls, self._client_cert = credentials is not None, bool(tls_cert)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        if credentials is None:
            self._channel = aio.insecure_channel(address, options=options)
        else:
            self._channel = aio.secure_channel(address, credentials, options=options)
        self._stub = pb_grpc.EnrollmentServiceStub(self._channel)

    async def __aenter__(self) -> AsyncEnrollmentClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _run(self, call: Call[T]) -> T:
        # As the sync client: no wait_for_ready, so a server that is down fails the call now.
        method = getattr(self._stub, call.method)
        try:
            response = await method(
                call.request, timeout=self.timeout, metadata=call_metadata(self._metadata)
            )
        except grpc.RpcError as error:
            raise call_failure(error, tls=self._tls, client_cert=self._client_cert) from None
        except aio.UsageError as error:
            # A call on a closed client: the sync client's grpc raises ValueError here too.
            raise ValueError(f"cannot call on a closed channel: {error}") from None
        return call.result(response)

    async def _walk(
        self, page: Callable[[str], Call[P]], items: Callable[[P], Iterable[T]], page_token: str
    ) -> AsyncIterator[T]:
        """As EnrollmentClient._walk."""
        while True:
            answer = await self._run(page(page_token))
            for item in items(answer):
                yield item
            page_token = calls.next_token(page_token, answer.next_page_token)
            if not page_token:
                return

    # Students

    async def create_student(
        self, name: str, email: str, *, request_id: str | None = None
    ) -> pb.Student:
        return await self._run(calls.create_student(name, email, request_id))

    async def get_student(self, student_id: int) -> pb.Student:
        return await self._run(calls.get_student(student_id))

    async def list_students(
        self, course_id: int = 0, page_size: int = 0, page_token: str = ""
    ) -> pb.ListStudentsResponse:
        """One page of all students (course_id 0) or of one course's roster."""
        return await self._run(calls.list_students(course_id, page_size, page_token))

    def iter_students(
        self, course_id: int = 0, *, page_size: int = 0, page_token: str = ""
    ) -> AsyncIterator[pb.Student]:
        """Every student from page_token on (the start by default), fetching page after page."""
        return self._walk(
            lambda token: calls.list_students(course_id, page_size, token),
            lambda page: page.students,
            page_token,
        )

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
        return await self._run(calls.update_student(student_id, name, email, etag, request_id))

    async def delete_student(
        self, student_id: int, force: bool = False, *, request_id: str | None = None
    ) -> None:
        await self._run(calls.delete_student(student_id, force, request_id))

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
        call = calls.create_course(code, title, capacity, waitlist_capacity, request_id)
        return await self._run(call)

    async def get_course(self, course_id: int) -> pb.Course:
        return await self._run(calls.get_course(course_id))

    async def list_courses(
        self, student_id: int = 0, page_size: int = 0, page_token: str = ""
    ) -> pb.ListCoursesResponse:
        """One page of the catalogue (student_id 0) or of the courses one student takes."""
        return await self._run(calls.list_courses(student_id, page_size, page_token))

    def iter_courses(
        self, student_id: int = 0, *, page_size: int = 0, page_token: str = ""
    ) -> AsyncIterator[pb.Course]:
        """Every course from page_token on (the start by default), fetching page after page."""
        return self._walk(
            lambda token: calls.list_courses(student_id, page_size, token),
            lambda page: page.courses,
            page_token,
        )

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
        call = calls.update_course(
            course_id, code, title, capacity, waitlist_capacity, etag, request_id
        )
        return await self._run(call)

    async def delete_course(
        self, course_id: int, force: bool = False, *, request_id: str | None = None
    ) -> None:
        await self._run(calls.delete_course(course_id, force, request_id))

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
        return await self._run(calls.enroll(student_id, course_id, waitlist_if_full, request_id))

    async def drop(
        self, student_id: int, course_id: int, *, request_id: str | None = None
    ) -> pb.Enrollment | None:
        """Drop an enrolled or waitlisted entry; returns whoever took the freed seat."""
        return await self._run(calls.drop(student_id, course_id, request_id))

    async def batch_enroll(
        self,
        pairs: Iterable[tuple[int, int]],
        *,
        allow_partial_success: bool = False,
        waitlist_if_full: bool = False,
        request_id: str | None = None,
    ) -> list[BatchResult]:
        """As EnrollmentClient.batch_enroll."""
        call = calls.batch_enroll(pairs, allow_partial_success, waitlist_if_full, request_id)
        return await self._run(call)

    async def batch_drop(
        self,
        pairs: Iterable[tuple[int, int]],
        *,
        allow_partial_success: bool = False,
        request_id: str | None = None,
    ) -> list[BatchResult]:
        """As EnrollmentClient.batch_drop."""
        return await self._run(calls.batch_drop(pairs, allow_partial_success, request_id))

    async def get_enrollment(self, student_id: int, course_id: int) -> pb.Enrollment:
        return await self._run(calls.get_enrollment(student_id, course_id))

    async def list_enrollments(
        self,
        student_id: int = 0,
        course_id: int = 0,
        state: pb.EnrollmentState.ValueType = pb.ENROLLMENT_STATE_UNSPECIFIED,
        page_size: int = 0,
        page_token: str = "",
    ) -> pb.ListEnrollmentsResponse:
        """One page of enrollments (filters combine; 0 and UNSPECIFIED mean any)."""
        call = calls.list_enrollments(student_id, course_id, state, page_size, page_token)
        return await self._run(call)

    def iter_enrollments(
        self,
        student_id: int = 0,
        course_id: int = 0,
        state: pb.EnrollmentState.ValueType = pb.ENROLLMENT_STATE_UNSPECIFIED,
        *,
        page_size: int = 0,
        page_token: str = "",
    ) -> AsyncIterator[pb.Enrollment]:
        """Every enrollment from page_token on; a course's waitlist comes in line order."""
        return self._walk(
            lambda token: calls.list_enrollments(student_id, course_id, state, page_size, token),
            lambda page: page.enrollments,
            page_token,
        )

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
        call = calls.list_events(after_sequence, student_id, course_id, page_size)
        return await self._run(call)

    async def iter_events(
        self,
        after: int = 0,
        *,
        student_id: int = 0,
        course_id: int = 0,
        follow: bool = False,
        poll_interval: float = 1.0,
        page_size: int = 0,
        on_outage: calls.OnOutage | None = None,
    ) -> AsyncIterator[pb.Event]:
        """As EnrollmentClient.iter_events: the events after `after`, each once, in
        order; with follow, forever (WatchEvents, else polling), resuming by itself from
        the last sequence after UNAVAILABLE, WATCHER_TOO_SLOW or the server's CANCELLED,
        calling on_outage with the error once when the server stops answering and with
        None when it is back."""
        feed = calls.Feed(after, student_id, course_id, follow, on_outage)
        while True:
            try:
                if feed.streams:
                    async for event in self._watch(feed.watch_request()):
                        yield feed.delivered(event)
                    continue  # the stream ended without an error: watch again
                page = await self._run(feed.list_call(page_size))
                feed.answered()
                for event in page.events:
                    yield event
                if feed.caught_up(page):
                    if not follow:
                        return
                    if not feed.watching:
                        await asyncio.sleep(poll_interval)
            except ClientError as error:
                await asyncio.sleep(feed.pause_after(error, poll_interval))

    async def _watch(self, request: pb.WatchEventsRequest) -> AsyncIterator[pb.Event]:
        stream = self._stub.WatchEvents(request, metadata=call_metadata(self._metadata))
        try:
            async for response in stream:
                for event in response.events:
                    yield event
        except grpc.RpcError as error:
            raise call_failure(error, tls=self._tls, client_cert=self._client_cert) from None
        finally:
            stream.cancel()
