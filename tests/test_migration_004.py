"""Migration 004 on every database: rows kept through up, rollback and up again; the new
columns mean v1.0; the migrated schema equals the models' on PostgreSQL and MariaDB too."""

from __future__ import annotations

import datetime as dt
import subprocess

import peewee as pw
import pytest
from peewee_migrate import Router

from enrollment.migrations import MIGRATIONS_DIR
from enrollment.server.persistence import engine, migrator
from enrollment.server.persistence.models import MODELS
from tests import databases
from tests.servers import SERVER

M003 = "003_mysql_utf8mb4_and_microseconds"
M004 = "004_waitlists_updates_and_etags"
BASE = dt.datetime(2025, 3, 1, 9, 30, 0, 123456)
V1_COLUMNS = {
    "students": "id, name, email, email_key, create_time",
    "courses": "id, code, code_key, title, capacity, enrolled_count, create_time",
    "student_courses": "student_id, course_id, enroll_time",
}
ORDER = {"students": "id", "courses": "id", "student_courses": "student_id, course_id"}


def _open(url: str) -> pw.Database:
    if url.startswith("sqlite:///"):
        open(url.removeprefix("sqlite:///"), "a").close()  # noqa: SIM115 - creates the file
    db = engine.open_probe(url, timeout=30)
    db.connect()
    return db


def _fill_v1(db: pw.Database) -> None:
    """Rows as a v1.0 server wrote them: 30 students, 6 courses, 90 enrollments."""
    with db.atomic():
        for s in range(1, 31):
            databases.sql(
                db,
                "INSERT INTO students (id, name, email, email_key, create_time) "
                "VALUES (?, ?, ?, ?, ?)",
                (s, f"Zoë {s} 李", f"S{s}@Example.org", f"s{s}@example.org",
                 BASE + dt.timedelta(seconds=s, microseconds=s)),
            )  # fmt: skip
        for c in range(1, 7):
            databases.sql(
                db,
                "INSERT INTO courses (id, code, code_key, title, capacity, enrolled_count, "
                "create_time) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (c, f"C-{c}", f"c-{c}", f"Théorie {c}", 0 if c % 2 else 40, 15,
                 BASE + dt.timedelta(hours=c)),
            )  # fmt: skip
        for s in range(1, 31):
            for c in {(s % 6) + 1, ((s + 2) % 6) + 1, ((s + 4) % 6) + 1}:
                databases.sql(
                    db,
                    "INSERT INTO student_courses (student_id, course_id, enroll_time) "
                    "VALUES (?, ?, ?)",
                    (s, c, BASE + dt.timedelta(minutes=s, microseconds=c)),
                )


def _v1_snapshot(db: pw.Database) -> dict[str, list[tuple]]:
    return {
        t: databases.sql(db, f"SELECT {cols} FROM {t} ORDER BY {ORDER[t]}")
        for t, cols in V1_COLUMNS.items()
    }


def _columns(db: pw.Database, table: str) -> set[str]:
    return {c.name for c in db.get_columns(table)}


def test_004_up_rollback_up_keeps_every_row_and_means_v1(backend, new_database):
    url = new_database()
    db = _open(url)
    try:
        Router(db, migrate_dir=MIGRATIONS_DIR).run(M003)
        assert migrator.applied_migrations(db)[-1] == M003
        _fill_v1(db)
        before = _v1_snapshot(db)
        assert [len(rows) for rows in before.values()] == [30, 6, 90]

        for step in ("up", "rollback", "up again"):
            if step == "rollback":
                assert migrator.rollback(db) == M004
                assert "state" not in _columns(db, "student_courses")
                assert "version" not in _columns(db, "courses")
            else:
                assert Router(db, migrate_dir=MIGRATIONS_DIR).run(M004) == [M004]
                # What v1.0 meant: every entry ENROLLED and never waited, no waitlists,
                # every student and course at its first version, updated when created.
                assert databases.sql(
                    db, "SELECT DISTINCT state, join_number, promote_time FROM student_courses"
                ) == [(1, 0, None)], step
                assert databases.sql(
                    db,
                    "SELECT DISTINCT waitlist_capacity, waitlisted_count, waitlist_joins, "
                    "version FROM courses",
                ) == [(0, 0, 0, 1)], step
                for table in ("students", "courses"):
                    assert databases.sql(
                        db,
                        f"SELECT COUNT(*) FROM {table} "
                        "WHERE version <> 1 OR update_time IS NULL OR update_time <> create_time",
                    ) == [(0,)], (step, table)
            assert _v1_snapshot(db) == before, step
    finally:
        db.close()


