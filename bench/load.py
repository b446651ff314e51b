"""The load generator: grpc.aio clients in several processes, a few coroutines each.

Each process connects and warms up, then drives calls until the end of the window; only
calls that complete inside [start, end] are counted, so set-up never blurs the figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from array import array
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from bench.seed import Shape
from enrollment.v1 import enrollment_pb2 as pb
from enrollment.v1 import enrollment_pb2_grpc as pb_grpc

MIXES = ("read", "write", "mixed")
WRITE_SHARE = {"read": 0.0, "write": 1.0, "mixed": 0.2}
# Calls the mixes make; every one is expected to answer OK.
METHODS = ("ListCourses", "GetStudent", "EnrollStudent", "DropCourse")


@dataclass(frozen=True)
class LoadSpec:
    address: str
    mix: str
    shape: Shape
    process_index: int
    processes: int
    coroutines: int
    seed: int = 1
    # Connections of this process, the coroutines spread over them: SO_REUSEPORT spreads
    # connections, not calls, over `serve --workers N`, so one connection per load
    # process can land every call on one worker.
    channels: int = 1


# Each channel its own connection (grpc shares one between channels of the same target).
_OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


@contextlib.asynccontextmanager
async def stubs(address: str, channels: int) -> AsyncIterator[list]:
    """Stubs over `channels` connections of their own, each ready; closed on the way out."""
    options = _OWN_CONNECTION if channels > 1 else None
    opened = [grpc.aio.insecure_channel(address, options=options) for _ in range(channels)]
    try:
        for channel in opened:
            await channel.channel_ready()
        yield [pb_grpc.EnrollmentServiceStub(channel) for channel in opened]
    finally:
        for channel in opened:
            await channel.close()


class _Driver:
    def __init__(self, spec: LoadSpec, stubs: list, start_ns: int, end_ns: int) -> None:
        self.spec = spec
        self.stubs = stubs
        self.start_ns = start_ns
        self.end_ns = end_ns
        self.latencies = {m: array("q") for m in METHODS}
        self.codes: Counter = Counter()

    async def call(self, stub, method: str, request) -> None:
        t0 = time.monotonic_ns()
        try:
            await getattr(stub, method)(request, timeout=30)
            code = "OK"
        except grpc.aio.AioRpcError as error:
            code = error.code().name
        t1 = time.monotonic_ns()
        if self.start_ns <= t1 <= self.end_ns:
            self.codes[(method, code)] += 1
            if code == "OK":
                self.latencies[method].append(t1 - t0)

    async def loop(self, slot: int) -> None:
        spec, shape = self.spec, self.spec.shape
        # Writers own disjoint students (slot g of G takes students g+1, g+1+G, ...), so
        # two coroutines never race on one pair and every call is expected to be OK.
        total = spec.processes * spec.coroutines
        mine = spec.process_index * spec.coroutines + slot
        owned = range(mine + 1, shape.students + 1, total)
        rng = random.Random(spec.seed * 1_000_003 + mine)
        write_share = WRITE_SHARE[spec.mix]
        stub = self.stubs[slot % len(self.stubs)]
        while time.monotonic_ns() < self.end_ns:
            if write_share and rng.random() < write_share:
                student = rng.choice(owned)
                taken = shape.enrolled(student)
                course = rng.randint(1, shape.courses)
                while course in taken:
                    course = rng.randint(1, shape.courses)
                # Each with a request_id, as enrollment.client sends every mutation: the
                # server records it with the change (and its event) in one transaction.
                await self.call(
                    stub,
                    "EnrollStudent",
                    pb.EnrollStudentRequest(
                        student_id=student, course_id=course, request_id=str(uuid.uuid4())
                    ),
                )
                await self.call(
                    stub,
                    "DropCourse",
                    pb.DropCourseRequest(
                        student_id=student, course_id=course, request_id=str(uuid.uuid4())
                    ),
                )
            else:
                student = rng.randint(1, shape.students)
                await self.call(stub, "ListCourses", pb.ListCoursesRequest(student_id=student))
                await self.call(stub, "GetStudent", pb.GetStudentRequest(student_id=student))


async def _drive(spec: LoadSpec, conn) -> None:
    async with stubs(spec.address, spec.channels) as opened:
        conn.send("ready")
        start_ns, end_ns = conn.recv()
        driver = _Driver(spec, opened, start_ns, end_ns)
        await asyncio.gather(*(driver.loop(i) for i in range(spec.coroutines)))
    conn.send(
        (
            {m: a.tobytes() for m, a in driver.latencies.items()},
            dict(driver.codes),
        )
    )


def worker(spec: LoadSpec, conn) -> None:
    """Entry point of one load process: connect, say ready, drive the window, report."""
    asyncio.run(_drive(spec, conn))
    conn.close()
