"""An event's payload text: the snapshot templates of server/domain/events.py write
exactly what json.dumps(..., separators=(",", ":")) writes for the same snapshot dicts
(the text the feed stored before the templates, and what readers parse)."""

from __future__ import annotations

import datetime as dt
import json
import random
from types import SimpleNamespace

from enrollment.server.domain import events
from enrollment.server.domain.enrollments import Entry
from enrollment.server.persistence import outbox

# Quotes, backslashes, control characters, non-ASCII and astral characters, and JSON-ish
# text, each of which json.dumps escapes or keeps in its own way.
_PIECES = [
    '"',
    "\\",
    "\n",
    "\t",
    "\x00",
    "\x1f",
    "\x7f",
    "é",
    "Ω",
    "中",
    "😀",
    "</",
    "{}",
    " ",
    "a",
]


def _text(rng: random.Random) -> str:
    return "".join(rng.choice(_PIECES) for _ in range(rng.randrange(0, 12)))


def _time(rng: random.Random, *, nullable: bool = False) -> dt.datetime | None:
    if nullable and rng.random() < 0.3:
        return None
    value = dt.datetime(1, 1, 1) + dt.timedelta(microseconds=rng.randrange(315_537_897_600_000_000))
    return value.replace(microsecond=0) if rng.random() < 0.2 else value  # no fraction shown


def _dumps(payload: dict) -> str:
    return json.dumps(payload, separators=(",", ":"))


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def test_student_snapshots_are_json_dumps_text():
    rng = random.Random(7)
    for _ in range(2000):
        row = SimpleNamespace(
            id=rng.randrange(1, 2**62), name=_text(rng), email=_text(rng),
            create_time=_time(rng), update_time=_time(rng, nullable=True),
            version=rng.randrange(1, 2**31),
        )  # fmt: skip
        expected = {
            "id": row.id, "name": row.name, "email": row.email,
            "create_time": _iso(row.create_time),
            "update_time": _iso(row.update_time or row.create_time), "version": row.version,
        }  # fmt: skip
        assert events._student(row) == _dumps(expected)
        assert json.loads(events._student(row)) == expected


def test_course_and_entry_snapshots_are_json_dumps_text():
    rng = random.Random(8)
    for _ in range(2000):
        row = SimpleNamespace(
            id=rng.randrange(1, 2**62), code=_text(rng), title=_text(rng),
            capacity=rng.randrange(0, 10**6), waitlist_capacity=rng.randrange(0, 10**6),
            create_time=_time(rng), update_time=_time(rng, nullable=True),
            version=rng.randrange(1, 2**31),
        )  # fmt: skip
        enrolled, waitlisted = rng.randrange(0, 10**6), rng.randrange(0, 10**6)
        course = {
            "id": row.id, "code": row.code, "title": row.title, "capacity": row.capacity,
            "enrolled_count": enrolled, "waitlist_capacity": row.waitlist_capacity,
            "waitlisted_count": waitlisted, "create_time": _iso(row.create_time),
            "update_time": _iso(row.update_time or row.create_time), "version": row.version,
        }  # fmt: skip
        assert events._course(row, enrolled, waitlisted) == _dumps(course)
        entry = Entry(
            student_id=rng.randrange(1, 2**62), course_id=row.id, state=rng.choice((1, 2)),
            waitlist_position=rng.randrange(0, 100), create_time=_time(rng),
            enroll_time=_time(rng, nullable=True),
        )  # fmt: skip
        enrollment = {
            "student_id": entry.student_id, "course_id": entry.course_id, "state": entry.state,
            "waitlist_position": entry.waitlist_position,
            "create_time": _iso(entry.create_time), "enroll_time": _iso(entry.enroll_time),
        }  # fmt: skip
        assert events._entry(entry) == _dumps(enrollment)


def test_the_recorded_events_payloads_are_their_snapshots():
    """What the recorders hand the outbox (through finish(), as a write's flush does): an
    entry's event is the entry then the course after the call, a course's the course."""
    when = dt.datetime(2026, 12, 1, 8, 0, 0, 250000)
    row = SimpleNamespace(
        id=2, code='CS "101"', title="Intro", capacity=30, enrolled_count=7,
        waitlist_capacity=5, waitlisted_count=1, create_time=when, update_time=None, version=3,
    )  # fmt: skip
    entry = Entry(
        student_id=1, course_id=2, state=1, waitlist_position=0, create_time=when,
        enroll_time=when,
    )  # fmt: skip
    token = outbox.begin()
    try:
        events.entry_changed(events.ENROLLED, entry)
        events.course_after(row, enrolled=1, waitlisted=0)
        events.course_deleted(row, emptied=True)
        rows = outbox.take()
    finally:
        outbox.end(token)
    stamp = when.isoformat()
    course = {
        "id": 2, "code": 'CS "101"', "title": "Intro", "capacity": 30, "enrolled_count": 8,
        "waitlist_capacity": 5, "waitlisted_count": 1, "create_time": stamp,
        "update_time": stamp, "version": 3,
    }  # fmt: skip
    gone = {**course, "enrolled_count": 0, "waitlisted_count": 0}
    enrollment = {
        "student_id": 1, "course_id": 2, "state": 1, "waitlist_position": 0,
        "create_time": stamp, "enroll_time": stamp,
    }  # fmt: skip
    # A course deleted in the call shows its last snapshot in every event of the call.
    assert [(r.type, r.student_id, r.course_id, r.payload) for r in rows] == [
        (events.ENROLLED, 1, 2, _dumps({"enrollment": enrollment, "course": gone})),
        (events.COURSE_DELETED, 0, 2, _dumps({"course": gone})),
    ]
