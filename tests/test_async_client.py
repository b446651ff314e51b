"""AsyncEnrollmentClient (grpc.aio) against a live server: the sync client's tests, awaited."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import socket
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

from enrollment.client.aio import AsyncEnrollmentClient
from enrollment.client.api import ClientError, EnrollmentClient
from enrollment.v1 import enrollment_pb2 as pb
from tests.rpc import new_student


def run(scenario: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(scenario())


def rpc_calls(caplog, method: str) -> int:
    return sum(f"method={method} " in r.getMessage() for r in caplog.records)


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def silent_port() -> Iterator[int]:
    """Accepts TCP connections but never speaks HTTP/2, so calls hang."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock.getsockname()[1]


def test_same_methods_as_the_sync_client():
    def public(cls) -> dict[str, list[str]]:
        return {
            name: list(inspect.signature(member).parameters)
            for name, member in vars(cls).items()
            if callable(member) and not name.startswith("_")
        }

    assert public(AsyncEnrollmentClient) == public(EnrollmentClient)
    assert list(inspect.signature(AsyncEnrollmentClient).parameters) == list(
        inspect.signature(EnrollmentClient).parameters
    )


def test_enroll_list_and_drop(live):
    async def scenario():
        async with AsyncEnrollmentClient(live.address, timeout=10) as api:
            student = await api.create_student("Ada Lovelace", "ada@example.com")
            course = await api.create_course("CS-101", "Computing", capacity=2)
            enrollment = await api.enroll(student.id, course.id)
            assert (enrollment.student_id, enrollment.course_id) == (student.id, course.id)
            assert (await api.get_course(course.id)).enrolled_count == 1
            assert (await api.get_student(student.id)).email == "ada@example.com"
            page = await api.list_courses(student.id)
            assert [c.id for c in page.courses] == [course.id] and page.next_page_token == ""
            assert [s.id for s in (await api.list_students(course.id)).students] == [student.id]
            await api.drop(student.id, course.id)
            assert (await api.get_course(course.id)).enrolled_count == 0
            await api.delete_course(course.id)
            await api.delete_student(student.id)
            with pytest.raises(ClientError) as raised:
                await api.get_student(student.id)
            assert (raised.value.code, raised.value.reason) == ("NOT_FOUND", "STUDENT_NOT_FOUND")

    run(scenario)


def test_waitlist_promotion_and_updates(live):
    async def scenario():
        async with AsyncEnrollmentClient(live.address, timeout=10) as api:
            course = await api.create_course("WL-1", "Waitlisted", capacity=1, waitlist_capacity=2)
            a, b, c = [await api.create_student(n, f"{n}@example.org") for n in ("an", "bo", "cy")]
            assert (await api.enroll(a.id, course.id)).state == pb.ENROLLMENT_STATE_ENROLLED
            for waiting in (b, c):
                got = await api.enroll(waiting.id, course.id, waitlist_if_full=True)
                assert got.state == pb.ENROLLMENT_STATE_WAITLISTED
            line = api.iter_enrollments(course_id=course.id, state=pb.ENROLLMENT_STATE_WAITLISTED)
            assert [e.student_id async for e in line] == [b.id, c.id]
            promoted = await api.drop(a.id, course.id)
            assert promoted is not None and promoted.student_id == b.id
            assert (await api.get_enrollment(c.id, course.id)).waitlist_position == 1
            raised = await api.update_course(course.id, capacity=2, etag=course.etag)
            assert (raised.enrolled_count, raised.waitlisted_count) == (2, 0)
            renamed = await api.update_student(c.id, name="Cy Young")
            assert renamed.name == "Cy Young" and renamed.etag != c.etag
            with pytest.raises(ClientError) as stale:
                await api.update_course(course.id, title="Other", etag=course.etag)
            assert (stale.value.code, stale.value.reason) == ("ABORTED", "ETAG_MISMATCH")

    run(scenario)


def test_client_error_attributes(live):
    async def scenario():
        async with AsyncEnrollmentClient(live.address, timeout=10) as api:
            student = await api.create_student("Grace Hopper", "grace@example.com")
            with pytest.raises(ClientError) as raised:
                await api.enroll(student.id, 424242)
            error = raised.value
            assert (error.code, error.reason, error.fields) == (
                "INVALID_ARGUMENT",
                "COURSE_NOT_FOUND",
                ["course_id"],
            )
            assert error.metadata == {"course_id": "424242"}
            assert str(error) == "INVALID_ARGUMENT COURSE_NOT_FOUND: course 424242 does not exist"

            with pytest.raises(ClientError) as raised:
                await api.create_student("Grace Again", "GRACE@example.com")
            assert (raised.value.code, raised.value.reason, raised.value.fields) == (
                "ALREADY_EXISTS",
                "EMAIL_TAKEN",
                [],
            )
            with pytest.raises(ClientError) as raised:
                await api.create_course("bad code!", " ", capacity=-1)
            assert raised.value.reason == "INVALID_FIELD"
            assert sorted(raised.value.fields) == ["capacity", "code", "title"]

    run(scenario)


