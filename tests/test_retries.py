"""Safe retries (request_id, AIP-155): replays, reuse, malformed ids, failed calls,
concurrent duplicates across processes, and a server killed after its commit."""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from google.protobuf import field_mask_pb2

from enrollment.v1 import enrollment_pb2 as pb
from enrollment.v1 import enrollment_pb2_grpc as pb_grpc
from tests import databases, servers
from tests.rpc import TIMEOUT, expect_error, failure, new_course, new_student

REUSED = (grpc.StatusCode.INVALID_ARGUMENT, "REQUEST_ID_REUSED")


def rid() -> str:
    return str(uuid.uuid4())


def records(url: str) -> int:
    return databases.query(url, "SELECT COUNT(*) FROM request_records")[0][0]


def mutations(stub):
    """(name, call, request) for every mutating method, each valid when run in order."""
    student = new_student(stub)
    other = new_student(stub)
    waiting = new_student(stub)
    course = stub.CreateCourse(
        pb.CreateCourseRequest(code=f"R-{uuid.uuid4().hex[:8]}", title="T", capacity=1,
                               waitlist_capacity=5),
        timeout=TIMEOUT,
    ).course  # fmt: skip
    spare = new_course(stub)
    return [
        ("CreateStudent", stub.CreateStudent,
         pb.CreateStudentRequest(name="New", email=f"{uuid.uuid4().hex}@example.com")),
        ("CreateCourse", stub.CreateCourse,
         pb.CreateCourseRequest(code=f"N-{uuid.uuid4().hex[:8]}", title="New", capacity=3)),
        ("UpdateStudent", stub.UpdateStudent,
         pb.UpdateStudentRequest(student=pb.Student(id=student.id, name="Renamed"),
                                 update_mask=field_mask_pb2.FieldMask(paths=["name"]))),
        ("EnrollStudent", stub.EnrollStudent,
         pb.EnrollStudentRequest(student_id=student.id, course_id=course.id)),
        ("EnrollStudent (waitlisted)", stub.EnrollStudent,
         pb.EnrollStudentRequest(student_id=waiting.id, course_id=course.id,
                                 waitlist_if_full=True)),
        ("DropCourse (promotes)", stub.DropCourse,
         pb.DropCourseRequest(student_id=student.id, course_id=course.id)),
        ("UpdateCourse", stub.UpdateCourse,
         pb.UpdateCourseRequest(course=pb.Course(id=course.id, capacity=4),
                                update_mask=field_mask_pb2.FieldMask(paths=["capacity"]))),
        ("BatchEnrollStudents", stub.BatchEnrollStudents,
         pb.BatchEnrollStudentsRequest(requests=[
             pb.EnrollStudentRequest(student_id=other.id, course_id=course.id),
             pb.EnrollStudentRequest(student_id=other.id, course_id=spare.id),
             pb.EnrollStudentRequest(student_id=student.id, course_id=course.id),
         ], allow_partial_success=True)),
        ("BatchDropCourses", stub.BatchDropCourses,
         pb.BatchDropCoursesRequest(requests=[
             pb.DropCourseRequest(student_id=other.id, course_id=spare.id),
         ])),
        ("DeleteStudent", stub.DeleteStudent,
         pb.DeleteStudentRequest(student_id=other.id, force=True)),
        ("DeleteCourse", stub.DeleteCourse,
         pb.DeleteCourseRequest(course_id=course.id, force=True)),
    ]  # fmt: skip


def test_replays_of_every_mutating_method_return_the_same_response_and_change_nothing(live):
    stub, url = live.stub, live.database_url
    for name, call, request in mutations(stub):
        request.request_id = rid()
        first = call(request, timeout=TIMEOUT)
        before = databases.snapshot(url)
        time.sleep(0.002)  # a replay that ran again would move update_time
        # The id in upper case is the same id.
        request.request_id = request.request_id.upper()
        again = call(request, timeout=TIMEOUT)
        assert again == first, name
        assert databases.snapshot(url) == before, name
    assert records(url) == 11


