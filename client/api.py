"""EnrollmentClient: one method per RPC, each with a deadline; failures raise ClientError."""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

import grpc

from enrollment.client import calls
from enrollment.client.calls import MAX_BATCH as MAX_BATCH
from enrollment.client.calls import Call, P, T
from enrollment.client.errors import BatchResult as BatchResult
from enrollment.client.errors import ClientError as ClientError
from enrollment.client.errors import call_failure
from enrollment.client.errors import connection_hint as connection_hint
from enrollment.client.tracecontext import call_metadata
from enrollment.v1 import enrollment_pb2 as pb
from enrollment.v1 import enrollment_pb2_grpc as pb_grpc

DEFAULT_TIMEOUT = 5.0
# The longest deadline: grpc keeps one as int32 milliseconds (2**31 - 1 ms, about 24.8
# days) and took a longer one as already past, failing every call DEADLINE_EXCEEDED
# without sending it. The server's own settings and `health --timeout` have this bound.
MAX_TIMEOUT = 2_147_483
TIMEOUT_RANGE = f"above 0 and at most {MAX_TIMEOUT} seconds (about 24 days)"
SERVICE = "enrollment.v1.EnrollmentService"
# The channel retries a call that failed UNAVAILABLE (the server or its database was
# away), or CANCELLED by the server (this process never retries its own cancel: a call
# it cancelled is over). grpc's server cancels the calls it has taken in but not yet
# handed to the service when it stops, so a restart under load answered a few calls
# CANCELLED that the service never saw. Only those two: every mutation carries a
# request_id, so a retry of one that did commit gets the first answer back instead of
# running twice.
RETRY_POLICY = {
    "maxAttempts": 4,
    "initialBackoff": "0.1s",
    "maxBackoff": "2s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"],
}
MAX_RECONNECT_BACKOFF_MS = 5000
# gRPC's load-balancing policies that need nothing but the addresses the target resolves
# to: pick_first (gRPC's default) sends every call to one of them, round_robin spreads
# calls over all of them (every pod behind a headless Service, say).
LB_POLICIES = ("pick_first", "round_robin")


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
        check_timeout(timeout)
        check_token(token)
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

    def _run(self, call: Call[T]) -> T:
        # No wait_for_ready: a server that is down should fail the call now, as
        # UNAVAILABLE, rather than hold it until the deadline.
        method = getattr(self._stub, call.method)
        metadata = call_metadata(self._metadata)  # adds the caller's traceparent, if any
        try:
            if metadata is None:
                response = method(call.request, timeout=self.timeout)
            else:
                response = method(call.request, timeout=self.timeout, metadata=metadata)
        except grpc.RpcError as error:
            raise call_failure(error, tls=self._tls, client_cert=self._client_cert) from None
        return call.result(response)

    def _walk(
        self, page: Callable[[str], Call[P]], items: Callable[[P], Iterable[T]], page_token: str
    ) -> Iterator[T]:
        """The items of page after page from page_token on; page(token) is one List* call
        and items takes the page's items from its answer."""
        while True:
            answer = self._run(page(page_token))
            yield from items(answer)
            page_token = calls.next_token(page_token, answer.next_page_token)
            if not page_token:
                return

    # Students

    def create_student(self, name: str, email: str, *, request_id: str | None = None) -> pb.Student:
        return self._run(calls.create_student(name, email, request_id))

    def get_student(self, student_id: int) -> pb.Student:
        return self._run(calls.get_student(student_id))

    def list_students(
        self, course_id: int = 0, page_size: int = 0, page_token: str = ""
    ) -> pb.ListStudentsResponse:
        """One page of all students (course_id 0) or of one course's roster."""
        return self._run(calls.list_students(course_id, page_size, page_token))

    def iter_students(
        self, course_id: int = 0, *, page_size: int = 0, page_token: str = ""
    ) -> Iterator[pb.Student]:
        """Every student from page_token on (the start by default), fetching page after page."""
        return self._walk(
            lambda token: calls.list_students(course_id, page_size, token),
            lambda page: page.students,
            page_token,
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
        return self._run(calls.update_student(student_id, name, email, etag, request_id))

    def delete_student(
        self, student_id: int, force: bool = False, *, request_id: str | None = None
    ) -> None:
        self._run(calls.delete_student(student_id, force, request_id))

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
        return self._run(calls.create_course(code, title, capacity, waitlist_capacity, request_id))

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
        call = calls.update_course(
            course_id, code, title, capacity, waitlist_capacity, etag, request_id
        )
        return self._run(call)

    def get_course(self, course_id: int) -> pb.Course:
        return self._run(calls.get_course(course_id))

    def list_courses(
        self, student_id: int = 0, page_size: int = 0, page_token: str = ""
    ) -> pb.ListCoursesResponse:
        """One page of the catalogue (student_id 0) or of the courses one student takes."""
        return self._run(calls.list_courses(student_id, page_size, page_token))

    def iter_courses(
        self, student_id: int = 0, *, page_size: int = 0, page_token: str = ""
    ) -> Iterator[pb.Course]:
        """Every course from page_token on (the start by default), fetching page after page."""
        return self._walk(
            lambda token: calls.list_courses(student_id, page_size, token),
            lambda page: page.courses,
            page_token,
        )

    def delete_course(
        self, course_id: int, force: bool = False, *, request_id: str | None = None
    ) -> None:
        self._run(calls.delete_course(course_id, force, request_id))

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
        return self._run(calls.enroll(student_id, course_id, waitlist_if_full, request_id))

    def drop(
        self, student_id: int, course_id: int, *, request_id: str | None = None
    ) -> pb.Enrollment | None:
        """Drop an enrolled or waitlisted entry; returns whoever took the freed seat."""
        return self._run(calls.drop(student_id, course_id, request_id))

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
        return self._run(
            calls.batch_enroll(pairs, allow_partial_success, waitlist_if_full, request_id)
        )

    def batch_drop(
        self,
        pairs: Iterable[tuple[int, int]],
        *,
        allow_partial_success: bool = False,
        request_id: str | None = None,
    ) -> list[BatchResult]:
        """Drop up to 1000 (student_id, course_id) pairs in order in one transaction; as
        batch_enroll, each result's enrollment is whoever took the freed seat."""
        return self._run(calls.batch_drop(pairs, allow_partial_success, request_id))

    def get_enrollment(self, student_id: int, course_id: int) -> pb.Enrollment:
        return self._run(calls.get_enrollment(student_id, course_id))

    def list_enrollments(
        self,
        student_id: int = 0,
        course_id: int = 0,
        state: pb.EnrollmentState.ValueType = pb.ENROLLMENT_STATE_UNSPECIFIED,
        page_size: int = 0,
        page_token: str = "",
    ) -> pb.ListEnrollmentsResponse:
        """One page of enrollments (filters combine; 0 and UNSPECIFIED mean any)."""
        return self._run(
            calls.list_enrollments(student_id, course_id, state, page_size, page_token)
        )

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
        return self._walk(
            lambda token: calls.list_enrollments(student_id, course_id, state, page_size, token),
            lambda page: page.enrollments,
            page_token,
        )

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
        return self._run(calls.list_events(after_sequence, student_id, course_id, page_size))

    def iter_events(
        self,
        after: int = 0,
        *,
        student_id: int = 0,
        course_id: int = 0,
        follow: bool = False,
        poll_interval: float = 1.0,
        page_size: int = 0,
        on_outage: calls.OnOutage | None = None,
    ) -> Iterator[pb.Event]:
        """The events after sequence `after`, in order, each once.

        Without follow: until the head at the time of the walk. With follow: forever,
        through WatchEvents where the server has it and by polling ListEvents where it
        does not or refuses the stream (TOO_MANY_WATCHERS), resuming by itself from the
        last sequence after UNAVAILABLE (a server restarting or shutting down, or not
        reached at all), WATCHER_TOO_SLOW or CANCELLED (the server's: a stopping server
        ends its streams); other errors are raised. While the server cannot be reached
        it tries again every poll_interval, and on_outage, if given, is called once with
        the error (its hint included) when it stops answering and once with None when
        it answers again."""
        feed = calls.Feed(after, student_id, course_id, follow, on_outage)
        while True:
            try:
                if feed.streams:
                    for event in self._watch(feed.watch_request()):
                        yield feed.delivered(event)
                    continue  # the stream ended without an error: watch again
                page = self._run(feed.list_call(page_size))
                feed.answered()
                yield from page.events
                if feed.caught_up(page):
                    if not follow:
                        return
                    if not feed.watching:
                        time.sleep(poll_interval)
            except ClientError as error:
                time.sleep(feed.pause_after(error, poll_interval))

    def _watch(self, request: pb.WatchEventsRequest) -> Iterator[pb.Event]:
        stream = self._stub.WatchEvents(request, metadata=call_metadata(self._metadata))
        try:
            for response in stream:
                yield from response.events
        except grpc.RpcError as error:
            raise call_failure(error, tls=self._tls, client_cert=self._client_cert) from None
        finally:
            stream.cancel()


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
    plaintext otherwise. Raises ValueError for TLS files it cannot use (read_tls_files).
    lb_policy: see channel_options."""
    options = channel_options(lb_policy)
    credentials = channel_credentials(tls_ca, tls_cert, tls_key)
    if credentials is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, credentials, options=options)


def channel_credentials(
    tls_ca: str | None, tls_cert: str | None, tls_key: str | None
) -> grpc.ChannelCredentials | None:
    """TLS credentials when tls_ca or tls_cert is given (see open_channel), else None."""
    files = read_tls_files(tls_ca, tls_cert, tls_key)
    if files is None:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=files.ca, private_key=files.key, certificate_chain=files.cert
    )


class TlsFiles(NamedTuple):
    ca: bytes | None
    cert: bytes | None
    key: bytes | None


def read_tls_files(
    tls_ca: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    *,
    spelled: Callable[[str], str] = str,
) -> TlsFiles | None:
    """The PEM files' bytes, checked by OpenSSL now: gRPC's core would only log lines
    and fail every call UNAVAILABLE. None without tls_ca and tls_cert (plaintext).
    Raises ValueError naming the file and what is wrong with it; spelled(name) is how
    the message names a parameter (a command line: its flag)."""
    ca, cert, key = spelled("tls_ca"), spelled("tls_cert"), spelled("tls_key")
    if bool(tls_cert) != bool(tls_key):
        raise ValueError(f"{cert} and {key} go together: give both")
    if not (tls_ca or tls_cert):
        return None
    files = TlsFiles(_read(tls_ca, ca), _read(tls_cert, cert), _read(tls_key, key))
    check = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if tls_ca:
        try:
            check.load_verify_locations(cafile=tls_ca)
        except OSError as exc:  # ssl.SSLError is one
            raise ValueError(f"{ca} {tls_ca!r} is not a PEM CA certificate: {exc}") from None
    if tls_cert:
        try:
            # A key that asks for a password gets none (gRPC takes no password either),
            # rather than OpenSSL prompting on the terminal.
            check.load_cert_chain(tls_cert, tls_key, password=_no_password)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise ValueError(
                f"{cert} {tls_cert!r} and {key} {tls_key!r} are not a PEM certificate and "
                f"its private key: {exc}"
            ) from None
    return files


def check_timeout(timeout: float) -> None:
    """Raises ValueError unless timeout is a deadline grpc can keep (TIMEOUT_RANGE)."""
    if not 0 < timeout <= MAX_TIMEOUT:  # NaN too
        raise ValueError(f"timeout must be {TIMEOUT_RANGE}")


def check_token(token: str | None, *, name: str = "token") -> None:
    """Raises ValueError, naming the token as name and never quoting it (a secret), when
    it cannot be a header value: grpc's core logged "Metadata value ... is invalid" and
    failed every call INTERNAL, as if the server had."""
    for position, char in enumerate(token or "", start=1):
        if not " " <= char <= "~":
            kind = "not ASCII" if char > "\x7f" else "a control character"
            raise ValueError(f"{name} must be printable ASCII: its character {position} is {kind}")


def channel_options(lb_policy: str | None = None) -> list[tuple[str, str | int]]:
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
    return [
        ("grpc.service_config", json.dumps(config)),
        # gRPC waits up to 120 s between attempts to reconnect to a server that was down
        # (1 s, then 1.6 times longer each time): after an outage of a minute or more,
        # every call of the process (channels share their connections) failed, and a
        # followed feed stayed silent, for up to two minutes after the server was back.
        ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
        # Connections of this channel's own: gRPC shares them between a process's
        # channels with the same settings, so a client made just after the server came
        # back inherited another's wait before its next reconnect and failed at once
        # ("Connection refused"), however long the server had been up again.
        ("grpc.use_local_subchannel_pool", 1),
    ]


def tls_flag(name: str) -> str:
    """A parameter of read_tls_files as the command lines spell it: tls_ca -> --tls-ca."""
    return "--" + name.replace("_", "-")


def _read(path: str | None, name: str) -> bytes | None:
    if not path:
        return None
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise ValueError(f"cannot read {name} {path!r}: {exc.strerror}") from None


def _no_password() -> bytes:
    raise ValueError("an encrypted private key (gRPC takes none)")