def test_004_rollback_is_refused_while_anyone_waits(backend, new_database):
    url = new_database()
    db = _open(url)
    try:
        Router(db, migrate_dir=MIGRATIONS_DIR).run(M003)
        _fill_v1(db)
        Router(db, migrate_dir=MIGRATIONS_DIR).run(M004)
        databases.sql(
            db, "UPDATE student_courses SET state = 2, join_number = 1 "
            "WHERE student_id = 1 AND course_id = 2",
        )  # fmt: skip
        with pytest.raises(Exception, match="waitlisted entries"):
            migrator.rollback(db)
        assert migrator.applied_migrations(db)[-1] == M004
        # The command says so in one line, exit 2 (it was two peewee-migrate tracebacks).
        done = _command("rollback", url)
        assert done.returncode == 2, done.stderr
        assert _failure_lines(done.stderr) == [
            "enrollment-server: rolling back 004 would turn 1 waitlisted entries into "
            "enrollments; drop them (DropCourse) first. Nothing was changed."
        ], done.stderr
        assert migrator.applied_migrations(db)[-1] == M004
        assert "state" in _columns(db, "student_courses")
        assert databases.sql(db, "SELECT COUNT(*) FROM student_courses WHERE state = 2") == [(1,)]
    finally:
        db.close()


def test_004_rollback_keeps_waitlist_capacities_unless_told(backend, new_database):
    # A course's waitlist capacity is a setting someone chose; v1.0 has no column for it,
    # so rolling 004 back would lose it. It was dropped without a word.
    url = new_database()
    db = _open(url)
    try:
        Router(db, migrate_dir=MIGRATIONS_DIR).run(M003)
        _fill_v1(db)
        Router(db, migrate_dir=MIGRATIONS_DIR).run(M004)
        databases.sql(db, "UPDATE courses SET waitlist_capacity = 5 WHERE id IN (2, 4)")
        with pytest.raises(migrator.DataLossRefused, match="waitlist capacity of 2 courses"):
            migrator.rollback(db)
        done = _command("rollback", url)
        assert done.returncode == 2, done.stderr
        assert _failure_lines(done.stderr) == [
            f"enrollment-server: rolling back {M004} would lose the waitlist capacity of 2 "
            "courses; nothing was changed (pass --allow-data-loss to lose it)"
        ], done.stderr
        assert migrator.applied_migrations(db)[-1] == M004
        assert databases.sql(db, "SELECT COUNT(*) FROM courses WHERE waitlist_capacity = 5") == [
            (2,)
        ]
        assert migrator.rollback(db, allow_data_loss=True) == M004
        assert "waitlist_capacity" not in _columns(db, "courses")
    finally:
        db.close()


def _failure_lines(stderr: str) -> list[str]:
    """What a schema command wrote besides its INFO progress lines."""
    return [line for line in stderr.splitlines() if " INFO " not in line]


def _command(*args: str) -> subprocess.CompletedProcess[str]:
    *command, url = args
    return subprocess.run(
        [SERVER, *command, "--database-url", url], capture_output=True, text=True, timeout=120
    )


def _with_a_newer_versions_migration(url: str) -> pw.Database:
    """The database at url migrated, plus a migration only a newer version has; open."""
    db = _open(url)
    migrator.migrate(db)
    databases.sql(db, "INSERT INTO migratehistory (name, migrated_at) VALUES (?, ?)",
                  ("999_future_thing", BASE))  # fmt: skip
    return db