def test_a_reused_request_id_with_another_request_or_method_is_rejected(live):
    stub, url = live.stub, live.database_url
    key = rid()
    stub.CreateStudent(
        pb.CreateStudentRequest(name="A", email="a@example.com", request_id=key), timeout=TIMEOUT
    )
    before = databases.snapshot(url)
    changed = pb.CreateStudentRequest(name="B", email="a@example.com", request_id=key)
    got = expect_error(stub.CreateStudent, changed, *REUSED, fields=["request_id"])
    assert "request_id" in got.message
    # Another method with the same id (even one whose fields serialize alike).
    other = pb.DeleteStudentRequest(student_id=1, request_id=key)
    expect_error(stub.DeleteStudent, other, *REUSED, fields=["request_id"])
    # INVALID_FIELD comes first.
    bad = pb.CreateStudentRequest(name="", email="a@example.com", request_id=key)
    expect_error(
        stub.CreateStudent, bad, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD", ["name"]
    )
    # REQUEST_ID_REUSED comes before NOT_FOUND.
    missing = pb.DeleteCourseRequest(course_id=999999, request_id=key)
    expect_error(stub.DeleteCourse, missing, *REUSED, fields=["request_id"])
    assert databases.snapshot(url) == before


@pytest.mark.parametrize(
    "bad_id",
    [
        "00000000-0000-0000-0000-000000000000",
        "not-a-uuid",
        "123e4567e89b12d3a456426614174000",  # no hyphens: not the canonical form
        "{123e4567-e89b-12d3-a456-426614174000}",
        "123e4567-e89b-12d3-a456-42661417400g",
        " 123e4567-e89b-12d3-a456-426614174000",
    ],
)
def test_the_nil_uuid_and_non_uuids_are_invalid_fields(live, bad_id):
    stub, url = live.stub, live.database_url
    before = databases.snapshot(url)
    request = pb.CreateStudentRequest(name="A", email="a@example.com", request_id=bad_id)
    expect_error(
        stub.CreateStudent, request, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD",
        ["request_id"],
    )  # fmt: skip
    # Reported with the other malformed fields at once.
    both = pb.CreateStudentRequest(name=" ", email="a@example.com", request_id=bad_id)
    expect_error(
        stub.CreateStudent, both, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD",
        ["name", "request_id"],
    )  # fmt: skip
    assert databases.snapshot(url) == before


def test_a_failed_call_records_nothing_and_its_retry_runs(live):
    stub, url = live.stub, live.database_url
    student, course = new_student(stub), new_course(stub, capacity=1)
    stub.EnrollStudent(
        pb.EnrollStudentRequest(student_id=new_student(stub).id, course_id=course.id),
        timeout=TIMEOUT,
    )
    request = pb.EnrollStudentRequest(student_id=student.id, course_id=course.id, request_id=rid())
    expect_error(stub.EnrollStudent, request, grpc.StatusCode.FAILED_PRECONDITION, "COURSE_FULL")
    assert records(url) == 0
    stub.UpdateCourse(
        pb.UpdateCourseRequest(
            course=pb.Course(id=course.id, capacity=2),
            update_mask=field_mask_pb2.FieldMask(paths=["capacity"]),
        ),
        timeout=TIMEOUT,
    )
    enrolled = stub.EnrollStudent(request, timeout=TIMEOUT).enrollment
    assert enrolled.state == pb.ENROLLMENT_STATE_ENROLLED
    assert records(url) == 1
    assert stub.EnrollStudent(request, timeout=TIMEOUT).enrollment == enrolled


def test_expired_records_are_purged_and_the_id_runs_again(start_server):
    live = start_server(request_id_retention=0.5)
    stub, url = live.stub, live.database_url
    request = pb.CreateStudentRequest(name="A", email="a@example.com", request_id=rid())
    stub.CreateStudent(request, timeout=TIMEOUT)
    assert records(url) == 1
    deadline = time.monotonic() + 10
    while records(url) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert records(url) == 0
    # Remembered no more: the call runs again (and finds the email taken).
    expect_error(stub.CreateStudent, request, grpc.StatusCode.ALREADY_EXISTS, "EMAIL_TAKEN")


CONNECTIONS = 16


