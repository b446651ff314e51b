"""Peewee models; the schema itself is built only by the migrations in migrations/."""

from __future__ import annotations

import datetime as dt
import sys
from typing import Any

import peewee as pw


class _Proxy(pw.DatabaseProxy):
    """peewee's proxy, except that a savepoint is the database's own: peewee's proxy
    makes its own, so PostgreSQL's serving pool would not see its savepoints to send
    them with the next statement (engine.PooledPostgresDatabase)."""

    def savepoint(self) -> Any:
        return self.obj.savepoint()


# The database every model uses: bound at start-up by engine.open_pool(), never at import.
proxy = _Proxy()

# Email and code uniqueness ignores case on every database, so it is decided by a
# unique index on a lower-cased key column computed here, not by a collation.
KEY_LENGTH = 512
# The longest name (and course title), email and course code the columns hold: the
# contract's limits, which validation enforces with these same numbers. They live here,
# beside the columns, because the domain may read persistence but not the other way round.
NAME_MAX = 200
EMAIL_MAX = 254
CODE_MAX = 32


def _utcnow() -> dt.datetime:
    """Naive UTC timestamp, as stored in every datetime column."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


# The same, made in one C call where it is not deprecated: the replace() above costs
# many times the now() (`make bench-micro`'s parts table times both forms), and a write
# takes several of these. Python 3.12 deprecates utcnow(); there the way above is taken.
utcnow = dt.datetime.utcnow if sys.version_info < (3, 12) else _utcnow


def lowercase_key(value: str) -> str:
    return value.lower()


class IdField(pw.BigAutoField):
    """64-bit id that is never handed out twice, also on SQLite (AUTOINCREMENT)."""

    def ddl(self, ctx: pw.Context) -> pw.NodeList:
        node = super().ddl(ctx)
        db = self.model._meta.database
        db = db.obj if isinstance(db, pw.DatabaseProxy) else db
        if isinstance(db, pw.SqliteDatabase):
            node = pw.NodeList((node, pw.SQL("AUTOINCREMENT")))
        return node


class TimestampField(pw.DateTimeField):
    """Naive UTC time to the microsecond on every database (MySQL's DATETIME alone keeps
    whole seconds, so there it is DATETIME(6))."""

    def ddl_datatype(self, ctx: pw.Context) -> pw.SQL:
        if _is_mysql(self.model._meta.database):
            return pw.SQL("DATETIME(6)")
        return super().ddl_datatype(ctx)

    def python_value(self, value: Any) -> Any:
        """SQLite's text as a datetime: datetime.fromisoformat reads what this field
        stores ('YYYY-MM-DD HH:MM:SS[.ffffff]') at once, where peewee's adapt first
        rewrites the text and tries its formats (about 0.7 us a value, two a row of a
        page). Anything else (the drivers' datetimes, other text) goes peewee's way."""
        if type(value) is str:
            try:
                return _fromisoformat(value)
            except ValueError:
                return super().python_value(value)  # type: ignore[no-untyped-call]
        return super().python_value(value)  # type: ignore[no-untyped-call]


_fromisoformat = dt.datetime.fromisoformat


def _is_mysql(db: pw.Database | pw.DatabaseProxy) -> bool:
    db = db.obj if isinstance(db, pw.DatabaseProxy) else db
    return isinstance(db, pw.MySQLDatabase)


# Enrollment.state as stored (the same numbers as the proto's EnrollmentState).
ENROLLED = 1
WAITLISTED = 2


def server_default(value: int) -> pw.SQL:
    """A constant DEFAULT in the column's DDL: migration 004 adds its NOT NULL columns
    with it, which PostgreSQL (11+), MariaDB (10.3+) and SQLite do without touching a
    row, and a v1.0 writer that names none of them still inserts valid rows."""
    return pw.SQL(f"DEFAULT {value}")


class BaseModel(pw.Model):
    class Meta:
        database = proxy
        legacy_table_names = False


class Student(BaseModel):
    id = IdField()
    name = pw.CharField(max_length=NAME_MAX)
    email = pw.CharField(max_length=EMAIL_MAX)
    email_key = pw.CharField(max_length=KEY_LENGTH, unique=True)
    create_time = TimestampField(default=utcnow)
    # Migration 004 on: NULL only for rows older than it (then = create_time; 004 fills
    # them), so that adding the column rewrites nothing.
    update_time = TimestampField(null=True)
    # Moves by one whenever name or email changes; the etag is made from it.
    version = pw.IntegerField(default=1, constraints=[server_default(1)])

    class Meta:
        table_name = "students"


class Course(BaseModel):
    id = IdField()
    code = pw.CharField(max_length=CODE_MAX)
    code_key = pw.CharField(max_length=KEY_LENGTH, unique=True)
    title = pw.CharField(max_length=NAME_MAX)
    capacity = pw.IntegerField(default=0, constraints=[pw.Check("capacity >= 0")])
    enrolled_count = pw.IntegerField(default=0, constraints=[pw.Check("enrolled_count >= 0")])
    create_time = TimestampField(default=utcnow)
    # Migration 004 on (see Student for update_time and version).
    waitlist_capacity = pw.IntegerField(
        default=0, constraints=[server_default(0), pw.Check("waitlist_capacity >= 0")]
    )
    waitlisted_count = pw.IntegerField(
        default=0, constraints=[server_default(0), pw.Check("waitlisted_count >= 0")]
    )
    # The join number of the latest entry to join the waitlist: raised by one, under the
    # course's row lock, by every entry that joins, so the waitlist's order is the order
    # of the commits, not of any clock.
    waitlist_joins = pw.BigIntegerField(default=0, constraints=[server_default(0)])
    update_time = TimestampField(null=True)
    version = pw.IntegerField(default=1, constraints=[server_default(1)])

    class Meta:
        table_name = "courses"
        constraints = [pw.SQL("CHECK (capacity = 0 OR enrolled_count <= capacity)")]


class StudentCourse(BaseModel):
    # The primary key covers lookups by student_id and the index below those by
    # course_id, so the foreign keys need no indexes of their own.
    student = pw.ForeignKeyField(
        Student, column_name="student_id", on_delete="RESTRICT", index=False
    )
    course = pw.ForeignKeyField(Course, column_name="course_id", on_delete="RESTRICT", index=False)
    # The ids the two keys hold, as peewee gives them (row.student_id): declared for
    # type checkers only (a bare annotation is no field).
    student_id: int
    course_id: int
    # When the entry was made (Enrollment.create_time): for an entry that never waited
    # also when it took its seat.
    enroll_time = TimestampField(default=utcnow)
    # Migration 004 on. ENROLLED or WAITLISTED; rows older than 004 are ENROLLED.
    state = pw.SmallIntegerField(
        default=ENROLLED,
        constraints=[server_default(ENROLLED), pw.Check(f"state IN ({ENROLLED}, {WAITLISTED})")],
    )
    # While WAITLISTED: the course's waitlist_joins when the entry joined (its place in
    # line: positions are 1 + the waiting entries of the course with a smaller number).
    # 0 once ENROLLED.
    join_number = pw.BigIntegerField(default=0, constraints=[server_default(0)])
    # When a waitlisted entry took its seat; NULL for an entry that never waited (its
    # seat was taken at enroll_time) and while waiting.
    promote_time = TimestampField(null=True)

    class Meta:
        table_name = "student_courses"
        primary_key = pw.CompositeKey("student", "course")
        # The roster of a course, in student order: (course_id, student_id); and its
        # waitlist in line order: (course_id, state, join_number).
        indexes = (
            (("course", "student"), False),
            (("course", "state", "join_number"), False),
        )


# EventCounter rows, each made by its first use; a missing one means 0.
SEQUENCE = "sequence"  # the highest sequence handed out (and committed)
PURGED = "purged"  # the highest sequence --event-retention has deleted; 0 = none
# Creates committed through the API, counted where their row lock makes creates of one
# kind take turns on PostgreSQL and MariaDB (outbox.take_turn): ids in commit order.
STUDENT_CREATES = "student_creates"
COURSE_CREATES = "course_creates"


class Event(BaseModel):
    """One change of the change feed, written in the transaction of the change (an
    outbox). sequence is given by EventCounter when the transaction ends (see
    persistence/outbox.py), not by an identity column."""

    sequence = pw.BigIntegerField(primary_key=True)
    event_time = TimestampField()
    type = pw.SmallIntegerField()  # the proto's EventType numbers
    # The ids the event concerns, 0 for none: the filters of ListEvents/WatchEvents.
    student_id = pw.BigIntegerField(default=0)
    course_id = pw.BigIntegerField(default=0)
    # The snapshots (student, course, enrollment) as JSON: plain data, no protobuf.
    payload = pw.TextField()
    request_id = pw.CharField(max_length=128, default="")
    actor = pw.CharField(max_length=64, default="")

    class Meta:
        table_name = "events"
        indexes = (
            (("student_id", "sequence"), False),
            (("course_id", "sequence"), False),
        )


class EventCounter(BaseModel):
    name = pw.CharField(max_length=16, primary_key=True)
    value = pw.BigIntegerField()

    class Meta:
        table_name = "event_counters"


class ResponseField(pw.BlobField):
    """Serialized response bytes: LONGBLOB on MySQL, whose BLOB stops at 64 KiB (a batch
    of 1000 results is larger)."""

    def ddl_datatype(self, ctx: pw.Context) -> pw.SQL:
        if _is_mysql(self.model._meta.database):
            return pw.SQL("LONGBLOB")
        return super().ddl_datatype(ctx)


class RequestRecord(BaseModel):
    """A successful call that carried a request_id (AIP-155), written in the transaction
    of its effect: a retry with the same id gets `response` back instead of running."""

    # The canonical lower-case UUID: the primary key decides concurrent duplicates.
    request_id = pw.CharField(max_length=36, primary_key=True)
    method = pw.CharField(max_length=64)
    # sha256 (hex) of the request serialized without its request_id.
    fingerprint = pw.CharField(max_length=64)
    response = ResponseField()
    # Purged after --request-id-retention, oldest first, by this index.
    create_time = TimestampField(index=True)

    class Meta:
        table_name = "request_records"


MODELS = (Student, Course, StudentCourse, Event, EventCounter, RequestRecord)
