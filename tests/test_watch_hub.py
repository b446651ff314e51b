"""The WatchEvents hub (server/transport/watch.py) on an event loop of the test's own, as
grpc.aio will run it: one poller for every watcher, each watcher gets exactly its
matching events in order (backlog, then live, written in this process and by another
server process), and the bounds: WATCHER_TOO_SLOW, TOO_MANY_WATCHERS, SHUTTING_DOWN."""

from __future__ import annotations

import asyncio
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from enrollment.server.domain import courses, enrollments, events, students
from enrollment.server.errors import ShuttingDown, TooManyWatchers, WatcherTooSlow
from enrollment.server.persistence import engine
from enrollment.server.transport.watch import WatchHub
from enrollment.v1 import enrollment_pb2 as pb
from enrollment.v1 import enrollment_pb2_grpc as pb_grpc
from tests import databases, servers
from tests.rpc import TIMEOUT


@pytest.fixture
def pool(db_url):
    engine.open_pool(db_url, max_connections=6)
    executor = ThreadPoolExecutor(4)

    def run_in_pool(fn, *args):
        return asyncio.get_running_loop().run_in_executor(executor, fn, *args)

    yield run_in_pool
    executor.shutdown()
    engine.close_pool()


def test_three_watchers_get_exactly_their_events_in_order(db_url, pool, tmp_path):
    people = [students.create_student(name=f"P{i}", email=f"p{i}@x.io").id for i in range(8)]
    rooms = [
        courses.create_course(code=f"R{i}", title="R", capacity=3, waitlist_capacity=5).id
        for i in range(3)
    ]
    start = events.read_after(0, 1)[1]
    process = servers.start(tmp_path / "other.log", "--database-url", db_url)
    channel = grpc.insecure_channel(process.address)
    stub = pb_grpc.EnrollmentServiceStub(channel)

    def write_here(rng: random.Random, stop: threading.Event) -> None:
        while not stop.is_set():
            s, c = rng.choice(people), rng.choice(rooms)
            try:
                enrollments.enroll_student(student_id=s, course_id=c, waitlist_if_full=True)
                enrollments.drop_course(student_id=s, course_id=c)
            except Exception:  # noqa: BLE001 - a losing race is fine here
                pass

    def write_there(rng: random.Random, stop: threading.Event) -> None:
        while not stop.is_set():
            s, c = rng.choice(people), rng.choice(rooms)
            try:
                stub.EnrollStudent(
                    pb.EnrollStudentRequest(student_id=s, course_id=c, waitlist_if_full=True),
                    timeout=TIMEOUT,
                )
                stub.DropCourse(pb.DropCourseRequest(student_id=s, course_id=c), timeout=TIMEOUT)
            except grpc.RpcError:
                pass

    filters = [
        {"student_id": people[0], "course_id": 0},
        {"student_id": 0, "course_id": rooms[1]},
        {"student_id": 0, "course_id": 0},
    ]

    async def scenario():
        hub = WatchHub(pool, interval=0.1)
        await hub.start()
        got: list[list[int]] = [[] for _ in filters]

        async def watch(i: int) -> None:
            async for batch in hub.watch(after_sequence=start, **filters[i]):
                got[i] += [e.sequence for e in batch]

        tasks = [asyncio.create_task(watch(i)) for i in range(len(filters))]
        stop = threading.Event()
        writers = [
            threading.Thread(target=fn, args=(random.Random(n), stop), daemon=True)
            for n, fn in enumerate([write_here, write_here, write_there, write_there])
        ]
        for w in writers:
            w.start()
        await asyncio.sleep(3)
        stop.set()
        for w in writers:
            await asyncio.get_running_loop().run_in_executor(None, w.join, 30)
        await asyncio.sleep(1.0)  # within 1 s of the last commit, from either process
        await hub.stop()
        for task in tasks:
            with pytest.raises(ShuttingDown):
                await task
        return got

    try:
        got = asyncio.run(scenario())
    finally:
        channel.close()
        process.stop()
    where = {0: "student_id = ?", 1: "course_id = ?", 2: "1 = ?"}
    values = [people[0], rooms[1], 1]
    for i, seen in enumerate(got):
        expected = [
            row[0]
            for row in databases.query(
                db_url,
                f"SELECT sequence FROM events WHERE sequence > ? AND {where[i]} ORDER BY sequence",
                (start, values[i]),
            )
        ]
        assert len(expected) > 5, (i, expected)
        assert seen == expected, i
    others = databases.query(
        db_url, "SELECT COUNT(*) FROM events WHERE sequence > ? AND request_id <> ''", (start,)
    )[0][0]
    assert others > 0, "some events came from the other server process"


