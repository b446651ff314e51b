"""EnrollmentClient: one method per RPC, each with a deadline; failures raise ClientError."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import grpc
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from enrollment.client.tracecontext import call_metadata
from enrollment.v1 import enrollment_pb2 as pb
from enrollment.v1 import enrollment_pb2_grpc as pb_grpc

DEFAULT_TIMEOUT = 5.0
SERVICE = "enrollment.v1.EnrollmentService"
# The channel retries a call that failed UNAVAILABLE (the server or its database was
# away), and only that: every mutation carries a request_id, so a retry of one that
# did commit gets the first answer back instead of running twice.
RETRY_POLICY = {
    "maxAttempts": 4,
    "initialBackoff": "0.1s",
    "maxBackoff": "2s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}

# google.rpc.Code numbers to grpc.StatusCode values.
_CODES = {code.value[0]: code.value for code in grpc.StatusCode}

_Response = TypeVar("_Response")
_Request = TypeVar("_Request")
# gRPC's load-balancing policies that need nothing but the addresses the target resolves
# to: pick_first (gRPC's default) sends every call to one of them, round_robin spreads
# calls over all of them (every pod behind a headless Service, say).
LB_POLICIES = ("pick_first", "round_robin")


class ClientError(Exception):
    """A failed call: the gRPC status code name, the ErrorInfo reason and the BadRequest fields."""

    def __init__(
        self,
        code: str,
        message: str,
        reason: str = "",
        fields: list[str] | None = None,
        metadata: dict[str, str] | None = None,
        hint: str = "",
    ) -> None:
        super().__init__(code, message, reason)
        self.code = code
        self.message = message
        self.reason = reason
        self.fields = list(fields or [])
        self.metadata = dict(metadata or {})
        # What the failure suggests about this client's settings (see connection_hint).
        self.hint = hint

    def __str__(self) -> str:
        head = f"{self.code} {self.reason}" if self.reason else self.code
        return f"{head}: {self.explained}"

    @property
    def explained(self) -> str:
        """The message, and the hint in brackets when there is one."""
        return f"{self.message} ({self.hint})" if self.hint else self.message

    @classmethod
    def from_status(cls, status: Any) -> ClientError:
        """A batch item's google.rpc.Status as an error."""
        info = error_details_pb2.ErrorInfo()
        bad = error_details_pb2.BadRequest()
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                detail.Unpack(info)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                detail.Unpack(bad)
        return cls(
            code=grpc.StatusCode(_CODES[status.code]).name if status.code in _CODES else "UNKNOWN",
            message=status.message,
            reason=info.reason,
            fields=[v.field for v in bad.field_violations],
            metadata=dict(info.metadata),
        )

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> ClientError:
        # Every RpcError a unary call raises is also a grpc.Call; getattr guards the
        # odd one that is not (a bare RpcError from an interceptor, say).
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        message = (error.details() if hasattr(error, "details") else None) or ""
        info = error_details_pb2.ErrorInfo()
        bad = error_details_pb2.BadRequest()
        try:
            # grpc.aio's errors are not grpc.Call, but have the same code/details/trailers.
            status = rpc_status.from_call(cast(grpc.Call, error))
        except (ValueError, AttributeError):
            # Details that contradict the status line are not trusted; code and message stand.
            status = None
        if status is not None:
            for detail in status.details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    detail.Unpack(info)
                elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                    detail.Unpack(bad)
        return cls(
            code=code.name,
            message=message,
            reason=info.reason,
            fields=[v.field for v in bad.field_violations],
            metadata=dict(info.metadata),
        )


@dataclass(frozen=True)
class BatchResult:
    """One item of a batch: its enrollment (for a drop: whoever was promoted, if anyone)
    when it was applied, else its error."""

    enrollment: pb.Enrollment | None
    error: ClientError | None

    @property
    def ok(self) -> bool:
        return self.error is None


MAX_BATCH = 1000


