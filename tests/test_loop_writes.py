"""SQLite writes on the event loop (transport/interceptors.py, LoopWrites): they give way
to another process's lock instead of holding the loop, take turns with the writer
thread in arrival order, and stop running there when they hold the loop too long."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram

from enrollment.server.callstate import WouldWait
from enrollment.server.domain import events
from enrollment.server.errors import EnrollmentError, InvalidField
from enrollment.server.persistence import engine, unit_of_work
from enrollment.server.persistence.models import Student, proxy
from enrollment.server.transport import interceptors
from enrollment.server.transport.interceptors import LoopWrites
from enrollment.v1 import enrollment_pb2 as pb
from tests import databases
from tests.rpc import TIMEOUT, new_student
from tests.test_limits import enroll_behind_the_lock


@pytest.mark.databases("sqlite")
def test_a_write_that_finds_the_file_locked_does_not_hold_the_loop(start_server):
    """Another process holds the file's write lock: EnrollStudent (a write run on the
    loop when it can) goes to the writer thread to wait, and the loop goes on answering
    reads meanwhile; the write is done once the lock is released."""
    live = start_server(database_timeout=30)
    course, student, blocker, waiting, _ = enroll_behind_the_lock(live, 5, 60)
    try:
        for _ in range(3):  # reads on the loop: answered while the write waits
            started = time.monotonic()
            found = live.stub.GetStudent(pb.GetStudentRequest(student_id=student.id), timeout=5)
            assert found.student.id == student.id
            assert time.monotonic() - started < 2.5
        assert not waiting.done()
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert waiting.result(timeout=TIMEOUT).enrollment.course_id == course.id
    seat = live.stub.GetCourse(pb.GetCourseRequest(course_id=course.id), timeout=TIMEOUT)
    assert seat.course.enrolled_count == 1
    # The lock is free again: the next write runs on the loop and is done too.
    other = new_student(live.stub)
    live.stub.EnrollStudent(
        pb.EnrollStudentRequest(student_id=other.id, course_id=course.id), timeout=TIMEOUT
    )


def test_the_loop_waits_for_the_writer_lock_in_line_with_threads():
    """A coroutine waiting for the lock takes its turn after the thread that asked
    before it and before the one that asked after it; one cancelled while it waits
    leaves the line, and one cancelled as the lock reaches it passes the lock on."""
    lock = unit_of_work.FairLock()
    order: list[str] = []
    lock.acquire()

    def thread_turn(name: str) -> threading.Thread:
        def take() -> None:
            with lock:
                order.append(name)

        thread = threading.Thread(target=take)
        queued = len(lock._waiters)
        thread.start()
        while len(lock._waiters) == queued:
            time.sleep(0.001)
        return thread

    async def main() -> None:
        first = thread_turn("thread 1")

        async def loop_turn() -> None:
            await lock.acquire_on_loop()
            order.append("loop")
            lock.release()

        mine = asyncio.create_task(loop_turn())
        gone = asyncio.create_task(lock.acquire_on_loop())
        while len(lock._waiters) < 3:
            await asyncio.sleep(0.001)
        gone.cancel()  # leaves the line before its turn
        await asyncio.gather(gone, return_exceptions=True)
        assert len(lock._waiters) == 2
        second = thread_turn("thread 2")
        lock.release()
        await mine
        for thread in (first, second):
            await asyncio.to_thread(thread.join, 5)

        # Handed over just as its wait is cancelled: the lock goes on to the next one.
        lock.acquire()
        late = asyncio.create_task(lock.acquire_on_loop())
        while not lock._waiters:
            await asyncio.sleep(0.001)
        third = thread_turn("thread 3")
        lock.release()  # the coroutine's turn, not yet resumed...
        late.cancel()  # ...when it is cancelled
        await asyncio.gather(late, return_exceptions=True)
        await asyncio.to_thread(third.join, 5)
        assert not third.is_alive()

    asyncio.run(main())
    assert order == ["thread 1", "loop", "thread 2", "thread 3"]
    assert lock.acquire(timeout=0)  # free at the end
    lock.release()


class _Turn:
    """LoopWrites' lock, without a database: counts its uses."""

    def __init__(self) -> None:
        self.entered = 0

    async def __aenter__(self) -> None:
        self.entered += 1

    async def __aexit__(self, *exc: object) -> None:
        return None

    def run(self, fn, *args):
        return fn(*args)


class _Work:
    """contextvars.Context's run, for calls that take a while or would wait."""

    def run(self, fn, *args):
        return fn(*args)


