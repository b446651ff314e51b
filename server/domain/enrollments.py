"""Enrollment rules: who may join, wait for or leave a course, with its counts kept exact.

Each kind of change a single call makes is made in one function here, so whatever
must go with a change (a change-feed event, say) is added in one place: join makes an
entry ENROLLED or WAITLISTED, promote_next promotes, drop_entry and drop_all_of_course
drop. Every one of them runs with the course's row locked (SELECT … FOR UPDATE; SQLite
has one writer), taken first by every writer of a course's entries, and moves the
counts by conditional UPDATEs whose row counts the database decides. Batches
(batches.py) apply the same rules to many items at once, set-based, under the same
locks; tests/test_batches.py holds them to what the items do one by one here.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import peewee as pw

from enrollment.server.domain import events, page_tokens
from enrollment.server.domain.lookups import course_or_none, find_course, find_student
from enrollment.server.domain.retries import checked, mutation
from enrollment.server.domain.validation import Fields
from enrollment.server.errors import (
    AlreadyEnrolled,
    AlreadyWaitlisted,
    CourseFull,
    CourseNotFound,
    NotEnrolled,
    UnknownCourseArgument,
    WaitlistFull,
)
from enrollment.server.persistence.models import (
    ENROLLED,
    WAITLISTED,
    Course,
    StudentCourse,
    utcnow,
)
from enrollment.server.persistence.prepared import Prepared, writes_return_rows
from enrollment.server.persistence.unit_of_work import statement_guard, transactional

STATES = (ENROLLED, WAITLISTED)


@dataclass(frozen=True)
class Entry:
    """One enrollment as the API shows it."""

    student_id: int
    course_id: int
    state: int
    waitlist_position: int  # 1 = next in line; 0 when enrolled
    create_time: dt.datetime
    enroll_time: dt.datetime | None  # when the seat was taken; None while waiting


def stored_entry(
    student_id: int,
    course_id: int,
    state: int,
    enroll_time: dt.datetime,
    promote_time: dt.datetime | None,
    position: int = 0,
) -> Entry:
    """A stored entry's columns as the API shows it (position: its place in line)."""
    enrolled = state == ENROLLED
    return Entry(
        student_id=student_id,
        course_id=course_id,
        state=state,
        waitlist_position=0 if enrolled else position,
        create_time=enroll_time,
        enroll_time=(promote_time or enroll_time) if enrolled else None,
    )


def _entry(row: StudentCourse, position: int = 0) -> Entry:
    return stored_entry(
        row.student_id, row.course_id, row.state, row.enroll_time, row.promote_time, position
    )


# A duplicate (enrolled or waiting) inserts nothing instead of failing, so no savepoint
# is needed for it even on PostgreSQL (ON CONFLICT DO NOTHING; INSERT OR IGNORE on
# SQLite, INSERT IGNORE on MariaDB, which also turns a missing student into no row).
_INSERT: Prepared[StudentCourse] = Prepared(
    lambda student_id, course_id, enroll_time: StudentCourse.insert(
        student=student_id, course=course_id, enroll_time=enroll_time
    ).on_conflict_ignore(),
    3,
)


def _taking_seat(course_id: int) -> pw.ModelUpdate:
    """One conditional UPDATE takes a seat; no row changed means the course is full."""
    return Course.update(enrolled_count=Course.enrolled_count + 1).where(
        (Course.id == course_id)
        & ((Course.capacity == 0) | (Course.enrolled_count < Course.capacity))
    )


