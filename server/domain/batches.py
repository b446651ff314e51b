"""Batches (AIP-233 style): up to 1000 enrolls or drops, in order, in one transaction.

Set-based, so that a batch of 1000 holds its locks (SQLite's write lock, the course
rows elsewhere) for a few statements, not a few per item:
1. lock: the courses a batch touches in ascending id order, one statement (the one
   global order: two batches, or a batch and single calls, which lock one course,
   never wait for each other in a cycle); its students, share-locked, one statement;
2. read: the existing entries of its pairs (and the waitlists a drop may promote
   from), one statement each;
3. decide: each item in order, in memory, by the same rules and in the same order of
   checks as EnrollStudent and DropCourse (tests/test_batches.py holds a batch to
   what its items do one by one); its events recorded as it is decided;
4. write: what changed, in a few statements: the new entries in one INSERT, the
   dropped ones in one DELETE, the promoted ones in one UPDATE, the courses' counts in
   one UPDATE.
All or nothing: the first failing item fails the call before anything is written.
Partial success: a failing item is left out, the others are written.

The rows read under the locks cannot change before the commit: every writer of a
course's entries locks its row first (enrollments.py), and a student cannot be
deleted while the batch shares its row.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import cast

import peewee as pw

from enrollment.server.domain import events
from enrollment.server.domain.enrollments import Entry, stored_entry
from enrollment.server.domain.retries import checked, mutation
from enrollment.server.domain.validation import Fields
from enrollment.server.errors import (
    AlreadyEnrolled,
    AlreadyWaitlisted,
    CourseFull,
    EnrollmentError,
    FieldViolation,
    InvalidField,
    NotEnrolled,
    StudentNotFound,
    UnknownCourseArgument,
    WaitlistFull,
    in_batch,
)
from enrollment.server.persistence.bulk import ids_in, insert_rows, pairs_in
from enrollment.server.persistence.models import (
    ENROLLED,
    WAITLISTED,
    Course,
    Student,
    StudentCourse,
    utcnow,
)
from enrollment.server.persistence.unit_of_work import locking, sharing

MAX_ITEMS = 1000


@dataclass(frozen=True)
class Item:
    """One EnrollStudentRequest or DropCourseRequest of a batch."""

    student_id: int
    course_id: int
    waitlist_if_full: bool = False
    request_id: str = ""


@dataclass(frozen=True)
class Outcome:
    """An item's result: entry (enrolled or waitlisted; for a drop, who was promoted,
    if anyone) when it was applied, else error (fields prefixed "requests[i].")."""

    entry: Entry | None = None
    error: EnrollmentError | None = None


@dataclass(frozen=True)
class _Row:
    """An entry as stored (the columns a batch reads and writes)."""

    state: int
    join_number: int
    enroll_time: dt.datetime
    promote_time: dt.datetime | None = None


@dataclass
class _Course:
    """A locked course's capacities and counts, moved as the items are decided."""

    capacity: int
    waitlist_capacity: int
    enrolled: int
    waitlisted: int
    joins: int
    # Its waiting students in line order (read only when a drop may need it).
    line: list[int] = field(default_factory=list)
    read: tuple[int, int, int] = (0, 0, 0)  # the counts as read

    def counts(self) -> tuple[int, int, int]:
        return self.enrolled, self.waitlisted, self.joins


Pair = tuple[int, int]  # (student_id, course_id)


@dataclass
class _Batch:
    """What the batch read under its locks, and the state its items have made so far."""

    courses: dict[int, _Course]
    students: set[int]
    now: dt.datetime
    rows: dict[Pair, _Row | None]  # every pair read or touched: its entry now
    before: dict[Pair, _Row | None]  # the same pairs as read

    def set(self, pair: Pair, row: _Row | None) -> None:
        self.before.setdefault(pair, self.rows.get(pair))
        self.rows[pair] = row


@mutation
def batch_enroll(*, items: list[Item], allow_partial_success: bool) -> list[Outcome]:
    return _run(items, allow_partial_success, _enroll, waitlists=False)


@mutation
def batch_drop(*, items: list[Item], allow_partial_success: bool) -> list[Outcome]:
    return _run(items, allow_partial_success, _drop, waitlists=True)