def test_sixteen_connections_over_two_processes_create_one_student(db_url, tmp_path):
    server = servers.start(tmp_path / "server.log", "--database-url", db_url, "--workers", "2")
    address = server.address
    channels = []
    try:
        for _ in range(CONNECTIONS):
            channel = grpc.insecure_channel(
                address, options=[("grpc.use_local_subchannel_pool", 1)]
            )
            grpc.channel_ready_future(channel).result(timeout=20)
            channels.append(channel)
        stubs = [pb_grpc.EnrollmentServiceStub(c) for c in channels]
        for round_ in range(3):
            request = pb.CreateStudentRequest(
                name="Once", email=f"once{round_}@example.com", request_id=rid()
            )
            barrier = threading.Barrier(CONNECTIONS)

            def call(stub, request=request, barrier=barrier):
                barrier.wait()
                return stub.CreateStudent(request, timeout=30).student

            with ThreadPoolExecutor(CONNECTIONS) as pool:
                got = list(pool.map(call, stubs))
            assert len({s.id for s in got}) == 1, got
            assert all(s == got[0] for s in got)
            email = f"once{round_}@example.com"
            rows = databases.query(db_url, f"SELECT id FROM students WHERE email = '{email}'")
            assert rows == [(got[0].id,)]
    finally:
        for channel in channels:
            channel.close()
        server.stop()


def test_sixteen_callers_of_one_failing_request_all_get_its_failure(db_url, tmp_path):
    """Sixteen calls at once with one request_id, into a full course: each gets
    COURSE_FULL, as it would alone. The first claims the id, the rest wait in line on
    its record; at its rollback InnoDB deadlocks the waiters' inserts of the record (each
    holds a shared lock on the key and needs an exclusive one), again at each one that
    fails, so a caller can be a victim many times: that is waiting in line, and it must
    not end the call UNAVAILABLE once three deadlocks are spent (unit_of_work.in_line)."""
    server = servers.start(
        tmp_path / "server.log", "--database-url", db_url, "--workers", "2", "--threads", "8"
    )
    channels = [grpc.insecure_channel(server.address)]
    try:
        stub = pb_grpc.EnrollmentServiceStub(channels[0])
        course = stub.CreateCourse(
            pb.CreateCourseRequest(code="FULL-1", title="Full", capacity=1), timeout=TIMEOUT
        ).course
        first, late = new_student(stub), new_student(stub)
        stub.EnrollStudent(
            pb.EnrollStudentRequest(student_id=first.id, course_id=course.id), timeout=TIMEOUT
        )
        for _ in range(CONNECTIONS):
            channel = grpc.insecure_channel(
                server.address, options=[("grpc.use_local_subchannel_pool", 1)]
            )
            grpc.channel_ready_future(channel).result(timeout=20)
            channels.append(channel)
        stubs = [pb_grpc.EnrollmentServiceStub(c) for c in channels[1:]]
        outcomes: dict[tuple[str, str], int] = {}
        for _ in range(8):
            request = pb.EnrollStudentRequest(
                student_id=late.id, course_id=course.id, request_id=rid()
            )
            barrier = threading.Barrier(CONNECTIONS)

            def call(stub, request=request, barrier=barrier):
                barrier.wait()
                try:
                    stub.EnrollStudent(request, timeout=30)
                    return ("OK", "")
                except grpc.RpcError as error:
                    got = failure(error)
                    return (got.code.name, got.reason)

            with ThreadPoolExecutor(CONNECTIONS) as pool:
                for outcome in pool.map(call, stubs):
                    outcomes[outcome] = outcomes.get(outcome, 0) + 1
        assert outcomes == {("FAILED_PRECONDITION", "COURSE_FULL"): 8 * CONNECTIONS}
        assert databases.query(db_url, "SELECT COUNT(*) FROM request_records") == [(0,)]
    finally:
        for channel in channels:
            channel.close()
        server.stop()


