"""bench/ceiling.py's bare servers, the "aio-bounded" one (the request-arrival bound's
price, `python -m bench run --bound-check`) too, answer with empty replies."""

from __future__ import annotations

import grpc
import pytest

from bench import ceiling, procs
from enrollment.v1 import enrollment_pb2 as pb
from tests.servers import free_port

METHOD = "/enrollment.v1.EnrollmentService/GetStudent"


@pytest.mark.parametrize("kind", ceiling.KINDS)
def test_each_kind_answers_empty_replies(kind, tmp_path):
    server = procs.ceiling_server(free_port(), tmp_path / "ceiling.log", threads=2, kind=kind)
    server.start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            unary = channel.unary_unary(
                METHOD,
                request_serializer=pb.GetStudentRequest.SerializeToString,
                response_deserializer=pb.GetStudentResponse.FromString,
            )
            assert unary(pb.GetStudentRequest(student_id=1), timeout=10) == pb.GetStudentResponse()
    finally:
        server.stop()
