"""Helpers for asserting on gRPC errors and their google.rpc details."""

from __future__ import annotations

import itertools
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from enrollment.v1 import enrollment_pb2 as pb

TIMEOUT = 10


@dataclass
class RpcFailure:
    code: grpc.StatusCode
    message: str
    reason: str
    domain: str
    metadata: dict[str, str]
    fields: list[str]


def failure(error: grpc.RpcError) -> RpcFailure:
    status = rpc_status.from_call(error)
    assert status is not None, f"no google.rpc.Status details on {error.code()}: {error.details()}"
    info = error_details_pb2.ErrorInfo()
    bad = error_details_pb2.BadRequest()
    found_info = False
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            detail.Unpack(info)
            found_info = True
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            detail.Unpack(bad)
    assert found_info, "no ErrorInfo in the status details"
    return RpcFailure(
        code=error.code(),
        message=error.details(),
        reason=info.reason,
        domain=info.domain,
        metadata=dict(info.metadata),
        fields=[v.field for v in bad.field_violations],
    )


def expect_error(call, request, code: grpc.StatusCode, reason: str, fields=None) -> RpcFailure:
    """Make the call, expect it to fail with code and reason (and BadRequest fields)."""
    with pytest.raises(grpc.RpcError) as raised:
        call(request, timeout=TIMEOUT)
    got = failure(raised.value)
    assert (got.code, got.reason) == (code, reason), got
    assert got.domain == "enrollment.v1"
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert fields is not None, "say which BadRequest fields are expected"
    if fields is not None:
        assert sorted(got.fields) == sorted(fields), got
    return got


def race(calls) -> list[grpc.StatusCode]:
    """Run the calls at once from many threads; return each one's status code."""
    barrier = threading.Barrier(len(calls))

    def run(call):
        barrier.wait()
        try:
            call()
            return grpc.StatusCode.OK
        except grpc.RpcError as error:
            return error.code()

    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        return list(pool.map(run, calls))


_serial = itertools.count(1)


def new_student(stub, name="Ada Lovelace", email=None) -> pb.Student:
    email = email or f"student{next(_serial)}@example.com"
    return stub.CreateStudent(
        pb.CreateStudentRequest(name=name, email=email), timeout=TIMEOUT
    ).student


def new_course(stub, code=None, title="Introduction", capacity=0) -> pb.Course:
    code = code or f"C-{next(_serial)}"
    request = pb.CreateCourseRequest(code=code, title=title, capacity=capacity)
    return stub.CreateCourse(request, timeout=TIMEOUT).course


def enroll(stub, student_id: int, course_id: int) -> pb.Enrollment:
    request = pb.EnrollStudentRequest(student_id=student_id, course_id=course_id)
    return stub.EnrollStudent(request, timeout=TIMEOUT).enrollment


def varint(value: int) -> bytes:
    """value as a protobuf varint (negative ones as their 64-bit two's complement), for
    request bodies written by hand."""
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)
