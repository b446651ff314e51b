"""Server memory for `make bench`: RSS idle, under load, and with many idle WatchEvents streams.

The watchers come from one load process over several connections (a connection carries
at most --max-streams-per-connection calls). Each stream starts one event before the
feed's head, so its first response says it is registered with the server's hub; after
that it idles, as a dashboard's watcher does between changes.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import time
import uuid
from dataclasses import dataclass

import grpc

from bench.procs import Server
from bench.seed import Shape
from enrollment.v1 import enrollment_pb2 as pb
from enrollment.v1 import enrollment_pb2_grpc as pb_grpc

WATCHERS = 1000
STREAMS_PER_CONNECTION = 50  # under serve's --max-streams-per-connection (100)
# A watcher above this needs a reason in bench/PROFILE.md (the performance issue).
PER_WATCHER_LIMIT_KIB = 64
SETTLE_S = 1.0  # after the last stream is up, before RSS is read


@dataclass(frozen=True)
class Watchers:
    rss_before_kib: int
    rss_with_kib: int
    watchers: int

    @property
    def per_watcher_kib(self) -> float:
        return (self.rss_with_kib - self.rss_before_kib) / self.watchers


async def _one_change(address: str, shape: Shape) -> int:
    """An enroll and its drop, so the feed has a head to start the watchers just before."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.EnrollmentServiceStub(channel)
        student = 1
        course = next(c for c in range(1, shape.courses + 1) if c not in shape.enrolled(student))
        await stub.EnrollStudent(
            pb.EnrollStudentRequest(
                student_id=student, course_id=course, request_id=str(uuid.uuid4())
            )
        )
        await stub.DropCourse(
            pb.DropCourseRequest(student_id=student, course_id=course, request_id=str(uuid.uuid4()))
        )
        page = await stub.ListEvents(pb.ListEventsRequest(page_size=1))
        return page.head_sequence


async def _hold(address: str, count: int, after: int, conn) -> None:
    channels = [
        # A subchannel pool per channel: each channel its own connection.
        grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range((count + STREAMS_PER_CONNECTION - 1) // STREAMS_PER_CONNECTION)
    ]
    calls = []
    try:
        for index in range(count):
            stub = pb_grpc.EnrollmentServiceStub(channels[index // STREAMS_PER_CONNECTION])
            calls.append(stub.WatchEvents(pb.WatchEventsRequest(after_sequence=after)))
        # Each stream's first response: the one event after `after`, its backlog.
        firsts = await asyncio.gather(*(call.read() for call in calls), return_exceptions=True)
        failed = [f for f in firsts if not isinstance(f, pb.WatchEventsResponse)]
        conn.send(f"{len(failed)} streams failed: {failed[0]!r}" if failed else "ready")
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # until told
    finally:
        for call in calls:
            call.cancel()
        for channel in channels:
            await channel.close()


def _watcher_process(address: str, count: int, after: int, conn) -> None:
    asyncio.run(_hold(address, count, after, conn))
    conn.close()


def with_watchers(server: Server, shape: Shape, count: int = WATCHERS) -> Watchers:
    """The server's RSS just before `count` idle WatchEvents streams open and with them."""
    head = asyncio.run(_one_change(server.address, shape))
    time.sleep(SETTLE_S)
    before = server.rss_kib()
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(
        target=_watcher_process, args=(server.address, count, head - 1, child), daemon=True
    )
    process.start()
    try:
        if not parent.poll(120):
            raise RuntimeError("the watchers did not all start within 120 s")
        answer = parent.recv()
        if answer != "ready":
            raise RuntimeError(f"WatchEvents: {answer}")
        time.sleep(SETTLE_S)
        with_them = server.rss_kib()
        parent.send("close")
    finally:
        process.join(30)
        if process.is_alive():
            process.kill()
    return Watchers(before, with_them, count)
