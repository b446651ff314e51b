"""Time `migrate` of the newest migration on a database holding many v1.0 enrollments.

python -m bench.migration --database-url URL [--enrollments N]: the URL's database must
not exist yet (SQLite) or be empty; it is migrated to the migration before the newest,
seeded with N enrollments (N/5 students, 5 courses each, from 500 courses) the way a
v1.0 server stores them, then `migrate` runs once and its wall time is printed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time

import peewee as pw
from peewee_migrate import Router

from enrollment.migrations import MIGRATIONS_DIR
from enrollment.server.persistence import engine, migrator

CHUNK = 2000
COURSES = 500
PER_STUDENT = 5


def _chunks(rows, size=CHUNK):
    batch = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def seed_v1(db: pw.Database, enrollments: int) -> None:
    """v1.0 rows, written with the v1.0 columns only."""
    students = enrollments // PER_STUDENT
    now = dt.datetime(2026, 1, 1)
    s_table = pw.Table("students", ("id", "name", "email", "email_key", "create_time"))
    c_table = pw.Table(
        "courses", ("id", "code", "code_key", "title", "capacity", "enrolled_count", "create_time")
    )
    e_table = pw.Table("student_courses", ("student_id", "course_id", "enroll_time"))
    counts = [0] * (COURSES + 1)
    pairs = []
    for s in range(1, students + 1):
        for j in range(PER_STUDENT):
            c = ((s * 7 + j * 101) % COURSES) + 1
            pairs.append((s, c))
            counts[c] += 1
    with db.atomic():
        rows = ((s, f"S {s}", f"s{s}@example.com", f"s{s}@example.com", now)
                for s in range(1, students + 1))  # fmt: skip
        for batch in _chunks(rows):
            s_table.insert(batch).bind(db).execute()
        rows = ((c, f"C-{c}", f"c-{c}", f"Course {c}", 0, counts[c], now)
                for c in range(1, COURSES + 1))  # fmt: skip
        for batch in _chunks(rows):
            c_table.insert(batch).bind(db).execute()
        for batch in _chunks((s, c, now) for s, c in pairs):
            e_table.insert(batch).bind(db).execute()


def migrate_all_but_newest(database_url: str) -> None:
    """Create the schema as the migration before the newest leaves it."""
    db = engine.open_pool(database_url, max_connections=1, create=True)
    try:
        with db.connection_context():
            Router(db, migrate_dir=MIGRATIONS_DIR).run(migrator.known_migrations()[-2])
    finally:
        engine.close_pool()


def migrate_timed(database_url: str) -> tuple[list[str], float]:
    """Apply the pending migrations: their names and the wall time it took."""
    db = engine.open_pool(database_url, max_connections=1)
    try:
        started = time.perf_counter()
        applied = migrator.migrate(db)
        return applied, time.perf_counter() - started
    finally:
        engine.close_pool()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.migration", description=__doc__)
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--enrollments", type=int, default=1_000_000)
    args = parser.parse_args(argv)
    names = migrator.known_migrations()
    db = engine.open_pool(args.database_url, max_connections=1, create=True)
    try:
        with db.connection_context():
            Router(db, migrate_dir=MIGRATIONS_DIR).run(names[-2])
            started = time.perf_counter()
            seed_v1(db, args.enrollments)
            seeded = time.perf_counter() - started
        if isinstance(db, pw.PostgresqlDatabase):
            with db.connection_context():
                db.execute_sql("ANALYZE")
        steps = _timed_statements(db)
        started = time.perf_counter()
        applied = migrator.migrate(db)
        took = time.perf_counter() - started
    finally:
        engine.close_pool()
    kind = engine.parse(args.database_url).kind
    print(
        f"{kind}: seeded {args.enrollments:,} v1.0 enrollments in {seeded:.1f} s; "
        f"migrate ({', '.join(applied)}) took {took:.2f} s"
    )
    for seconds, sql in sorted(steps, reverse=True)[:8]:
        print(f"  {seconds:7.2f} s  {' '.join(sql.split())[:110]}")
    return 0


def _timed_statements(db: pw.Database) -> list[tuple[float, str]]:
    """Record each statement's wall time from here on (the slowest are printed)."""
    steps: list[tuple[float, str]] = []
    execute_sql = db.execute_sql

    def timed(sql, params=None, *args, **kwargs):
        started = time.perf_counter()
        try:
            return execute_sql(sql, params, *args, **kwargs)
        finally:
            steps.append((time.perf_counter() - started, sql))

    db.execute_sql = timed
    return steps


if __name__ == "__main__":
    sys.exit(main())
