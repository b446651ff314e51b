"""Courses: create, read, update, list (the catalogue or one student's courses), delete."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import peewee as pw

from enrollment.server.domain import events, page_tokens
from enrollment.server.domain.enrollments import drop_all_of_course, promote_next
from enrollment.server.domain.lookups import course_found, find_course, student_found
from enrollment.server.domain.retries import checked, mutation
from enrollment.server.domain.rows import create_unique, list_page
from enrollment.server.domain.updates import Updatable, update
from enrollment.server.domain.validation import Fields
from enrollment.server.errors import (
    CapacityBelowEnrollment,
    CourseCodeTaken,
    HasEnrollments,
    WaitlistBelowWaiting,
)
from enrollment.server.persistence.models import (
    COURSE_CREATES,
    ENROLLED,
    Course,
    StudentCourse,
    lowercase_key,
    utcnow,
)
from enrollment.server.persistence.prepared import Prepared
from enrollment.server.persistence.steps import Read, Steps
from enrollment.server.persistence.unit_of_work import savepoint

# A page of the catalogue, and of one student's courses: keyset on the course id. A
# student's courses are ordered by the join table's course_id, the same values, so that
# SQLite walks the primary key (student_id, course_id) in order instead of sorting.
_CATALOGUE_PAGE: Prepared[Course] = Prepared(
    lambda after_id, limit: (
        Course.select().where(Course.id > after_id).order_by(Course.id).limit(limit)
    ),
    2,
    plain=True,
)
_STUDENT_COURSES_PAGE: Prepared[Course] = Prepared(
    lambda student_id, after_id, limit: (
        Course.select()
        .join(StudentCourse)
        .where(
            (StudentCourse.student == student_id)
            & (StudentCourse.course > after_id)
            & (StudentCourse.state == ENROLLED)
        )
        .order_by(StudentCourse.course)
        .limit(limit)
    ),
    3,
    plain=True,
)


@dataclass(frozen=True)
class CoursePage:
    courses: list[Course]
    next_page_token: str


@mutation
def create_course(*, code: str, title: str, capacity: int, waitlist_capacity: int = 0) -> Course:
    fields = Fields()
    code = fields.code("code", code)
    title = fields.name("title", title)
    capacity = fields.capacity("capacity", capacity)
    waitlist_capacity = fields.waitlist_capacity("waitlist_capacity", waitlist_capacity)
    checked(fields)
    now = utcnow()
    course = create_unique(
        Course,
        Course.code_key,
        CourseCodeTaken.of,
        COURSE_CREATES,
        code=code,
        code_key=lowercase_key(code),
        title=title,
        capacity=capacity,
        enrolled_count=0,
        waitlist_capacity=waitlist_capacity,
        waitlisted_count=0,
        create_time=now,
        update_time=now,
    )
    events.course_created(course.id)
    return course


@mutation
def update_course(
    *,
    course_id: int,
    etag: str,
    paths: list[str],
    code: str,
    title: str,
    capacity: int,
    waitlist_capacity: int,
) -> Course:
    """Checks in contract order: INVALID_FIELD, NOT_FOUND, ETAG_MISMATCH,
    COURSE_CODE_TAKEN, CAPACITY_BELOW_ENROLLMENT, WAITLIST_BELOW_WAITING."""
    return update(
        _UPDATABLE,
        course_id,
        etag,
        paths,
        code=code,
        title=title,
        capacity=capacity,
        waitlist_capacity=waitlist_capacity,
    )


def _apply_course_changes(course: Course, changes: dict[str, Any], now: dt.datetime) -> Course:
    """The one place a course is updated (and its new seats filled from the waitlist)."""
    course_id = course.id
    this = Course.id == course_id
    # Recorded first, so that it comes before the promotions it causes; its snapshot is
    # read when the call ends. A check failing below rolls it back with the rest.
    events.course_updated(course_id)
    if "code" in changes:
        try:
            with savepoint():
                code = changes["code"]
                Course.update(code=code, code_key=lowercase_key(code)).where(this).execute()
        except pw.IntegrityError:
            raise CourseCodeTaken.of() from None
    if "capacity" in changes:
        capacity = changes["capacity"]
        fits = this if capacity == 0 else this & (Course.enrolled_count <= capacity)
        if Course.update(capacity=capacity).where(fits).execute() != 1:
            raise CapacityBelowEnrollment.of(course_id, capacity, course.enrolled_count)
        # The row is locked: its counts are the ones read above.
        free = course.waitlisted_count if capacity == 0 else capacity - course.enrolled_count
        promote_next(course_id, min(free, course.waitlisted_count), now)
    if "waitlist_capacity" in changes:
        limit = changes["waitlist_capacity"]
        if (
            Course.update(waitlist_capacity=limit)
            .where(this & (Course.waitlisted_count <= limit))
            .execute()
            != 1
        ):
            (left,) = Course.select(Course.waitlisted_count).where(this).tuples()[0]
            raise WaitlistBelowWaiting.of(course_id, limit, left)
    rest = {Course.title: changes["title"]} if "title" in changes else {}
    Course.update({**rest, Course.version: Course.version + 1, Course.update_time: now}).where(
        this
    ).execute()
    return find_course(course_id)


_UPDATABLE = Updatable(
    kind="course",
    resource="Course",
    checks={
        "code": Fields.code,
        "title": Fields.name,
        "capacity": Fields.capacity,
        "waitlist_capacity": Fields.waitlist_capacity,
    },
    output_only=(
        "id",
        "etag",
        "enrolled_count",
        "waitlisted_count",
        "create_time",
        "update_time",
    ),  # fmt: skip
    # Locked: enrollments, drops and other updates of this course wait for this one.
    find=lambda course_id: find_course(course_id, lock=True),
    apply=_apply_course_changes,
)


@Read
def get_course(*, course_id: int) -> Steps[Course]:
    fields = Fields()
    fields.required_id("course_id", course_id)
    fields.check()
    return (yield from course_found(course_id))


@Read
def list_courses(*, student_id: int, page_size: int, page_token: str) -> Steps[CoursePage]:
    rows, token = yield from list_page(
        page_tokens.Kind.COURSES,
        filter_field="student_id",
        filter_id=student_id,
        page_size=page_size,
        page_token=page_token,
        every_row=_CATALOGUE_PAGE,
        filtered=_STUDENT_COURSES_PAGE,
        find_filter=student_found,  # no courses, or no such student?
    )
    return CoursePage(rows, token)


@mutation
def delete_course(*, course_id: int, force: bool) -> None:
    fields = Fields()
    fields.required_id("course_id", course_id)
    checked(fields)
    course = find_course(course_id, lock=True)
    # Waitlist entries count too.
    count = StudentCourse.select().where(StudentCourse.course == course_id).count()
    if count and not force:
        raise HasEnrollments.of("course", course.id, count)
    if count:
        drop_all_of_course(course_id)
    Course.delete().where(Course.id == course_id).execute()
    events.course_deleted(course, emptied=bool(count))
