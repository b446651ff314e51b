"""Bulk seeding straight into the database, never through RPCs: the fastest path each
database offers (one transaction; SQLite's own executemany, PostgreSQL's COPY, MariaDB's
multi-row INSERTs), with the secondary indexes dropped for the load and made again from
the very definitions the migrations left (so the schema ends as migrated)."""

from __future__ import annotations

import datetime as dt
import io
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import peewee as pw

from enrollment.server.persistence import engine, migrator

# Rows per multi-row INSERT (PostgreSQL, MariaDB).
CHUNK = 5000
# Steps between a student's courses; coprime with the usual course counts.
_STRIDE = 7
_GAP = 101
# The proto's EventType numbers (server/domain/events.py).
_STUDENT_CREATED, _COURSE_CREATED, _ENROLLED = 1, 4, 7
_TABLES = ("students", "courses", "student_courses", "events", "event_counters")


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


def _chunks(rows: Iterable[tuple], size: int = CHUNK) -> Iterator[list[tuple]]:
    batch: list[tuple] = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class _Rows:
    """The rows of a shape, table by table, as tuples in column order."""

    def __init__(self, shape: Shape, now) -> None:
        self.shape = shape
        self.now = now
        self.counts = [0] * (shape.courses + 1)
        for student in range(1, shape.students + 1):
            for course in shape.enrolled(student):
                self.counts[course] += 1

    def tables(self, events: bool) -> list[tuple[str, tuple[str, ...], Iterable[tuple]]]:
        tables = [
            ("students", ("id", "name", "email", "email_key", "create_time"), self.students()),
            (
                "courses",
                ("id", "code", "code_key", "title", "capacity", "enrolled_count", "create_time"),
                self.courses(),
            ),
            ("student_courses", ("student_id", "course_id", "enroll_time"), self.enrollments()),
        ]
        if events:
            columns = (
                *("sequence", "event_time", "type", "student_id", "course_id"),
                *("payload", "request_id", "actor"),
            )
            tables.append(("events", columns, self.events()))
            last = self.shape.courses + self.shape.students + self.shape.enrollments
            tables.append(("event_counters", ("name", "value"), [("sequence", last)]))
        return tables

    def students(self) -> Iterator[tuple]:
        now = self.now
        for s in range(1, self.shape.students + 1):
            yield (s, f"Student {s}", f"s{s}@example.com", f"s{s}@example.com", now)

    def courses(self) -> Iterator[tuple]:
        now, counts = self.now, self.counts
        for c in range(1, self.shape.courses + 1):
            yield (c, f"C-{c}", f"c-{c}", f"Course {c}", 0, counts[c], now)

    def enrollments(self) -> Iterator[tuple]:
        now, shape = self.now, self.shape
        for s in range(1, shape.students + 1):
            for c in sorted(shape.enrolled(s)):
                yield (s, c, now)

    def events(self) -> Iterator[tuple]:
        """What the server would have appended making the rows one call at a time: each
        course's COURSE_CREATED, then per student STUDENT_CREATED and an ENROLLED per
        course (the payload as server/domain/events.py writes it; the course snapshot
        with its count after that enrollment)."""
        now, shape = self.now, self.shape
        t = "2026-01-01T00:00:00"
        sequence = 0

        def course(c: int, count: int) -> str:
            return (
                f'{{"id":{c},"code":"C-{c}","title":"Course {c}","capacity":0,'
                f'"enrolled_count":{count},"waitlist_capacity":0,"waitlisted_count":0,'
                f'"create_time":"{t}","update_time":"{t}","version":1}}'
            )

        for c in range(1, shape.courses + 1):
            sequence += 1
            yield (sequence, now, _COURSE_CREATED, 0, c, f'{{"course":{course(c, 0)}}}', "", "")
        running = [0] * (shape.courses + 1)
        for s in range(1, shape.students + 1):
            sequence += 1
            student = (
                f'{{"student":{{"id":{s},"name":"Student {s}","email":"s{s}@example.com",'
                f'"create_time":"{t}","update_time":"{t}","version":1}}}}'
            )
            yield (sequence, now, _STUDENT_CREATED, s, 0, student, "", "")
            for c in sorted(shape.enrolled(s)):
                sequence += 1
                running[c] += 1
                payload = (
                    f'{{"enrollment":{{"student_id":{s},"course_id":{c},"state":1,'
                    f'"waitlist_position":0,"create_time":"{t}","enroll_time":"{t}"}},'
                    f'"course":{course(c, running[c])}}}'
                )
                yield (sequence, now, _ENROLLED, s, c, payload, "", "")