class EnrollmentClient:
    """A channel to one server; use as a context manager so the channel gets closed."""

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
        """TLS when tls_ca (the server's CA; system roots otherwise) or tls_cert is given;
        tls_cert/tls_key are the client certificate for mutual TLS; token is sent as
        'authorization: Bearer <token>' on every call. lb_policy "round_robin" spreads
        calls over every address the target resolves to, e.g.
        "dns:///enrollment-headless.NAMESPACE.svc.cluster.local:50051" or
        "ipv4:10.0.0.1:50051,10.0.0.2:50051"; gRPC's default is "pick_first"."""
        if timeout <= 0:
            raise ValueError("timeout must be more than 0 seconds")
        self.address = address
        self.timeout = timeout
        self._tls, self._client_cert = bool(tls_ca or tls_cert), bool(tls_cert)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._channel = open_channel(
            address, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key, lb_policy=lb_policy
        )
        self._stub = pb_grpc.EnrollmentServiceStub(self._channel)

    def __enter__(self) -> EnrollmentClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: Callable[..., _Response], request: Any) -> _Response:
        # No wait_for_ready: a server that is down should fail the call now, as
        # UNAVAILABLE, rather than hold it until the deadline.
        metadata = call_metadata(self._metadata)  # adds the caller's traceparent, if any
        try:
            if metadata is None:
                return method(request, timeout=self.timeout)
            return method(request, timeout=self.timeout, metadata=metadata)
        except grpc.RpcError as error:
            failure = ClientError.from_rpc_error(error)
            if failure.code == "UNAVAILABLE":
                failure.hint = connection_hint(
                    failure.message, tls=self._tls, client_cert=self._client_cert
                )
            raise failure from None

    def _mutate(
        self, method: Callable[..., _Response], request: Any, request_id: str | None
    ) -> _Response:
        """A mutation with its request_id: the caller's, else a fresh one, so that the
        channel's retries (and the caller's own, passing the same id) apply it once."""
        return self._call(method, with_request_id(request, request_id))

    # Students

    def create_student(self, name: str, email: str, *, request_id: str | None = None) -> pb.Student:
        request = pb.CreateStudentRequest(name=name, email=email)
        return self._mutate(self._stub.CreateStudent, request, request_id).student

    def get_student(self, student_id: int) -> pb.Student:
        request = pb.GetStudentRequest(student_id=student_id)
        return self._call(self._stub.GetStudent, request).student

    def list_students(
        self, course_id: int = 0, page_size: int = 0, page_token: str = ""
    ) -> pb.ListStudentsResponse:
        """One page of all students (course_id 0) or of one course's roster."""
        request = pb.ListStudentsRequest(
            course_id=course_id, page_size=page_size, page_token=page_token
        )
        return self._call(self._stub.ListStudents, request)

    def iter_students(
        self, course_id: int = 0, *, page_size: int = 0, page_token: str = ""
    ) -> Iterator[pb.Student]:
        """Every student from page_token on (the start by default), fetching page after page."""
        return _walk(
            lambda token: self.list_students(course_id, page_size, token), "students", page_token
        )

    def update_student(
        self,
        student_id: int,
        *,
        name: str | None = None,
        email: str | None = None,
        etag: str = "",
        request_id: str | None = None,
    ) -> pb.Student:
        """Change the fields given (None leaves one as it is). etag: the student's etag as
        last read, to refuse the change (ABORTED ETAG_MISMATCH) if it moved since."""
        request = update_student_request(student_id, name=name, email=email, etag=etag)
        return self._mutate(self._stub.UpdateStudent, request, request_id).student

    def delete_student(
        self, student_id: int, force: bool = False, *, request_id: str | None = None
    ) -> None:
        request = pb.DeleteStudentRequest(student_id=student_id, force=force)
        self._mutate(self._stub.DeleteStudent, request, request_id)

    # Courses

    def create_course(
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
        return self._mutate(self._stub.CreateCourse, request, request_id).course

    def update_course(
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
        return self._mutate(self._stub.UpdateCourse, request, request_id).course

    def get_course(self, course_id: int) -> pb.Course:
        request = pb.GetCourseRequest(course_id=course_id)
        return self._call(self._stub.GetCourse, request).course

    def list_courses(
        self, student_id: int = 0, page_size: int = 0, page_token: str = ""
    ) -> pb.ListCoursesResponse:
        """One page of the catalogue (student_id 0) or of the courses one student takes."""
        request = pb.ListCoursesRequest(
            student_id=student_id, page_size=page_size, page_token=page_token
        )
        return self._call(self._stub.ListCourses, request)

    def iter_courses(
        self, student_id: int = 0, *, page_size: int = 0, page_token: str = ""
    ) -> Iterator[pb.Course]:
        """Every course from page_token on (the start by default), fetching page after page."""
        return _walk(
            lambda token: self.list_courses(student_id, page_size, token), "courses", page_token
        )

    def delete_course(
        self, course_id: int, force: bool = False, *, request_id: str | None = None
    ) -> None:
        request = pb.DeleteCourseRequest(course_id=course_id, force=force)
        self._mutate(self._stub.DeleteCourse, request, request_id)

    # Enrollments

    def enroll(
        self,
        student_id: int,
        course_id: int,
        waitlist_if_full: bool = False,
        *,
        request_id: str | None = None,
    ) -> pb.Enrollment:
        """waitlist_if_full: join the course's waitlist when it is full (the answer's
        state is then ENROLLMENT_STATE_WAITLISTED, with its waitlist_position)."""
        request = pb.EnrollStudentRequest(
            student_id=student_id, course_id=course_id, waitlist_if_full=waitlist_if_full
        )
        return self._mutate(self._stub.EnrollStudent, request, request_id).enrollment

    def drop(
        self, student_id: int, course_id: int, *, request_id: str | None = None
    ) -> pb.Enrollment | None:
        """Drop an enrolled or waitlisted entry; returns whoever took the freed seat."""
        request = pb.DropCourseRequest(student_id=student_id, course_id=course_id)
        response = self._mutate(self._stub.DropCourse, request, request_id)
        return response.promoted if response.HasField("promoted") else None

    def batch_enroll(
        self,
        pairs: Iterable[tuple[int, int]],
        *,
        allow_partial_success: bool = False,
        waitlist_if_full: bool = False,
        request_id: str | None = None,
    ) -> list[BatchResult]:
        """Enroll up to 1000 (student_id, course_id) pairs in order in one transaction.
        All or nothing by default (the first failing item raises, its index in
        error.metadata["index"]); allow_partial_success: one BatchResult per pair."""
        request = batch_enroll_request(pairs, allow_partial_success, waitlist_if_full)
        response = self._mutate(self._stub.BatchEnrollStudents, request, request_id)
        return batch_results(response.results)

    def batch_drop(
        self,
        pairs: Iterable[tuple[int, int]],
        *,
        allow_partial_success: bool = False,
        request_id: str | None = None,
    ) -> list[BatchResult]:
        """Drop up to 1000 (student_id, course_id) pairs in order in one transaction; as
        batch_enroll, each result's enrollment is whoever took the freed seat."""
        request = batch_drop_request(pairs, allow_partial_success)
        response = self._mutate(self._stub.BatchDropCourses, request, request_id)
        return batch_results(response.results)

    def get_enrollment(self, student_id: int, course_id: int) -> pb.Enrollment:
        request = pb.GetEnrollmentRequest(student_id=student_id, course_id=course_id)
        return self._call(self._stub.GetEnrollment, request).enrollment

    def list_enrollments(
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
        return self._call(self._stub.ListEnrollments, request)

    def iter_enrollments(
        self,
        student_id: int = 0,
        course_id: int = 0,
        state: pb.EnrollmentState.ValueType = pb.ENROLLMENT_STATE_UNSPECIFIED,
        *,
        page_size: int = 0,
        page_token: str = "",
    ) -> Iterator[pb.Enrollment]:
        """Every enrollment from page_token on; a course's waitlist (course_id and
        ENROLLMENT_STATE_WAITLISTED) comes in line order."""
        while True:
            page = self.list_enrollments(student_id, course_id, state, page_size, page_token)
            yield from page.enrollments
            page_token = _next_token(page_token, page.next_page_token)
            if not page_token:
                return

    # The change feed

    def list_events(
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
        return self._call(self._stub.ListEvents, request)

    def iter_events(
        self,
        after: int = 0,
        *,
        student_id: int = 0,
        course_id: int = 0,
        follow: bool = False,
        poll_interval: float = 1.0,
        page_size: int = 0,
    ) -> Iterator[pb.Event]:
        """The events after sequence `after`, in order, each once.

        Without follow: until the head at the time of the walk. With follow: forever,
        through WatchEvents where the server has it and by polling ListEvents where it
        does not, resuming by itself from the last sequence after UNAVAILABLE (a server
        restarting or shutting down) or WATCHER_TOO_SLOW; other errors are raised."""
        last = after
        watch = follow
        while True:
            try:
                if watch:
                    for event in self._watch(last, student_id, course_id):
                        last = event.sequence
                        yield event
                    continue  # the stream ended without an error: watch again
                page = self.list_events(
                    last, student_id=student_id, course_id=course_id, page_size=page_size
                )
                yield from page.events
                if page.events:
                    last = page.events[-1].sequence
                if not page.events or last >= page.head_sequence:
                    # Nothing matching up to the head: the next call may start there.
                    last = max(last, page.head_sequence)
                    if not follow:
                        return
                    time.sleep(poll_interval)
            except ClientError as error:
                if error.code == "UNIMPLEMENTED" and watch:
                    watch = False  # a server without WatchEvents: poll ListEvents
                    continue
                resumable = error.code == "UNAVAILABLE" or error.reason == "WATCHER_TOO_SLOW"
                if not (follow and resumable):
                    raise
                time.sleep(poll_interval)

    def _watch(self, after: int, student_id: int, course_id: int) -> Iterator[pb.Event]:
        request = pb.WatchEventsRequest(
            after_sequence=after, student_id=student_id, course_id=course_id
        )
        stream = self._stub.WatchEvents(request, metadata=call_metadata(self._metadata))
        try:
            for response in stream:
                yield from response.events
        except grpc.RpcError as error:
            raise ClientError.from_rpc_error(error) from None
        finally:
            stream.cancel()


def with_request_id(request: _Request, request_id: str | None) -> _Request:
    """The mutation request with request_id set: the caller's, else a fresh uuid4, so that
    the channel's retries (and the caller's own, passing the same id) apply it once."""
    request.request_id = request_id or str(uuid.uuid4())  # type: ignore[attr-defined]
    return request


def batch_enroll_request(
    pairs: Iterable[tuple[int, int]], allow_partial_success: bool, waitlist_if_full: bool
) -> pb.BatchEnrollStudentsRequest:
    return pb.BatchEnrollStudentsRequest(
        requests=[
            pb.EnrollStudentRequest(student_id=s, course_id=c, waitlist_if_full=waitlist_if_full)
            for s, c in pairs
        ],
        allow_partial_success=allow_partial_success,
    )


def batch_drop_request(
    pairs: Iterable[tuple[int, int]], allow_partial_success: bool
) -> pb.BatchDropCoursesRequest:
    return pb.BatchDropCoursesRequest(
        requests=[pb.DropCourseRequest(student_id=s, course_id=c) for s, c in pairs],
        allow_partial_success=allow_partial_success,
    )


def batch_results(results: Iterable[Any]) -> list[BatchResult]:
    """One BatchResult per item of a Batch*Response."""
    out = []
    for result in results:
        error = None
        if result.status.code:
            error = ClientError.from_status(result.status)
        entry = result.enrollment if hasattr(result, "enrollment") else result.promoted
        field = "enrollment" if hasattr(result, "enrollment") else "promoted"
        out.append(BatchResult(entry if result.HasField(field) else None, error))
    return out


def open_channel(
    address: str,
    *,
    tls_ca: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    lb_policy: str | None = None,
) -> grpc.Channel:
    """A channel to HOST:PORT: TLS when tls_ca (the server's CA; system roots otherwise) or
    tls_cert is given, with tls_cert/tls_key as the client certificate for mutual TLS;
    plaintext otherwise. Raises ValueError for a certificate without its key (or the
    reverse) and OSError for a file that cannot be read. lb_policy: see channel_options."""
    if bool(tls_cert) != bool(tls_key):
        raise ValueError("tls_cert and tls_key go together")
    options = channel_options(lb_policy)
    if not (tls_ca or tls_cert):
        return grpc.insecure_channel(address, options=options)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(tls_ca),
        private_key=_read(tls_key),
        certificate_chain=_read(tls_cert),
    )
    return grpc.secure_channel(address, credentials, options=options)


def channel_options(lb_policy: str | None = None) -> list[tuple[str, str]]:
    """Channel options: a service config retrying UNAVAILABLE (RETRY_POLICY), and gRPC's
    load-balancing policy lb_policy (one of LB_POLICIES; None leaves gRPC's default,
    pick_first). Raises ValueError for another policy."""
    config: dict[str, object] = {
        "methodConfig": [{"name": [{"service": SERVICE}], "retryPolicy": RETRY_POLICY}]
    }
    if lb_policy is not None:
        if lb_policy not in LB_POLICIES:
            raise ValueError(f"lb_policy must be one of {', '.join(LB_POLICIES)}")
        config["loadBalancingConfig"] = [{lb_policy: {}}]
    return [("grpc.service_config", json.dumps(config))]


def connection_hint(message: str, *, tls: bool, client_cert: bool) -> str:
    """What an UNAVAILABLE's message suggests about the client's security settings, or "".

    A TLS server closes a plaintext client's connection, and a mutual-TLS server that of a
    client without a certificate, and grpc reports only "Socket closed"; a plaintext
    server answers a TLS hello with bytes TLS cannot read (WRONG_VERSION_NUMBER).
    Options are named as enrollment-client and `enrollment-server health` spell them
    (EnrollmentClient takes the same names as keywords: tls_ca, tls_cert, tls_key).
    """
    if tls and "WRONG_VERSION_NUMBER" in message:
        return "the server may not speak TLS: connect without --tls-ca and --tls-cert"
    if tls and "CERTIFICATE_VERIFY_FAILED" in message:
        return "the server's certificate is not signed by the CA of --tls-ca"
    if "Socket closed" not in message:
        return ""
    if not tls:
        return (
            "the server may expect TLS: give --tls-ca (and --tls-cert/--tls-key when it "
            "asks for a client certificate)"
        )
    if not client_cert:
        return "the server may ask for a client certificate (mutual TLS): give --tls-cert/--tls-key"
    return "the server may not accept this client certificate, or may not speak TLS"


def _read(path: str | None) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as file:
        return file.read()


def update_student_request(
    student_id: int, *, name: str | None, email: str | None, etag: str
) -> pb.UpdateStudentRequest:
    """An UpdateStudent whose mask names exactly the fields given (None: left as is)."""
    student = pb.Student(id=student_id, etag=etag)
    paths: list[str] = []
    if name is not None:
        student.name, paths = name, [*paths, "name"]
    if email is not None:
        student.email, paths = email, [*paths, "email"]
    return pb.UpdateStudentRequest(
        student=student, update_mask=field_mask_pb2.FieldMask(paths=paths)
    )


def update_course_request(
    course_id: int,
    *,
    code: str | None,
    title: str | None,
    capacity: int | None,
    waitlist_capacity: int | None,
    etag: str,
) -> pb.UpdateCourseRequest:
    """An UpdateCourse whose mask names exactly the fields given (None: left as is)."""
    course = pb.Course(id=course_id, etag=etag)
    paths: list[str] = []
    if code is not None:
        course.code, paths = code, [*paths, "code"]
    if title is not None:
        course.title, paths = title, [*paths, "title"]
    if capacity is not None:
        course.capacity, paths = capacity, [*paths, "capacity"]
    if waitlist_capacity is not None:
        course.waitlist_capacity, paths = waitlist_capacity, [*paths, "waitlist_capacity"]
    return pb.UpdateCourseRequest(course=course, update_mask=field_mask_pb2.FieldMask(paths=paths))


def _walk(fetch: Callable[[str], Any], items: str, page_token: str) -> Iterator[Any]:
    """The items of page after page from page_token on; fetch(token) makes one List* call
    and items names the reply's repeated field."""
    while True:
        page = fetch(page_token)
        yield from getattr(page, items)
        page_token = _next_token(page_token, page.next_page_token)
        if not page_token:
            return


def _next_token(current: str, following: str) -> str:
    # A server that hands back the token it was given would keep a walk going forever.
    if following and following == current:
        raise ClientError("INTERNAL", "the server returned the same page token twice")
    return following