def test_rollback_of_a_newer_versions_migration_is_refused_in_one_line(backend, new_database):
    # Rolled back with the older binary after a deploy was reverted: it was a traceback
    # ending in FileNotFoundError, with the path of the file it looked for.
    url = new_database()
    db = _with_a_newer_versions_migration(url)
    try:
        done = _command("rollback", url)
        assert done.returncode == 2, done.stderr
        (line,) = _failure_lines(done.stderr)
        assert "999_future_thing" in line and "newer version" in line, done.stderr
        assert "/" not in line, line  # no path of a file it looked for
        assert migrator.applied_migrations(db)[-1] == "999_future_thing"
    finally:
        db.close()


@pytest.mark.databases("sqlite")
def test_status_and_migrate_name_a_newer_versions_migration(backend, new_database):
    # status listed it as a plain "applied" line and migrate said "schema is up to
    # date": an operator running the older binary was not told the schema is newer.
    url = new_database()
    _with_a_newer_versions_migration(url).close()
    status = _command("status", url)
    assert status.returncode == 0, status.stderr
    assert status.stdout.splitlines()[-1] == (
        "applied  999_future_thing (unknown to this version: a newer version applied it)"
    ), status.stdout
    done = _command("migrate", url)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        "nothing to apply; the schema is newer than this version (999_future_thing)"
    ), done.stdout


def _schema(db: pw.Database) -> dict[str, list[tuple]]:
    """Per table: (column, type, nullable, default) and (index columns, unique)."""
    out = {}
    for table in V1_COLUMNS:
        cols = sorted(
            (c.name, c.data_type.lower(), c.null, _norm_default(c.default))
            for c in db.get_columns(table)
        )
        idx = sorted((tuple(i.columns), i.unique) for i in db.get_indexes(table))
        out[table] = [*cols, *idx]
    return out


def _norm_default(value) -> str | None:
    if value is None:
        return None
    text = str(value).strip("'()")
    return text.split("::")[0].strip("'")


@pytest.mark.databases("postgresql", "mysql")
def test_migrated_schema_equals_the_models(backend, new_database):
    migrated_url, modeled_url = new_database(), new_database()
    db = engine.open_pool(migrated_url, max_connections=1, create=True)
    migrator.migrate(db)
    engine.close_pool()
    db = engine.open_pool(modeled_url, max_connections=1, create=True)
    with db.connection_context():
        db.create_tables(MODELS)
    engine.close_pool()
    a, b = _open(migrated_url), _open(modeled_url)
    try:
        assert _schema(a) == _schema(b)
        assert ("state", "smallint", False, "1") in _schema(a)["student_courses"]
    finally:
        a.close()
        b.close()


@pytest.mark.databases("mysql")
def test_004_cut_short_on_mariadb_completes_when_run_again(backend, new_database):
    """MariaDB commits each ALTER TABLE by itself: 004 stopped between two (here by a
    lock wait on courses that ran out, a long transaction having read it) leaves the
    students' new columns in place. Running migrate again completes it, with the
    schema of a migration that ran through."""
    url, whole_url = new_database(), new_database()
    db = _open(url)
    try:
        Router(db, migrate_dir=MIGRATIONS_DIR).run(M003)
        _fill_v1(db)
        before = _v1_snapshot(db)
    finally:
        db.close()
    with databases.connection(url) as holder:
        holder.execute_sql("BEGIN")
        holder.execute_sql("SELECT COUNT(*) FROM courses").fetchone()
        pool = engine.open_pool(url, max_connections=1, timeout=1)
        try:
            with pytest.raises(pw.DatabaseError):
                migrator.migrate(pool)
        finally:
            engine.close_pool()
            holder.execute_sql("ROLLBACK")
    db = _open(url)
    try:
        assert "version" in _columns(db, "students")  # cut short: part of 004 is there
        assert migrator.applied_migrations(db)[-1] == M003
    finally:
        db.close()

    pool = engine.open_pool(url, max_connections=1, timeout=5)
    try:
        assert migrator.migrate(pool)[0] == M004
    finally:
        engine.close_pool()
    pool = engine.open_pool(whole_url, max_connections=1, timeout=5)
    try:
        migrator.migrate(pool)
    finally:
        engine.close_pool()
    a, b = _open(url), _open(whole_url)
    try:
        assert _schema(a) == _schema(b)
        assert _v1_snapshot(a) == before
    finally:
        a.close()
        b.close()
