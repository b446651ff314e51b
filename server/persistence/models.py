"""Peewee models; the schema itself is built only by the migrations in migrations/."""

from __future__ import annotations

import datetime as dt

import peewee as pw

# The database every model uses: bound at start-up by engine.open_pool(), never at import.
proxy = pw.DatabaseProxy()

# Email and code uniqueness ignores case on every database, so it is decided by a
# unique index on a lower-cased key column computed here, not by a collation.
KEY_LENGTH = 512
# The longest name (and course title), email and course code the columns hold: the
# contract's limits, which validation enforces with these same numbers. They live here,
# beside the columns, because the domain may read persistence but not the other way round.
NAME_MAX = 200
EMAIL_MAX = 254
CODE_MAX = 32


def utcnow() -> dt.datetime:
    """Naive UTC timestamp, as stored in every datetime column."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def lowercase_key(value: str) -> str:
    return value.lower()


class IdField(pw.BigAutoField):
    """64-bit id that is never handed out twice, also on SQLite (AUTOINCREMENT)."""

    def ddl(self, ctx):
        node = super().ddl(ctx)
        db = self.model._meta.database
        db = db.obj if isinstance(db, pw.DatabaseProxy) else db
        if isinstance(db, pw.SqliteDatabase):
            node = pw.NodeList((node, pw.SQL("AUTOINCREMENT")))
        return node


class TimestampField(pw.DateTimeField):
    """Naive UTC time to the microsecond on every database (MySQL's DATETIME alone keeps
    whole seconds, so there it is DATETIME(6))."""

    def ddl_datatype(self, ctx):
        if _is_mysql(self.model._meta.database):
            return pw.SQL("DATETIME(6)")
        return super().ddl_datatype(ctx)


def _is_mysql(db) -> bool:
    db = db.obj if isinstance(db, pw.DatabaseProxy) else db
    return isinstance(db, pw.MySQLDatabase)


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
    enroll_time = TimestampField(default=utcnow)

    class Meta:
        table_name = "student_courses"
        primary_key = pw.CompositeKey("student", "course")
        # The roster of a course, in student order: (course_id, student_id).
        indexes = ((("course", "student"), False),)


MODELS = (Student, Course, StudentCourse)