def test_page_walkers_fetch_page_after_page(live, caplog):
    caplog.set_level(logging.INFO, logger="enrollment.rpc")

    async def scenario():
        async with AsyncEnrollmentClient(live.address, timeout=10) as api:
            courses = [await api.create_course(f"K-{i}", f"Course {i}") for i in range(5)]
            student = await api.get_student(new_student(live.stub).id)
            for course in courses[1::2]:
                await api.enroll(student.id, course.id)
            caplog.clear()
            walked = [c.id async for c in api.iter_courses(page_size=2)]
            assert walked == [c.id for c in courses]
            assert rpc_calls(caplog, "ListCourses") == 3
            mine = [
                (c.id, c.enrolled_count) async for c in api.iter_courses(student.id, page_size=1)
            ]
            assert mine == [(c.id, 1) for c in courses[1::2]]
            assert [s.id async for s in api.iter_students(courses[1].id)] == [student.id]
            assert [s.id async for s in api.iter_students(courses[0].id)] == []

    run(scenario)


def test_many_calls_at_once_on_one_event_loop(live):
    async def scenario():
        async with AsyncEnrollmentClient(live.address, timeout=10) as api:
            course = await api.create_course("RACE-1", "Seats", capacity=5)
            students = await asyncio.gather(
                *(api.create_student(f"S{i}", f"s{i}@example.com") for i in range(20))
            )
            outcomes = await asyncio.gather(
                *(api.enroll(s.id, course.id) for s in students), return_exceptions=True
            )
            errors = [o for o in outcomes if isinstance(o, ClientError)]
            assert len(outcomes) - len(errors) == 5
            assert {(e.code, e.reason) for e in errors} == {("FAILED_PRECONDITION", "COURSE_FULL")}
            assert (await api.get_course(course.id)).enrolled_count == 5

    run(scenario)


def test_the_token_is_sent(start_server, tmp_path):
    token = "async-admin-token"
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"{hashlib.sha256(token.encode()).hexdigest()} admin async-bot\n")
    live = start_server(auth_tokens=str(tokens))

    async def scenario():
        async with AsyncEnrollmentClient(live.address, timeout=10, token=token) as api:
            assert (await api.create_course("T-1", "Tokens")).id > 0
        async with AsyncEnrollmentClient(live.address, timeout=10) as api:
            with pytest.raises(ClientError) as raised:
                await api.get_course(1)
            assert (raised.value.code, raised.value.reason) == ("UNAUTHENTICATED", "MISSING_TOKEN")

    run(scenario)


def test_iter_stops_on_a_token_that_repeats():
    class LoopingStub:
        async def ListCourses(self, request, timeout, metadata):  # noqa: N802 (the stub's name)
            return pb.ListCoursesResponse(courses=[pb.Course(id=1)], next_page_token="again")

    async def scenario():
        async with AsyncEnrollmentClient("127.0.0.1:1") as api:
            api._stub = LoopingStub()
            with pytest.raises(ClientError) as raised:
                [c async for c in api.iter_courses()]
        return raised.value

    assert run(scenario).code == "INTERNAL"


def test_timeout_is_honoured(silent_port):
    async def scenario():
        async with AsyncEnrollmentClient(f"127.0.0.1:{silent_port}", timeout=0.5) as api:
            started = asyncio.get_running_loop().time()
            with pytest.raises(ClientError) as raised:
                await api.get_course(1)
            assert asyncio.get_running_loop().time() - started < 5
        return raised.value

    assert run(scenario).code in ("DEADLINE_EXCEEDED", "UNAVAILABLE")


def test_connection_failure_and_close(closed_port):
    async def scenario():
        api = AsyncEnrollmentClient(f"127.0.0.1:{closed_port}", timeout=3)
        async with api:
            with pytest.raises(ClientError) as raised:
                await api.get_course(1)
            assert raised.value.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED")
            assert raised.value.reason == ""
        with pytest.raises(ValueError, match="closed channel"):
            await api.get_course(1)

    run(scenario)


def test_settings_are_checked():
    for kwargs in ({"timeout": 0}, {"tls_cert": "c.pem"}, {"lb_policy": "random"}):
        with pytest.raises(ValueError):
            AsyncEnrollmentClient("127.0.0.1:1", **kwargs)
