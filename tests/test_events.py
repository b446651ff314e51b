"""The change feed through ListEvents: exactly the contract's events with their snapshots
for every change, none for failed calls or updates that change nothing, causes before
effects, paging, filters, head_sequence, EVENTS_EXPIRED after a purge."""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import hashlib
import sqlite3
import time

import grpc
import pytest
from google.protobuf import field_mask_pb2

from enrollment.server.domain import events as domain_events
from enrollment.server.startup.config import parse_duration
from enrollment.v1 import enrollment_pb2 as pb
from tests import databases
from tests.rpc import TIMEOUT, expect_error, new_student

E = pb.EventType
INVALID = grpc.StatusCode.INVALID_ARGUMENT
ENROLLED, WAITLISTED = pb.ENROLLMENT_STATE_ENROLLED, pb.ENROLLMENT_STATE_WAITLISTED


def feed(stub, after=0, **filters) -> list[pb.Event]:
    """Every event after `after`, walking pages of 7."""
    found: list[pb.Event] = []
    while True:
        page = stub.ListEvents(
            pb.ListEventsRequest(after_sequence=after, page_size=7, **filters), timeout=TIMEOUT
        )
        found += page.events
        if not page.events:
            return found
        after = page.events[-1].sequence


def head(stub) -> int:
    return stub.ListEvents(pb.ListEventsRequest(), timeout=TIMEOUT).head_sequence


def kinds(events) -> list[tuple[str, int, int]]:
    return [(E.Name(e.type).removeprefix("EVENT_TYPE_"), e.student_id, e.course_id) for e in events]


def course(stub, capacity=0, waitlist=0, code="C-1") -> pb.Course:
    request = pb.CreateCourseRequest(
        code=code, title="Feed", capacity=capacity, waitlist_capacity=waitlist
    )
    return stub.CreateCourse(request, timeout=TIMEOUT).course


def enroll(stub, student_id, course_id, wait=False, request_id=None):
    request = pb.EnrollStudentRequest(
        student_id=student_id, course_id=course_id, waitlist_if_full=wait
    )
    metadata = (("x-request-id", request_id),) if request_id else None
    return stub.EnrollStudent(request, timeout=TIMEOUT, metadata=metadata).enrollment


def drop(stub, student_id, course_id):
    request = pb.DropCourseRequest(student_id=student_id, course_id=course_id)
    return stub.DropCourse(request, timeout=TIMEOUT)


def test_every_change_emits_the_contracts_events_with_snapshots(stub):
    a, b, c = (new_student(stub, name=n) for n in ("Ada", "Bo", "Cy"))
    cs = course(stub, capacity=1, waitlist=2)
    start = head(stub)
    enroll(stub, a.id, cs.id, request_id="req-enroll-a")
    enroll(stub, b.id, cs.id, wait=True)
    enroll(stub, c.id, cs.id, wait=True)
    promoted = drop(stub, a.id, cs.id).promoted
    assert promoted.student_id == b.id

    got = feed(stub, after=start)
    assert kinds(got) == [
        ("ENROLLED", a.id, cs.id),
        ("WAITLISTED", b.id, cs.id),
        ("WAITLISTED", c.id, cs.id),
        ("DROPPED", a.id, cs.id),
        ("PROMOTED", b.id, cs.id),
    ]
    sequences = [e.sequence for e in got]
    assert sequences == list(range(start + 1, start + 6)), "no gaps without a purge"
    enrolled, wait_b, wait_c, dropped, promoted_event = got
    assert enrolled.request_id == "req-enroll-a" and enrolled.actor == ""
    assert enrolled.enrollment.state == ENROLLED and enrolled.course.enrolled_count == 1
    assert not enrolled.HasField("student")
    assert (wait_b.enrollment.state, wait_b.enrollment.waitlist_position) == (WAITLISTED, 1)
    assert (wait_c.enrollment.waitlist_position, wait_c.course.waitlisted_count) == (2, 2)
    # DROPPED holds the entry before; both events of the call show the course after it.
    assert dropped.enrollment.state == ENROLLED
    assert dropped.enrollment.enroll_time == enrolled.enrollment.enroll_time
    assert promoted_event.enrollment == promoted
    for event in (dropped, promoted_event):
        assert (event.course.enrolled_count, event.course.waitlisted_count) == (1, 1)
    # A made-up x-request-id for calls that sent none, one per call.
    assert dropped.request_id and dropped.request_id == promoted_event.request_id
    assert wait_b.request_id != wait_c.request_id
    assert all(e.event_time.seconds > 0 for e in got)


