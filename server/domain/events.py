"""The change feed: what each kind of change records, and reading it back.

The functions that make a change (students, courses, enrollments) call one recorder
each; the events are held by the unit of work and written, numbered, just before it
commits (persistence/outbox.py says why numbering waits until then). A call that fails
rolls back, and its events with it. Course snapshots show the counts after the whole
call: read when the call ends, or, for EnrollStudent and DropCourse, made from the row
read under its lock plus what the call moved (course_after); student and enrollment
snapshots are taken when recorded (a DROPPED entry as it was just before).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from dataclasses import dataclass
from json import encoder as json_encoder
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from enrollment.server import callstate
from enrollment.server.domain.validation import Fields
from enrollment.server.errors import EventsExpired
from enrollment.server.persistence import outbox
from enrollment.server.persistence.models import (
    PURGED,
    SEQUENCE,
    Course,
    Event,
    EventCounter,
    Student,
    utcnow,
)
from enrollment.server.persistence.prepared import Prepared
from enrollment.server.persistence.unit_of_work import transactional

if TYPE_CHECKING:  # enrollments imports this module
    from enrollment.server.domain.enrollments import Entry

# An event's payload read back, and the snapshots in it.
Json = dict[str, Any]

# The proto's EventType numbers.
STUDENT_CREATED, STUDENT_UPDATED, STUDENT_DELETED = 1, 2, 3
COURSE_CREATED, COURSE_UPDATED, COURSE_DELETED = 4, 5, 6
ENROLLED, WAITLISTED, PROMOTED, DROPPED = 7, 8, 9, 10
_ENTRY_KINDS = frozenset({ENROLLED, WAITLISTED, PROMOTED, DROPPED})

# An event's payload is compact JSON ({"student": …}, {"course": …} or {"enrollment": …,
# "course": …}), written from one template per snapshot: the text json.dumps(payload,
# separators=(",", ":")) gives for the same dicts (tests/test_event_payloads.py holds
# them to it), for less CPU than the dicts and an encoder (`make bench-micro`'s parts
# table: "event snapshots + JSON"; bench/PROFILE.md, seventh session).
# Text goes through the encoder json.dumps uses for strings (escapes, non-ASCII as \u);
# a time's isoformat() has only digits, '-', ':', 'T' and '.', nothing to escape; the
# other values are non-null integer columns.
_json_string: Callable[[str], str] = json_encoder.encode_basestring_ascii


def _json_time(value: dt.datetime | None) -> str:
    return "null" if value is None else f'"{value.isoformat()}"'


_STUDENT_JSON = '{"id":%d,"name":%s,"email":%s,"create_time":%s,"update_time":%s,"version":%d}'
_COURSE_JSON = (
    '{"id":%d,"code":%s,"title":%s,"capacity":%d,"enrolled_count":%d,"waitlist_capacity":%d,'
    '"waitlisted_count":%d,"create_time":%s,"update_time":%s,"version":%d}'
)
_ENTRY_JSON = (
    '{"student_id":%d,"course_id":%d,"state":%d,"waitlist_position":%d,'
    '"create_time":%s,"enroll_time":%s}'
)

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


def _student(row: Student) -> str:
    return _STUDENT_JSON % (
        row.id,
        _json_string(row.name),
        _json_string(row.email),
        _json_time(row.create_time),
        _json_time(row.update_time or row.create_time),
        row.version,
    )


# A course's snapshot fields, read when the call ends (see _CallEvents.finish).
_COURSE_SNAPSHOT: Prepared[Course] = Prepared(
    lambda course_id: Course.select(
        Course.id,
        Course.code,
        Course.title,
        Course.capacity,
        Course.enrolled_count,
        Course.waitlist_capacity,
        Course.waitlisted_count,
        Course.create_time,
        Course.update_time,
        Course.version,
    ).where(Course.id == course_id),
    1,
    plain=True,
)


def _course(row: Course, enrolled_count: int, waitlisted_count: int) -> str:
    """The course's snapshot with these two counts (the rest as in row)."""
    return _COURSE_JSON % (
        row.id,
        _json_string(row.code),
        _json_string(row.title),
        row.capacity,
        enrolled_count,
        row.waitlist_capacity,
        waitlisted_count,
        _json_time(row.create_time),
        _json_time(row.update_time or row.create_time),
        row.version,
    )


def _entry(entry: Entry) -> str:
    return _ENTRY_JSON % (
        entry.student_id,
        entry.course_id,
        entry.state,
        entry.waitlist_position,
        _json_time(entry.create_time),
        _json_time(entry.enroll_time),
    )


