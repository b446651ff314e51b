"""The ceiling: bare servers on the same proto whose handlers return empty replies.

Two of them, as the performance issue asks: grpcio's sync server (a thread pool) and
grpc.aio (an event loop), neither with a database, validation or logging. `make bench`
measures both in the same rounds and compares the enrollment server with the cheaper
per call of the two.

A third kind, "aio-bounded", is not a ceiling but a measure of one cost the enrollment
server cannot drop: grpc.aio with every single-message method registered
request-streaming and its message read under the server's own bound on its arrival
(transport/interceptors.py, RequestReads; the "Hostile clients" issue's
--request-timeout), then an empty answer. `python -m bench run --bound-check` runs it
in the same rounds; its "cpu x" is the price of that bound on a bare server.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from concurrent import futures

import grpc

from enrollment.v1 import enrollment_pb2 as pb
from enrollment.v1 import enrollment_pb2_grpc as pb_grpc

KINDS = ("sync", "aio", "aio-bounded")
# Built as startup/server.py builds the real one, where it matters for a call's cost.
OPTIONS = [("grpc.so_reuseport", 0)]
_METHODS = pb.DESCRIPTOR.services_by_name["EnrollmentService"].methods
SERVICE = pb.DESCRIPTOR.services_by_name["EnrollmentService"].full_name


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


def _bounded_handlers() -> dict[str, grpc.RpcMethodHandler]:
    """EnrollmentService's single-message methods as the enrollment server registers
    them: request-streaming, the one message read with RequestReads' bound."""
    from enrollment.server.transport.interceptors import RequestReads

    reads = RequestReads(timeout=30.0)
    handlers = {}
    for method in _METHODS:
        if method.client_streaming or method.server_streaming:
            continue
        request = getattr(pb, method.input_type.name)
        response = getattr(pb, method.output_type.name)

        async def handler(request_iterator, context, response=response):
            await reads.read(context)
            return response()

        handlers[method.name] = grpc.stream_unary_rpc_method_handler(
            handler,
            request_deserializer=request.FromString,
            response_serializer=response.SerializeToString,
        )
    return handlers


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


async def _serve_aio(address: str, *, bounded: bool = False) -> None:
    server = grpc.aio.server(options=OPTIONS)
    if bounded:
        # Registered methods, as the generated add_…_to_server registers them.
        server.add_registered_method_handlers(SERVICE, _bounded_handlers())
    else:
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
    if args.kind != "sync":
        asyncio.run(_serve_aio(args.address, bounded=args.kind == "aio-bounded"))
    else:
        _serve_sync(args.address, args.threads)


if __name__ == "__main__":
    main()
