"""Limits (request size, concurrent calls, keepalive, connection age) and deadlines."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from enrollment.server.persistence import engine
from enrollment.server.startup.config import ServerConfig, StartupError
from enrollment.server.startup.server import create_server
from enrollment.server.transport import interceptors
from enrollment.server.transport.error_status import reason_of
from enrollment.v1 import enrollment_pb2 as pb
from enrollment.v1 import enrollment_pb2_grpc as pb_grpc
from tests import databases, watching
from tests.databases import sqlite_path
from tests.rpc import TIMEOUT, expect_error, failure, new_student, varint
from tests.servers import scrape

# Limits and deadlines are the transport's, the same on every database; the deadline
# tests hold SQLite's write lock to keep a write in progress.
pytestmark = pytest.mark.databases("sqlite")

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def wait_for(predicate, timeout: float = 20.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def create(stub, name: str, **kwargs):
    request = pb.CreateStudentRequest(name=name, email="big@example.com")
    return stub.CreateStudent(request, **kwargs)


def test_requests_over_64_kib_are_resource_exhausted_by_default(live):
    with pytest.raises(grpc.RpcError) as raised:
        create(live.stub, "x" * 70_000, timeout=TIMEOUT)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Just under the limit the request reaches the service, which judges the name.
    expect_error(
        lambda request, timeout: create(live.stub, "x" * 60_000, timeout=timeout),
        None,
        INVALID,
        "INVALID_FIELD",
        fields=["name"],
    )
    assert new_student(live.stub).id == 1


def test_max_message_bytes_is_configurable(start_server):
    live = start_server(max_message_bytes=2048)
    with pytest.raises(grpc.RpcError) as raised:
        create(live.stub, "x" * 3000, timeout=TIMEOUT)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert new_student(live.stub).id == 1


def unknown_field(size: int) -> bytes:
    """A protobuf field no request declares (number 15, length-delimited) of size bytes:
    every request message parses with it, so it makes any request as large as wanted."""
    return b"\x7a" + varint(size) + b"x" * size


def test_a_request_over_the_limit_is_refused_with_a_reason_and_a_request_id(start_server, caplog):
    # grpc refused it itself: RESOURCE_EXHAUSTED without details or x-request-id, and the
    # server logged the call CANCELLED CALL_ENDED, as if its caller had gone away.
    caplog.set_level(logging.INFO, logger="enrollment.rpc")
    live = start_server(max_message_bytes=2048)
    request = pb.CreateStudentRequest(name="x" * 3000, email="big@example.com")
    size = request.ByteSize()
    for compression in (None, grpc.Compression.Gzip):  # the limit is on the message itself
        with pytest.raises(grpc.RpcError) as raised:
            live.stub.CreateStudent(
                request,
                timeout=TIMEOUT,
                compression=compression,
                metadata=(("x-request-id", f"big-{compression}"),),
            )
        got = failure(raised.value)
        assert (got.code, got.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "REQUEST_TOO_LARGE")
        assert got.metadata == {"max_message_bytes": "2048", "message_bytes": str(size)}
        assert got.message == (
            f"the request message is {size} bytes; this server accepts at most 2048"
        )
        assert ("x-request-id", f"big-{compression}") in raised.value.trailing_metadata()
        [line] = [r.getMessage() for r in caplog.records if f"=big-{compression}" in r.getMessage()]
        assert "rpc method=CreateStudent code=RESOURCE_EXHAUSTED reason=REQUEST_TOO_LARGE" in line
    # A server-streaming call, and a call of a message without strings, alike.
    watch = live.channel.unary_stream("/enrollment.v1.EnrollmentService/WatchEvents")
    with pytest.raises(grpc.RpcError) as raised:
        next(watch(unknown_field(2100), timeout=TIMEOUT))
    assert failure(raised.value).reason == "REQUEST_TOO_LARGE"
    # Beyond twice the limit, grpc refuses the body before it is read at all.
    with pytest.raises(grpc.RpcError) as raised:
        create(live.stub, "x" * 5000, timeout=TIMEOUT)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert databases.table_counts(live.database_url) == (0, 0, 0)
    assert new_student(live.stub).id == 1


def test_metadata_over_grpcs_limit_is_refused_and_changes_nothing(live, caplog):
    # grpc's own limit (16 KiB): the call is refused before the service reads it.
    caplog.set_level(logging.INFO, logger="enrollment.rpc")
    with pytest.raises(grpc.RpcError) as raised:
        live.stub.CreateStudent(
            pb.CreateStudentRequest(name="Big", email="big@example.com"),
            metadata=(("x-pad", "a" * 20_000),),
            timeout=TIMEOUT,
        )
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert databases.table_counts(live.database_url) == (0, 0, 0)
    # Logged as the proto's comment says: the service cannot tell it from a cancel.
    wait_for(lambda: "method=CreateStudent code=CANCELLED reason=CALL_ENDED" in caplog.text)
    assert new_student(live.stub).id == 1


def test_the_largest_valid_requests_fit_the_default_limit(live):
    # The largest requests a caller can validly make: batches of the most items, each
    # with the widest ids (an item has no request id of its own, the batch has one).
    top = 2**63 - 1
    enrolls = pb.BatchEnrollStudentsRequest(
        requests=[
            pb.EnrollStudentRequest(student_id=top, course_id=top, waitlist_if_full=True)
            for _ in range(1000)
        ],
        allow_partial_success=True,
        request_id=str(uuid.uuid4()),
    )
    drops = pb.BatchDropCoursesRequest(
        requests=[pb.DropCourseRequest(student_id=top, course_id=top) for _ in range(1000)],
        allow_partial_success=True,
        request_id=str(uuid.uuid4()),
    )
    assert enrolls.ByteSize() == 24_040  # of the 65,536 a request may have by default
    for call, request in [
        (live.stub.BatchEnrollStudents, enrolls),
        (live.stub.BatchDropCourses, drops),
    ]:
        results = call(request, timeout=60).results
        assert len(results) == 1000 and all(r.status.code != 0 for r in results)


def test_health_and_reflection_refuse_large_and_undecodable_requests_with_reasons(start_server):
    # Health and reflection answered a body that was not protobuf with UNKNOWN
    # ("Unexpected DecodeError"), and grpc refused a large one without saying why.
    live = start_server(max_message_bytes=2048)
    check = live.channel.unary_unary("/grpc.health.v1.Health/Check")
    watch = live.channel.unary_stream("/grpc.health.v1.Health/Watch")
    reflect = live.channel.stream_stream(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
    )
    for body, code, reason in [
        (unknown_field(3000), grpc.StatusCode.RESOURCE_EXHAUSTED, "REQUEST_TOO_LARGE"),
        (b"\xff\xff\xff", INVALID, "INVALID_FIELD"),
    ]:
        with pytest.raises(grpc.RpcError) as raised:
            check(body, timeout=TIMEOUT)
        assert (failure(raised.value).code, failure(raised.value).reason) == (code, reason)
        with pytest.raises(grpc.RpcError) as raised:
            next(watch(body, timeout=TIMEOUT))
        assert (failure(raised.value).code, failure(raised.value).reason) == (code, reason)
        with pytest.raises(grpc.RpcError) as raised:
            next(reflect(iter([body]), timeout=TIMEOUT))
        assert (failure(raised.value).code, failure(raised.value).reason) == (code, reason)
    served = health_pb2_grpc.HealthStub(live.channel).Check(
        health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT
    )
    assert served.status == health_pb2.HealthCheckResponse.SERVING


def test_calls_beyond_max_concurrent_rpcs_are_refused_at_once(start_server):
    live = start_server(max_concurrent_rpcs=2, database_timeout=30, metrics_address="127.0.0.1:0")
    blocker = sqlite3.connect(sqlite_path(live), isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # the two writers below wait for this lock
    try:
        held = [
            live.stub.CreateStudent.future(
                pb.CreateStudentRequest(name="Held", email=f"held{i}@example.com"), timeout=60
            )
            for i in range(2)
        ]
        # In progress: on SQLite one holds the writer thread, the other waits for it.
        wait_for(
            lambda: scrape(live.running.metrics_port)[("enrollment_rpcs_in_flight", ())] == 2,
            what="two calls in progress",
        )
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as raised:
            live.stub.ListCourses(pb.ListCoursesRequest(), timeout=TIMEOUT)
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert time.monotonic() - start < TIMEOUT / 2  # refused, not queued
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert sorted(f.result(timeout=TIMEOUT).student.id for f in held) == [1, 2]
    live.stub.ListCourses(pb.ListCoursesRequest(), timeout=TIMEOUT)  # room again


def test_watchers_leave_max_concurrent_rpcs_to_the_other_calls(start_server, caplog):
    caplog.set_level(logging.INFO, logger="enrollment.rpc")
    # Each WatchEvents stream held one of grpc's concurrent-call slots: with as many
    # watchers open as --max-concurrent-rpcs, every other call, health checks too, got
    # grpc's bare RESOURCE_EXHAUSTED, and so did one watcher more, without its reason.
    live = start_server(
        max_concurrent_rpcs=2, max_watchers=2, database_timeout=30, metrics_address="127.0.0.1:0"
    )
    live.stub.CreateCourse(pb.CreateCourseRequest(code="W", title="W"), timeout=TIMEOUT)
    watchers = [watching.Watcher(live.address) for _ in range(2)]
    extra = watching.channel(live.address)
    blocker = sqlite3.connect(sqlite_path(live), isolation_level=None)
    try:
        for watcher in watchers:
            watcher.start()
            watcher.wait_for(1, TIMEOUT)  # open: its backlog came
        assert live.stub.ListCourses(pb.ListCoursesRequest(), timeout=TIMEOUT).courses
        health = health_pb2_grpc.HealthStub(live.channel)
        served = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT)
        assert served.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as refused:
            next(
                pb_grpc.EnrollmentServiceStub(extra).WatchEvents(
                    pb.WatchEventsRequest(), timeout=TIMEOUT
                )
            )
        assert failure(refused.value).reason == "TOO_MANY_WATCHERS"
        # The other calls are still held to --max-concurrent-rpcs while watchers are open.
        blocker.execute("BEGIN IMMEDIATE")
        held = [
            live.stub.CreateStudent.future(
                pb.CreateStudentRequest(name="Held", email=f"held{i}@example.com"), timeout=60
            )
            for i in range(2)
        ]
        wait_for(  # the watchers are calls in progress too
            lambda: scrape(live.running.metrics_port)[("enrollment_rpcs_in_flight", ())] == 4,
            what="two calls in progress",
        )
        with pytest.raises(grpc.RpcError) as raised:
            live.stub.ListCourses(
                pb.ListCoursesRequest(),
                metadata=(("x-request-id", "over-the-limit"),),
                timeout=TIMEOUT,
            )
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # Refused, it is still a call the operator can see: its request id sent back,
        # its log line, and its count.
        assert ("x-request-id", "over-the-limit") in raised.value.trailing_metadata()
        lines = [r.getMessage() for r in caplog.records if "method=ListCourses" in r.getMessage()]
        assert "code=RESOURCE_EXHAUSTED reason=MAX_CONCURRENT_RPCS" in lines[-1]
        assert "request_id=over-the-limit" in lines[-1]
        counted = ("code", "RESOURCE_EXHAUSTED"), ("method", "ListCourses")
        assert scrape(live.running.metrics_port)[("enrollment_rpc_requests_total", counted)] == 1
        blocker.execute("ROLLBACK")
        assert sorted(f.result(timeout=TIMEOUT).student.id for f in held) == [1, 2]
    finally:
        if blocker.in_transaction:
            blocker.execute("ROLLBACK")
        blocker.close()
        extra.close()
        for watcher in watchers:
            watcher.close()


def test_streams_that_need_no_token_cannot_take_the_room_of_calls(start_server):
    # Health Watch and reflection streams need no token and last as long as their client
    # keeps them: counted in --max-concurrent-rpcs, anyone could open that many and
    # every call, health checks too, was refused.
    live = start_server(max_concurrent_rpcs=1, max_open_streams=2)
    health = health_pb2_grpc.HealthStub(live.channel)
    reflect = reflection_pb2_grpc.ServerReflectionStub(live.channel)
    held: list = []
    try:
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
        held.append(watch)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        asking = iter_forever(
            reflection_pb2.ServerReflectionRequest(list_services=""), stop=threading.Event()
        )
        listing = reflect.ServerReflectionInfo(asking, timeout=60)
        held.append(listing)
        assert next(listing).list_services_response.service
        # Their own room is full: one more is refused at once.
        with pytest.raises(grpc.RpcError) as refused:
            next(health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-open-streams" not in (refused.value.details() or "")
        # The calls' room is untouched: a call is served, a health check too.
        assert live.stub.ListCourses(pb.ListCoursesRequest(), timeout=TIMEOUT) is not None
        checked = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT)
        assert checked.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        for call in held:
            call.cancel()


def iter_forever(request, stop: threading.Event):
    """A request stream that sends request once, then stays open until stop is set."""
    yield request
    stop.wait(60)


def test_more_calls_than_workers_queue_rather_than_fail(start_server):
    live = start_server(threads=2)
    calls = [
        live.stub.CreateStudent.future(
            pb.CreateStudentRequest(name="Queued", email=f"q{i}@example.com"), timeout=30
        )
        for i in range(40)
    ]
    assert len({c.result().student.id for c in calls}) == 40


def watch_states(channel: grpc.Channel) -> list[str]:
    states: list[str] = []
    channel.subscribe(lambda state: states.append(state.name), try_to_connect=True)
    return states


def pinging_channel(address: str) -> grpc.Channel:
    # A client that pings its idle connection every 200 ms.
    return grpc.insecure_channel(
        address,
        options=[
            ("grpc.keepalive_time_ms", 200),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ],
    )


def test_keepalive_enforcement_disconnects_clients_that_ping_too_often(start_server):
    tolerant = start_server(keepalive_min_ping_interval=0.05)
    with pinging_channel(tolerant.address) as channel:
        states = watch_states(channel)
        wait_for(lambda: "READY" in states, what="READY")
        time.sleep(5)  # longer than the strict server below takes to send GOAWAY
        assert states[-1] == "READY", states
    tolerant.running.stop(None).wait(10)

    strict = start_server(keepalive_min_ping_interval=10)
    with pinging_channel(strict.address) as channel:
        states = watch_states(channel)
        wait_for(lambda: "READY" in states, what="READY")
        wait_for(lambda: states[-1] != "READY", what="GOAWAY too_many_pings")


def test_connections_are_closed_at_max_connection_age_and_calls_go_on(start_server):
    live = start_server(max_connection_age=1, max_connection_age_grace=1)
    states = watch_states(live.channel)
    new_student(live.stub)
    wait_for(lambda: "READY" in states, what="READY")
    wait_for(lambda: states[-1] != "READY", what="the connection to be aged out")
    assert new_student(live.stub).id == 2  # the client reconnects by itself


def hold_the_write_lock(live) -> sqlite3.Connection:
    blocker = sqlite3.connect(sqlite_path(live), isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    return blocker


def enroll_behind_the_lock(live, capacity: int, timeout: float):
    """A course and a student, the file's write lock held by another connection, and an
    EnrollStudent of them waiting for it: (course, student, blocker, the call, its
    request). The caller rolls the blocker back."""
    course = live.stub.CreateCourse(
        pb.CreateCourseRequest(code="CS-1", title="Intro", capacity=capacity), timeout=TIMEOUT
    ).course
    student = new_student(live.stub)
    blocker = hold_the_write_lock(live)
    try:
        request = pb.EnrollStudentRequest(student_id=student.id, course_id=course.id)
        call = live.stub.EnrollStudent.future(request, timeout=timeout)
        # The server has the call: a connection is out of the pool (the loop's, trying
        # the lock, or the writer thread's, waiting for it).
        wait_for(lambda: engine.connections_in_use() == 1, what="the call in progress")
    except BaseException:
        blocker.execute("ROLLBACK")
        blocker.close()
        raise
    return course, student, blocker, call, request


class Noted:
    """Events the (in-process) server's transport is seen to pass (note_calls)."""

    def __init__(self) -> None:
        self.handed = threading.Event()  # a call's work handed to a pool thread
        self.ended = threading.Event()  # a call ended before its answer, seen there