_TAKE_SEAT: Prepared[Course] = Prepared(_taking_seat, 1)
# The same, giving back the course's row after it where the database runs UPDATE …
# RETURNING (prepared.writes_return_rows): no row means full or no such course.
_TAKE_SEAT_RETURNING: Prepared[Course] = Prepared(
    lambda course_id: _taking_seat(course_id).returning(*Course._meta.sorted_fields), 1
)
# And one takes a place on the waitlist, handing out the next join number.
_JOIN_WAITLIST: Prepared[Course] = Prepared(
    lambda course_id: Course.update(
        waitlisted_count=Course.waitlisted_count + 1, waitlist_joins=Course.waitlist_joins + 1
    ).where((Course.id == course_id) & (Course.waitlisted_count < Course.waitlist_capacity)),
    1,
)
_ENTRY: Prepared[StudentCourse] = Prepared(
    lambda student_id, course_id: StudentCourse.select().where(
        (StudentCourse.student == student_id) & (StudentCourse.course == course_id)
    ),
    2,
)
# Deletes the entry when it is (still) in the state given.
_DELETE: Prepared[StudentCourse] = Prepared(
    lambda student_id, course_id, state: StudentCourse.delete().where(
        (StudentCourse.student == student_id)
        & (StudentCourse.course == course_id)
        & (StudentCourse.state == state)
    ),
    3,
)
# Deletes the entry and gives back what it was, in one statement where the database
# runs DELETE … RETURNING (prepared.writes_return_rows); elsewhere the entry is read
# first and deleted by _DELETE, the course's lock keeping it as read in between.
_DELETE_RETURNING: Prepared[StudentCourse] = Prepared(
    lambda student_id, course_id: (
        StudentCourse.delete()
        .where((StudentCourse.student == student_id) & (StudentCourse.course == course_id))
        .returning(*StudentCourse._meta.sorted_fields)
    ),
    2,
)
_FREE_SEAT: Prepared[Course] = Prepared(
    lambda course_id: Course.update(enrolled_count=Course.enrolled_count - 1).where(
        (Course.id == course_id) & (Course.enrolled_count > 0)
    ),
    1,
)
_LEAVE_WAITLIST: Prepared[Course] = Prepared(
    lambda course_id: Course.update(waitlisted_count=Course.waitlisted_count - 1).where(
        (Course.id == course_id) & (Course.waitlisted_count > 0)
    ),
    1,
)


def _check_pair(student_id: int, course_id: int) -> None:
    """Malformed ids (and a mutating call's request_id), the first of the checks."""
    fields = Fields()
    fields.required_id("student_id", student_id)
    fields.required_id("course_id", course_id)
    checked(fields)  # a mutating call's request_id too


def _validate_pair(
    student_id: int,
    course_id: int,
    *,
    lock: bool = True,
    missing_course: type[UnknownCourseArgument | CourseNotFound] = UnknownCourseArgument,
    student: bool = True,
    ids_checked: bool = False,
) -> Course:
    """Checks in contract order: malformed ids (unless ids_checked: _check_pair ran),
    then the course, then the student.

    student=False leaves the student to the caller, which looks it up only when its own
    statement finds no entry: an entry's foreign key already says that its student
    exists, so a call that succeeds needs no SELECT of the student (EnrollStudent's
    insert and DropCourse's entry do; bench/PROFILE.md, sixth session)."""
    if not ids_checked:
        _check_pair(student_id, course_id)
    # The course row is locked first, by every writer of its seats in the same order,
    # so PostgreSQL and MariaDB never deadlock two enrollments on the count.
    course = course_or_none(course_id, lock=lock)
    if course is None:
        raise missing_course.of(course_id)
    if student:
        find_student(student_id)
    return course


def position_of(course_id: int, join_number: int) -> int:
    """1 + the entries of the course waiting with a smaller join number: no gaps."""
    ahead = (
        StudentCourse.select()
        .where(
            (StudentCourse.course == course_id)
            & (StudentCourse.state == WAITLISTED)
            & (StudentCourse.join_number < join_number)
        )
        .count()
    )
    return ahead + 1


def _shown(row: StudentCourse) -> Entry:
    """An entry read under its course's lock, with its place in line."""
    if row.state == WAITLISTED:
        return _entry(row, position_of(row.course_id, row.join_number))
    return _entry(row)


_AHEAD = StudentCourse.alias("ahead")


def _with_places(
    query: pw.ModelSelect[StudentCourse],
) -> pw.ModelSelect[StudentCourse]:
    """query's entries, each waiting one with the entries ahead of it in its course's
    line counted by the same statement (as `ahead`; None for an enrolled one): a read
    without the course's lock. Under READ COMMITTED (PostgreSQL, MariaDB) each statement
    sees what is committed when it starts, so a count of its own paired a row with a
    later line: pages such as [1, 2, 2] or [1, 1, 3] while others joined and left."""
    ahead = _AHEAD.select(pw.fn.COUNT(pw.SQL("*"))).where(
        (_AHEAD.course == StudentCourse.course)
        & (_AHEAD.state == WAITLISTED)
        & (_AHEAD.join_number < StudentCourse.join_number)
    )
    place = pw.Case(None, [(StudentCourse.state == WAITLISTED, ahead)], None)
    return query.select_extend(place.alias("ahead"))