class _CallEvents:
    """The events of one transaction, in the order recorded, until it ends. Each item's
    payload is complete for a student's event; a course's or an entry's ends where its
    course's snapshot goes, known only when the call ends."""

    def __init__(self) -> None:
        self.items: list[tuple[int, int, int, str]] = []
        self.gone_courses: dict[int, str] = {}  # deleted in this call: the last snapshot
        # Known without reading the row back (course_after); None: told twice, read it.
        self.known_courses: dict[int, str | None] = {}
        self.time = utcnow()

    def _course_at_end(self, course_id: int) -> str:
        snapshot = self.gone_courses.get(course_id) or self.known_courses.get(course_id)
        if snapshot is None:
            row = _COURSE_SNAPSHOT.first(course_id)
            if row is None:
                raise LookupError(f"course {course_id} of an event is gone without its snapshot")
            snapshot = _course(row, row.enrolled_count, row.waitlisted_count)
            self.known_courses[course_id] = snapshot  # read once for all its events
        return snapshot

    def finish(self) -> None:
        request_id, actor = callstate.caller()
        request_id, actor = request_id[:128], actor[:64]
        add, time = outbox.add, self.time
        for kind, student_id, course_id, payload in self.items:
            if kind > STUDENT_DELETED:
                payload = f"{payload}{self._course_at_end(course_id)}}}"
            add(outbox.Row(time, kind, student_id, course_id, payload, request_id, actor))


def _record(kind: int, student_id: int, course_id: int, payload: str) -> None:
    call = _current_call()
    call.items.append((kind, student_id, course_id, payload))


def _current_call() -> _CallEvents:
    holder = outbox.state()
    call = holder.get("events")
    if call is None:
        call = holder["events"] = _CallEvents()
        outbox.before_flush(call.finish)
    return call


# One recorder per kind of change, called by the one function that makes it.
def _student_event(kind: int, student: Student) -> None:
    _record(kind, student.id, 0, f'{{"student":{_student(student)}}}')


def student_created(student: Student) -> None:
    _student_event(STUDENT_CREATED, student)


def student_updated(student: Student) -> None:
    _student_event(STUDENT_UPDATED, student)


def student_deleted(student: Student) -> None:
    _student_event(STUDENT_DELETED, student)


_COURSE_ONLY = '{"course":'  # a course's event: its snapshot and "}" follow at the end


def course_created(course_id: int) -> None:
    _record(COURSE_CREATED, 0, course_id, _COURSE_ONLY)


def course_updated(course_id: int) -> None:
    _record(COURSE_UPDATED, 0, course_id, _COURSE_ONLY)


def course_deleted(course: Course, *, emptied: bool) -> None:
    """course: its row as read under the lock; emptied: its entries were dropped in this
    call (its counts are 0 at the end)."""
    enrolled, waitlisted = (0, 0) if emptied else (course.enrolled_count, course.waitlisted_count)
    _current_call().gone_courses[course.id] = _course(course, enrolled, waitlisted)
    _record(COURSE_DELETED, 0, course.id, _COURSE_ONLY)


def course_after(course: Course, *, enrolled: int, waitlisted: int) -> None:
    """The course's snapshot at the end of this call, known without reading its row back
    (one statement less per EnrollStudent and DropCourse): course is its row as read
    under the row lock this transaction holds, and enrolled/waitlisted how much this
    call moved its two counts, the only columns of the snapshot the caller changed.
    Told twice in one call for the same course, the row is read back after all."""
    calls = _current_call().known_courses
    if course.id in calls:
        calls[course.id] = None
        return
    calls[course.id] = _course(
        course, course.enrolled_count + enrolled, course.waitlisted_count + waitlisted
    )


def entry_changed(kind: int, entry: Entry) -> None:
    """ENROLLED, WAITLISTED, PROMOTED (the entry after) or DROPPED (the entry before)."""
    assert kind in _ENTRY_KINDS
    _record(kind, entry.student_id, entry.course_id, f'{{"enrollment":{_entry(entry)},"course":')


# ----------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class EventRecord:
    sequence: int
    event_time: dt.datetime
    type: int
    student_id: int
    course_id: int
    student: SimpleNamespace | None
    course: SimpleNamespace | None
    enrollment: SimpleNamespace | None
    request_id: str
    actor: str


@dataclass(frozen=True)
class EventPage:
    events: list[EventRecord]
    head_sequence: int


