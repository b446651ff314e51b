"""Create the student_courses join table; no other table is touched."""

import datetime as dt

import peewee as pw
from peewee_migrate import Migrator


def _utcnow():
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def migrate(migrator: Migrator, database: pw.Database, *, fake=False):
    # The frozen students and courses models as 001 left them.
    Student = migrator.orm["students"]
    Course = migrator.orm["courses"]

    @migrator.create_model
    class StudentCourse(pw.Model):
        student = pw.ForeignKeyField(
            Student, column_name="student_id", on_delete="RESTRICT", index=False
        )
        course = pw.ForeignKeyField(
            Course, column_name="course_id", on_delete="RESTRICT", index=False
        )
        enroll_time = pw.DateTimeField(default=_utcnow)

        class Meta:
            table_name = "student_courses"
            legacy_table_names = False
            primary_key = pw.CompositeKey("student", "course")
            indexes = ((("course", "student"), False),)


def rollback(migrator: Migrator, database: pw.Database, *, fake=False):
    # Drops only the join table: students and courses keep every row.
    migrator.remove_model("student_courses", cascade=False)
