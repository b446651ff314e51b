"""Create the students and courses tables."""

import datetime as dt

import peewee as pw
from peewee_migrate import Migrator


def _utcnow():
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class IdField(pw.BigAutoField):
    """64-bit id, never reused (AUTOINCREMENT on SQLite). Frozen copy."""

    def ddl(self, ctx):
        node = super().ddl(ctx)
        db = self.model._meta.database
        db = db.obj if isinstance(db, pw.DatabaseProxy) else db
        if isinstance(db, pw.SqliteDatabase):
            node = pw.NodeList((node, pw.SQL("AUTOINCREMENT")))
        return node


def migrate(migrator: Migrator, database: pw.Database, *, fake=False):
    @migrator.create_model
    class Student(pw.Model):
        id = IdField()
        name = pw.CharField(max_length=200)
        email = pw.CharField(max_length=254)
        email_key = pw.CharField(max_length=512, unique=True)
        create_time = pw.DateTimeField(default=_utcnow)

        class Meta:
            table_name = "students"
            legacy_table_names = False

    @migrator.create_model
    class Course(pw.Model):
        id = IdField()
        code = pw.CharField(max_length=32)
        code_key = pw.CharField(max_length=512, unique=True)
        title = pw.CharField(max_length=200)
        capacity = pw.IntegerField(default=0, constraints=[pw.Check("capacity >= 0")])
        enrolled_count = pw.IntegerField(default=0, constraints=[pw.Check("enrolled_count >= 0")])
        create_time = pw.DateTimeField(default=_utcnow)

        class Meta:
            table_name = "courses"
            legacy_table_names = False
            constraints = [pw.SQL("CHECK (capacity = 0 OR enrolled_count <= capacity)")]


def rollback(migrator: Migrator, database: pw.Database, *, fake=False):
    migrator.remove_model("courses")
    migrator.remove_model("students")