def test_creates_updates_and_deletes(stub):
    start = head(stub)
    s = new_student(stub, name="Ann", email="ann@example.com")
    cs = course(stub, capacity=3)
    student = pb.Student(id=s.id, name="Anne")
    stub.UpdateStudent(
        pb.UpdateStudentRequest(
            student=student, update_mask=field_mask_pb2.FieldMask(paths=["name"])
        ),
        timeout=TIMEOUT,
    )
    # An update that changes nothing emits nothing.
    stub.UpdateStudent(
        pb.UpdateStudentRequest(
            student=student, update_mask=field_mask_pb2.FieldMask(paths=["name"])
        ),
        timeout=TIMEOUT,
    )
    updated = stub.UpdateCourse(
        pb.UpdateCourseRequest(
            course=pb.Course(id=cs.id, title="Feeds"),
            update_mask=field_mask_pb2.FieldMask(paths=["title"]),
        ),
        timeout=TIMEOUT,
    ).course
    stub.DeleteStudent(pb.DeleteStudentRequest(student_id=s.id), timeout=TIMEOUT)
    stub.DeleteCourse(pb.DeleteCourseRequest(course_id=cs.id), timeout=TIMEOUT)
    got = feed(stub, after=start)
    assert kinds(got) == [
        ("STUDENT_CREATED", s.id, 0),
        ("COURSE_CREATED", 0, cs.id),
        ("STUDENT_UPDATED", s.id, 0),
        ("COURSE_UPDATED", 0, cs.id),
        ("STUDENT_DELETED", s.id, 0),
        ("COURSE_DELETED", 0, cs.id),
    ]
    created, course_created, student_updated, course_updated, deleted, course_deleted = got
    assert created.student == s and not created.HasField("course")
    assert course_created.course == cs and not course_created.HasField("student")
    assert student_updated.student.name == "Anne" and student_updated.student.etag != s.etag
    assert course_updated.course == updated
    assert deleted.student == student_updated.student
    assert course_deleted.course == updated
    assert not any(e.HasField("enrollment") for e in got)


def test_forced_deletes_drop_and_promote_per_entry_before_the_delete(stub):
    a, b, c, d = (new_student(stub) for _ in range(4))
    one = course(stub, capacity=1, waitlist=2, code="ONE")
    two = course(stub, capacity=0, code="TWO")
    enroll(stub, a.id, one.id)
    enroll(stub, b.id, one.id, wait=True)
    enroll(stub, c.id, one.id, wait=True)
    enroll(stub, a.id, two.id)
    enroll(stub, d.id, two.id)
    start = head(stub)
    stub.DeleteStudent(pb.DeleteStudentRequest(student_id=a.id, force=True), timeout=TIMEOUT)
    got = feed(stub, after=start)
    assert kinds(got) == [
        ("DROPPED", a.id, one.id),
        ("PROMOTED", b.id, one.id),
        ("DROPPED", a.id, two.id),
        ("STUDENT_DELETED", a.id, 0),
    ]
    assert got[1].course.waitlisted_count == 1 and got[1].enrollment.state == ENROLLED

    start = head(stub)
    stub.DeleteCourse(pb.DeleteCourseRequest(course_id=one.id, force=True), timeout=TIMEOUT)
    got = feed(stub, after=start)
    # The waitlist first (in line), then the roster; nobody promoted; counts 0 after.
    assert kinds(got) == [
        ("DROPPED", c.id, one.id),
        ("DROPPED", b.id, one.id),
        ("COURSE_DELETED", 0, one.id),
    ]
    assert (got[0].enrollment.state, got[0].enrollment.waitlist_position) == (WAITLISTED, 1)
    assert got[1].enrollment.state == ENROLLED
    for event in got:
        assert (event.course.enrolled_count, event.course.waitlisted_count) == (0, 0)