def note_calls(monkeypatch) -> Noted:
    """Watch the transport for Noted's events: grpc cancelling a call's coroutine tells
    its _CallState (ended); a write that finds the file locked goes to the writer
    thread (handed)."""
    noted = Noted()
    slot = interceptors._CallState.ended  # the slot's descriptor

    class State(interceptors._CallState):
        __slots__ = ()

        @property
        def ended(self) -> bool:
            return slot.__get__(self)

        @ended.setter
        def ended(self, value: bool) -> None:
            slot.__set__(self, value)
            if value:
                noted.ended.set()

    in_pool = interceptors._Guard._in_pool

    async def handed(self, *args):
        noted.handed.set()
        return await in_pool(self, *args)

    monkeypatch.setattr(interceptors, "_CallState", State)
    monkeypatch.setattr(interceptors._Guard, "_in_pool", handed)
    return noted


@pytest.mark.parametrize("how", ["deadline", "cancel"])
def test_a_write_past_its_deadline_or_cancelled_is_rolled_back(
    start_server, caplog, monkeypatch, how
):
    caplog.set_level(logging.INFO, logger="enrollment.rpc")
    noted = note_calls(monkeypatch)
    live = start_server(database_timeout=30)
    timeout = 1.0 if how == "deadline" else 60
    course, _, blocker, call, request = enroll_behind_the_lock(live, 1, timeout)
    try:
        # Its one connection in use may have been the loop's, trying the lock before
        # handing the write on: wait for the writer thread's.
        assert noted.handed.wait(TIMEOUT), "the write never went to the writer thread"
        wait_for(lambda: engine.connections_in_use() == 1, what="the write waiting for the lock")
        if how == "cancel":
            assert call.cancel()
        with pytest.raises(grpc.FutureCancelledError if how == "cancel" else grpc.RpcError):
            call.result(timeout=TIMEOUT)
        if how == "deadline":
            assert call.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # The call's end is news the server gets a moment after the caller: a lock
        # released before then lets the write commit as the live call it still is there.
        assert noted.ended.wait(TIMEOUT), "the server never saw the call end"
        assert engine.connections_in_use() == 1  # the write is still waiting for the lock
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    expected = "code=DEADLINE_EXCEEDED" if how == "deadline" else "code=CANCELLED"

    def logged() -> bool:
        return any(
            "method=EnrollStudent" in r.getMessage() and expected in r.getMessage()
            for r in caplog.records
        )

    wait_for(logged, what="the abandoned call to finish")
    assert databases.table_counts(live.database_url) == (
        1,
        1,
        0,
    )  # nothing of the enrollment was written
    seat = live.stub.GetCourse(pb.GetCourseRequest(course_id=course.id), timeout=TIMEOUT)
    assert seat.course.enrolled_count == 0
    # The seat is still free for a caller who waits for the answer.
    live.stub.EnrollStudent(request, timeout=TIMEOUT)


