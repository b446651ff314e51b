"""The ceiling: a bare grpcio server on the same proto whose handlers return empty replies."""

from __future__ import annotations

import argparse
import signal
from concurrent import futures

import grpc

from enrollment.v1 import enrollment_pb2 as pb
from enrollment.v1 import enrollment_pb2_grpc as pb_grpc


class EmptyServicer(pb_grpc.EnrollmentServiceServicer):
    """Every method answers its empty response: no database, no validation, no logging."""


def _empty(response_type):
    def handler(self, request, context):
        return response_type()

    return handler


for _method in pb.DESCRIPTOR.services_by_name["EnrollmentService"].methods:
    setattr(EmptyServicer, _method.name, _empty(getattr(pb, _method.output_type.name)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--address", required=True)
    parser.add_argument("--threads", type=int, default=16)
    args = parser.parse_args(argv)
    # Built as server.app builds the real one: same pool size, same options.
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=args.threads, thread_name_prefix="rpc"),
        options=[("grpc.so_reuseport", 0)],
    )
    pb_grpc.add_EnrollmentServiceServicer_to_server(EmptyServicer(), server)
    if not server.add_insecure_port(args.address):
        raise SystemExit(f"cannot listen on {args.address}")
    server.start()
    signal.signal(signal.SIGTERM, lambda *_: server.stop(0))
    server.wait_for_termination()


if __name__ == "__main__":
    main()