def _enroll(item: Item, batch: _Batch) -> Entry:
    """EnrollStudent's rules (enrollments.join): a seat when one is free, else a place
    on the waitlist when asked for and there is room."""
    course = _course_and_student(item, batch)
    pair = (item.student_id, item.course_id)
    found = batch.rows.get(pair)
    if found is not None:
        if found.state == WAITLISTED:
            raise AlreadyWaitlisted.of(*pair)
        raise AlreadyEnrolled.of(*pair)
    now = batch.now
    if course.capacity == 0 or course.enrolled < course.capacity:
        course.enrolled += 1
        batch.set(pair, _Row(ENROLLED, 0, now))
        entry = Entry(item.student_id, item.course_id, ENROLLED, 0, now, now)
        events.entry_changed(events.ENROLLED, entry)
        return entry
    if not item.waitlist_if_full or course.waitlist_capacity == 0:
        raise CourseFull.of(item.course_id, course.capacity)
    if course.waitlisted >= course.waitlist_capacity:
        raise WaitlistFull.of(item.course_id, course.waitlist_capacity)
    course.waitlisted += 1
    course.joins += 1
    course.line.append(item.student_id)
    batch.set(pair, _Row(WAITLISTED, course.joins, now))
    # Everyone waiting joined before: the newcomer is last in line.
    entry = Entry(item.student_id, item.course_id, WAITLISTED, course.waitlisted, now, None)
    events.entry_changed(events.WAITLISTED, entry)
    return entry


def _drop(item: Item, batch: _Batch) -> Entry | None:
    """DropCourse's rules (enrollments.drop_entry and promote_next): a freed seat goes
    to position 1 of the waitlist; returns who was promoted."""
    course = _course_and_student(item, batch)
    pair = (item.student_id, item.course_id)
    row = batch.rows.get(pair)
    if row is None:
        raise NotEnrolled.of(*pair)
    batch.set(pair, None)
    if row.state == WAITLISTED:
        position = course.line.index(item.student_id) + 1
        course.line.remove(item.student_id)
        course.waitlisted -= 1
        events.entry_changed(events.DROPPED, _entry(pair, row, position))
        return None
    events.entry_changed(events.DROPPED, _entry(pair, row))
    course.enrolled -= 1
    if not course.line:
        return None
    # Nobody waits while a seat is free: the seat just freed is the first in line's.
    first = (course.line.pop(0), item.course_id)
    waited = batch.rows[first]
    assert waited is not None
    promoted = replace(waited, state=ENROLLED, join_number=0, promote_time=batch.now)
    batch.set(first, promoted)
    course.waitlisted -= 1
    course.enrolled += 1
    entry = _entry(first, promoted)
    events.entry_changed(events.PROMOTED, entry)
    return entry


def _entry(pair: Pair, row: _Row, position: int = 0) -> Entry:
    return stored_entry(*pair, row.state, row.enroll_time, row.promote_time, position)


def _course_and_student(item: Item, batch: _Batch) -> _Course:
    """The existence checks of EnrollStudent/DropCourse, in their order, against the
    rows read under the batch's locks."""
    course = batch.courses.get(item.course_id)
    if course is None:
        raise UnknownCourseArgument.of(item.course_id)
    if item.student_id not in batch.students:
        raise StudentNotFound.of(item.student_id)
    return course


def _item_violations(item: Item) -> list[FieldViolation]:
    fields = Fields()
    fields.required_id("student_id", item.student_id)
    fields.required_id("course_id", item.course_id)
    return fields.violations


def _run(
    items: list[Item],
    partial: bool,
    apply: Callable[[Item, _Batch], Entry | None],
    *,
    waitlists: bool,
) -> list[Outcome]:
    fields = Fields()
    if not 1 <= len(items) <= MAX_ITEMS:
        fields.invalid("requests", f"must hold 1 to {MAX_ITEMS} requests, not {len(items)}")
    # Malformed ids are INVALID_FIELD before anything else: of the call when all or
    # nothing, else of the item. An item's own request_id fails the call in either mode.
    # The call's violations are listed in item order, "index" the first failing item.
    malformed: dict[int, InvalidField] = {}
    for i, item in enumerate(items[:MAX_ITEMS]):
        violations = _item_violations(item)
        if violations:
            malformed[i] = in_batch(InvalidField.of(violations), i, call=False)
            if not partial:
                fields.violations.extend(malformed[i].violations)
        if item.request_id:
            fields.invalid(
                f"requests[{i}].request_id",
                "must be empty: the batch's own request_id covers its items",
            )
        if item.request_id or (violations and not partial):
            fields.metadata.setdefault("index", str(i))
    checked(fields)

    batch = _read([item for i, item in enumerate(items) if i not in malformed], waitlists)
    outcomes: list[Outcome] = []
    for i, item in enumerate(items):
        if i in malformed:
            outcomes.append(Outcome(error=malformed[i]))
            continue
        try:
            entry = apply(item, batch)
        except EnrollmentError as exc:
            if not partial:
                raise in_batch(exc, i, call=True) from None
            outcomes.append(Outcome(error=in_batch(exc, i, call=False)))
        else:
            outcomes.append(Outcome(entry=entry))
    _write(batch)
    return outcomes