def test_a_watcher_too_slow_is_ended_and_told_where_to_resume(db_url, pool):
    s = students.create_student(name="Slow", email="slow@x.io").id

    async def scenario():
        hub = WatchHub(pool, interval=0.05, max_queued=5)
        await hub.start()
        stream = hub.watch(after_sequence=0, student_id=0, course_id=0)
        first = await stream.__anext__()  # the backlog: the student's creation
        loop = asyncio.get_running_loop()
        for i in range(10):
            await loop.run_in_executor(
                None, lambda i=i: courses.create_course(code=f"Z{i}", title="Z", capacity=0)
            )
        await asyncio.sleep(0.5)  # the poller queues them; the stream is not read
        delivered = list(first)
        with pytest.raises(WatcherTooSlow) as ended:
            while True:
                delivered += await stream.__anext__()
        await hub.stop()
        return delivered, ended.value

    delivered, error = asyncio.run(scenario())
    # Its queue overflowed: what it held is dropped (the memory it took is given back at
    # once), and the stream ends after what it had sent, naming where to resume.
    assert [e.student_id for e in delivered] == [s]
    assert error.metadata["last_sequence"] == str(delivered[-1].sequence)


def test_too_many_watchers_and_shutting_down(pool):
    async def scenario():
        hub = WatchHub(pool, max_watchers=1)
        await hub.start()
        one = hub.watch(after_sequence=0, student_id=0, course_id=0)
        waiting = asyncio.create_task(one.__anext__())
        await asyncio.sleep(0.2)
        two = hub.watch(after_sequence=0, student_id=0, course_id=0)
        with pytest.raises(TooManyWatchers):
            await two.__anext__()
        await hub.stop()
        with pytest.raises(ShuttingDown):
            await waiting
        with pytest.raises(ShuttingDown):
            await hub.watch(after_sequence=0, student_id=0, course_id=0).__anext__()

    asyncio.run(scenario())


def test_a_burst_of_watchers_into_an_empty_hub_is_held_to_max_watchers(pool):
    # The first watcher of an empty hub reads the feed's head (an await) before it is
    # counted; every watcher arriving meanwhile passed the check too, so a burst into
    # a process with no watchers was let in far past --max-watchers.
    async def scenario():
        hub = WatchHub(pool, max_watchers=3)
        await hub.start()
        streams = [hub.watch(after_sequence=0, student_id=0, course_id=0) for _ in range(20)]
        tasks = [asyncio.create_task(s.__anext__()) for s in streams]
        await asyncio.sleep(0.5)
        refused = [t for t in tasks if t.done() and isinstance(t.exception(), TooManyWatchers)]
        assert hub.watchers == 3 and len(refused) == 17, (hub.watchers, len(refused))
        await hub.stop()
        for task in tasks:
            with pytest.raises((ShuttingDown, TooManyWatchers)):
                await task

    asyncio.run(scenario())


def test_stop_ends_the_poller_even_when_a_wake_up_comes_with_it(pool):
    # A commit's wake-up landing in the same turn of the loop as stop(): Python 3.11's
    # asyncio.wait_for returned the wake-up and swallowed the poller's cancellation, so
    # stop() waited on it forever and the server never stopped (SIGTERM hung until
    # SIGKILL).
    async def scenario():
        hub = WatchHub(pool, interval=30)
        await hub.start()
        stream = hub.watch(after_sequence=0, student_id=0, course_id=0)
        waiting = asyncio.create_task(stream.__anext__())
        await asyncio.sleep(0.2)  # registered; the poller waits for a wake-up
        hub.wake()
        await asyncio.sleep(0)  # the wake-up is delivered: the poller's wait is done ...
        started = asyncio.get_running_loop().time()
        async with asyncio.timeout(5):
            await hub.stop()  # ... in the turn stop() cancels it (inline, no task between)
        took = asyncio.get_running_loop().time() - started
        assert took < 4, f"stop() waited {took:.1f} s for the poller"
        with pytest.raises(ShuttingDown):
            await waiting

    asyncio.run(scenario())
