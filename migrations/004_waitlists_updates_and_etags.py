"""Waitlists, updates and etags: new columns whose defaults mean exactly v1.0.

Every NOT NULL column is added with a constant DEFAULT and no UPDATE (PostgreSQL 11+
and MariaDB 10.3+ add such a column without rewriting the table; SQLite never
rewrites on ADD COLUMN): courses get no waitlist (waitlist_capacity 0, nobody
waiting), every enrollment is ENROLLED, every student and course is at version 1 (its
etag). The nullable promote_time means "never waited" for every old enrollment, whose
enroll_time stays both when the entry was made and when the seat was taken. Only the
small students and courses tables are written to: update_time = create_time. The one
index added is built beside the join table, not by rewriting it.
"""

import peewee as pw
from peewee_migrate import Migrator

ENROLLED, WAITLISTED = 1, 2


def _is_mysql(db) -> bool:
    db = db.obj if isinstance(db, pw.DatabaseProxy) else db
    return isinstance(db, pw.MySQLDatabase)


class TimestampField(pw.DateTimeField):
    """Naive UTC time to the microsecond (DATETIME(6) on MySQL). Frozen copy."""

    def ddl_datatype(self, ctx):
        if _is_mysql(self.model._meta.database):
            return pw.SQL("DATETIME(6)")
        return super().ddl_datatype(ctx)


def _default(value: int) -> pw.SQL:
    return pw.SQL(f"DEFAULT {value}")


def _fields():
    """Frozen copies of the fields 004 adds, per table."""
    return {
        "students": {
            "update_time": TimestampField(null=True),
            "version": pw.IntegerField(default=1, constraints=[_default(1)]),
        },
        "courses": {
            "waitlist_capacity": pw.IntegerField(
                default=0, constraints=[_default(0), pw.Check("waitlist_capacity >= 0")]
            ),
            "waitlisted_count": pw.IntegerField(
                default=0, constraints=[_default(0), pw.Check("waitlisted_count >= 0")]
            ),
            "waitlist_joins": pw.BigIntegerField(default=0, constraints=[_default(0)]),
            "update_time": TimestampField(null=True),
            "version": pw.IntegerField(default=1, constraints=[_default(1)]),
        },
        "student_courses": {
            "state": pw.SmallIntegerField(
                default=ENROLLED,
                constraints=[
                    _default(ENROLLED),
                    pw.Check(f"state IN ({ENROLLED}, {WAITLISTED})"),
                ],
            ),
            "join_number": pw.BigIntegerField(default=0, constraints=[_default(0)]),
            "promote_time": TimestampField(null=True),
        },
    }


INDEX_COLUMNS = ["course_id", "state", "join_number"]


def migrate(migrator: Migrator, database: pw.Database, *, fake=False):
    # fake: peewee-migrate replays the plan without a database (its queries are mocked).
    done = set() if fake else _done_before(database)
    for table, fields in _fields().items():
        missing = {name: field for name, field in fields.items() if (table, name) not in done}
        # allow_not_null: ADD COLUMN … NOT NULL DEFAULT <constant> in one statement,
        # instead of playhouse's add-nullable, UPDATE every row, then SET NOT NULL.
        if missing:
            migrator.add_fields(table, allow_not_null=True, **missing)
    migrator.sql("UPDATE students SET update_time = create_time WHERE update_time IS NULL")
    migrator.sql("UPDATE courses SET update_time = create_time WHERE update_time IS NULL")
    if ("student_courses", "index") not in done:
        migrator.add_index("student_courses", "course", "state", "join_number")


def _done_before(database: pw.Database) -> set[tuple[str, str]]:
    """On MariaDB, what an earlier run of 004 that stopped part way (a lock wait that ran
    out, a lost connection) left behind: MariaDB commits each ALTER TABLE by itself, so
    such a run keeps the columns it added; running 004 again adds only the rest. Empty
    on SQLite and PostgreSQL, where 004 runs in one transaction and a stopped run
    leaves nothing."""
    if not _is_mysql(database):
        return set()
    done = {(table, column.name) for table in _fields() for column in database.get_columns(table)}
    if any(index.columns == INDEX_COLUMNS for index in database.get_indexes("student_courses")):
        done.add(("student_courses", "index"))
    return done


# What rolling 004 back loses that v1.0 has no column for, each with the query that
# counts it: the rollback command refuses while a count is above zero unless told
# --allow-data-loss (server/persistence/migrator.py reads this before anything runs).
# Versions (etags) and update times are not listed: going up again gives every student
# and course a first version, updated when created, as for any v1.0 row.
LOST_BY_ROLLBACK = {
    "the waitlist capacity of {} courses": (
        "SELECT COUNT(*) FROM courses WHERE waitlist_capacity <> 0"
    ),
}


def rollback(migrator: Migrator, database: pw.Database, *, fake=False):
    # v1.0 would read a waitlisted entry as an enrollment (and its course's counts
    # would no longer match): refuse while anyone waits, before anything changes.
    migrator.run(_refuse_waitlisted_entries, database)
    migrator.drop_index("student_courses", "course", "state", "join_number")
    for table, fields in reversed(list(_fields().items())):
        migrator.remove_fields(table, *fields)


class WaitlistedEntries(RuntimeError):
    """Rolling 004 back would turn waitlisted entries into enrollments."""


def _refuse_waitlisted_entries(database: pw.Database) -> None:
    cursor = database.execute_sql(
        f"SELECT COUNT(*) FROM student_courses WHERE state = {WAITLISTED}"
    )
    (waiting,) = cursor.fetchone()
    if waiting:
        raise WaitlistedEntries(
            f"rolling back 004 would turn {waiting} waitlisted entries into enrollments; "
            "drop them (DropCourse) first. Nothing was changed."
        )