def _read(items: list[Item], waitlists: bool) -> _Batch:
    """Every course of the batch locked in ascending id order (one statement), then its
    students that exist, share-locked (a student deleted before is missing here; a
    delete after waits for the batch); then the entries of its pairs, and with
    waitlists the waiting entries of its courses where anyone waits."""
    course_ids = sorted({item.course_id for item in items})
    student_ids = sorted({item.student_id for item in items})
    courses: dict[int, _Course] = {}
    if course_ids:
        query = Course.select().where(ids_in(Course.id, course_ids)).order_by(Course.id)
        for c in locking(query):
            counts = (c.enrolled_count, c.waitlisted_count, c.waitlist_joins)
            courses[c.id] = _Course(c.capacity, c.waitlist_capacity, *counts, read=counts)
    students: set[int] = set()
    if student_ids:
        known = Student.select(Student.id).where(ids_in(Student.id, student_ids))
        students = {student_id for (student_id,) in sharing(known).tuples()}
    pairs = {
        (item.student_id, item.course_id)
        for item in items
        if item.course_id in courses and item.student_id in students
    }
    rows: dict[Pair, _Row | None] = {}
    wanted: pw.ColumnBase | None = _pairs_condition(pairs)
    if waitlists:
        waiting = [course_id for course_id, c in courses.items() if c.waitlisted]
        if waiting:
            line = ids_in(StudentCourse.course, waiting) & (StudentCourse.state == WAITLISTED)
            wanted = line if wanted is None else (wanted | line)
    if wanted is not None:
        entries = StudentCourse.select(
            StudentCourse.student, StudentCourse.course, StudentCourse.state,
            StudentCourse.join_number, StudentCourse.enroll_time, StudentCourse.promote_time,
        ).where(wanted).order_by(StudentCourse.course, StudentCourse.join_number)  # fmt: skip
        found = cast(
            Iterable[tuple[int, int, int, int, dt.datetime, dt.datetime | None]], entries.tuples()
        )
        for student_id, course_id, state, join_number, enroll_time, promote_time in found:
            rows[(student_id, course_id)] = _Row(state, join_number, enroll_time, promote_time)
            if state == WAITLISTED and waitlists:
                courses[course_id].line.append(student_id)
    return _Batch(courses, students, utcnow(), rows, {})


def _pairs_condition(pairs: Iterable[Pair]) -> pw.SQL | None:
    """WHERE the entry is one of pairs (student_id, course_id)."""
    by_course = ((course_id, student_id) for student_id, course_id in pairs)
    return pairs_in(StudentCourse.course, StudentCourse.student, by_course)


def _write(batch: _Batch) -> None:
    """What the items changed, against what was read: a few statements in all."""
    inserted, deleted, promoted = [], [], []
    for pair, old in batch.before.items():
        new = batch.rows[pair]
        if old is None and new is not None:
            inserted.append((pair, new))
        elif old is not None and new is None:
            deleted.append(pair)
        elif old != new:
            # A waiting entry promoted (the only change a batch makes to a kept entry).
            assert old is not None and new is not None and new.state == ENROLLED
            promoted.append(pair)
    if deleted:
        StudentCourse.delete().where(_pairs_condition(deleted)).execute()
    if promoted:
        StudentCourse.update(state=ENROLLED, join_number=0, promote_time=batch.now).where(
            _pairs_condition(promoted)
        ).execute()
    columns = (
        StudentCourse.student, StudentCourse.course, StudentCourse.enroll_time,
        StudentCourse.state, StudentCourse.join_number,
    )  # fmt: skip
    insert_rows(
        StudentCourse,
        columns,
        [(*pair, row.enroll_time, row.state, row.join_number) for pair, row in sorted(inserted)],
    )
    _write_counts(batch)


def _write_counts(batch: _Batch) -> None:
    """The courses' new counts in one UPDATE (a CASE on the id per column)."""
    moved = {course_id: c for course_id, c in batch.courses.items() if c.counts() != c.read}
    if not moved:
        return
    columns: tuple[tuple[pw.Field, Callable[[_Course], int]], ...] = (
        (Course.enrolled_count, lambda c: c.enrolled),
        (Course.waitlisted_count, lambda c: c.waitlisted),
        (Course.waitlist_joins, lambda c: c.joins),
    )
    Course.update(
        {
            column: pw.Case(Course.id, [(course_id, value(c)) for course_id, c in moved.items()])
            for column, value in columns
        }
    ).where(ids_in(Course.id, sorted(moved))).execute()
