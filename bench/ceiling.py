"""The ceiling: bare servers on the same proto whose handlers return empty replies.

Two of them, as the performance issue asks: grpcio's sync server (a thread pool) and
grpc.aio (an event loop), neither with a database, validation or logging. `make bench`
measures both in the same rounds and compares the enrollment server with the cheaper
per call of the two.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from concurrent import futures

import grpc

from enrollment.v1 import enrollment_pb2 as pb
from enrollment.v1 import enrollment_pb2_grpc as pb_grpc

KINDS = ("sync", "aio")
# Built as startup/server.py builds the real one, where it matters for a call's cost.
OPTIONS = [("grpc.so_reuseport", 0)]
_METHODS = pb.DESCRIPTOR.services_by_name["EnrollmentService"].methods


class EmptyServicer(pb_grpc.EnrollmentServiceServicer):
    """Every method answers its empty response (sync handlers, in the pool's threads)."""


class EmptyAioServicer(pb_grpc.EnrollmentServiceServicer):
    """Every method answers its empty response (coroutines, on the event loop)."""


def _empty(response_type):
    def handler(self, request, context):
        return response_type()

    return handler


def _empty_async(response_type):
    async def handler(self, request, context):
        return response_type()

    return handler


for _method in _METHODS:
    _response = getattr(pb, _method.output_type.name)
    setattr(EmptyServicer, _method.name, _empty(_response))
    setattr(EmptyAioServicer, _method.name, _empty_async(_response))


def _serve_sync(address: str, threads: int) -> None:
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="rpc"),
        options=OPTIONS,
    )
    pb_grpc.add_EnrollmentServiceServicer_to_server(EmptyServicer(), server)
    if not server.add_insecure_port(address):
        raise SystemExit(f"cannot listen on {address}")
    server.start()
    signal.signal(signal.SIGTERM, lambda *_: server.stop(0))
    server.wait_for_termination()


async def _serve_aio(address: str) -> None:
    server = grpc.aio.server(options=OPTIONS)
    pb_grpc.add_EnrollmentServiceServicer_to_server(EmptyAioServicer(), server)
    if not server.add_insecure_port(address):
        raise SystemExit(f"cannot listen on {address}")
    await server.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--address", required=True)
    parser.add_argument("--kind", choices=KINDS, default="sync")
    parser.add_argument("--threads", type=int, default=16, help="the sync server's pool")
    args = parser.parse_args(argv)
    if args.kind == "aio":
        asyncio.run(_serve_aio(args.address))
    else:
        _serve_sync(args.address, args.threads)


if __name__ == "__main__":
    main()