def test_writes_that_hold_the_loop_too_long_on_average_go_to_the_writer_thread():
    writes = LoopWrites(_Turn(), budget=0.002, pause=60)
    now = 1000.0
    for _ in range(20):
        writes.held(0.0005, now)
    writes.held(0.012, now)  # one slow write among fast ones: still here
    assert 0 < writes.average < 0.002
    for _ in range(20):
        writes.held(0.0005, now)
    # However slow: a 25 ms fsync under the mixed mix's load once paused the loop's
    # writes for a second of the writer thread's dearer ones.
    writes.held(0.025, now)
    assert 0 < writes.average < 0.002
    for _ in range(20):
        writes.held(0.0005, now)
    writes.held(1.0, now)
    assert 0 < writes.average < 0.002
    assert asyncio.run(writes.run(_Work(), _Call(lambda: "ran"), None, None)) == "ran"
    for _ in range(10):
        writes.held(0.004, time.monotonic())  # a slow disk: they all take long
    turn = writes.turn
    before = turn.entered
    assert asyncio.run(writes.run(_Work(), _Call(lambda: "ran"), None, None)) is None
    assert turn.entered == before  # paused: not tried on the loop at all


def test_the_pauses_are_counted():
    registry = CollectorRegistry()
    pauses = Counter("pauses", "", registry=registry)
    sizes = Histogram("sizes", "", registry=registry)
    writes = LoopWrites(_Turn(), budget=0.002, pause=60, metrics=(sizes, pauses))
    for _ in range(10):
        writes.held(0.0005, time.monotonic())
    assert registry.get_sample_value("pauses_total") == 0
    for _ in range(10):
        writes.held(0.004, time.monotonic())  # a slow disk
    # Once: after a pause the average starts afresh.
    assert registry.get_sample_value("pauses_total") == 1


class _Clock:
    """interceptors' time for one test: a write's computing moves the wall clock and
    the thread's CPU clock together, its waiting only the wall clock."""

    def __init__(self) -> None:
        self.wall = self.cpu = 1000.0

    def monotonic(self) -> float:
        return self.wall

    def thread_time(self) -> float:
        return self.cpu

    def computes(self, seconds: float) -> str:
        self.wall += seconds
        self.cpu += seconds
        return "ran"

    def waits(self, seconds: float) -> str:
        self.wall += seconds
        return "ran"


def test_only_what_a_write_makes_the_loop_wait_counts_against_the_budget(monkeypatch):
    """The writer thread would not give the loop back a write's CPU (its Python holds
    the GIL): writes that compute for 5 ms each stay on the loop; writes that wait
    5 ms each (an fsync, say) go to the writer thread.

    On the machine's own clocks the computing writes were sent away too whenever other
    processes took the core from them (a test suite beside, on 2 cores): that time
    counts as waiting, as it should. The clocks here are the test's, so that the test
    says what the budget counts, whatever else runs."""
    clock = _Clock()
    monkeypatch.setattr(interceptors, "time", clock)
    writes = LoopWrites(_Turn(), budget=0.002, pause=60)

    def run(fn):
        return asyncio.run(writes.run(_Work(), _Call(fn), None, None))

    ran = [run(lambda: clock.computes(0.005)) for _ in range(30)]
    assert ran == ["ran"] * 30
    ran = [run(lambda: clock.waits(0.005)) for _ in range(30)]
    assert ran[0] == "ran" and ran[-1] is None


def test_a_write_that_would_wait_is_handed_on_and_the_pause_ends():
    writes = LoopWrites(_Turn(), budget=0.002, pause=0.05)

    def would_wait():
        raise WouldWait

    assert asyncio.run(writes.run(_Work(), _Call(would_wait), None, None)) is None
    for _ in range(3):
        writes.held(0.03, time.monotonic())
    assert asyncio.run(writes.run(_Work(), _Call(lambda: "ran"), None, None)) is None
    time.sleep(0.1)
    assert asyncio.run(writes.run(_Work(), _Call(lambda: "ran"), None, None)) == "ran"


class _Call:
    def __init__(self, fn) -> None:
        self.fn = fn

    def run(self, request, state):
        return self.fn()


def test_the_loop_writes_are_those_of_a_few_rows():
    from enrollment.server.startup.server import READS_ON_LOOP, WRITES_ON_LOOP

    assert {"EnrollStudent", "DropCourse"} <= WRITES_ON_LOOP
    assert not any(name.startswith(("Batch", "Delete")) for name in WRITES_ON_LOOP)
    assert not WRITES_ON_LOOP & READS_ON_LOOP