def seed(database_url: str, shape: Shape, *, events: bool = False) -> None:
    """Fill a freshly migrated, empty database with shape's rows, enrolled_count kept
    exact; events: also the change feed those rows would have made (and its counter)."""
    target = engine.parse(database_url)
    if target.kind == "sqlite":
        _seed_sqlite(target.params["database"], shape, events)
        return
    db = engine.open_pool(database_url, max_connections=1)
    try:
        with db.connection_context():
            _refuse_filled(db, database_url)
            indexes = _drop_indexes(db, target.kind)
            with db.atomic():
                for table, columns, rows in _Rows(shape, dt.datetime(2026, 1, 1)).tables(events):
                    if target.kind == "postgresql":
                        _copy(db, table, columns, rows)
                        continue
                    insert = pw.Table(table, columns)
                    for batch in _chunks(rows):
                        insert.insert(batch).bind(db).execute()
            for sql in indexes:
                db.execute_sql(sql)
            if target.kind == "postgresql":
                migrator.sync_sequences(db)  # COPY wrote the ids itself
                db.execute_sql("ANALYZE")  # what autovacuum would have done by now
    finally:
        engine.close_pool()


def _copy(db, table: str, columns: tuple[str, ...], rows: Iterable[tuple]) -> None:
    """PostgreSQL's COPY FROM STDIN in text format, 100,000 rows at a time (the seeded
    values hold no tab, newline or backslash, the characters it would escape)."""
    sql = f"COPY {table} ({', '.join(columns)}) FROM STDIN"
    cursor = db.cursor()
    for batch in _chunks(rows, 100_000):
        text = "".join("\t".join(map(str, row)) + "\n" for row in batch)
        cursor.copy_expert(sql, io.StringIO(text))


def _refuse_filled(db, database_url: str) -> None:
    for table in ("students", "courses"):
        if db.execute_sql(f"SELECT 1 FROM {table} LIMIT 1").fetchone():
            raise SystemExit(f"refusing to seed {database_url}: it already holds rows")


def _drop_indexes(db, kind: str) -> list[str]:
    """Drop the seeded tables' secondary indexes (PostgreSQL); the statements that make
    them again. MariaDB keeps its indexes (its foreign keys need them)."""
    if kind != "postgresql":
        return []
    rows = db.execute_sql(
        "SELECT i.indexname, i.indexdef FROM pg_indexes i "
        "WHERE i.schemaname = current_schema() AND i.tablename IN %s AND NOT EXISTS ("
        " SELECT 1 FROM pg_constraint c WHERE c.conname = i.indexname)",
        (_TABLES,),
    ).fetchall()
    for name, _ in rows:
        db.execute_sql(f'DROP INDEX "{name}"')
    return [sql for _, sql in rows]


def _seed_sqlite(path: str, shape: Shape, events: bool) -> None:
    """sqlite3's executemany over generators in one transaction, written straight into
    the file (a rollback journal, which for a new database holds almost nothing, not the
    WAL, which would hold every page twice), without fsync and with a large cache; the
    file is left in WAL mode, as the server keeps it."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = DELETE")
        conn.execute("PRAGMA synchronous = OFF")
        conn.execute("PRAGMA cache_size = -1000000")  # KiB: about 1 GB
        conn.execute("PRAGMA temp_store = MEMORY")
        conn.execute("BEGIN IMMEDIATE")
        _refuse_filled_sqlite(conn, path)
        names = ",".join("?" * len(_TABLES))
        indexes = conn.execute(
            f"SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL "
            f"AND tbl_name IN ({names})",
            _TABLES,
        ).fetchall()
        for name, _ in indexes:
            conn.execute(f'DROP INDEX "{name}"')
        # peewee's text form of a DateTimeField on SQLite.
        for table, columns, rows in _Rows(shape, "2026-01-01 00:00:00").tables(events):
            marks = ",".join("?" * len(columns))
            conn.executemany(f"INSERT INTO {table} ({','.join(columns)}) VALUES ({marks})", rows)
        for _, sql in indexes:
            conn.execute(sql)
        conn.execute("COMMIT")
        conn.execute("PRAGMA journal_mode = WAL")
    finally:
        conn.close()


def _refuse_filled_sqlite(conn: sqlite3.Connection, path: str) -> None:
    for table in ("students", "courses"):
        if conn.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone():
            raise SystemExit(f"refusing to seed {path}: it already holds rows")
