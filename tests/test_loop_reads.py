"""PostgreSQL's one-statement reads driven by the event loop (persistence/loop_reads.py):
on the loop's own asynchronous connections, failing as a unit of work's reads fail."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from enrollment.server.errors import CallEnded, DatabaseUnavailable
from enrollment.server.persistence import engine
from enrollment.server.persistence.loop_reads import LoopReads
from enrollment.server.persistence.models import proxy
from enrollment.server.persistence.steps import Steps
from enrollment.server.startup.config import ServerConfig
from enrollment.server.startup.server import create_server
from enrollment.v1 import enrollment_pb2 as pb
from enrollment.v1 import enrollment_pb2_grpc as pb_grpc
from tests import databases
from tests.rpc import expect_error, new_course, new_student

pytestmark = pytest.mark.databases("postgresql")


class Raw:
    """A statement of the test's own, as the loop's driver takes a Prepared query."""

    def __init__(self, sql: str) -> None:
        self.sql = sql

    def statement(self, values: tuple) -> tuple[str, tuple]:
        return self.sql, values

    def made(self, fetched: list[tuple]) -> list[tuple]:
        return fetched


def one(sql: str, *values) -> Steps[list[tuple]]:
    found: list[tuple] = yield (Raw(sql), values)  # type: ignore[misc]
    return found


def always() -> bool:
    return True


def backend_pids(url: str) -> set[int]:
    """The server's connections to url's database, but this query's own."""
    name = url.rsplit("/", 1)[-1].split("?")[0]
    found = databases.query(
        url,
        "SELECT pid FROM pg_stat_activity WHERE datname = ? AND pid <> pg_backend_pid()"
        " AND application_name = 'enrollment'",
        (name,),
    )
    return {pid for (pid,) in found}


@pytest.fixture
def pool(db_url):
    """The serving pool's database (the loop's reads take its driver parameters)."""
    db = engine.open_pool(db_url, max_connections=2, timeout=2, statement_timeout=0.5)
    try:
        yield db
    finally:
        engine.close_pool()


def run(coroutine_of):
    """Run coroutine_of(reads_factory) on a fresh loop; the LoopReads made are closed."""
    made: list[LoopReads] = []

    def reads(size: int = 1, wait: float = 2.0) -> LoopReads:
        made.append(LoopReads(proxy.obj, size, wait=wait))
        return made[-1]

    async def main():
        try:
            return await coroutine_of(reads)
        finally:
            for each in made:
                each.close()

    return asyncio.run(main())


def test_a_read_runs_on_one_of_the_loops_connections_and_gives_it_back(pool, db_url):
    async def reads_twice(reads):
        loop_reads = reads(size=2)
        first = await loop_reads.run(lambda: one("SELECT %s + 1", 41), always)
        # 16 at once on two connections: they take turns, and every answer is its own.
        answers = await asyncio.gather(
            *(loop_reads.run(lambda i=i: one("SELECT %s * 2", i), always) for i in range(16))
        )
        pids = await asyncio.gather(
            *(loop_reads.run(lambda: one("SELECT pg_backend_pid()"), always) for _ in range(16))
        )
        mine = {p[0][0] for p in pids}
        return first, answers, loop_reads.open_connections(), mine, backend_pids(db_url)

    first, answers, opened, pids, named = run(reads_twice)
    assert first == [(42,)]
    assert answers == [[(i * 2,)] for i in range(16)]
    # Never more than two (a second one is opened while reads wait for the first).
    assert 1 <= opened <= 2 and 1 <= len(pids) <= 2
    # The loop's connections are named as the pool's are (application_name).
    assert pids <= named


