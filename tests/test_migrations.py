"""Migrations on real SQLite files: rows survive, reruns are no-ops, schema == models, CLIs.

Every database here is a file under tmp_path. Migrations run on databases of their own
(plain peewee.SqliteDatabase objects), not on the app's DatabaseProxy; the few tests that
use the proxy (server.db.connect) close it in a fixture teardown.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path

import peewee as pw
import pytest
from peewee_migrate import Router

import enrollment.server.persistence.models
from enrollment.migrations import MIGRATIONS_DIR
from enrollment.server.persistence import engine, migrator

M001 = "001_create_students_and_courses"
M002 = "002_create_student_courses"
M003 = "003_mysql_utf8mb4_and_microseconds"  # changes nothing on SQLite
M004 = "004_waitlists_updates_and_etags"
M005 = "005_change_feed"
M006 = "006_request_records"
ALL_MIGRATIONS = [M001, M002, M003, M004, M005, M006]
TABLES = (
    "students", "courses", "student_courses", "events", "event_counters", "request_records",
)  # fmt: skip
KEPT_TABLES = ("students", "courses")  # tables 002 and its rollback must not touch

REPO_ROOT = Path(__file__).resolve().parent.parent
BIN_DIR = Path(sys.executable).parent
CLI_TIMEOUT = 60
SERVE_TIMEOUT = 20  # a server that wrongly starts is killed after this long

UNICODE_NAMES = (
    "Zoë Ångström",
    "Łukasz Żółć",
    "李小龍",
    "مريم الحسن",
    "Søren Kierkegaard",
    'O\'Brien "Quote"; DROP TABLE students; --',
    "José 🙂 Núñez",
    "Ελένη Παπαδοπούλου",
    "Nguyễn Văn Ánh",
    "Ольга Петрова",
)
BASE_TIME = dt.datetime(2024, 1, 31, 8, 0, 0)
BIG_ID = 2**40  # ids are 64-bit


# --------------------------------------------------------------------------- data


def student_rows() -> list[tuple]:
    """50 students; ids with gaps, unicode names, one 64-bit id; in insertion (id) order."""
    rows = []
    for i in range(50):
        sid = BIG_ID if i == 49 else 7 + 3 * i + 100 * (i // 10)
        email = f"Student.{i}@Example.ORG"
        created = BASE_TIME + dt.timedelta(days=i, seconds=37 * i, microseconds=1001 * i)
        rows.append((sid, f"{UNICODE_NAMES[i % 10]} #{i}", email, email.lower(), str(created)))
    return rows


def course_rows() -> list[tuple]:
    """20 courses; ids with gaps, unicode titles, unlimited (0) and limited capacities."""
    rows = []
    for i in range(20):
        cid = BIG_ID + 5 if i == 19 else 1 + i * i
        code = f"Cs-{100 + i}É"
        capacity = 0 if i % 4 == 0 else 10 + i
        enrolled = i if capacity == 0 else min(i, capacity)
        title = f"{UNICODE_NAMES[(i + 3) % 10]}: Théorie des catégories {i}"
        created = BASE_TIME + dt.timedelta(hours=i, microseconds=7 * i)
        rows.append((cid, code, code.lower(), title, capacity, enrolled, str(created)))
    return rows


def insert_students_and_courses(db: pw.Database) -> tuple[list[tuple], list[tuple]]:
    students, courses = student_rows(), course_rows()
    with db.atomic():
        for row in students:
            db.execute_sql(
                "INSERT INTO students (id, name, email, email_key, create_time) "
                "VALUES (?, ?, ?, ?, ?)",
                row,
            )
        for row in courses:
            db.execute_sql(
                "INSERT INTO courses "
                "(id, code, code_key, title, capacity, enrolled_count, create_time) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                row,
            )
    return students, courses


def insert_enrollments(db: pw.Database) -> list[tuple[int, int]]:
    """Enroll students into courses and keep courses.enrolled_count consistent."""
    student_ids = [row[0] for row in student_rows()]
    course_ids = [row[0] for row in course_rows()]
    pairs = sorted(
        {
            (sid, course_ids[(i * k) % len(course_ids)])
            for i, sid in enumerate(student_ids[:40])
            for k in (1, 3)
        }
    )
    with db.atomic():
        for n, (sid, cid) in enumerate(pairs):
            db.execute_sql(
                "INSERT INTO student_courses (student_id, course_id, enroll_time) VALUES (?, ?, ?)",
                (sid, cid, str(BASE_TIME + dt.timedelta(minutes=n))),
            )
        db.execute_sql(
            "UPDATE courses SET capacity = 0, enrolled_count = "
            "(SELECT count(*) FROM student_courses WHERE course_id = courses.id)"
        )
    return pairs


# --------------------------------------------------------------------------- inspection


def table_exists(db: pw.Database, table: str) -> bool:
    cursor = db.execute_sql(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
    )
    return cursor.fetchone() is not None


def table_contents(db: pw.Database, table: str) -> tuple[list[str], list[tuple]]:
    """Column names and every row (with SQLite's storage class per value), in rowid order."""
    cursor = db.execute_sql(f'SELECT * FROM "{table}" ORDER BY rowid')
    names = [d[0] for d in cursor.description]
    rows = cursor.fetchall()
    types_sql = ", ".join(f'typeof("{n}")' for n in names)
    types = db.execute_sql(f'SELECT {types_sql} FROM "{table}" ORDER BY rowid').fetchall()
    return names, [
        tuple(zip(row, kinds, strict=True)) for row, kinds in zip(rows, types, strict=True)
    ]


def kept_snapshot(db: pw.Database) -> dict:
    """Everything 002 must leave alone: rows, DDL and AUTOINCREMENT counters of 001's tables."""
    snap = {table: table_contents(db, table) for table in KEPT_TABLES}
    snap["ddl"] = db.execute_sql(
        "SELECT type, name, tbl_name, sql FROM sqlite_master "
        "WHERE tbl_name IN ('students', 'courses') ORDER BY type, name"
    ).fetchall()
    snap["sqlite_sequence"] = db.execute_sql(
        "SELECT name, seq FROM sqlite_sequence ORDER BY name"
    ).fetchall()
    return snap


def plain_rows(db: pw.Database, table: str) -> list[tuple]:
    return db.execute_sql(f'SELECT * FROM "{table}" ORDER BY rowid').fetchall()


V1_COLUMNS = {
    "students": "id, name, email, email_key, create_time",
    "courses": "id, code, code_key, title, capacity, enrolled_count, create_time",
    "student_courses": "student_id, course_id, enroll_time",
}


def v1_rows(db: pw.Database, table: str) -> list[tuple]:
    """The columns a table had in v1.0 (before 004 added its own), every row."""
    return db.execute_sql(f'SELECT {V1_COLUMNS[table]} FROM "{table}" ORDER BY rowid').fetchall()


def fk_violations(db: pw.Database) -> list[tuple]:
    return db.execute_sql("PRAGMA foreign_key_check").fetchall()


def assert_healthy(db: pw.Database) -> None:
    assert fk_violations(db) == []
    assert db.execute_sql("PRAGMA integrity_check").fetchall() == [("ok",)]


def master(db_or_conn) -> list[tuple]:
    execute = db_or_conn.execute_sql if isinstance(db_or_conn, pw.Database) else db_or_conn.execute
    return execute(
        "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name"
    ).fetchall()


def history(db: pw.Database) -> list[tuple]:
    return db.execute_sql("SELECT id, name, migrated_at FROM migratehistory ORDER BY id").fetchall()


def router(db: pw.Database) -> Router:
    return Router(db, migrate_dir=MIGRATIONS_DIR)


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def open_db(tmp_path: Path) -> Iterator[Callable[[str], pw.SqliteDatabase]]:
    """Opens SQLite files under tmp_path with the app's pragmas; closes them all at teardown."""
    opened: list[pw.SqliteDatabase] = []

    def open_(name: str) -> pw.SqliteDatabase:
        db = pw.SqliteDatabase(str(tmp_path / name), pragmas=engine.SQLITE_PRAGMAS)
        db.connect()
        opened.append(db)
        return db

    yield open_
    for db in opened:
        db.close()


@pytest.fixture
def db_at_001(open_db) -> tuple[pw.SqliteDatabase, list[tuple], list[tuple]]:
    """A file with only 001 applied, holding 50 students and 20 courses."""
    db = open_db("at_001.db")
    assert router(db).run(M001) == [M001]
    assert migrator.applied_migrations(db) == [M001]
    assert not table_exists(db, "student_courses")
    students, courses = insert_students_and_courses(db)
    # The rows read back exactly as written (so later comparisons compare real data).
    assert plain_rows(db, "students") == students
    assert plain_rows(db, "courses") == courses
    return db, students, courses


@pytest.fixture
def app_database(tmp_path: Path) -> Iterator[pw.Database]:
    """The app's own database object (PooledSqliteDatabase behind the proxy), closed after."""
    db = engine.open_pool(sqlite_url(tmp_path / "app.db"), max_connections=2, create=True)
    try:
        yield db
    finally:
        engine.close_pool()


def build_migrated(path: Path) -> None:
    db = pw.SqliteDatabase(str(path), pragmas=engine.SQLITE_PRAGMAS)
    try:
        with db.connection_context():
            assert router(db).run() == ALL_MIGRATIONS
    finally:
        db.close()


def build_from_models(path: Path) -> None:
    """db.create_tables(MODELS), the models bound through the app's proxy; closed after."""
    db = engine.open_pool(sqlite_url(path), max_connections=1, create=True)
    try:
        assert enrollment.server.persistence.models.proxy.obj is db
        with db.connection_context():
            db.create_tables(enrollment.server.persistence.models.MODELS)
    finally:
        engine.close_pool()


@pytest.fixture(scope="module")
def schema_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(built by the migrations, built by create_tables(MODELS)); never written afterwards."""
    base = tmp_path_factory.mktemp("schema")
    migrated, modeled = base / "migrated.db", base / "models.db"
    build_migrated(migrated)
    build_from_models(modeled)
    return migrated, modeled


@pytest.fixture
def schema_conns(schema_files) -> Iterator[tuple[sqlite3.Connection, sqlite3.Connection]]:
    migrated, modeled = schema_files
    with closing(sqlite3.connect(migrated)) as a, closing(sqlite3.connect(modeled)) as b:
        yield a, b


# --------------------------------------------------------------------------- 1 and 6: rows


def test_rows_written_at_001_survive_002_and_its_rollback(db_at_001):
    db, students, courses = db_at_001
    before = kept_snapshot(db)
    assert [len(before["students"][1]), len(before["courses"][1])] == [50, 20]
    assert dict(before["sqlite_sequence"]) == {"students": BIG_ID, "courses": BIG_ID + 5}
    assert_healthy(db)

    assert router(db).run(M003) == [M002, M003]
    assert migrator.applied_migrations(db) == [M001, M002, M003]
    assert table_exists(db, "student_courses")
    assert kept_snapshot(db) == before
    assert_healthy(db)

    router(db).rollback()
    assert migrator.applied_migrations(db) == [M001, M002]
    assert kept_snapshot(db) == before
    router(db).rollback()
    assert migrator.applied_migrations(db) == [M001]
    assert not table_exists(db, "student_courses")
    assert kept_snapshot(db) == before
    assert plain_rows(db, "students") == students
    assert plain_rows(db, "courses") == courses
    assert_healthy(db)


def test_rollback_with_enrollments_keeps_students_and_courses_and_002_reapplies(db_at_001):
    db, students, _ = db_at_001
    assert router(db).run(M002) == [M002]
    created_sql = [row for row in master(db) if row[2] == "student_courses"]
    pairs = insert_enrollments(db)
    assert len(pairs) == 76  # 40 students x 2 courses; 4 of them draw one course twice
    assert plain_rows(db, "student_courses")[0][:2] == pairs[0]
    assert_healthy(db)
    # The foreign keys are real and enforced: an enrollment of a missing student is refused.
    with pytest.raises(pw.IntegrityError), db.atomic():
        db.execute_sql(
            "INSERT INTO student_courses (student_id, course_id, enroll_time) VALUES (?, ?, ?)",
            (8, 1, str(BASE_TIME)),
        )
    before = kept_snapshot(db)
    assert sum(row[5][0] for row in before["courses"][1]) == len(pairs)  # enrolled_count

    router(db).rollback()
    assert migrator.applied_migrations(db) == [M001]
    assert not table_exists(db, "student_courses")
    assert kept_snapshot(db) == before
    assert_healthy(db)

    assert router(db).run(M002) == [M002]
    assert migrator.applied_migrations(db) == [M001, M002]
    assert [row for row in master(db) if row[2] == "student_courses"] == created_sql
    assert plain_rows(db, "student_courses") == []
    assert kept_snapshot(db) == before
    # The table is usable again, and ids are still never reused after the round trip.
    db.execute_sql(
        "INSERT INTO student_courses (student_id, course_id, enroll_time) VALUES (?, ?, ?)",
        (students[0][0], 1, str(BASE_TIME)),
    )
    db.execute_sql("DELETE FROM students WHERE id = ?", (BIG_ID,))
    cursor = db.execute_sql(
        "INSERT INTO students (name, email, email_key, create_time) VALUES ('n', 'e', 'e', 'x')"
    )
    assert cursor.lastrowid > BIG_ID
    assert_healthy(db)


def test_every_step_of_001_002_rollback_002_keeps_every_row(app_database):
    """The app's database object and server.schema, as the CLI uses them."""
    db = app_database
    with db.connection_context():
        assert router(db).run(M001) == [M001]
        students, courses = insert_students_and_courses(db)

    def check(step: str, applied: list[str], has_join_table: bool) -> None:
        with db.connection_context():
            assert migrator.applied_migrations(db) == applied, step
            assert table_exists(db, "student_courses") is has_join_table, step
            counts = [
                db.execute_sql(f"SELECT count(*) FROM {t}").fetchone()[0] for t in KEPT_TABLES
            ]
            assert counts == [50, 20], step
            assert v1_rows(db, "students") == students, step
            assert v1_rows(db, "courses") == courses, step
            assert_healthy(db)

    check("001", [M001], False)
    assert migrator.migrate(db) == [M002, M003, M004, M005, M006]
    check("001 to 006", ALL_MIGRATIONS, True)
    assert migrator.rollback(db) == M006
    check("rollback 006", [M001, M002, M003, M004, M005], True)
    assert migrator.rollback(db) == M005
    check("rollback 005", [M001, M002, M003, M004], True)
    assert migrator.rollback(db) == M004
    check("rollback 004", [M001, M002, M003], True)
    assert migrator.rollback(db) == M003
    check("rollback 003", [M001, M002], True)
    assert migrator.rollback(db) == M002
    check("rollback 002", [M001], False)
    assert migrator.migrate(db) == [M002, M003, M004, M005, M006]
    check("002 again", ALL_MIGRATIONS, True)
    with db.connection_context():
        assert migrator.pending_migrations(db) == []


# --------------------------------------------------------------------------- 2: idempotence


def test_migrating_twice_is_a_noop(open_db):
    db = open_db("twice.db")
    assert router(db).run() == ALL_MIGRATIONS
    insert_students_and_courses(db)
    history_before, master_before = history(db), master(db)
    rows_before = kept_snapshot(db)
    assert [name for _, name, _ in history_before] == ALL_MIGRATIONS

    assert router(db).run() == []
    assert migrator.migrate(db) == []
    assert migrator.pending_migrations(db) == []
    assert history(db) == history_before
    assert master(db) == master_before
    assert kept_snapshot(db) == rows_before


# --------------------------------------------------------------------------- 3: schema == models


def columns(conn: sqlite3.Connection, table: str) -> list[tuple]:
    """(name, declared type, notnull, default, pk position) per column, in order."""
    return [tuple(row[1:]) for row in conn.execute(f'PRAGMA table_info("{table}")')]


def indexes(conn: sqlite3.Connection, table: str) -> list[tuple]:
    """(unique, origin, partial, columns in order, DDL without the index name), name-blind."""
    out = []
    for _, name, unique, origin, partial in conn.execute(f'PRAGMA index_list("{table}")'):
        cols = tuple(row[2] for row in conn.execute(f'PRAGMA index_info("{name}")'))
        (sql,) = conn.execute("SELECT sql FROM sqlite_master WHERE name = ?", (name,)).fetchone()
        sql = None if sql is None else re.sub(r'INDEX "[^"]+"', "INDEX ?", " ".join(sql.split()))
        out.append((unique, origin, partial, cols, sql))
    return sorted(out, key=repr)


def index_names(conn: sqlite3.Connection, table: str) -> list[tuple[str, tuple]]:
    out = []
    for _, name, *_ in conn.execute(f'PRAGMA index_list("{table}")'):
        if not name.startswith("sqlite_autoindex_"):
            cols = tuple(row[2] for row in conn.execute(f'PRAGMA index_info("{name}")'))
            out.append((name, cols))
    return sorted(out)


def foreign_keys(conn: sqlite3.Connection, table: str) -> list[tuple]:
    """(parent table, [(from, to)...], on_update, on_delete, match), one per constraint."""
    grouped: dict[int, list] = {}
    for fk_id, seq, parent, frm, to, on_update, on_delete, match in conn.execute(
        f'PRAGMA foreign_key_list("{table}")'
    ):
        entry = grouped.setdefault(fk_id, [parent, [], on_update, on_delete, match])
        entry[1].append((seq, frm, to))
    return sorted(
        (p, tuple(c[1:] for c in sorted(cols)), u, d, m) for p, cols, u, d, m in grouped.values()
    )


def create_sql(conn: sqlite3.Connection, table: str) -> str:
    (sql,) = conn.execute(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
    ).fetchone()
    return " ".join(sql.split())


def test_the_same_tables_exist(schema_conns):
    migrated, modeled = schema_conns
    query = "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
    from_migrations = {row[0] for row in migrated.execute(query)} - {"migratehistory"}
    from_models = {row[0] for row in modeled.execute(query)}
    assert from_migrations == from_models == {*TABLES, "sqlite_sequence"}


EXPECTED_COLUMNS = {
    "students": [
        ("id", "INTEGER", 1, None, 1),
        ("name", "VARCHAR(200)", 1, None, 0),
        ("email", "VARCHAR(254)", 1, None, 0),
        ("email_key", "VARCHAR(512)", 1, None, 0),
        ("create_time", "DATETIME", 1, None, 0),
        ("update_time", "DATETIME", 0, None, 0),
        ("version", "INTEGER", 1, "1", 0),
    ],
    "courses": [
        ("id", "INTEGER", 1, None, 1),
        ("code", "VARCHAR(32)", 1, None, 0),
        ("code_key", "VARCHAR(512)", 1, None, 0),
        ("title", "VARCHAR(200)", 1, None, 0),
        ("capacity", "INTEGER", 1, None, 0),
        ("enrolled_count", "INTEGER", 1, None, 0),
        ("create_time", "DATETIME", 1, None, 0),
        ("waitlist_capacity", "INTEGER", 1, "0", 0),
        ("waitlisted_count", "INTEGER", 1, "0", 0),
        ("waitlist_joins", "INTEGER", 1, "0", 0),
        ("update_time", "DATETIME", 0, None, 0),
        ("version", "INTEGER", 1, "1", 0),
    ],
    "student_courses": [
        ("student_id", "INTEGER", 1, None, 1),
        ("course_id", "INTEGER", 1, None, 2),
        ("enroll_time", "DATETIME", 1, None, 0),
        ("state", "INTEGER", 1, "1", 0),
        ("join_number", "INTEGER", 1, "0", 0),
        ("promote_time", "DATETIME", 0, None, 0),
    ],
    "events": [
        ("sequence", "INTEGER", 1, None, 1),
        ("event_time", "DATETIME", 1, None, 0),
        ("type", "INTEGER", 1, None, 0),
        ("student_id", "INTEGER", 1, None, 0),
        ("course_id", "INTEGER", 1, None, 0),
        ("payload", "TEXT", 1, None, 0),
        ("request_id", "VARCHAR(128)", 1, None, 0),
        ("actor", "VARCHAR(64)", 1, None, 0),
    ],
    "event_counters": [
        ("name", "VARCHAR(16)", 1, None, 1),
        ("value", "INTEGER", 1, None, 0),
    ],
    "request_records": [
        ("request_id", "VARCHAR(36)", 1, None, 1),
        ("method", "VARCHAR(64)", 1, None, 0),
        ("fingerprint", "VARCHAR(64)", 1, None, 0),
        ("response", "BLOB", 1, None, 0),
        ("create_time", "DATETIME", 1, None, 0),
    ],
}


@pytest.mark.parametrize("table", TABLES)
def test_columns_match_the_models(schema_conns, table):
    migrated, modeled = schema_conns
    assert columns(migrated, table) == columns(modeled, table)
    assert columns(migrated, table) == EXPECTED_COLUMNS[table]


EXPECTED_INDEX_COLUMNS = {
    "students": [(1, ("email_key",))],
    "courses": [(1, ("code_key",))],
    "student_courses": [
        (0, ("course_id", "state", "join_number")),
        (0, ("course_id", "student_id")),
        (1, ("student_id", "course_id")),
    ],
    "events": [(0, ("course_id", "sequence")), (0, ("student_id", "sequence"))],
    "event_counters": [(1, ("name",))],
    "request_records": [(0, ("create_time",)), (1, ("request_id",))],
}


@pytest.mark.parametrize("table", TABLES)
def test_indexes_match_the_models(schema_conns, table):
    migrated, modeled = schema_conns
    assert indexes(migrated, table) == indexes(modeled, table)
    got = sorted((unique, cols) for unique, _, _, cols, _ in indexes(migrated, table))
    assert got == EXPECTED_INDEX_COLUMNS[table]


@pytest.mark.parametrize("table", TABLES)
def test_index_names_match_the_models(schema_conns, table):
    migrated, modeled = schema_conns
    if table != "event_counters":  # its primary key is its only index
        assert index_names(modeled, table), "the models declare a named index on every table"
    assert index_names(migrated, table) == index_names(modeled, table)


EXPECTED_FOREIGN_KEYS = {
    "students": [],
    "courses": [],
    "student_courses": [
        ("courses", (("course_id", "id"),), "NO ACTION", "RESTRICT", "NONE"),
        ("students", (("student_id", "id"),), "NO ACTION", "RESTRICT", "NONE"),
    ],
    "events": [],  # events outlive what they name
    "event_counters": [],
    "request_records": [],
}


@pytest.mark.parametrize("table", TABLES)
def test_foreign_keys_match_the_models(schema_conns, table):
    migrated, modeled = schema_conns
    assert foreign_keys(migrated, table) == foreign_keys(modeled, table)
    assert foreign_keys(migrated, table) == EXPECTED_FOREIGN_KEYS[table]


@pytest.mark.parametrize("table", TABLES)
def test_create_table_sql_matches_the_models(schema_conns, table):
    """Covers what PRAGMAs do not show: CHECK constraints and AUTOINCREMENT."""
    migrated, modeled = schema_conns
    assert create_sql(migrated, table) == create_sql(modeled, table)
    sql = create_sql(migrated, table)
    if table in ("students", "courses"):
        assert '"id" INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT' in sql
    if table == "courses":
        assert '"capacity" INTEGER NOT NULL CHECK (capacity >= 0)' in sql
        assert '"enrolled_count" INTEGER NOT NULL CHECK (enrolled_count >= 0)' in sql
        assert "CHECK (capacity = 0 OR enrolled_count <= capacity)" in sql
        assert (
            '"waitlist_capacity" INTEGER NOT NULL DEFAULT 0 CHECK (waitlist_capacity >= 0)' in sql
        )
        assert '"waitlisted_count" INTEGER NOT NULL DEFAULT 0 CHECK (waitlisted_count >= 0)' in sql
    if table == "student_courses":
        assert '"state" INTEGER NOT NULL DEFAULT 1 CHECK (state IN (1, 2))' in sql


NEW_ROW_SQL = {
    "students": "INSERT INTO students (name, email, email_key, create_time) "
    "VALUES ('n', 'e', lower(hex(randomblob(8))), '2024-01-01 00:00:00')",
    "courses": "INSERT INTO courses (code, code_key, title, capacity, enrolled_count, "
    "create_time) VALUES ('c', lower(hex(randomblob(8))), 't', 0, 0, '2024-01-01 00:00:00')",
}


@pytest.mark.parametrize("table", ["students", "courses"])
@pytest.mark.parametrize("source", ["migrations", "models"])
def test_ids_are_never_reused(tmp_path, table, source):
    path = tmp_path / f"{source}.db"
    (build_migrated if source == "migrations" else build_from_models)(path)
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        ids = [conn.execute(NEW_ROW_SQL[table]).lastrowid for _ in range(3)]
        assert ids == sorted(ids) and len(set(ids)) == 3
        conn.execute(f"DELETE FROM {table} WHERE id = ?", (ids[-1],))
        after_delete = conn.execute(NEW_ROW_SQL[table]).lastrowid
        assert after_delete > ids[-1]
        conn.execute(f"DELETE FROM {table}")
        after_emptied = conn.execute(NEW_ROW_SQL[table]).lastrowid
        assert after_emptied > after_delete


def test_the_migrated_schema_enforces_its_constraints(tmp_path):
    path = tmp_path / "constraints.db"
    build_migrated(path)
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("PRAGMA foreign_keys = 1")
        ins_student = "INSERT INTO students (id, name, email, email_key, create_time) "
        conn.execute(ins_student + "VALUES (1, 'A', 'A@x.org', 'a@x.org', 't')")
        with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
            conn.execute(ins_student + "VALUES (2, 'B', 'a@X.org', 'a@x.org', 't')")
        ins_course = (
            "INSERT INTO courses (id, code, code_key, title, capacity, enrolled_count, "
            "create_time) VALUES (?, ?, ?, 'T', ?, ?, 't')"
        )
        conn.execute(ins_course, (1, "C1", "c1", 2, 2))
        conn.execute(ins_course, (2, "C2", "c2", 0, 99))  # capacity 0 means unlimited
        for bad in [(3, "C3", "c1", 0, 0), (4, "C4", "c4", -1, 0), (5, "C5", "c5", 0, -1)]:
            with pytest.raises(sqlite3.IntegrityError):
                conn.execute(ins_course, bad)
        with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
            conn.execute(ins_course, (6, "C6", "c6", 2, 3))
        # A v1.0 writer names only the v1.0 columns; the rest take their defaults.
        ins_enrollment = (
            "INSERT INTO student_courses (student_id, course_id, enroll_time) VALUES (?, ?, 't')"
        )
        conn.execute(ins_enrollment, (1, 1))
        assert conn.execute(
            "SELECT state, join_number, promote_time FROM student_courses"
        ).fetchall() == [(1, 0, None)]
        with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
            conn.execute("UPDATE student_courses SET state = 3")
        for column in ("waitlist_capacity", "waitlisted_count"):
            with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
                conn.execute(f"UPDATE courses SET {column} = -1 WHERE id = 1")
        with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
            conn.execute(ins_enrollment, (1, 1))
        with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"):
            conn.execute(ins_enrollment, (1, 99))
        with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"):
            conn.execute("DELETE FROM students WHERE id = 1")  # ON DELETE RESTRICT


# --------------------------------------------------------------------------- 4 and 5: CLIs


def run_cli(
    program: str, *args: str, cwd: Path, timeout: float = CLI_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    executable = BIN_DIR / program
    assert executable.exists(), f"console script {executable} is not installed"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENROLLMENT_")}
    return subprocess.run(
        [str(executable), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def server_cli(command: str, path: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    proc = run_cli("enrollment-server", command, "--database-url", sqlite_url(path), cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return proc


def test_enrollment_server_migrate_status_and_rollback(tmp_path, open_db):
    path = tmp_path / "cli.db"
    # A mistyped path is an error, not a new empty database; only migrate creates one.
    for command in ("status", "rollback", "serve"):
        proc = run_cli(
            "enrollment-server", command, "--database-url", sqlite_url(path), cwd=tmp_path
        )
        assert proc.returncode == 2 and "does not exist" in proc.stderr, proc.stderr
        assert "enrollment-server migrate" in proc.stderr and not path.exists()

    assert server_cli("migrate", path, tmp_path).stdout == f"applied {', '.join(ALL_MIGRATIONS)}\n"
    assert server_cli("migrate", path, tmp_path).stdout == "schema is up to date\n"
    status = server_cli("status", path, tmp_path).stdout.splitlines()
    assert status == [f"applied  {name}" for name in ALL_MIGRATIONS]

    db = open_db("cli.db")
    assert migrator.applied_migrations(db) == ALL_MIGRATIONS
    students, courses = insert_students_and_courses(db)
    insert_enrollments(db)
    db.close()

    # 006 and 005 drop their tables, empty here, and 004 only its own columns: their
    # rollbacks go through and keep every row.
    assert server_cli("rollback", path, tmp_path).stdout == f"rolled back {M006}\n"
    assert server_cli("rollback", path, tmp_path).stdout == f"rolled back {M005}\n"
    assert server_cli("rollback", path, tmp_path).stdout == f"rolled back {M004}\n"
    db.connect()
    before = kept_snapshot(db)
    v1_before = {table: v1_rows(db, table) for table in KEPT_TABLES}
    db.close()
    # 003 drops nothing: its rollback goes through.
    assert server_cli("rollback", path, tmp_path).stdout == f"rolled back {M003}\n"
    # Dropping student_courses would lose its rows: refused, and nothing changes.
    refused = run_cli(
        "enrollment-server", "rollback", "--database-url", sqlite_url(path), cwd=tmp_path
    )
    assert refused.returncode == 2, refused.stderr
    assert "student_courses" in refused.stderr and "--allow-data-loss" in refused.stderr
    assert "Traceback" not in refused.stderr
    db.connect()
    assert migrator.applied_migrations(db) == [M001, M002] and table_exists(db, "student_courses")
    db.close()

    proc = run_cli(
        "enrollment-server", "rollback", "--allow-data-loss", "--database-url", sqlite_url(path),
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stdout == f"rolled back {M002}\n", proc.stderr
    status = server_cli("status", path, tmp_path).stdout.splitlines()
    assert status == [f"applied  {M001}", *(f"pending  {m}" for m in ALL_MIGRATIONS[1:])]
    db.connect()
    assert migrator.applied_migrations(db) == [M001]
    assert not table_exists(db, "student_courses")
    assert kept_snapshot(db) == before
    assert_healthy(db)
    db.close()

    applied = f"applied {M002}, {M003}, {M004}, {M005}, {M006}\n"
    assert server_cli("migrate", path, tmp_path).stdout == applied
    db.connect()
    assert migrator.pending_migrations(db) == []
    assert {table: v1_rows(db, table) for table in KEPT_TABLES} == v1_before
    assert plain_rows(db, "students")[0][1] == students[0][1]
    assert len(plain_rows(db, "courses")) == len(courses)


def test_pw_migrate_cli_brings_a_fresh_database_to_head(tmp_path, open_db):
    path = tmp_path / "pw.db"
    proc = run_cli(
        "pw_migrate",
        "migrate",
        "--database",
        sqlite_url(path),
        "--directory",
        "migrations",
        cwd=REPO_ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr

    db = open_db("pw.db")
    assert migrator.applied_migrations(db) == ALL_MIGRATIONS
    assert migrator.pending_migrations(db) == []
    pw_master = master(db)
    db.close()
    status = server_cli("status", path, tmp_path).stdout.splitlines()
    assert status == [f"applied  {name}" for name in ALL_MIGRATIONS]
    assert server_cli("migrate", path, tmp_path).stdout == "schema is up to date\n"

    # The same schema as `enrollment-server migrate` builds.
    other = tmp_path / "server.db"
    server_cli("migrate", other, tmp_path)
    with closing(sqlite3.connect(other)) as conn:
        assert master(conn) == pw_master


@pytest.mark.parametrize("applied", [[], [M001]], ids=["empty", "at_001"])
def test_serve_refuses_a_database_behind_the_code(tmp_path, open_db, applied):
    path = tmp_path / "behind.db"
    db = open_db("behind.db")
    if applied:
        assert router(db).run(M001) == applied
        insert_students_and_courses(db)
    before = master(db)
    db.close()
    pending = [name for name in ALL_MIGRATIONS if name not in applied]

    try:
        proc = run_cli(
            "enrollment-server",
            "serve",
            "--address",
            "127.0.0.1:0",
            "--database-url",
            sqlite_url(path),
            cwd=tmp_path,
            timeout=SERVE_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"serve still running after {SERVE_TIMEOUT}s on a database behind the code")

    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "enrollment-server migrate" in lines[0]
    assert f"{len(pending)} pending migration(s), first {pending[0]}" in lines[0]
    # Refusing to start changed nothing.
    db.connect()
    assert master(db) == before
    assert migrator.applied_migrations(db) == applied


@pytest.mark.databases("sqlite", "postgresql", "mysql")
def test_a_second_migrate_waits_for_the_first(db_url):
    # On SQLite the second migrate waited only its 5 s busy timeout, then failed with
    # "database is locked"; the README says it waits, then finds nothing to do.
    with closing(engine.open_probe(db_url, timeout=10)) as holder:
        holder.connect()
        if isinstance(holder, pw.SqliteDatabase):
            holder.execute_sql("BEGIN EXCLUSIVE")
        elif isinstance(holder, pw.PostgresqlDatabase):
            holder.execute_sql("SELECT pg_advisory_lock(%s)", (migrator.LOCK_KEY,))
        else:
            holder.execute_sql("SELECT GET_LOCK(%s, 0)", (migrator.LOCK_NAME,))
        second = subprocess.Popen(
            [str(BIN_DIR / "enrollment-server"), "migrate", "--database-url", db_url],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        with contextlib.suppress(subprocess.TimeoutExpired):
            second.wait(timeout=8)  # longer than the 5 s of any of its timeouts
        waiting = second.poll() is None
        if isinstance(holder, pw.SqliteDatabase):
            holder.execute_sql("ROLLBACK")
    out, _ = second.communicate(timeout=60)
    assert waiting, out
    assert second.returncode == 0, out
