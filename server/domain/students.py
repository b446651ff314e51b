"""Students: create, read, update, list (all or a course's roster), delete."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import peewee as pw

from enrollment.server.domain import events, page_tokens
from enrollment.server.domain.enrollments import drop_entry
from enrollment.server.domain.lookups import course_found, find_student, student_found
from enrollment.server.domain.retries import checked, mutation
from enrollment.server.domain.rows import create_unique, list_page
from enrollment.server.domain.updates import Updatable, update
from enrollment.server.domain.validation import Fields
from enrollment.server.errors import EmailTaken, HasEnrollments
from enrollment.server.persistence.models import (
    ENROLLED,
    STUDENT_CREATES,
    Course,
    Student,
    StudentCourse,
    lowercase_key,
    utcnow,
)
from enrollment.server.persistence.prepared import Prepared
from enrollment.server.persistence.steps import Read, Steps
from enrollment.server.persistence.unit_of_work import (
    RunAgain,
    final_attempt,
    locking,
    savepoint,
)

# A page of all students, and of one course's roster: keyset on the student id. The roster
# is ordered by the join table's student_id, the same values, so that SQLite reads the
# (course_id, student_id) index in order and stops after one page instead of sorting
# the whole roster.
_STUDENTS_PAGE: Prepared[Student] = Prepared(
    lambda after_id, limit: (
        Student.select().where(Student.id > after_id).order_by(Student.id).limit(limit)
    ),
    2,
    plain=True,
)
_ROSTER_PAGE: Prepared[Student] = Prepared(
    lambda course_id, after_id, limit: (
        Student.select()
        .join(StudentCourse)
        .where(
            (StudentCourse.course == course_id)
            & (StudentCourse.student > after_id)
            & (StudentCourse.state == ENROLLED)
        )
        .order_by(StudentCourse.student)
        .limit(limit)
    ),
    3,
    plain=True,
)


@dataclass(frozen=True)
class StudentPage:
    students: list[Student]
    next_page_token: str


@mutation
def create_student(*, name: str, email: str) -> Student:
    fields = Fields()
    name = fields.name("name", name)
    email = fields.email("email", email)
    checked(fields)
    now = utcnow()
    student = create_unique(
        Student,
        Student.email_key,
        EmailTaken.of,
        STUDENT_CREATES,
        name=name,
        email=email,
        email_key=lowercase_key(email),
        create_time=now,
        update_time=now,
    )
    events.student_created(student)
    return student


@mutation
def update_student(
    *, student_id: int, etag: str, paths: list[str], name: str, email: str
) -> Student:
    """Checks in contract order: INVALID_FIELD, NOT_FOUND, ETAG_MISMATCH, EMAIL_TAKEN."""
    return update(_UPDATABLE, student_id, etag, paths, name=name, email=email)


def _apply_student_changes(student: Student, changes: dict[str, Any], now: dt.datetime) -> Student:
    """The one place a student is updated."""
    columns: dict[Any, Any] = {Student.version: Student.version + 1, Student.update_time: now}
    if "name" in changes:
        columns[Student.name] = changes["name"]
    if "email" in changes:
        columns[Student.email] = changes["email"]
        columns[Student.email_key] = lowercase_key(changes["email"])
    try:
        with savepoint():
            Student.update(columns).where(Student.id == student.id).execute()
    except pw.IntegrityError:
        raise EmailTaken.of() from None
    student = find_student(student.id)
    events.student_updated(student)
    return student


_UPDATABLE = Updatable(
    kind="student",
    resource="Student",
    checks={"name": Fields.name, "email": Fields.email},
    output_only=("id", "etag", "create_time", "update_time"),
    find=lambda student_id: find_student(student_id, lock=True),
    apply=_apply_student_changes,
)


@Read
def get_student(*, student_id: int) -> Steps[Student]:
    fields = Fields()
    fields.required_id("student_id", student_id)
    fields.check()
    return (yield from student_found(student_id))


@Read
def list_students(*, course_id: int, page_size: int, page_token: str) -> Steps[StudentPage]:
    rows, token = yield from list_page(
        page_tokens.Kind.STUDENTS,
        filter_field="course_id",
        filter_id=course_id,
        page_size=page_size,
        page_token=page_token,
        every_row=_STUDENTS_PAGE,
        filtered=_ROSTER_PAGE,
        find_filter=course_found,  # an empty roster, or no such course?
    )
    return StudentPage(rows, token)


@mutation
def delete_student(*, student_id: int, force: bool) -> None:
    fields = Fields()
    fields.required_id("student_id", student_id)
    checked(fields)
    # The order every writer of entries keeps: course rows first, in id order, then the
    # student's (an entry's insert takes its key lock through the foreign key). Locking
    # the student first deadlocked with a batch enrolling it in one course while holding
    # another of its courses.
    locked = _lock_courses(_courses_of(student_id), {})
    # With the student's row ours, no entry of it can be added: an enrollment racing
    # the delete either committed before (and is read below) or waits and then finds
    # no student.
    student = find_student(student_id, lock=True)
    # Read again: a drop may have committed before its course was locked here, an
    # enroll before the student was. The latter's course is not locked: the delete runs
    # again from the start, which locks it in order. On the last attempt it is locked
    # now, out of order (a deadlock that may cause fails the call UNAVAILABLE), and the
    # entries read once more: that course may have dropped the student or gone since.
    courses = _courses_of(student_id)
    added = [course_id for course_id in courses if course_id not in locked]
    if added:
        if not final_attempt():
            raise RunAgain
        locked = _lock_courses(added, locked)
        courses = _courses_of(student_id)
    if courses and not force:
        # Waitlist entries count too.
        raise HasEnrollments.of("student", student_id, len(courses))
    now = utcnow()
    # Each entry is dropped as DropCourse drops it: a freed seat goes to position 1.
    for course_id in courses:
        drop_entry(locked[course_id], student_id, now)
    Student.delete().where(Student.id == student_id).execute()
    events.student_deleted(student)


def _lock_courses(ids: list[int], locked: dict[int, Course]) -> dict[int, Course]:
    """locked and the courses of ids, their rows locked in id order (a course that is
    gone is left out: its entries went with it)."""
    if not ids:
        return locked
    query = Course.select().where(Course.id.in_(ids)).order_by(Course.id)
    return {**locked, **{course.id: course for course in locking(query)}}


def _courses_of(student_id: int) -> list[int]:
    query = StudentCourse.select(StudentCourse.course).where(StudentCourse.student == student_id)
    return [row.course_id for row in query.order_by(StudentCourse.course)]
