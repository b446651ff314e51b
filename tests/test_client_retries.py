"""The client library's retries: its channel's service config retries UNAVAILABLE, and
only that, up to RETRY_POLICY's attempts, and every attempt of a mutation carries the
same request_id, so a retry of a call that did commit is answered, not applied again.

First against a scripted EnrollmentService on a real gRPC server (it answers each call
with the next status of a script and records every attempt's request_id), then
end to end: a real server whose database connection is cut under the first attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from enrollment.client.aio import AsyncEnrollmentClient
from enrollment.client.api import (
    MAX_RECONNECT_BACKOFF_MS,
    RETRY_POLICY,
    ClientError,
    EnrollmentClient,
    open_channel,
)
from enrollment.v1 import enrollment_pb2 as pb
from tests import databases, servers
from tests.proxy import server_through_proxy

SERVICE = pb.DESCRIPTOR.services_by_name["EnrollmentService"]
OK = grpc.StatusCode.OK
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
ATTEMPTS = RETRY_POLICY["maxAttempts"]

# One call of each mutating method, as a caller of either client makes it.
MUTATIONS: dict[str, Callable[[Any], Any]] = {
    "CreateStudent": lambda c: c.create_student("Ada", "ada@example.com"),
    "UpdateStudent": lambda c: c.update_student(1, name="Ada L."),
    "DeleteStudent": lambda c: c.delete_student(1),
    "CreateCourse": lambda c: c.create_course("CS-1", "Intro", capacity=3),
    "UpdateCourse": lambda c: c.update_course(2, capacity=4),
    "DeleteCourse": lambda c: c.delete_course(2),
    "EnrollStudent": lambda c: c.enroll(1, 2),
    "DropCourse": lambda c: c.drop(1, 2),
    "BatchEnrollStudents": lambda c: c.batch_enroll([(1, 2), (3, 2)]),
    "BatchDropCourses": lambda c: c.batch_drop([(1, 2)]),
}


class ScriptedService:
    """Every unary method of EnrollmentService on a real server on a free port. Each
    call is answered with the next code of `script` (OK: an empty response) and its
    (method, request_id) recorded; once the script runs out, calls are answered OK."""

    def __init__(self) -> None:
        self.script: list[grpc.StatusCode] = []
        self.attempts: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._server = grpc.server(futures.ThreadPoolExecutor(4))
        handlers = {}
        for method in SERVICE.methods:
            if method.server_streaming:
                continue  # WatchEvents: its own resume logic, not the channel's retries
            request = getattr(pb, method.input_type.name)
            response = getattr(pb, method.output_type.name)
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                self._answer(method.name, response),
                request_deserializer=request.FromString,
                response_serializer=response.SerializeToString,
            )
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),)
        )
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{self.port}"
        self._server.start()

    def _answer(self, name: str, response: type) -> Callable:
        def answer(request, context):
            with self._lock:
                self.attempts.append((name, getattr(request, "request_id", "")))
                code = self.script.pop(0) if self.script else OK
            if code is not OK:
                context.abort(code, f"scripted {code.name}")
            return response()

        return answer

    def stop(self) -> None:
        self._server.stop(None).wait()


@pytest.fixture
def scripted() -> Iterator[ScriptedService]:
    service = ScriptedService()
    yield service
    service.stop()


def call(kind: str, address: str, make: Callable[[Any], Any]) -> Any:
    """make(client) with a new client of kind ("sync" or "async"): what the call
    returned, or the ClientError it raised."""
    if kind == "sync":
        with EnrollmentClient(address, timeout=20) as client:
            try:
                return make(client)
            except ClientError as error:
                return error

    async def scenario():
        async with AsyncEnrollmentClient(address, timeout=20) as client:
            try:
                result = make(client)
                return await result if inspect.isawaitable(result) else result
            except ClientError as error:
                return error

    return asyncio.run(scenario())


KINDS = ["sync", "async"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", sorted(MUTATIONS))
def test_unavailable_is_retried_and_every_attempt_carries_the_same_request_id(
    scripted, kind, method
):
    scripted.script = [UNAVAILABLE] * (ATTEMPTS - 1)
    got = call(kind, scripted.address, MUTATIONS[method])
    assert not isinstance(got, ClientError), got
    assert [name for name, _ in scripted.attempts] == [method] * ATTEMPTS
    ids = {request_id for _, request_id in scripted.attempts}
    assert len(ids) == 1, scripted.attempts
    (request_id,) = ids
    assert uuid.UUID(request_id).version == 4
    # The next call is another request: a fresh id.
    call(kind, scripted.address, MUTATIONS[method])
    assert scripted.attempts[-1][1] not in ("", request_id)


@pytest.mark.parametrize("kind", KINDS)
def test_a_callers_own_request_id_is_the_one_every_attempt_carries(scripted, kind):
    mine = str(uuid.uuid4())
    scripted.script = [UNAVAILABLE, UNAVAILABLE]
    got = call(
        kind,
        scripted.address,
        lambda c: c.create_student("Ada", "ada@example.com", request_id=mine),
    )
    assert not isinstance(got, ClientError), got
    assert scripted.attempts == [("CreateStudent", mine)] * 3


@pytest.mark.parametrize("kind", KINDS)
def test_reads_are_retried_on_unavailable_too(scripted, kind):
    scripted.script = [UNAVAILABLE]
    got = call(kind, scripted.address, lambda c: c.get_student(1))
    assert not isinstance(got, ClientError), got
    assert scripted.attempts == [("GetStudent", "")] * 2


@pytest.mark.parametrize("kind", KINDS)
def test_retries_stop_after_the_policys_attempts(scripted, kind):
    scripted.script = [UNAVAILABLE] * (ATTEMPTS + 5)
    got = call(kind, scripted.address, MUTATIONS["EnrollStudent"])
    assert isinstance(got, ClientError)
    assert (got.code, got.message) == ("UNAVAILABLE", "scripted UNAVAILABLE")
    assert len(scripted.attempts) == ATTEMPTS
    assert len({request_id for _, request_id in scripted.attempts}) == 1


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.NOT_FOUND,
    ],
    ids=lambda code: code.name,
)
def test_no_other_status_is_retried(scripted, kind, code):
    scripted.script = [code, UNAVAILABLE]  # a second attempt would be seen
    got = call(kind, scripted.address, MUTATIONS["EnrollStudent"])
    assert isinstance(got, ClientError)
    assert got.code == code.name
    assert len(scripted.attempts) == 1


# -------------------------------------------------------------- against the real server


@pytest.mark.databases("postgresql", "mysql")
@pytest.mark.parametrize("kind", KINDS)
def test_a_mutation_whose_database_connection_is_cut_is_applied_once_by_the_retry(db_url, kind):
    """The first attempt's INSERT never reaches the database (DATABASE_UNAVAILABLE,
    nothing committed); the client's retry applies it."""
    with server_through_proxy(db_url) as (proxy, address):
        with EnrollmentClient(address) as client:
            course = client.create_course("CS-1", "Intro", capacity=5)
            student = client.create_student("Ada", "ada@example.com")
        proxy.cut_before(b"INSERT")
        got = call(kind, address, lambda c: c.enroll(student.id, course.id))
        assert proxy.statements_cut == 1
        assert (got.student_id, got.course_id) == (student.id, course.id)
        assert one_effect(db_url, student.id, course.id)