def test_a_write_that_gives_way_leaves_no_failed_transaction_span():
    """With tracing on, a loop write that gives way (WouldWait) is marked so, not failed;
    a transaction that fails still is."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import StatusCode

    from enrollment.server.operations import tracing

    exported = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    tracer = provider.get_tracer("test")
    spans = tracing._TransactionSpans(tracer)
    with tracer.start_as_current_span("call"):
        with pytest.raises(WouldWait), spans.span("enroll_student", True, 1):
            raise WouldWait
        with pytest.raises(ValueError), spans.span("enroll_student", True, 1):
            raise ValueError("a bug")
    gave_way, failed = [s for s in exported.get_finished_spans() if s.name != "call"]
    assert gave_way.attributes["enrollment.db.gave_way"] is True
    assert gave_way.status.status_code is StatusCode.UNSET
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.attributes["error.type"] == "ValueError"


# ------------------------------------------------------------------------ group commit


class _Member:
    """A write for LoopWrites' groups: attempt() runs fn in a unit of work of its own (a
    savepoint of the group's transaction when grouped); finish() is recorded."""

    trailer = (("x-request-id", "test"),)

    def __init__(self, fn, seen: list) -> None:
        self.fn, self.seen = fn, seen

    def attempt(self, request, state):
        @unit_of_work.transactional(write=True)
        def work():
            return self.fn()

        try:
            response = work()
        except EnrollmentError as error:
            self.seen.append(("failed", error.code))
            return self.failed(error)
        self.seen.append(("ran", response))
        return response, None, "OK", ""

    def failed(self, error):
        return None, ("status", error.code), error.code, error.reason

    def run(self, request, state):
        response, status, code, reason = self.attempt(request, state)
        self.finish(code, reason)
        return response, status

    def finish(self, code: str, reason: str) -> None:
        self.seen.append(("finished", code))


def _insert(name: str):
    def insert() -> str:
        proxy.obj.execute_sql(
            "INSERT INTO students (name, email, email_key, create_time) "
            "VALUES (?, ?, ?, '2026-11-30 00:00:00')",
            (name, f"{name}@x.test", f"{name}@x.test"),
        )
        return name

    return insert


def _names(url: str) -> list[str]:
    return [row[0] for row in databases.query(url, "SELECT name FROM students ORDER BY id")]


def _kinds(statements: list[str]) -> list[str]:
    """Each statement's first word (BEGIN, SAVEPOINT, COMMIT...), PRAGMAs left out."""
    return [s.split()[0].upper() for s in statements if not s.startswith("PRAGMA")]


def _together(
    db_url: str,
    members: list[_Member],
    statements: list[str] | None = None,
    turns: list[int] | None = None,
) -> list:
    """The members' writes queued in one turn of the loop (or each after its number of
    turns), the loop thread keeping its connection as the server's does; their answers
    (statements: SQLite's, as run)."""
    db = engine.open_pool(db_url, max_connections=2)
    if statements is not None:
        hooks = db._add_conn_hooks

        def traced(connection):
            hooks(connection)
            connection.set_trace_callback(statements.append)

        db._add_conn_hooks = traced

    async def arrive(writes: LoopWrites, member: _Member, after: int):
        for _ in range(after):
            await asyncio.sleep(0)
        return await writes.run(_Work(), member, None, None)

    async def main():
        writes = LoopWrites(unit_of_work.LoopTurn())
        with unit_of_work.connection_kept():
            return await asyncio.gather(
                *(
                    arrive(writes, member, turns[index] if turns else 0)
                    for index, member in enumerate(members)
                )
            )

    try:
        return asyncio.run(main())
    finally:
        engine.close_pool()


@pytest.mark.databases("sqlite")
def test_writes_queued_together_commit_together_and_are_answered_after_the_commit(db_url):
    seen: list = []
    statements: list[str] = []
    members = [_Member(_insert(f"s{i}"), seen) for i in range(3)]
    answers = _together(db_url, members, statements)
    assert answers == [(f"s{i}", None) for i in range(3)]
    # One transaction, each write a savepoint in it; all answered after its COMMIT.
    kinds = _kinds(statements)
    assert kinds.count("BEGIN") == 1 and kinds.count("COMMIT") == 1
    assert kinds.count("SAVEPOINT") == 3 and kinds[-1] == "COMMIT"
    assert [kind for kind, _ in seen] == ["ran"] * 3 + ["finished"] * 3
    assert _names(db_url) == ["s0", "s1", "s2"]


@pytest.mark.databases("sqlite")
def test_writes_a_few_turns_behind_the_first_join_its_group(db_url):
    """Under load the next calls' requests are still being read when the first write
    queues: the group lets the loop run what is due first, and they join it."""
    seen: list = []
    statements: list[str] = []
    members = [_Member(_insert(f"s{i}"), seen) for i in range(4)]
    answers = _together(db_url, members, statements, turns=[0, 1, 3, 6])
    assert answers == [(f"s{i}", None) for i in range(4)]
    kinds = _kinds(statements)
    assert kinds.count("BEGIN") == 1 and kinds.count("COMMIT") == 1, kinds
    assert _names(db_url) == ["s0", "s1", "s2", "s3"]


