"""Bulk seeding straight into the database (insert_many on the models), never through RPCs."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass

from enrollment.server.persistence import engine
from enrollment.server.persistence.models import Course, Student, StudentCourse

# Stays under SQLite's limit on bound variables per statement.
CHUNK = 2000
# Steps between a student's courses; coprime with the usual course counts.
_STRIDE = 7
_GAP = 101


@dataclass(frozen=True)
class Shape:
    """How much data: students 1..students, courses 1..courses, per_student each.

    roster: when set, students 1..roster are also all enrolled in course 1 (a large roster).
    """

    students: int = 10_000
    courses: int = 500
    per_student: int = 5
    roster: int = 0

    @property
    def enrollments(self) -> int:
        return sum(len(self.enrolled(s)) for s in range(1, self.students + 1))

    def enrolled(self, student: int) -> set[int]:
        """The course ids a seeded student is enrolled in (the load generator asks too)."""
        courses = {
            ((student * _STRIDE + j * _GAP) % self.courses) + 1 for j in range(self.per_student)
        }
        if self.roster and student <= self.roster:
            courses.add(1)
        return courses


def _chunks(rows: Iterator[tuple], size: int = CHUNK) -> Iterator[list[tuple]]:
    batch: list[tuple] = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def seed(database_url: str, shape: Shape) -> None:
    """Fill a freshly migrated, empty database with shape's rows, enrolled_count kept exact."""
    db = engine.open_pool(database_url, max_connections=1)
    try:
        with db.connection_context():
            if Student.select().exists() or Course.select().exists():
                raise SystemExit(f"refusing to seed {database_url}: it already holds rows")
            now = dt.datetime(2026, 1, 1)
            counts = [0] * (shape.courses + 1)
            for student in range(1, shape.students + 1):
                for course in shape.enrolled(student):
                    counts[course] += 1
            with db.atomic():
                students = (
                    (s, f"Student {s}", f"s{s}@example.com", f"s{s}@example.com", now)
                    for s in range(1, shape.students + 1)
                )
                fields = [Student.id, Student.name, Student.email, Student.email_key]
                for batch in _chunks(students):
                    Student.insert_many(batch, fields=[*fields, Student.create_time]).execute()
                courses = (
                    (c, f"C-{c}", f"c-{c}", f"Course {c}", 0, counts[c], now)
                    for c in range(1, shape.courses + 1)
                )
                fields = [
                    Course.id,
                    Course.code,
                    Course.code_key,
                    Course.title,
                    Course.capacity,
                    Course.enrolled_count,
                    Course.create_time,
                ]
                for batch in _chunks(courses):
                    Course.insert_many(batch, fields=fields).execute()
                pairs = (
                    (s, c, now)
                    for s in range(1, shape.students + 1)
                    for c in sorted(shape.enrolled(s))
                )
                fields = [StudentCourse.student, StudentCourse.course, StudentCourse.enroll_time]
                for batch in _chunks(pairs):
                    StudentCourse.insert_many(batch, fields=fields).execute()
    finally:
        engine.close_pool()
