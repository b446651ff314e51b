"""The request_records table (safe retries, AIP-155); no other table is touched.

Numbered 006: 005 belongs to the change feed, developed at the same time.
"""

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


class ResponseField(pw.BlobField):
    """LONGBLOB on MySQL (BLOB stops at 64 KiB). Frozen copy."""

    def ddl_datatype(self, ctx):
        if _is_mysql(self.model._meta.database):
            return pw.SQL("LONGBLOB")
        return super().ddl_datatype(ctx)


def migrate(migrator: Migrator, database: pw.Database, *, fake=False):
    @migrator.create_model
    class RequestRecord(pw.Model):
        request_id = pw.CharField(max_length=36, primary_key=True)
        method = pw.CharField(max_length=64)
        fingerprint = pw.CharField(max_length=64)
        response = ResponseField()
        create_time = TimestampField(index=True)

        class Meta:
            table_name = "request_records"
            legacy_table_names = False


def rollback(migrator: Migrator, database: pw.Database, *, fake=False):
    # Only the records go: a retry after the rollback runs as a new call.
    migrator.remove_model("request_records", cascade=False)