def _snapshot(data: Json | None) -> SimpleNamespace | None:
    if data is None:
        return None
    values = {
        key: dt.datetime.fromisoformat(value) if key.endswith("_time") and value else value
        for key, value in data.items()
    }
    return SimpleNamespace(**values)


def to_record(row: Event) -> EventRecord:
    payload = json.loads(row.payload)
    return EventRecord(
        sequence=row.sequence,
        event_time=row.event_time,
        type=row.type,
        student_id=row.student_id,
        course_id=row.course_id,
        student=_snapshot(payload.get("student")),
        course=_snapshot(payload.get("course")),
        enrollment=_snapshot(payload.get("enrollment")),
        request_id=row.request_id,
        actor=row.actor,
    )


def check_request(fields: Fields, *, after_sequence: int, student_id: int, course_id: int) -> None:
    if after_sequence < 0:
        fields.invalid("after_sequence", "must be 0 (from the oldest kept event) or more")
    fields.optional_id("student_id", student_id)
    fields.optional_id("course_id", course_id)


def counter(name: str) -> int:
    """A committed counter; one not made yet is 0."""
    found = EventCounter.select(EventCounter.value).where(EventCounter.name == name).tuples()
    return found[0][0] if found else 0


def check_not_expired(after_sequence: int) -> None:
    """0 means from the oldest kept; a positive cursor below the highest purged
    sequence has lost events. Read after the events: a purge committing in between
    makes the call fail, never lose an event silently."""
    if after_sequence > 0:
        purged = counter(PURGED)
        if after_sequence < purged:
            raise EventsExpired.of(after_sequence, purged)


def select_events(
    after_sequence: int, head: int, student_id: int, course_id: int, limit: int
) -> list[EventRecord]:
    query = Event.select().where((Event.sequence > after_sequence) & (Event.sequence <= head))
    if student_id:
        query = query.where(Event.student_id == student_id)
    if course_id:
        query = query.where(Event.course_id == course_id)
    return [to_record(row) for row in query.order_by(Event.sequence).limit(limit)]


@transactional(write=False)
def list_events(
    *, after_sequence: int, page_size: int, student_id: int, course_id: int
) -> EventPage:
    fields = Fields()
    check_request(fields, after_sequence=after_sequence, student_id=student_id, course_id=course_id)
    if page_size < 0:
        fields.invalid("page_size", "must be 0 (the default, 100) or more")
    fields.check()
    size = DEFAULT_PAGE_SIZE if page_size == 0 else min(page_size, MAX_PAGE_SIZE)
    # The head first: the events read after it are bounded by it, so every statement
    # (each its own snapshot under READ COMMITTED) agrees with the head returned.
    head = counter(SEQUENCE)
    found = select_events(after_sequence, head, student_id, course_id, size)
    check_not_expired(after_sequence)
    return EventPage(found, head)


PURGE_BATCH = 500


@transactional(write=True)
def purge_batch(*, older_than: dt.datetime, batch: int = PURGE_BATCH) -> int:
    """Delete up to `batch` of the oldest events made before older_than, in one short
    transaction of its own (writers wait for it at most that long, and only where they
    touch the same index pages); returns how many. It walks the primary key from the
    oldest, so it needs no index on event_time, and stops at the first event young
    enough to keep, so the kept events always follow the purged ones without a hole."""
    oldest = Event.select(Event.sequence, Event.event_time).order_by(Event.sequence).limit(batch)
    last = None
    for event in oldest:
        if event.event_time >= older_than:
            break
        last = event.sequence
    if last is None:
        return 0
    deleted: int = Event.delete().where(Event.sequence <= last).execute()
    outbox.set_at_least(PURGED, last)
    return deleted


def purge_oldest(retention: dt.timedelta, limit: int) -> int:
    """One batch: up to `limit` of the events older than retention; how many went."""
    return purge_batch(older_than=utcnow() - retention, batch=limit)


@transactional(write=False)
def read_after(after_sequence: int, limit: int) -> tuple[list[EventRecord], int]:
    """Every event after after_sequence (at most limit), unfiltered, and the head: the
    one query a process's watch poller makes per wake-up, on the primary key."""
    head = counter(SEQUENCE)
    return select_events(after_sequence, head, 0, 0, limit), head


def on_commit(listener: Callable[[], None]) -> None:
    """listener() after each local commit that wrote events (see outbox.on_commit)."""
    outbox.on_commit(listener)


def remove_listener(listener: Callable[[], None]) -> None:
    outbox.remove_listener(listener)