def test_a_write_whose_deadline_passes_while_queued_behind_another_is_not_written(
    start_server, caplog, monkeypatch
):
    # On SQLite the writes run one at a time (one writer thread): the second waits in
    # line behind the first, and its deadline passes there. It must not run late.
    caplog.set_level(logging.INFO, logger="enrollment.rpc")
    noted = note_calls(monkeypatch)
    live = start_server(database_timeout=30)
    course = live.stub.CreateCourse(
        pb.CreateCourseRequest(code="CS-1", title="Intro", capacity=5), timeout=TIMEOUT
    ).course
    first, second = new_student(live.stub), new_student(live.stub)
    blocker = hold_the_write_lock(live)
    try:
        ahead = live.stub.EnrollStudent.future(
            pb.EnrollStudentRequest(student_id=first.id, course_id=course.id), timeout=60
        )
        wait_for(lambda: engine.connections_in_use() == 1, what="the first write in progress")
        queued = live.stub.EnrollStudent.future(
            pb.EnrollStudentRequest(student_id=second.id, course_id=course.id), timeout=1.0
        )
        with pytest.raises(grpc.RpcError):
            queued.result(timeout=TIMEOUT)
        assert queued.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert noted.ended.wait(TIMEOUT), "the server never saw the deadline pass"
        # Reads (here one run by the pool's threads) are not in the writes' line.
        live.stub.ListEvents(pb.ListEventsRequest(), timeout=TIMEOUT)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert ahead.result(timeout=TIMEOUT).enrollment.student_id == first.id

    def logged() -> bool:
        return any(
            "method=EnrollStudent" in r.getMessage() and "code=DEADLINE_EXCEEDED" in r.getMessage()
            for r in caplog.records
        )

    wait_for(logged, what="the queued call to finish")
    seat = live.stub.GetCourse(pb.GetCourseRequest(course_id=course.id), timeout=TIMEOUT)
    assert seat.course.enrolled_count == 1  # the first student's only
    assert databases.table_counts(live.database_url)[2] == 1