@pytest.mark.databases("sqlite")
def test_a_group_waits_for_the_loop_at_most_turns_turns(db_url):
    """A write TURNS / 2 turns behind joins the group; one 2 × TURNS turns behind comes
    too late, though the loop had something due all along (its own wait)."""
    for behind, groups in ((LoopWrites.TURNS // 2, 1), (2 * LoopWrites.TURNS, 2)):
        seen: list = []
        statements: list[str] = []
        names = [f"b{behind}-{i}" for i in range(2)]
        members = [_Member(_insert(name), seen) for name in names]
        answers = _together(db_url, members, statements, turns=[0, behind])
        assert answers == [(name, None) for name in names]
        kinds = _kinds(statements)
        assert kinds.count("BEGIN") == kinds.count("COMMIT") == groups, (behind, kinds)


@pytest.mark.databases("sqlite")
def test_a_group_takes_at_most_max_group_writes(db_url):
    seen: list = []
    statements: list[str] = []
    members = [_Member(_insert(f"s{i}"), seen) for i in range(LoopWrites.MAX_GROUP + 1)]
    answers = _together(db_url, members, statements)
    assert answers == [(f"s{i}", None) for i in range(LoopWrites.MAX_GROUP + 1)]
    kinds = _kinds(statements)
    assert kinds.count("COMMIT") == 2
    # The first MAX_GROUP are savepoints of one transaction; the last runs alone, without.
    assert kinds.count("SAVEPOINT") == LoopWrites.MAX_GROUP
    assert _names(db_url) == [f"s{i}" for i in range(LoopWrites.MAX_GROUP + 1)]


@pytest.mark.databases("sqlite")
def test_a_write_that_fails_in_a_group_rolls_back_alone(db_url):
    def insert_then_fail():
        _insert("lost")()
        raise InvalidField("no")

    seen: list = []
    members = [_Member(f, seen) for f in (_insert("a"), insert_then_fail, _insert("b"))]
    answers = _together(db_url, members)
    assert answers == [("a", None), (None, ("status", "INVALID_ARGUMENT")), ("b", None)]
    assert _names(db_url) == ["a", "b"]


@pytest.mark.databases("sqlite")
def test_a_group_whose_commit_fails_fails_every_write_and_commits_none(db_url):
    """SQLite checks deferred foreign keys at COMMIT: one write's dangling reference
    makes the group's COMMIT fail. No write of it is answered as done."""

    def dangling():
        proxy.obj.execute_sql("PRAGMA defer_foreign_keys = ON")
        proxy.obj.execute_sql(
            "INSERT INTO student_courses (student_id, course_id, enroll_time) "
            "VALUES (999, 999, '2026-11-30 00:00:00')"
        )
        return "dangling"

    seen: list = []
    members = [_Member(f, seen) for f in (_insert("a"), dangling, _insert("b"))]
    answers = _together(db_url, members)
    assert all(response is None and status is not None for response, status in answers)
    assert [code for kind, code in seen if kind == "finished"] == ["INTERNAL"] * 3
    assert _names(db_url) == []
    assert databases.query(db_url, "SELECT count(*) FROM student_courses") == [(0,)]


def _recorded(name: str, then_fail: bool = False):
    """A student inserted with its STUDENT_CREATED event recorded (then an error)."""

    def insert() -> str:
        _insert(name)()
        events.student_created(Student.get(Student.name == name))
        if then_fail:
            raise InvalidField("no")
        return name

    return insert


@pytest.mark.databases("sqlite")
def test_a_group_numbers_and_inserts_its_members_events_at_once(db_url):
    """The events of a group's writes go in with one counter raise and one INSERT
    before its COMMIT, numbered in the members' order; a member that failed has none."""
    seen: list = []
    statements: list[str] = []
    members = [
        _Member(f, seen)
        for f in (_recorded("a"), _recorded("lost", then_fail=True), _recorded("b"))
    ]
    answers = _together(db_url, members, statements)
    assert answers == [("a", None), (None, ("status", "INVALID_ARGUMENT")), ("b", None)]
    counter = [s for s in statements if s.upper().startswith("UPDATE") and "event_counters" in s]
    inserts = [s for s in statements if s.upper().startswith('INSERT INTO "EVENTS"')]
    assert len(counter) == 1 and len(inserts) == 1, statements
    # After every member's work, and just before the COMMIT.
    students = [i for i, s in enumerate(statements) if s.startswith("INSERT INTO students")]
    assert statements.index(counter[0]) > students[-1]
    assert statements[statements.index(inserts[0]) + 1 :] == ["COMMIT"]
    rows = databases.query(db_url, "SELECT sequence, payload FROM events ORDER BY sequence")
    assert [sequence for sequence, _ in rows] == [1, 2]
    assert ['"name":"a"' in rows[0][1], '"name":"b"' in rows[1][1]] == [True, True]
    assert databases.query(db_url, "SELECT value FROM event_counters") == [(2,)]
    assert _names(db_url) == ["a", "b"]