def _placed(row: StudentCourse) -> Entry:
    """An entry of _with_places."""
    ahead = row.ahead  # type: ignore[attr-defined]
    return _entry(row, 0 if ahead is None else ahead + 1)


@mutation
def enroll_student(*, student_id: int, course_id: int, waitlist_if_full: bool = False) -> Entry:
    # A missing student fails the insert's foreign key (_insert says which row is missing).
    _check_pair(student_id, course_id)
    now = utcnow()
    if writes_return_rows():
        # A free seat, the common case, in one statement that also locks the course's
        # row first (the order every writer of its seats keeps) and gives it back, after
        # the seat, for the event's snapshot; the entry's insert then decides the rest,
        # and a rejected one rolls the seat back with the call.
        course = _TAKE_SEAT_RETURNING.first(course_id)
        if course is not None:
            _insert(student_id, course_id, now)
            return _enrolled(course, student_id, now, taken=0)
    # Full, or no such course (or a database without RETURNING): from the course's row
    # read under its lock.
    course = _validate_pair(student_id, course_id, student=False, ids_checked=True)
    return join(course, student_id, now, waitlist_if_full)


def _insert(student_id: int, course_id: int, now: dt.datetime) -> None:
    """The entry's row, ENROLLED; a duplicate or a missing student raises why."""
    try:
        # The primary key decides duplicates, enrolled or waiting.
        with statement_guard():
            inserted = _INSERT.execute(student_id, course_id, now)
    except pw.IntegrityError:
        inserted = 0  # no such student (the foreign key; MariaDB's INSERT IGNORE inserts none)
    if inserted != 1:
        _raise_rejected_enrollment(student_id, course_id)
        # A constraint this code does not know: INTERNAL, with the traceback logged.
        raise RuntimeError(f"enrollment of {student_id} in {course_id} inserted no row")


def _enrolled(course: Course, student_id: int, now: dt.datetime, *, taken: int) -> Entry:
    """The entry enrolled and its event; taken: the seat not yet in course's count (1),
    or already (0)."""
    entry = Entry(student_id, course.id, ENROLLED, 0, now, now)
    events.entry_changed(events.ENROLLED, entry)
    events.course_after(course, enrolled=taken, waitlisted=0)
    return entry


def join(course: Course, student_id: int, now: dt.datetime, waitlist_if_full: bool) -> Entry:
    """A single call's entry from its course's row read under the row lock this
    transaction holds: ENROLLED when a seat is free, else WAITLISTED when asked for and
    the waitlist has room (batches.py decides a batch's items by these same rules,
    set-based; enroll_student takes a free seat itself first where the database gives
    the row back with it). The course's snapshot in the event is made from the row."""
    course_id = course.id
    _insert(student_id, course_id, now)
    # The row read under the lock shows the counts as they are until this transaction
    # ends, so a full course or waitlist needs no statement to find out (a registration
    # rush's many rejected calls); the conditional UPDATEs still check again.
    seat_free = course.capacity == 0 or course.enrolled_count < course.capacity
    if seat_free and _TAKE_SEAT.execute(course_id) == 1:
        return _enrolled(course, student_id, now, taken=1)
    # Full. Raising rolls the new entry back with the transaction.
    if not waitlist_if_full or course.waitlist_capacity == 0:
        raise CourseFull.of(course_id, course.capacity)
    line_free = course.waitlisted_count < course.waitlist_capacity
    if not line_free or _JOIN_WAITLIST.execute(course_id) != 1:
        raise WaitlistFull.of(course_id, course.waitlist_capacity)
    # The course's row is ours until commit: the number just taken is this entry's.
    (join_number,) = Course.select(Course.waitlist_joins).where(Course.id == course_id).tuples()[0]
    StudentCourse.update(state=WAITLISTED, join_number=join_number).where(
        (StudentCourse.student == student_id) & (StudentCourse.course == course_id)
    ).execute()
    entry = Entry(student_id, course_id, WAITLISTED, position_of(course_id, join_number), now, None)
    events.entry_changed(events.WAITLISTED, entry)
    events.course_after(course, enrolled=0, waitlisted=1)
    return entry