def test_a_read_found_dead_by_its_statement_runs_again_on_a_new_connection(pool, db_url):
    """The database dropped the connection while it was idle, and the loop has not yet
    seen it go: the read's statement finds it, and the read runs once more."""

    async def read_after_the_kill(reads):
        loop_reads = reads(size=1)
        [(pid,)] = await loop_reads.run(lambda: one("SELECT pg_backend_pid()"), always)
        # Blocking, on purpose: the loop gets no turn to see the socket close before
        # the next read sends its statement on it.
        databases.query(db_url, "SELECT pg_terminate_backend(?)", (pid,))
        deadline = time.monotonic() + 5
        while pid in backend_pids(db_url) and time.monotonic() < deadline:
            time.sleep(0.02)
        [(now,)] = await loop_reads.run(lambda: one("SELECT pg_backend_pid()"), always)
        return pid, now, loop_reads.open_connections()

    pid, now, opened = run(read_after_the_kill)
    assert now != pid and opened == 1


def test_a_new_connection_that_fails_is_unavailable_and_the_next_read_recovers(pool, db_url):
    async def lost_twice(reads):
        loop_reads = reads(size=1)
        # A connection that never answered before: lost, it is not run again.
        got = []
        for _ in range(2):
            read = asyncio.ensure_future(loop_reads.run(lambda: one("SELECT pg_sleep(5)"), always))
            deadline = time.monotonic() + 5
            while not backend_pids(db_url) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.1)
            databases.query(
                db_url,
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = 'enrollment' AND pid <> pg_backend_pid()",
            )
            try:
                got.append(await read)
            except DatabaseUnavailable as exc:
                got.append(exc)
        after = await loop_reads.run(lambda: one("SELECT 3"), always)
        return got, after

    got, after = run(lost_twice)
    assert all(isinstance(each, DatabaseUnavailable) for each in got), got
    assert after == [(3,)]


def test_a_statement_over_its_time_limit_is_unavailable_and_the_connection_serves_on(pool, db_url):
    async def too_slow(reads):
        loop_reads = reads(size=1)
        pid = "SELECT pg_backend_pid()"
        [(before,)] = await loop_reads.run(lambda: one(pid), always)
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailable):
            await loop_reads.run(lambda: one("SELECT pg_sleep(3)"), always)
        took = time.monotonic() - started
        [(after,)] = await loop_reads.run(lambda: one(pid), always)
        return took, before, after

    took, before, after = run(too_slow)
    assert took < 2  # --database-timeout's statement_timeout (0.5 s here) ended it
    assert before == after  # the same connection


def test_a_cancelled_read_leaves_its_answer_to_be_thrown_away(pool, db_url):
    async def cancel_mid_statement(reads):
        loop_reads = reads(size=1)
        slow = asyncio.ensure_future(loop_reads.run(lambda: one("SELECT pg_sleep(0.3)"), always))
        await asyncio.sleep(0.1)
        slow.cancel()
        started = time.monotonic()
        # The one connection is busy until the cancelled statement's answer is read.
        got = await loop_reads.run(lambda: one("SELECT 5"), always)
        return got, time.monotonic() - started, slow.cancelled(), loop_reads.open_connections()

    got, waited, cancelled, opened = run(cancel_mid_statement)
    assert cancelled and got == [(5,)]
    assert 0.1 < waited < 2
    assert opened == 1


def test_a_read_that_waits_too_long_for_a_connection_is_unavailable(pool, db_url):
    async def all_busy(reads):
        loop_reads = reads(size=1, wait=0.2)
        slow = asyncio.ensure_future(loop_reads.run(lambda: one("SELECT pg_sleep(0.4)"), always))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailable):
            await loop_reads.run(lambda: one("SELECT 6"), always)
        waited = time.monotonic() - started
        await slow
        return waited, await loop_reads.run(lambda: one("SELECT 7"), always)

    waited, after = run(all_busy)
    assert 0.15 < waited < 0.39
    assert after == [(7,)]


