"""Property-based bad input against a live server: only contract answers, invariants hold."""

from __future__ import annotations

import base64

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enrollment.v1 import enrollment_pb2 as pb
from tests import databases
from tests.rpc import TIMEOUT, enroll, failure, new_course, new_student

SERVICE = "enrollment.v1.EnrollmentService"
MAX_REQUEST = 64 * 1024
CONTRACT_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
}
CONTRACT_REASONS = {
    "INVALID_FIELD",
    "COURSE_NOT_FOUND",
    "STUDENT_NOT_FOUND",
    "ALREADY_ENROLLED",
    "COURSE_FULL",
    "NOT_ENROLLED",
    "EMAIL_TAKEN",
    "COURSE_CODE_TAKEN",
    "HAS_ENROLLMENTS",
}
# What a message must never hold: SQL, driver names, paths, tracebacks.
LEAKS = ("select ", "insert ", "update ", "delete from", "sqlite", "peewee", "traceback")
LEAKS += ("/tmp", ".db", ".py", 'file "', "integrityerror", "operationalerror")

INT64 = (-(2**63), 2**63 - 1)
INT32 = (-(2**31), 2**31 - 1)

PROPERTY_SETTINGS = settings(
    max_examples=35,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Any code point protobuf can carry (no lone surrogates), control characters and NUL included.
any_char = st.characters(exclude_categories=("Cs",))
texts = st.one_of(
    st.text(any_char, max_size=40),
    st.sampled_from(
        ["", " ", "\x00", "a\x00b", "\x7f", "\tAda", "CS-101", "ada@example.com", "a@b.c"]
        + ["DROP TABLE students;--", "' OR 1=1 --", "../../etc/passwd", "%s%n", "\u202e"]
    ),
    # Long strings: up to 40,000 characters of one code point (some past 64 KiB in UTF-8).
    st.builds(lambda c, n: c * n, any_char, st.integers(150, 40_000)),
)
emails = st.one_of(texts, st.emails())
ids = st.one_of(
    st.integers(-2, 8), st.integers(*INT64), st.sampled_from([INT64[0], INT64[1], 2**31, 2**32])
)
int32s = st.one_of(st.integers(-2, 60), st.integers(*INT32), st.sampled_from(list(INT32)))
page_tokens = st.one_of(
    texts, st.binary(max_size=64).map(lambda b: base64.urlsafe_b64encode(b).decode())
)

REQUESTS = {
    "CreateStudent": st.builds(pb.CreateStudentRequest, name=texts, email=emails),
    "GetStudent": st.builds(pb.GetStudentRequest, student_id=ids),
    "ListStudents": st.builds(
        pb.ListStudentsRequest, course_id=ids, page_size=int32s, page_token=page_tokens
    ),
    "DeleteStudent": st.builds(pb.DeleteStudentRequest, student_id=ids, force=st.booleans()),
    "CreateCourse": st.builds(pb.CreateCourseRequest, code=texts, title=texts, capacity=int32s),
    "GetCourse": st.builds(pb.GetCourseRequest, course_id=ids),
    "ListCourses": st.builds(
        pb.ListCoursesRequest, student_id=ids, page_size=int32s, page_token=page_tokens
    ),
    "DeleteCourse": st.builds(pb.DeleteCourseRequest, course_id=ids, force=st.booleans()),
    "EnrollStudent": st.builds(pb.EnrollStudentRequest, student_id=ids, course_id=ids),
    "DropCourse": st.builds(pb.DropCourseRequest, student_id=ids, course_id=ids),
}


@pytest.fixture
def seeded(live):
    """A live server with a few students, courses (capacities 0, 1, 2) and enrollments."""
    students = [new_student(live.stub).id for _ in range(3)]
    courses = [new_course(live.stub, capacity=c).id for c in (0, 1, 2)]
    enroll(live.stub, students[0], courses[0])
    enroll(live.stub, students[1], courses[1])
    enroll(live.stub, students[2], courses[2])
    return live


def check_answer(call, request_size: int) -> None:
    """Make the call; an error must be one the contract names, told without leaks."""
    try:
        call()
    except grpc.RpcError as error:
        if request_size > MAX_REQUEST:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
            return
        got = failure(error)
        assert got.code in CONTRACT_CODES, got
        assert got.reason in CONTRACT_REASONS and got.domain == "enrollment.v1", got
        lowered = got.message.lower()
        assert not any(leak in lowered for leak in LEAKS), got.message


def check_still_serving(live) -> None:
    health = health_pb2_grpc.HealthStub(live.channel)
    reply = health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=TIMEOUT)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    live.stub.ListCourses(pb.ListCoursesRequest(), timeout=TIMEOUT)


@pytest.mark.parametrize("method", sorted(REQUESTS))
def test_arbitrary_field_values_get_contract_answers(seeded, method):
    stub_call = getattr(seeded.stub, method)

    @PROPERTY_SETTINGS
    @given(request=REQUESTS[method])
    def property_(request):
        check_answer(lambda: stub_call(request, timeout=TIMEOUT), request.ByteSize())
        assert not databases.miscounted_courses(seeded.database_url)

    property_()
    check_still_serving(seeded)


def test_arbitrary_bodies_through_a_generic_stub(seeded):
    calls = {m: seeded.channel.unary_unary(f"/{SERVICE}/{m}") for m in REQUESTS}

    @settings(PROPERTY_SETTINGS, max_examples=120)
    @given(method=st.sampled_from(sorted(REQUESTS)), body=st.binary(max_size=300))
    def property_(method, body):
        check_answer(lambda: calls[method](body, timeout=TIMEOUT), len(body))
        assert not databases.miscounted_courses(seeded.database_url)

    property_()
    check_still_serving(seeded)