def _raise_rejected_enrollment(student_id: int, course_id: int) -> None:
    """The insert broke a constraint: raise why (a duplicate, or a row deleted by a
    concurrent call), or return when it is none of these.

    It raises rather than returns the error on purpose. A returned error held in a local
    of enroll_student forms a cycle (frame -> error -> traceback -> frame) that keeps the
    failed insert's cursor alive past the call; the garbage collector later finalizes it
    on a pooled connection another call may be using, and the race tests then saw
    "database is locked".
    """
    duplicate = _ENTRY.first(student_id, course_id)
    if duplicate is not None:
        if duplicate.state == WAITLISTED:
            raise AlreadyWaitlisted.of(student_id, course_id) from None
        raise AlreadyEnrolled.of(student_id, course_id) from None
    if not Course.select().where(Course.id == course_id).exists():
        raise UnknownCourseArgument.of(course_id) from None
    find_student(student_id)


@mutation
def drop_course(*, student_id: int, course_id: int) -> Entry | None:
    """Drops the entry; returns the entry promoted into the freed seat, if any."""
    # The student is looked up only when there is no entry (drop_entry).
    course = _validate_pair(student_id, course_id, student=False)
    promoted = drop_entry(course, student_id, utcnow())
    return promoted[0] if promoted else None


def drop_entry(course: Course, student_id: int, now: dt.datetime) -> list[Entry]:
    """The one place a single entry is dropped, enrolled or waiting. course: its row, read
    under the row lock the caller holds, at most once per call (the course's snapshot in
    the events is made from it). A freed seat goes to position 1 of the waitlist;
    returns who was promoted."""
    # The entry as it was, for the DROPPED event's snapshot and what its state frees.
    if writes_return_rows():
        row = _DELETE_RETURNING.first(student_id, course.id)
    else:
        # Read first; the course's lock keeps it as read until the delete below.
        row = _ENTRY.first(student_id, course.id)
        if row is not None and _DELETE.execute(student_id, course.id, row.state) != 1:
            raise NotEnrolled.of(student_id, course.id)
    if row is None:
        # No entry: a student that does not exist is said first, as the contract
        # orders the checks (an entry's foreign key says its student exists).
        find_student(student_id)
        raise NotEnrolled.of(student_id, course.id)
    events.entry_changed(events.DROPPED, _shown(row))
    if row.state == ENROLLED:
        _FREE_SEAT.execute_later(course.id)
        # Nobody waits while a seat is free, so the count read under the lock says
        # whether anyone is in line for this one.
        promoted = promote_next(course.id, 1, now) if course.waitlisted_count else []
        moved = len(promoted)
        events.course_after(course, enrolled=moved - 1, waitlisted=-moved)
        return promoted
    _LEAVE_WAITLIST.execute_later(course.id)
    events.course_after(course, enrolled=0, waitlisted=-1)
    return []


def drop_all_of_course(course_id: int) -> None:
    """The one place a course's entries are dropped together (forced DeleteCourse): its
    waitlist first, then its roster; nobody is promoted."""
    line = (
        StudentCourse.select()
        .where((StudentCourse.course == course_id) & (StudentCourse.state == WAITLISTED))
        .order_by(StudentCourse.join_number)
    )
    for position, row in enumerate(line, start=1):
        events.entry_changed(events.DROPPED, _entry(row, position))
    roster = (
        StudentCourse.select()
        .where((StudentCourse.course == course_id) & (StudentCourse.state == ENROLLED))
        .order_by(StudentCourse.student)
    )
    for row in roster:
        events.entry_changed(events.DROPPED, _entry(row))
    for state in (WAITLISTED, ENROLLED):
        StudentCourse.delete().where(
            (StudentCourse.course == course_id) & (StudentCourse.state == state)
        ).execute()
    Course.update(enrolled_count=0, waitlisted_count=0).where(Course.id == course_id).execute()