def test_a_forced_delete_of_a_large_course_writes_every_event(live):
    """More events than SQLite binds in one statement (32766 values in its default
    build): the outbox inserts them in chunks, numbered without a gap."""
    big = course(live.stub, capacity=0, code="BIG")
    roster = 1200  # three INSERTs of the outbox (INSERT_ROWS each at most)
    if databases.kind_of(live.database_url) == "sqlite":
        # Above what this SQLite binds in one statement (the server runs the same one);
        # PostgreSQL's and MariaDB's drivers put the values in the SQL text themselves.
        limit = sqlite3.connect(":memory:").getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
        roster = limit // 8 + 1
    with databases.connection(live.database_url) as db, db.atomic():
        mark = db.param
        first = databases.sql(db, "SELECT COALESCE(MAX(id), 0) FROM students")[0][0] + 1
        for n in range(first, first + roster):
            db.execute_sql(
                f"INSERT INTO students (id, name, email, email_key, create_time) "
                f"VALUES ({mark}, {mark}, {mark}, {mark}, {mark})",
                (n, "R", f"r{n}@x.io", f"r{n}@x.io", "2026-01-01 00:00:00"),
            )
            db.execute_sql(
                f"INSERT INTO student_courses (student_id, course_id, enroll_time) "
                f"VALUES ({mark}, {mark}, {mark})",
                (n, big.id, "2026-01-01 00:00:00"),
            )
        db.execute_sql(
            f"UPDATE courses SET enrolled_count = {mark} WHERE id = {mark}", (roster, big.id)
        )
    start = head(live.stub)
    live.stub.DeleteCourse(pb.DeleteCourseRequest(course_id=big.id, force=True), timeout=60)
    got = databases.query(
        live.database_url,
        "SELECT sequence, type, student_id FROM events WHERE sequence > ? ORDER BY sequence",
        (start,),
    )
    assert [row[0] for row in got] == list(range(start + 1, start + roster + 2))
    assert [row[1] for row in got] == [E.EVENT_TYPE_DROPPED] * roster + [
        E.EVENT_TYPE_COURSE_DELETED
    ]
    assert sorted(row[2] for row in got[:-1]) == list(range(first, first + roster))
    assert head(live.stub) == start + roster + 1


def test_course_updated_comes_before_the_promotions_it_causes(stub):
    cs = course(stub, capacity=1, waitlist=3)
    people = [new_student(stub) for _ in range(4)]
    enroll(stub, people[0].id, cs.id)
    for p in people[1:]:
        enroll(stub, p.id, cs.id, wait=True)
    start = head(stub)
    stub.UpdateCourse(
        pb.UpdateCourseRequest(
            course=pb.Course(id=cs.id, capacity=3),
            update_mask=field_mask_pb2.FieldMask(paths=["capacity"]),
        ),
        timeout=TIMEOUT,
    )
    got = feed(stub, after=start)
    assert kinds(got) == [
        ("COURSE_UPDATED", 0, cs.id),
        ("PROMOTED", people[1].id, cs.id),
        ("PROMOTED", people[2].id, cs.id),
    ]
    for event in got:
        assert (event.course.capacity, event.course.enrolled_count) == (3, 3)
        assert event.course.waitlisted_count == 1


def test_failed_calls_emit_nothing(stub, live):
    a, b = new_student(stub), new_student(stub)
    cs = course(stub, capacity=1)
    enroll(stub, a.id, cs.id)
    before = head(stub)
    count = databases.sql_count(live.database_url, "events")
    failing = [
        (stub.EnrollStudent, pb.EnrollStudentRequest(student_id=b.id, course_id=cs.id)),
        (stub.EnrollStudent, pb.EnrollStudentRequest(student_id=a.id, course_id=cs.id)),
        (stub.CreateStudent, pb.CreateStudentRequest(name="X", email=a.email)),
        (stub.CreateCourse, pb.CreateCourseRequest(code="C-1", title="again")),
        (stub.DropCourse, pb.DropCourseRequest(student_id=b.id, course_id=cs.id)),
        (stub.DeleteCourse, pb.DeleteCourseRequest(course_id=cs.id)),
        (
            stub.UpdateCourse,
            pb.UpdateCourseRequest(
                course=pb.Course(id=cs.id, capacity=0, title="T", etag="stale"),
                update_mask=field_mask_pb2.FieldMask(paths=["title"]),
            ),
        ),
    ]
    for method, request in failing:
        with pytest.raises(grpc.RpcError):
            method(request, timeout=TIMEOUT)
    assert head(stub) == before
    assert databases.sql_count(live.database_url, "events") == count


def test_paging_filters_and_head(stub):
    a, b = new_student(stub), new_student(stub)
    x, y = course(stub, code="X"), course(stub, code="Y")
    for s in (a, b):
        for c in (x, y):
            enroll(stub, s.id, c.id)
    everything = feed(stub)
    assert len(everything) == 2 + 2 + 4
    assert [e.sequence for e in everything] == sorted({e.sequence for e in everything})
    top = head(stub)
    assert top == everything[-1].sequence
    assert kinds(feed(stub, student_id=a.id)) == [
        ("STUDENT_CREATED", a.id, 0), ("ENROLLED", a.id, x.id), ("ENROLLED", a.id, y.id)
    ]  # fmt: skip
    assert kinds(feed(stub, course_id=y.id)) == [
        ("COURSE_CREATED", 0, y.id), ("ENROLLED", a.id, y.id), ("ENROLLED", b.id, y.id)
    ]  # fmt: skip
    assert kinds(feed(stub, student_id=b.id, course_id=x.id)) == [("ENROLLED", b.id, x.id)]
    # A filter naming nothing is no error.
    assert feed(stub, student_id=10**12) == []
    # page_size: 0 means 100, above 1000 means 1000; head_sequence on every page.
    page = stub.ListEvents(pb.ListEventsRequest(page_size=3), timeout=TIMEOUT)
    assert [e.sequence for e in page.events] == [e.sequence for e in everything[:3]]
    assert page.head_sequence == top
    page = stub.ListEvents(pb.ListEventsRequest(after_sequence=top), timeout=TIMEOUT)
    assert (list(page.events), page.head_sequence) == ([], top)
    for size in (0, 5000):
        page = stub.ListEvents(pb.ListEventsRequest(page_size=size), timeout=TIMEOUT)
        assert len(page.events) == len(everything)