@pytest.mark.databases("postgresql", "mysql")
@pytest.mark.parametrize("kind", KINDS)
def test_a_mutation_whose_commit_answer_is_lost_is_answered_not_applied_again(db_url, kind):
    """The first attempt commits and its answer is lost (COMMIT_OUTCOME_UNKNOWN, an
    UNAVAILABLE); the retry carries the same request_id and gets the recorded answer.
    A retry with a new id would fail ALREADY_ENROLLED."""
    with server_through_proxy(db_url) as (proxy, address):
        with EnrollmentClient(address) as client:
            course = client.create_course("CS-1", "Intro", capacity=5)
            student = client.create_student("Ada", "ada@example.com")
        proxy.cut_at_commit()
        got = call(kind, address, lambda c: c.enroll(student.id, course.id))
        assert proxy.commits_cut == 1
        assert (got.student_id, got.course_id) == (student.id, course.id)
        assert one_effect(db_url, student.id, course.id)


def one_effect(url: str, student_id: int, course_id: int) -> bool:
    rows = databases.query(url, "SELECT student_id, course_id FROM student_courses")
    (enrolled,) = databases.query(url, "SELECT enrolled_count FROM courses")[0]
    enrolls = databases.query(url, "SELECT COUNT(*) FROM events WHERE type = 7")[0][0]
    return rows == [(student_id, course_id)] and enrolled == 1 and enrolls == 1