def test_a_call_ended_by_its_deadline_is_never_answered_cancelled(live):
    # The server can find a call's deadline passed (before a statement, or before its
    # COMMIT) and answer it before the caller's own grpc gives up on it. Such an answer
    # is DEADLINE_EXCEEDED, as the caller's grpc would say, never CANCELLED: the caller
    # cancelled nothing. Deadlines of 2 ms end a share of these calls on the server's
    # side (a quarter of them went out CANCELLED before the fix).
    course = live.stub.CreateCourse(
        pb.CreateCourseRequest(code="CS-1", title="Intro"), timeout=TIMEOUT
    ).course
    student = new_student(live.stub)
    pair = {"student_id": student.id, "course_id": course.id}
    codes: dict[str, int] = {}
    for _ in range(60):
        for method, request in (
            (live.stub.EnrollStudent, pb.EnrollStudentRequest(**pair)),
            (live.stub.DropCourse, pb.DropCourseRequest(**pair)),
        ):
            try:
                method(request, timeout=0.002)
                code = "OK"
            except grpc.RpcError as error:
                code = error.code().name
                reason = reason_of(error.trailing_metadata())
                # The server's own answer says why: the call ended, nothing changed.
                assert reason in ("", "CALL_ENDED", "ALREADY_ENROLLED", "NOT_ENROLLED"), reason
            codes[code] = codes.get(code, 0) + 1
    assert "CANCELLED" not in codes, codes
    # Whatever each call did, the course's count is its rows.
    seats = live.stub.GetCourse(pb.GetCourseRequest(course_id=course.id), timeout=TIMEOUT)
    assert seats.course.enrolled_count == databases.table_counts(live.database_url)[2]


@pytest.mark.parametrize(
    "override, flag",
    [
        ({"max_message_bytes": 10}, "--max-message-bytes"),
        ({"max_concurrent_rpcs": 0}, "--max-concurrent-rpcs"),
        ({"keepalive_time": 0}, "--keepalive-time"),
        ({"max_connection_age": -1}, "--max-connection-age"),
    ],
)
def test_limits_out_of_range_are_startup_errors(db_url, override, flag):
    config = ServerConfig(address="127.0.0.1:0", database_url=db_url, **override)
    with pytest.raises(StartupError, match=flag):
        create_server(config)


def test_parallel_threads_do_not_leak_liveness_between_calls(live):
    # A call bound to a finished context must not leave it bound for the next call on
    # the same worker thread: many quick calls in a row all succeed.
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(10):
                new_student(live.stub)
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors
    assert databases.table_counts(live.database_url)[0] == 40
