"""Batches (AIP-233 style): up to 1000 enrolls or drops, in order, in one transaction.

The courses a batch touches are locked up front in ascending id order, the one global
order: two batches, or a batch and single calls (which lock one course), never wait
for each other in a cycle. Then each item runs through the same one-function-per-change
code as EnrollStudent and DropCourse. All or nothing: the first failing item fails the
call and the transaction rolls back. Partial success: each item runs in a savepoint,
and a failing item's savepoint is rolled back alone.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass

from enrollment.server.domain.enrollments import Entry, drop_entry, join
from enrollment.server.domain.lookups import find_course
from enrollment.server.domain.retries import checked, mutation
from enrollment.server.domain.validation import Fields
from enrollment.server.errors import (
    CallEnded,
    DatabaseUnavailable,
    EnrollmentError,
    FieldViolation,
    InvalidField,
    StudentNotFound,
    UnknownCourseArgument,
    in_batch,
)
from enrollment.server.persistence.models import Course, Student, utcnow
from enrollment.server.persistence.unit_of_work import locking, savepoint, sharing

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


@dataclass
class _Locked:
    courses: dict[int, Course]
    students: set[int]
    now: dt.datetime


@mutation
def batch_enroll(*, items: list[Item], allow_partial_success: bool) -> list[Outcome]:
    return _run(items, allow_partial_success, _enroll)


@mutation
def batch_drop(*, items: list[Item], allow_partial_success: bool) -> list[Outcome]:
    return _run(items, allow_partial_success, _drop)


def _enroll(item: Item, locked: _Locked) -> Entry | None:
    course = _course_and_student(item, locked)
    # The course's capacities cannot change while the batch holds its row.
    return join(course, item.student_id, locked.now, item.waitlist_if_full, student_locked=True)


def _drop(item: Item, locked: _Locked) -> Entry | None:
    _course_and_student(item, locked)
    # Read again (the row is ours): earlier items may have moved its counts.
    course = find_course(item.course_id)
    promoted = drop_entry(course, item.student_id, locked.now)
    return promoted[0] if promoted else None


def _course_and_student(item: Item, locked: _Locked) -> Course:
    """The existence checks of EnrollStudent/DropCourse, in their order, against the
    rows read under the batch's locks."""
    course = locked.courses.get(item.course_id)
    if course is None:
        raise UnknownCourseArgument.of(item.course_id)
    if item.student_id not in locked.students:
        raise StudentNotFound.of(item.student_id)
    return course


def _item_violations(item: Item) -> list[FieldViolation]:
    fields = Fields()
    fields.required_id("student_id", item.student_id)
    fields.required_id("course_id", item.course_id)
    return fields.violations


def _run(
    items: list[Item], partial: bool, apply: Callable[[Item, _Locked], Entry | None]
) -> list[Outcome]:
    fields = Fields()
    if not 1 <= len(items) <= MAX_ITEMS:
        fields.invalid("requests", f"must hold 1 to {MAX_ITEMS} requests, not {len(items)}")
    for i, item in enumerate(items):
        if item.request_id:
            fields.invalid(
                f"requests[{i}].request_id",
                "must be empty: the batch's own request_id covers its items",
            )
    # Malformed ids are INVALID_FIELD before anything else: of the call when all or
    # nothing (every malformed item listed, "index" the first), else of the item.
    malformed: dict[int, InvalidField] = {}
    for i, item in enumerate(items[:MAX_ITEMS]):
        violations = _item_violations(item)
        if violations:
            malformed[i] = in_batch(InvalidField.of(violations), i, call=False)
    if malformed and not partial:
        for error in malformed.values():
            fields.violations.extend(error.violations)
        fields.metadata["index"] = str(min(malformed))
    checked(fields)

    locked = _lock(items, malformed)
    outcomes: list[Outcome] = []
    for i, item in enumerate(items):
        if i in malformed:
            outcomes.append(Outcome(error=malformed[i]))
            continue
        try:
            with savepoint() if partial else contextlib.nullcontext():
                entry = apply(item, locked)
        except (DatabaseUnavailable, CallEnded):
            raise
        except EnrollmentError as exc:
            if not partial:
                raise in_batch(exc, i, call=True) from None
            outcomes.append(Outcome(error=in_batch(exc, i, call=False)))
        else:
            outcomes.append(Outcome(entry=entry))
    return outcomes


def _lock(items: list[Item], malformed: dict[int, InvalidField]) -> _Locked:
    """Every course of the batch locked in ascending id order (one statement), then its
    students that exist, share-locked (a student deleted before is missing here; a
    delete after waits for the batch)."""
    wanted = [item for i, item in enumerate(items) if i not in malformed]
    course_ids = sorted({item.course_id for item in wanted})
    student_ids = sorted({item.student_id for item in wanted})
    query = Course.select().where(Course.id.in_(course_ids)).order_by(Course.id)
    courses = {course.id: course for course in locking(query)} if course_ids else {}
    students: set[int] = set()
    if student_ids:
        # Share-locked: none of them can be deleted until the batch ends.
        ids = Student.select(Student.id).where(Student.id.in_(student_ids))
        students = {student_id for (student_id,) in sharing(ids).tuples()}
    return _Locked(courses, students, utcnow())
