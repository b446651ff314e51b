"""The databases the suite runs on: which are selected, and a throwaway database on each."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import peewee as pw

from enrollment.server.persistence import engine

ALL = ("sqlite", "postgresql", "mysql")
DEFAULT_URLS = {
    "postgresql": "postgresql://postgres@127.0.0.1:5432/test",
    "mysql": "mysql://root@127.0.0.1:3306/test",
}
TABLES = ("student_courses", "courses", "students", "request_records")  # children first


def selected(option: str | None) -> list[str]:
    """--databases, else TEST_DATABASES, else all three."""
    text = option or os.environ.get("TEST_DATABASES") or ",".join(ALL)
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    unknown = sorted(set(names) - set(ALL))
    if unknown:
        raise ValueError(f"unknown database(s) {unknown}; choose from {', '.join(ALL)}")
    return names


def admin_url(kind: str) -> str:
    """The server a kind's test databases are made on (TEST_POSTGRESQL_URL / TEST_MYSQL_URL)."""
    return os.environ.get(f"TEST_{kind.upper()}_URL", DEFAULT_URLS[kind])


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@dataclass
class Server:
    """A PostgreSQL or MariaDB server the tests may create databases on."""

    kind: str
    url: str

    def admin(self) -> pw.Database:
        return engine.open_probe(self.url, timeout=5)

    def check(self) -> None:
        """Raise with the driver's reason when the server cannot be reached."""
        db = self.admin()
        try:
            engine.ping(db)
        finally:
            db.close()

    def create(self, prefix: str = "enrollment_test") -> str:
        name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        self._run(f"CREATE DATABASE {name}")
        return with_database(self.url, name)

    def drop(self, url: str) -> None:
        name = urlsplit(url).path.lstrip("/")
        if self.kind == "postgresql":
            self._run(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        else:
            self._run(f"DROP DATABASE IF EXISTS {name}")

    def _run(self, sql: str) -> None:
        db = self.admin()
        db.connect()
        try:
            if self.kind == "postgresql":
                db.connection().autocommit = True  # CREATE/DROP DATABASE refuse a transaction
            db.execute_sql(sql)
        finally:
            db.close()


def kind_of(url: str) -> str:
    return engine.parse(url, create=True).kind


@contextlib.contextmanager
def connection(url: str) -> Iterator[pw.Database]:
    """A plain connection of the test's own, beside the server's pool, with the server's
    settings (the same unpooled database the health probe uses)."""
    db = engine.open_probe(url, timeout=10)
    db.connect()
    try:
        yield db
    finally:
        db.close()


def sql(db: pw.Database, text: str, params: tuple = ()) -> list[tuple]:
    """Run one statement, written with ? placeholders, in its own transaction."""
    if db.param != "?":
        text = text.replace("?", db.param)
    with db.atomic():
        cursor = db.execute_sql(text, params)
        return list(cursor.fetchall()) if cursor.description else []


def query(url: str, text: str, params: tuple = ()) -> list[tuple]:
    with connection(url) as db:
        return sql(db, text, params)


def table_counts(url: str) -> tuple[int, int, int]:
    with connection(url) as db:
        return tuple(
            sql(db, f"SELECT COUNT(*) FROM {t}")[0][0]
            for t in ("students", "courses", "student_courses")
        )


def miscounted_courses(url: str) -> list[str]:
    """Each course whose enrolled_count or waitlisted_count differs from its entries in
    that state, or whose roster exceeds its capacity (0 = unlimited); the tests and the
    bench must leave none. Read with plain SQL, not the server's models."""
    rows = query(
        url,
        "SELECT c.id, c.capacity, c.enrolled_count, c.waitlisted_count, "
        "SUM(CASE WHEN sc.state = 1 THEN 1 ELSE 0 END), "
        "SUM(CASE WHEN sc.state = 2 THEN 1 ELSE 0 END) FROM courses c "
        "LEFT JOIN student_courses sc ON sc.course_id = c.id "
        "GROUP BY c.id, c.capacity, c.enrolled_count, c.waitlisted_count ORDER BY c.id",
    )
    return [
        f"course {course_id}: enrolled_count {enrolled}, roster {roster}, "
        f"waitlisted_count {waitlisted}, waiting {waiting}, capacity {capacity}"
        for course_id, capacity, enrolled, waitlisted, roster, waiting in (
            (r[0], r[1], r[2], r[3], int(r[4] or 0), int(r[5] or 0)) for r in rows
        )
        if enrolled != roster or waitlisted != waiting or (capacity and roster > capacity)
    ]


def snapshot(url: str) -> dict[str, list[tuple]]:
    """Every row of every table (update_time and counts included)."""
    with connection(url) as db:
        return {
            "students": sql(db, "SELECT * FROM students ORDER BY id"),
            "courses": sql(db, "SELECT * FROM courses ORDER BY id"),
            "student_courses": sql(
                db, "SELECT * FROM student_courses ORDER BY student_id, course_id"
            ),
            "request_records": sql(
                db,
                "SELECT request_id, method, fingerprint, create_time FROM request_records "
                "ORDER BY request_id",
            ),  # fmt: skip
        }


def empty_tables(url: str) -> None:
    with connection(url) as db, db.atomic():
        for table in TABLES:
            db.execute_sql(f"DELETE FROM {table}")
        # The change feed starts over too, from sequence 1.
        db.execute_sql("DELETE FROM events")
        db.execute_sql("DELETE FROM event_counters")


class write_blocked:  # noqa: N801 - used as a context manager, like a function
    """Hold, from another connection, what a CreateStudent with this email must wait for.

    SQLite: the whole database's write lock. PostgreSQL and MariaDB lock rows, not
    the database: an uncommitted student with the same email key makes the insert wait
    for this transaction. release() (or leaving the block) rolls it back.
    """

    def __init__(self, url: str, email: str) -> None:
        self._url, self._email = url, email
        self._db: pw.Database | None = None

    def __enter__(self) -> write_blocked:
        db = self._db = connection(self._url).__enter__()
        if isinstance(db, pw.SqliteDatabase):
            db.execute_sql("BEGIN IMMEDIATE")
        else:
            db.begin()
            db.execute_sql(
                "INSERT INTO students (name, email, email_key, create_time) "
                f"VALUES ({db.param}, {db.param}, {db.param}, {db.param})",
                ("Blocker", self._email, self._email.lower(), "2026-01-01 00:00:00"),
            )
        return self

    def release(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            try:
                db.rollback()
            finally:
                db.close()

    def __exit__(self, *exc) -> None:
        self.release()


def sqlite_path(live) -> str:
    """The file of a live server's SQLite database (tests marked databases("sqlite"))."""
    return live.database_url.removeprefix("sqlite:///")


def sqlite_file(tmp_path: Path, name: str = "enrollment.db") -> str:
    return f"sqlite:///{tmp_path / name}"


def sql_count(url: str, table: str) -> int:
    return query(url, f"SELECT COUNT(*) FROM {table}")[0][0]


def insert_events(url: str, count: int) -> None:
    """count STUDENT_CREATED events numbered 1..count, straight into an empty feed."""
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    stamp = now.isoformat()
    student = {"id": 1, "name": "n", "email": "e@x.io", "create_time": stamp}
    payload = json.dumps({"student": {**student, "update_time": stamp, "version": 1}})
    with connection(url) as db, db.atomic():
        rows = [(n, now, 1, 1, 0, payload, "", "") for n in range(1, count + 1)]
        columns = "sequence, event_time, type, student_id, course_id, payload, request_id, actor"
        marks = ", ".join([db.param] * 8)
        for row in rows:
            db.execute_sql(f"INSERT INTO events ({columns}) VALUES ({marks})", row)
        db.execute_sql(
            f"INSERT INTO event_counters (name, value) VALUES ('sequence', {db.param})", (count,)
        )


def age_events(url: str, *, through: int, days: int) -> None:
    """Make the events up to sequence `through` look `days` days old."""
    old = dt.datetime.now(dt.UTC).replace(tzinfo=None) - dt.timedelta(days=days)
    query(url, "UPDATE events SET event_time = ? WHERE sequence <= ?", (old, through))
