"""The change feed: the events table and its counters; no other table is touched."""

import peewee as pw
from peewee_migrate import Migrator


def _is_mysql(db) -> bool:
    db = db.obj if isinstance(db, pw.DatabaseProxy) else db
    return isinstance(db, pw.MySQLDatabase)


class TimestampField(pw.DateTimeField):
    """Naive UTC time to the microsecond (DATETIME(6) on MySQL). Frozen copy."""

    def ddl_datatype(self, ctx):
        if _is_mysql(self.model._meta.database):
            return pw.SQL("DATETIME(6)")
        return super().ddl_datatype(ctx)


def migrate(migrator: Migrator, database: pw.Database, *, fake=False):
    @migrator.create_model
    class Event(pw.Model):
        sequence = pw.BigIntegerField(primary_key=True)
        event_time = TimestampField()
        type = pw.SmallIntegerField()
        student_id = pw.BigIntegerField(default=0)
        course_id = pw.BigIntegerField(default=0)
        payload = pw.TextField()
        request_id = pw.CharField(max_length=128, default="")
        actor = pw.CharField(max_length=64, default="")

        class Meta:
            table_name = "events"
            legacy_table_names = False
            indexes = (
                (("student_id", "sequence"), False),
                (("course_id", "sequence"), False),
            )

    @migrator.create_model
    class EventCounter(pw.Model):
        name = pw.CharField(max_length=16, primary_key=True)
        value = pw.BigIntegerField()

        class Meta:
            table_name = "event_counters"
            legacy_table_names = False

    # No rows: a counter is made by its first use (see persistence/outbox.py), so that
    # rolling back a feed nobody wrote to drops no rows.


def rollback(migrator: Migrator, database: pw.Database, *, fake=False):
    migrator.remove_model("event_counters", cascade=False)
    migrator.remove_model("events", cascade=False)