class HoldingProxy:
    """Forwards one client's TCP connection to a server; once `hold` is set, keeps every
    byte the server sends (the response) from the client."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.hold = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, held: bool) -> None:
        try:
            while data := source.recv(65536):
                if held and self.hold.is_set():
                    continue  # the server's answer never reaches the client
                sink.sendall(data)
        except OSError:
            pass
        for s in (source, sink):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()
        for s in self.sockets:
            s.close()


def _course(stub, capacity: int, waitlist: int = 0) -> pb.Course:
    request = pb.CreateCourseRequest(
        code=f"K-{uuid.uuid4().hex[:8]}", title="T", capacity=capacity, waitlist_capacity=waitlist
    )
    return stub.CreateCourse(request, timeout=TIMEOUT).course


def _waiting(stub, course: pb.Course) -> tuple[int, int]:
    """A student enrolled in the (one-seat) course and one on its waitlist."""
    first, second = new_student(stub), new_student(stub)
    stub.EnrollStudent(
        pb.EnrollStudentRequest(student_id=first.id, course_id=course.id), timeout=TIMEOUT
    )
    stub.EnrollStudent(
        pb.EnrollStudentRequest(student_id=second.id, course_id=course.id, waitlist_if_full=True),
        timeout=TIMEOUT,
    )
    return first.id, second.id


def _rows(url: str, table: str) -> list[tuple]:
    if table == "student_courses":
        return databases.query(url, "SELECT student_id, course_id, state FROM student_courses "
                               "ORDER BY course_id, student_id")  # fmt: skip
    return databases.query(url, f"SELECT * FROM {table} ORDER BY id")


def _killed_create_student(stub):
    request = pb.CreateStudentRequest(name="Kept", email="kept@example.com")

    def check(response, url):
        (row,) = databases.query(url, "SELECT id, name, email FROM students")
        assert (response.student.id, response.student.name, response.student.email) == row

    return request, check


def _killed_update_student(stub):
    student = new_student(stub)
    request = pb.UpdateStudentRequest(
        student=pb.Student(id=student.id, name="Renamed"),
        update_mask=field_mask_pb2.FieldMask(paths=["name"]),
    )

    def check(response, url):
        assert (response.student.name, response.student.etag) != (student.name, student.etag)
        row = databases.query(url, "SELECT name, version FROM students")
        assert row == [("Renamed", 2)]  # renamed once

    return request, check


def _killed_delete_student(stub):
    student = new_student(stub)
    course = _course(stub, 5)
    stub.EnrollStudent(
        pb.EnrollStudentRequest(student_id=student.id, course_id=course.id), timeout=TIMEOUT
    )
    request = pb.DeleteStudentRequest(student_id=student.id, force=True)

    def check(response, url):
        assert _rows(url, "students") == []
        assert databases.query(url, "SELECT enrolled_count FROM courses") == [(0,)]

    return request, check


def _killed_create_course(stub):
    request = pb.CreateCourseRequest(code="KEPT-1", title="Kept", capacity=3)

    def check(response, url):
        (row,) = databases.query(url, "SELECT id, code, capacity FROM courses")
        assert (response.course.id, response.course.code, response.course.capacity) == row

    return request, check


def _killed_update_course(stub):
    course = _course(stub, 1, waitlist=3)
    _, waiting = _waiting(stub, course)
    request = pb.UpdateCourseRequest(
        course=pb.Course(id=course.id, capacity=2),
        update_mask=field_mask_pb2.FieldMask(paths=["capacity"]),
    )

    def check(response, url):
        assert (response.course.capacity, response.course.enrolled_count) == (2, 2)
        counts = "SELECT capacity, enrolled_count, waitlisted_count, version FROM courses"
        assert databases.query(url, counts) == [(2, 2, 0, 2)]

    return request, check


def _killed_delete_course(stub):
    course = _course(stub, 1, waitlist=3)
    _waiting(stub, course)
    request = pb.DeleteCourseRequest(course_id=course.id, force=True)

    def check(response, url):
        assert _rows(url, "courses") == [] and _rows(url, "student_courses") == []

    return request, check


def _killed_enroll_student(stub):
    student, course = new_student(stub), _course(stub, 5)
    request = pb.EnrollStudentRequest(student_id=student.id, course_id=course.id)

    def check(response, url):
        enrollment = response.enrollment
        assert (enrollment.student_id, enrollment.course_id) == (student.id, course.id)
        assert enrollment.state == pb.ENROLLMENT_STATE_ENROLLED
        assert databases.query(url, "SELECT enrolled_count FROM courses") == [(1,)]

    return request, check


def _killed_drop_course(stub):
    course = _course(stub, 1, waitlist=3)
    enrolled, waiting = _waiting(stub, course)
    request = pb.DropCourseRequest(student_id=enrolled, course_id=course.id)

    def check(response, url):
        assert response.promoted.student_id == waiting  # promoted once, by the first
        assert _rows(url, "student_courses") == [(waiting, course.id, 1)]

    return request, check


def _killed_batch_enroll(stub):
    course = _course(stub, 2, waitlist=2)
    students = [new_student(stub).id for _ in range(3)]
    request = pb.BatchEnrollStudentsRequest(
        requests=[
            pb.EnrollStudentRequest(student_id=s, course_id=course.id, waitlist_if_full=True)
            for s in students
        ]
    )

    def check(response, url):
        states = [r.enrollment.state for r in response.results]
        assert states == [pb.ENROLLMENT_STATE_ENROLLED] * 2 + [pb.ENROLLMENT_STATE_WAITLISTED]
        counts = "SELECT enrolled_count, waitlisted_count FROM courses"
        assert databases.query(url, counts) == [(2, 1)]

    return request, check


def _killed_batch_drop(stub):
    course = _course(stub, 1, waitlist=3)
    enrolled, waiting = _waiting(stub, course)
    request = pb.BatchDropCoursesRequest(
        requests=[pb.DropCourseRequest(student_id=enrolled, course_id=course.id)]
    )

    def check(response, url):
        assert [r.promoted.student_id for r in response.results] == [waiting]
        assert _rows(url, "student_courses") == [(waiting, course.id, 1)]

    return request, check


# Per mutating method: setup(stub) makes what the call needs and returns its request
# and check(response, url), which asserts the answer and the database show one effect.
KILLED = {
    "CreateStudent": _killed_create_student,
    "UpdateStudent": _killed_update_student,
    "DeleteStudent": _killed_delete_student,
    "CreateCourse": _killed_create_course,
    "UpdateCourse": _killed_update_course,
    "DeleteCourse": _killed_delete_course,
    "EnrollStudent": _killed_enroll_student,
    "DropCourse": _killed_drop_course,
    "BatchEnrollStudents": _killed_batch_enroll,
    "BatchDropCourses": _killed_batch_drop,
}


@pytest.mark.parametrize("method", list(KILLED))
def test_a_server_killed_after_its_commit_answers_the_retry_with_the_original_result(
    db_url, tmp_path, method
):
    # The server that answers the retry starts alongside (it serves nothing before).
    with ThreadPoolExecutor(2) as pool:
        starting = [
            pool.submit(servers.start, tmp_path / f"{name}.log", "--database-url", db_url)
            for name in ("first", "second")
        ]
        first, second = [f.result() for f in starting]
    proxy = HoldingProxy(first.address)
    channel = grpc.insecure_channel(f"127.0.0.1:{proxy.port}")
    stub = pb_grpc.EnrollmentServiceStub(channel)
    key = rid()
    try:
        request, check = KILLED[method](stub)
        request.request_id = key
        stub.ListStudents(pb.ListStudentsRequest(), timeout=TIMEOUT)  # the connection is up
        proxy.hold.set()
        pending = getattr(stub, method).future(request, timeout=60)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            found = databases.query(
                db_url, f"SELECT COUNT(*) FROM request_records WHERE request_id = '{key}'"
            )
            if found == [(1,)]:
                break
            time.sleep(0.01)
        assert found == [(1,)], "the call never committed"
        # The effect and its record committed; the answer is still on its way.
        first.stop(signal.SIGKILL)
        with pytest.raises(grpc.RpcError) as lost:
            pending.result()
        assert lost.value.code() == grpc.StatusCode.UNAVAILABLE
    except BaseException:
        second.stop()
        raise
    finally:
        proxy.close()
        channel.close()
        first.stop(signal.SIGKILL)
    before = databases.snapshot(db_url)
    events = databases.query(db_url, "SELECT COUNT(*) FROM events")
    try:
        with grpc.insecure_channel(second.address) as again:
            retried = getattr(pb_grpc.EnrollmentServiceStub(again), method)(
                request, timeout=TIMEOUT
            )
        check(retried, db_url)
        assert databases.snapshot(db_url) == before
        assert databases.query(db_url, "SELECT COUNT(*) FROM events") == events
    finally:
        second.stop()