def test_page_size_defaults_to_100_and_caps_at_1000(stub, live):
    databases.insert_events(live.database_url, 1200)
    assert len(stub.ListEvents(pb.ListEventsRequest(), timeout=TIMEOUT).events) == 100
    big = stub.ListEvents(pb.ListEventsRequest(page_size=5000), timeout=TIMEOUT)
    assert len(big.events) == 1000 and big.head_sequence == 1200


def test_bad_requests(stub):
    expect_error(
        stub.ListEvents,
        pb.ListEventsRequest(after_sequence=-1, page_size=-1, student_id=-2, course_id=-3),
        INVALID,
        "INVALID_FIELD",
        fields=["after_sequence", "page_size", "student_id", "course_id"],
    )


def test_events_expired_after_a_purge(stub, live):
    people = [new_student(stub) for _ in range(5)]
    everything = feed(stub)
    assert len(everything) == 5
    # The first three made old, then purged in batches of 2 by the server's own purge
    # (purge_oldest, one batch a call) on a thread of its pool, as its purger runs them
    # (it runs in this process; on PostgreSQL and MariaDB those threads keep the
    # pool's connections).
    databases.age_events(live.database_url, through=everything[2].sequence, days=10)
    pool = live.running.pool
    assert pool is not None
    purged = [pool.call(domain_events.purge_oldest, dt.timedelta(days=1), 2) for _ in range(3)]
    assert purged == [2, 1, 0]
    third = everything[2].sequence
    # Before the highest purged sequence: some events after the cursor are gone.
    for after in (1, third - 1):
        got = expect_error(
            stub.ListEvents,
            pb.ListEventsRequest(after_sequence=after),
            grpc.StatusCode.OUT_OF_RANGE,
            "EVENTS_EXPIRED",
        )
        assert got.metadata["purged_sequence"] == str(third)
    # At it, or 0 (from the oldest kept): nothing lost.
    assert [e.sequence for e in feed(stub, after=third)] == [e.sequence for e in everything[3:]]
    assert [e.student.id for e in feed(stub)] == [p.id for p in people[3:]]


def test_actor_is_the_tokens_name(start_server, tmp_path):
    token = "feed-admin-token"
    path = tmp_path / "tokens.txt"
    path.write_text(f"{hashlib.sha256(token.encode()).hexdigest()} admin registrar\n")
    live = start_server(auth_tokens=str(path))
    metadata = (("authorization", f"Bearer {token}"),)
    live.stub.CreateStudent(
        pb.CreateStudentRequest(name="Tok", email="tok@example.com"),
        timeout=TIMEOUT,
        metadata=metadata,
    )
    page = live.stub.ListEvents(pb.ListEventsRequest(), timeout=TIMEOUT, metadata=metadata)
    assert [e.actor for e in page.events] == ["registrar"]


def test_the_server_purges_events_older_than_its_retention(start_server):
    # With --pool-size at --threads, and every thread keeping its connection between
    # calls (PostgreSQL and MariaDB), the purge still gets one: it runs on those threads.
    live = start_server(event_retention=1.0, threads=2)
    for _ in range(3):
        new_student(live.stub)
    first = feed(live.stub)
    assert len(first) == 3
    with concurrent.futures.ThreadPoolExecutor(8) as calls:  # both threads busy at once
        list(calls.map(lambda _: feed(live.stub), range(16)))
    deadline = time.monotonic() + 15
    while feed(live.stub) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert feed(live.stub) == []  # 0: from the oldest kept, never expired
    expect_error(
        live.stub.ListEvents,
        pb.ListEventsRequest(after_sequence=first[0].sequence),
        grpc.StatusCode.OUT_OF_RANGE,
        "EVENTS_EXPIRED",
    )
    # A consumer that had seen everything loses nothing.
    assert feed(live.stub, after=first[-1].sequence) == []
    assert head(live.stub) == first[-1].sequence


@pytest.mark.parametrize(
    ("text", "seconds"), [("30d", 2592000), ("12h", 43200), ("90m", 5400), ("45s", 45), ("7", 7)]
)
def test_retention_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "-1d", "1w", "forever", "1.5.h"])
def test_bad_retention_durations(text):
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)
