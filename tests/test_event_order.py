"""The change feed's ordering guarantee, attacked: once any reader has seen sequence N,
no event with a sequence of N or less appears later.

Many writers on a 2-worker server while readers poll ListEvents in a tight loop; every
poll re-reads a window below its cursor, so an event that commits late below a sequence
already seen is caught there, and afterwards each reader's union must equal the table.
On PostgreSQL and MariaDB a trigger (made by the test, in the test's own database)
sleeps inside every transaction that writes an event for one marked student, after its
events are numbered and before it commits: the out-of-order commit case, forced.
"""

from __future__ import annotations

import random
import threading
import time

import grpc
import pytest

from enrollment.v1 import enrollment_pb2 as pb
from enrollment.v1 import enrollment_pb2_grpc as pb_grpc
from tests import databases, servers
from tests.rpc import TIMEOUT

WRITERS = 8
READERS = 3
SECONDS = 5.0
WINDOW = 300  # how far below its cursor each poll looks again
HOLD = 0.5  # seconds the marked writer's numbered transaction stays open

SLOW_TRIGGER = {
    "postgresql": [
        "CREATE FUNCTION hold_before_commit() RETURNS trigger AS $$ BEGIN "
        "IF NEW.student_id = {marked} THEN PERFORM pg_sleep({hold}); END IF; "
        "RETURN NEW; END $$ LANGUAGE plpgsql",
        "CREATE TRIGGER hold_before_commit AFTER INSERT ON events FOR EACH ROW "
        "EXECUTE FUNCTION hold_before_commit()",
    ],
    "mysql": [
        "CREATE TRIGGER hold_before_commit AFTER INSERT ON events FOR EACH ROW BEGIN "
        "IF NEW.student_id = {marked} THEN DO SLEEP({hold}); END IF; END",
    ],
}


def _stub(address: str):
    channel = grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
    grpc.channel_ready_future(channel).result(timeout=20)
    return channel, pb_grpc.EnrollmentServiceStub(channel)


class Reader(threading.Thread):
    def __init__(self, address: str, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.address, self.stop = address, stop
        self.seen: set[int] = set()
        self.last = 0
        self.late: list[tuple[int, int]] = []  # (sequence that appeared, highest seen before)
        self.polls = 0
        self.error: BaseException | None = None

    def poll(self, stub) -> int:
        after = max(0, self.last - WINDOW)
        page = stub.ListEvents(
            pb.ListEventsRequest(after_sequence=after, page_size=1000), timeout=TIMEOUT
        )
        self.polls += 1
        fresh = 0
        for event in page.events:
            n = event.sequence
            if n in self.seen:
                continue
            if n <= self.last:
                self.late.append((n, self.last))
            self.seen.add(n)
            fresh += 1
        if page.events:
            self.last = max(self.last, page.events[-1].sequence)
        return fresh

    def run(self) -> None:
        channel, stub = _stub(self.address)
        try:
            while not self.stop.is_set():
                self.poll(stub)
            while self.poll(stub) or self.last < self.final_head(stub):
                pass
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            channel.close()

    @staticmethod
    def final_head(stub) -> int:
        return stub.ListEvents(pb.ListEventsRequest(page_size=1), timeout=TIMEOUT).head_sequence


def _writer(address: str, students, courses, stop: threading.Event, counts: list[int]):
    channel, stub = _stub(address)
    rng = random.Random()
    try:
        while not stop.is_set():
            s, c = rng.choice(students), rng.choice(courses)
            try:
                stub.EnrollStudent(
                    pb.EnrollStudentRequest(student_id=s, course_id=c), timeout=TIMEOUT
                )
                stub.DropCourse(pb.DropCourseRequest(student_id=s, course_id=c), timeout=TIMEOUT)
                counts.append(2)
            except grpc.RpcError as error:
                # Two writers on one pair: the loser's call fails, which is fine here.
                assert error.code() in (
                    grpc.StatusCode.ALREADY_EXISTS,
                    grpc.StatusCode.NOT_FOUND,
                ), error
    finally:
        channel.close()


@pytest.mark.own_database
def test_no_reader_ever_sees_a_sequence_appear_below_one_it_saw(backend, db_url, tmp_path):
    server = servers.start(tmp_path / "server.log", "--database-url", db_url, "--workers", "2")
    address = server.address
    try:
        channel, stub = _stub(address)
        students = [
            stub.CreateStudent(
                pb.CreateStudentRequest(name=f"S{i}", email=f"s{i}@example.com"), timeout=TIMEOUT
            ).student.id
            for i in range(40)
        ]
        courses = [
            stub.CreateCourse(
                pb.CreateCourseRequest(code=f"C{i}", title="T"), timeout=TIMEOUT
            ).course.id
            for i in range(6)
        ]
        marked = students[0]
        if backend in SLOW_TRIGGER:
            with databases.connection(db_url) as db:
                for statement in SLOW_TRIGGER[backend]:
                    db.execute_sql(statement.format(marked=marked, hold=HOLD))
        stop, writers_done = threading.Event(), threading.Event()
        readers = [Reader(address, writers_done) for _ in range(READERS)]
        counts: list[int] = []
        writers = [
            # Writer 0 works only with the marked student: each of its transactions
            # stays open HOLD seconds after its events are numbered.
            threading.Thread(
                target=_writer,
                args=(address, [marked] if i == 0 else students[1:], courses, stop, counts),
                daemon=True,
            )
            for i in range(WRITERS)
        ]
        for thread in (*readers, *writers):
            thread.start()
        time.sleep(SECONDS)
        stop.set()
        for thread in writers:
            thread.join(60)
        writers_done.set()  # then the readers catch up with the table and stop
        for thread in readers:
            thread.join(60)
        channel.close()
    finally:
        server.stop()

    table = {row[0] for row in databases.query(db_url, "SELECT sequence FROM events")}
    marked_events = databases.query(
        db_url, "SELECT COUNT(*) FROM events WHERE student_id = ?", (marked,)
    )[0][0]
    assert sum(counts) > 50 and marked_events >= 2, (sum(counts), marked_events)
    for reader in readers:
        assert reader.error is None, reader.error
        assert reader.polls > 10
        assert reader.late == [], f"appeared below a sequence already seen: {reader.late[:5]}"
        assert reader.seen == table, f"missed {sorted(table - reader.seen)[:10]}"