def test_an_ended_call_starts_no_read_and_close_fails_those_waiting(pool, db_url):
    async def ended(reads):
        loop_reads = reads(size=1)
        with pytest.raises(CallEnded):
            await loop_reads.run(lambda: one("SELECT 8"), lambda: False)
        assert loop_reads.open_connections() == 0  # nothing was opened for it
        slow = asyncio.ensure_future(loop_reads.run(lambda: one("SELECT pg_sleep(5)"), always))
        waiting = asyncio.ensure_future(loop_reads.run(lambda: one("SELECT 9"), always))
        await asyncio.sleep(0.3)
        loop_reads.close()
        results = await asyncio.gather(slow, waiting, return_exceptions=True)
        await asyncio.sleep(0.2)
        return results, loop_reads.open_connections(), backend_pids(db_url)

    results, opened, pids = run(ended)
    assert all(isinstance(r, DatabaseUnavailable) for r in results), results
    assert opened == 0
    deadline = time.monotonic() + 5
    while pids and time.monotonic() < deadline:  # the backend ends its sleep's session
        time.sleep(0.1)
        pids = backend_pids(db_url)
    assert not pids


def test_the_server_answers_postgresql_reads_on_the_loop_within_its_pool_size(db_url):
    """Served in this process: the four reads go to the loop's connections (two, beyond
    --threads' by default; --pool-size counts them), their answers and errors as the
    pool's path gives them."""
    config = ServerConfig(database_url=db_url, address="127.0.0.1:0", threads=2)
    assert config.connections == 4 and config.loop_read_connections == 2
    running = create_server(config)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.EnrollmentServiceStub(channel)
            student, course = new_student(stub), new_course(stub, capacity=3)
            stub.EnrollStudent(pb.EnrollStudentRequest(student_id=student.id, course_id=course.id))
            assert running.loop_reads is not None
            assert running.loop_reads.open_connections() == 0  # no read yet
            got = stub.GetStudent(pb.GetStudentRequest(student_id=student.id))
            assert (
                got.student == stub.GetStudent(pb.GetStudentRequest(student_id=student.id)).student
            )
            assert got.student.email == student.email
            assert stub.GetCourse(pb.GetCourseRequest(course_id=course.id)).course.id == course.id
            roster = stub.ListStudents(pb.ListStudentsRequest(course_id=course.id))
            assert [s.id for s in roster.students] == [student.id]
            mine = stub.ListCourses(pb.ListCoursesRequest(student_id=student.id))
            assert [c.id for c in mine.courses] == [course.id]
            assert 1 <= running.loop_reads.open_connections() <= 2
            expect_error(
                stub.GetStudent,
                pb.GetStudentRequest(student_id=student.id + 1000),
                grpc.StatusCode.NOT_FOUND,
                "STUDENT_NOT_FOUND",
            )
            expect_error(
                stub.ListCourses,
                pb.ListCoursesRequest(student_id=student.id + 1000),
                grpc.StatusCode.NOT_FOUND,
                "STUDENT_NOT_FOUND",
            )
            expect_error(
                stub.ListStudents,
                pb.ListStudentsRequest(page_token="not a token"),
                grpc.StatusCode.INVALID_ARGUMENT,
                "INVALID_FIELD",
                ["page_token"],
            )
            # Within --pool-size: the threads' and the loop's, no more.
            assert len(backend_pids(db_url)) <= config.connections
    finally:
        running.stop(None).wait(10)
        running.wait_idle()
        engine.close_pool()
    assert running.loop_reads.open_connections() == 0


def test_a_statement_the_driver_cannot_send_fails_alone_and_leaves_nothing_behind(pool, db_url):
    """A value the driver cannot adapt fails the read before anything is sent: its
    error goes up as it is (INTERNAL at the transport), the connection serves on, and
    no answer is left for nobody to read (asyncio would log it at collection)."""
    import gc

    import peewee as pw

    async def unsendable(reads):
        loop = asyncio.get_running_loop()
        unhandled: list[dict] = []
        loop.set_exception_handler(lambda _loop, context: unhandled.append(context))
        loop_reads = reads(size=1)
        with pytest.raises(pw.ProgrammingError):
            await loop_reads.run(lambda: one("SELECT %s", object()), always)
        gc.collect()
        await asyncio.sleep(0)
        return unhandled, await loop_reads.run(lambda: one("SELECT 10"), always)

    unhandled, after = run(unsendable)
    assert after == [(10,)]
    assert unhandled == []