def promote_next(course_id: int, seats: int, now: dt.datetime) -> list[Entry]:
    """The one place entries are promoted: up to `seats` waiting entries, first in line
    first, take seats (the caller holds the course's row lock and knows the seats free)."""
    if seats <= 0:
        return []
    rows = list(
        StudentCourse.select()
        .where((StudentCourse.course == course_id) & (StudentCourse.state == WAITLISTED))
        .order_by(StudentCourse.join_number)
        .limit(seats)
    )
    if not rows:
        return []
    moved = (
        StudentCourse.update(state=ENROLLED, join_number=0, promote_time=now)
        .where(
            (StudentCourse.course == course_id)
            & (StudentCourse.state == WAITLISTED)
            & (StudentCourse.student.in_([r.student_id for r in rows]))
        )
        .execute()
    )
    n = len(rows)
    counted = (
        Course.update(
            enrolled_count=Course.enrolled_count + n, waitlisted_count=Course.waitlisted_count - n
        )
        .where(
            (Course.id == course_id)
            & (Course.waitlisted_count >= n)
            & ((Course.capacity == 0) | (Course.enrolled_count + n <= Course.capacity))
        )
        .execute()
    )
    if moved != n or counted != 1:
        # Cannot happen while every writer holds the course's lock; fail the whole call.
        raise RuntimeError(f"promotion in course {course_id} found its counts changed")
    promoted = []
    for row in rows:
        row.state, row.promote_time = ENROLLED, now
        entry = _entry(row)
        events.entry_changed(events.PROMOTED, entry)
        promoted.append(entry)
    return promoted


@transactional(write=False)
def get_enrollment(*, student_id: int, course_id: int) -> Entry:
    _validate_pair(student_id, course_id, lock=False, missing_course=CourseNotFound)
    query = StudentCourse.select().where(
        (StudentCourse.student == student_id) & (StudentCourse.course == course_id)
    )
    row = _with_places(query).first()
    if row is None:
        raise NotEnrolled.of(student_id, course_id)
    return _placed(row)


@dataclass(frozen=True)
class EnrollmentPage:
    enrollments: list[Entry]
    next_page_token: str


@transactional(write=False)
def list_enrollments(
    *, student_id: int, course_id: int, state: int, page_size: int, page_token: str
) -> EnrollmentPage:
    fields = Fields()
    fields.optional_id("student_id", student_id)
    fields.optional_id("course_id", course_id)
    if state not in (0, *STATES):
        fields.invalid("state", "must be ENROLLMENT_STATE_UNSPECIFIED, _ENROLLED or _WAITLISTED")
    if page_size < 0:
        fields.invalid("page_size", "must be 0 (the default) or more")
    # Waitlist order for one course's waiting entries, else (course_id, student_id).
    in_line = course_id > 0 and state == WAITLISTED
    kind = page_tokens.Kind.WAITLIST if in_line else page_tokens.Kind.ENROLLMENTS
    filters = (max(student_id, 0), max(course_id, 0), state if state in STATES else 0)
    page_token = fields.token("page_token", page_token)
    try:
        after = page_tokens.decode_pair(page_token, kind=kind, filters=filters)
    except page_tokens.BadToken as exc:
        fields.invalid("page_token", str(exc))
        after = None
    fields.check()
    size = page_tokens.effective_page_size(page_size)

    query = StudentCourse.select()
    if student_id:
        query = query.where(StudentCourse.student == student_id)
    if course_id:
        query = query.where(StudentCourse.course == course_id)
    if state:
        query = query.where(StudentCourse.state == state)
    if in_line:
        if after is not None:
            query = query.where(StudentCourse.join_number > after[0])
        query = query.order_by(StudentCourse.join_number)
    else:
        if after is not None:
            last_course, last_student = after
            query = query.where(
                (StudentCourse.course > last_course)
                | ((StudentCourse.course == last_course) & (StudentCourse.student > last_student))
            )
        query = query.order_by(StudentCourse.course, StudentCourse.student)
    rows = list(_with_places(query).limit(size + 1))
    token = ""
    if len(rows) > size:
        rows = rows[:size]
        last = rows[-1]
        key = (last.join_number, 0) if in_line else (last.course_id, last.student_id)
        token = page_tokens.encode_pair(kind=kind, filters=filters, after=key)
    if not rows:
        # No entries and a missing filter look alike; only then ask, the course first.
        if course_id:
            find_course(course_id)
        if student_id:
            find_student(student_id)
    return EnrollmentPage([_placed(row) for row in rows], token)