class _Refusing:
    """A listener on a free port of 127.0.0.1 that closes every connection at once (a
    server that is not there yet), noting when each came: a client's connection
    attempts."""

    def __init__(self) -> None:
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(16)
        self.port = self.socket.getsockname()[1]
        self.attempts: list[float] = []
        threading.Thread(target=self._refuse, daemon=True).start()

    def _refuse(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                connection, _ = self.socket.accept()
                self.attempts.append(time.monotonic())
                connection.close()

    def wait_for(self, attempts: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while len(self.attempts) < attempts and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(self.attempts) >= attempts, self.attempts


def test_the_client_tries_a_server_that_was_down_again_within_seconds():
    # gRPC's own reconnect backoff grows to 120 s: after an outage of a minute or more,
    # every call of the process failed, and a followed feed stayed silent, for up to two
    # minutes after the server was back. The client's attempts, 32 s of them, come at
    # most MAX_RECONNECT_BACKOFF_MS (with gRPC's 20% jitter) apart. 32 s: the eighth
    # attempt comes by 29.1 s even when every wait draws the most jitter.
    refusing = _Refusing()
    channel = open_channel(f"127.0.0.1:{refusing.port}")
    try:
        channel.subscribe(lambda _: None, try_to_connect=True)
        time.sleep(32)
    finally:
        channel.close()
        refusing.socket.close()
    attempts = refusing.attempts
    gaps = [later - earlier for earlier, later in zip(attempts, attempts[1:], strict=False)]
    # 1 s, then 1.6 times longer each time: 1, 1.6, 2.6, 4.1, 5, 5 ... in 30 s, where
    # gRPC's default goes on to 6.6, 10.5, 16.8 ...
    assert len(attempts) >= 8, gaps
    assert max(gaps) <= MAX_RECONNECT_BACKOFF_MS / 1000 * 1.3, gaps


def test_a_new_client_connects_at_once_while_another_waits_to_reconnect(db_url, tmp_path):
    # gRPC shares connections between a process's channels of the same settings: a
    # client made right after the server came back took over another client's wait
    # before its next reconnect, and failed at once ("Connection refused") while the
    # server served.
    refusing = _Refusing()
    address = f"127.0.0.1:{refusing.port}"
    waiting = EnrollmentClient(address)
    server = None
    try:
        waiting._channel.subscribe(lambda _: None, try_to_connect=True)
        refusing.wait_for(4)  # its next attempt is 4 s or more away (1, 1.6, 2.6, 4.1, 5 ...)
        refusing.socket.close()
        server = servers.start(tmp_path / "server.log", "--database-url", db_url,
                               port=refusing.port)  # fmt: skip
        with EnrollmentClient(address) as fresh:
            assert fresh.list_courses().courses == []
    finally:
        waiting.close()
        if server is not None:
            server.stop()


def test_calls_during_a_servers_stop_are_never_answered_cancelled(db_url, tmp_path):
    # grpc's shutdown cancels the calls it has taken in but not yet handed to the
    # service: their callers, who cancelled nothing, got CANCELLED (about one call in a
    # hundred at each restart under load), which no retry policy reads as retryable.
    # The client retries them: the service never saw them.
    server = servers.start(tmp_path / "server.log", "--database-url", db_url, "--grace", "3")
    with EnrollmentClient(server.address, timeout=20) as client:
        student = client.create_student("Ada", "ada@example.com")
    outcomes: dict[str, int] = {}
    lock = threading.Lock()
    stop = threading.Event()

    def caller() -> None:
        with EnrollmentClient(server.address, timeout=5) as client:
            while not stop.is_set():
                try:
                    client.get_student(student.id)
                    got = "OK"
                except ClientError as error:
                    got = error.code
                with lock:
                    outcomes[got] = outcomes.get(got, 0) + 1
                if got != "OK":
                    time.sleep(0.01)

    callers = [threading.Thread(target=caller) for _ in range(16)]
    for each in callers:
        each.start()
    try:
        time.sleep(1)
        assert server.stop() == 0, server.log
    finally:
        stop.set()
        for each in callers:
            each.join(30)
    assert outcomes.get("OK", 0) > 100, outcomes
    assert "CANCELLED" not in outcomes, outcomes
