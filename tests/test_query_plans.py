"""The SQL the services run uses indexes: no full-table SCAN, no sort of a whole result.

The statements are the real ones: captured from database.execute_sql while the service
functions run, then asked for their plan with SQLite's EXPLAIN QUERY PLAN.

PostgreSQL (once the server supports it): the same capture, then `EXPLAIN (FORMAT JSON)`
with `SET enable_seqscan = off` (on a handful of rows the planner rightly prefers a
sequential scan), rejecting any "Seq Scan" node and any "Sort" above a whole table.
"""

from __future__ import annotations

import peewee as pw
import pytest

from enrollment.server.domain import courses, enrollments, events, students
from enrollment.server.domain.page_tokens import Kind, encode
from enrollment.server.persistence import engine

_TRANSACTION = ("BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE")

# The calls below name rows by the ids a fresh database hands out.
pytestmark = [pytest.mark.databases("sqlite", "postgresql"), pytest.mark.own_database]

# (name, call, statements it may run besides transaction control: a number, or one per
# database kind, or None for any)
CALLS = [
    ("GetStudent", lambda: students.get_student(student_id=2), 1),
    ("GetCourse", lambda: courses.get_course(course_id=2), 1),
    (
        "ListCourses of a student",
        lambda: courses.list_courses(student_id=1, page_size=0, page_token=""),
        1,
    ),
    (
        "ListCourses of a student, next page",
        lambda: courses.list_courses(
            student_id=1,
            page_size=1,
            page_token=encode(kind=Kind.COURSES, filter_id=1, after_id=1),
        ),
        1,
    ),
    (
        "ListCourses, the catalogue",
        lambda: courses.list_courses(student_id=0, page_size=0, page_token=""),
        1,
    ),
    (
        "ListCourses, the catalogue's last page",
        lambda: courses.list_courses(
            student_id=0, page_size=2, page_token=encode(kind=Kind.COURSES, filter_id=0, after_id=3)
        ),
        1,
    ),
    (
        "ListStudents, a roster",
        lambda: students.list_students(course_id=1, page_size=0, page_token=""),
        1,
    ),
    (
        "ListStudents, a roster's next page",
        lambda: students.list_students(
            course_id=1,
            page_size=1,
            page_token=encode(kind=Kind.STUDENTS, filter_id=1, after_id=1),
        ),
        1,
    ),
    (
        "ListStudents, everyone",
        lambda: students.list_students(course_id=0, page_size=0, page_token=""),
        1,
    ),
    (
        "ListStudents, an empty roster",
        lambda: students.list_students(course_id=3, page_size=0, page_token=""),
        2,
    ),
    (
        "ListEvents from the middle of the feed",
        lambda: events.list_events(after_sequence=6, page_size=0, student_id=0, course_id=0),
        # the head, the page, the purged counter
        3,
    ),
    (
        "ListEvents of a course",
        lambda: events.list_events(after_sequence=6, page_size=0, student_id=0, course_id=1),
        3,
    ),
    (
        "EnrollStudent",
        lambda: enrollments.enroll_student(student_id=3, course_id=2),
        # 2 (the seat, whose UPDATE … RETURNING locks the course's row and gives it
        # back; the entry, whose foreign key says the student exists, no SELECT of
        # it), then the feed's: the counter raised and read in one UPDATE … RETURNING,
        # the event; on PostgreSQL both in one statement (WITH … INSERT). The course's
        # snapshot is made from the row the seat's UPDATE gave back, not read again.
        {"sqlite": 4, "postgresql": 3},
    ),
    (
        "DropCourse",
        lambda: enrollments.drop_course(student_id=1, course_id=2),
        # 3 (the course, the entry's delete, which gives back the entry as it was for
        # DROPPED's snapshot (DELETE … RETURNING), the seat; the student is read only
        # when there is no entry), and the feed's (see EnrollStudent)
        {"sqlite": 5, "postgresql": 4},
    ),
    (
        "DeleteStudent with force",
        lambda: students.delete_student(student_id=2, force=True),
        None,
    ),
    (
        "DeleteCourse with force",
        lambda: courses.delete_course(course_id=1, force=True),
        None,
    ),
]


@pytest.fixture
def db(db_url):
    db = engine.open_pool(db_url, max_connections=2)
    for n in range(1, 5):
        students.create_student(name=f"Student {n}", email=f"s{n}@example.com")
        courses.create_course(code=f"C-{n}", title=f"Course {n}", capacity=0)
    for student, course in ((1, 1), (1, 2), (2, 1), (2, 2), (1, 4)):
        enrollments.enroll_student(student_id=student, course_id=course)
    yield db
    engine.close_pool()


def _capture(db, monkeypatch, call) -> list[tuple[str, tuple]]:
    statements = []
    execute_sql = db.execute_sql

    def spy(sql, params=None, *args, **kwargs):
        statements.append((sql, tuple(params or ())))
        return execute_sql(sql, params, *args, **kwargs)

    monkeypatch.setattr(db, "execute_sql", spy)
    if hasattr(db, "execute_later"):  # PostgreSQL's pool: sent with the next statement
        later = db.execute_later

        def spy_later(sql, params):
            statements.append((sql, tuple(params)))
            return later(sql, params)

        monkeypatch.setattr(db, "execute_later", spy_later)
        committing = db.execute_and_commit

        def spy_committing(sql, params):  # the events' statement, with the COMMIT
            statements.append((sql, tuple(params)))
            return committing(sql, params)

        monkeypatch.setattr(db, "execute_and_commit", spy_committing)
    try:
        call()
    finally:
        monkeypatch.undo()
    return [s for s in statements if not s[0].lstrip().upper().startswith(_TRANSACTION)]


@pytest.mark.parametrize(("name", "call", "expected"), CALLS, ids=[c[0] for c in CALLS])
def test_statements_use_indexes(db, db_url, monkeypatch, name, call, expected):
    statements = _capture(db, monkeypatch, call)
    assert statements, f"{name} ran no SQL"
    if isinstance(expected, dict):
        expected = expected[engine.parse(db_url).kind]
    if expected is not None:
        assert len(statements) == expected, [sql for sql, _ in statements]
    with db.connection_context():
        for sql, params in statements:
            plan, bad = explain(db, sql, params)
            assert not bad, f"{name}: {sql}\n  plan: {plan}"


def explain(db: pw.Database, sql: str, params: tuple) -> tuple[list, list]:
    """The plan's steps, and those that read a whole table (or sort a whole result)."""
    if isinstance(db, pw.PostgresqlDatabase):
        with db.atomic():
            db.execute_sql("SET LOCAL enable_seqscan = off")
            (document,) = db.execute_sql(f"EXPLAIN (FORMAT JSON) {sql}", params).fetchone()
        steps = list(_nodes(document[0]["Plan"]))
        return steps, [s for s in steps if s.startswith("Seq Scan")]
    steps = [row[-1] for row in db.execute_sql(f"EXPLAIN QUERY PLAN {sql}", params)]
    # "SCAN n CONSTANT ROWS" is a multi-row VALUES list (the feed's events), not a table.
    scans = [s for s in steps if s.startswith("SCAN") and "CONSTANT ROW" not in s]
    return steps, scans + [s for s in steps if "TEMP B-TREE" in s]


def _nodes(node: dict):
    yield f"{node['Node Type']} {node.get('Relation Name', '')} {node.get('Index Name', '')}"
    for child in node.get("Plans", ()):
        yield from _nodes(child)
